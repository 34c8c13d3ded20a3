"""PSC speed (and, with --rd, rate-distortion on the bundled demo UNet).

    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.05 0.1 0.2 --backend fast   # 256², random weights
    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.05 0.1 0.2 --backend eager
    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.1 --max-rounds 4
    python benchmarks/psc.py --smoke [--backend fast]                           # CPU, tiny; numbers mean nothing
    python benchmarks/psc.py --rd --device cpu --size 64 --s 8 --r 6 --steps 10 --bpp 0.2

Speed mode: a UNet of the preset with random weights (timing does not depend on them) and a
random image, in the compute mode of --backend/--dtype (default: fast bf16 on CUDA, eager fp32
otherwise; "compute" in the JSON). Reports UNet sample evaluations per second (the sampler's x̂0
of the round's batch of s samples, as PSC runs it: a CUDA graph replay on the fast path; median
of --repeats after --warmup), then, under "rates", seconds per round and per image for encode
and decode (rows rebuilt and checked, then the restoration) at each rate of --bpp, or at
--rounds. With --max-rounds below the rounds a rate needs, only that many rounds run and the
per-image seconds are per-round seconds x rounds, marked "extrapolated" (an underestimate: the
row recipe's cost grows with the rows already sent). The round-0 cache is off (every round is
timed as the work it is).

RD mode (--rd): the demo UNet (idemrt/demo_models, trained on 64x64 crops) codes a held-out
photograph resized to --size at the (first) rate of --bpp; one decode rebuilds and checks all rows, then
every prefix of rounds is restored (projected and guided), and the table lists payload bpp,
file bpp and PSNR (peak 1, on the [0, 1] image) per prefix, with the linear estimate Hᵀy_q as
a reference.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

from idemrt import bitstream as bsfmt
from idemrt import psc
from idemrt.psc import stream
from idemrt.psc.sampling import DTYPES, deterministic
from idemrt.models.unet import PRESETS, ADMUNet, UNetConfig

TINY_UNET = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                       attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True,
                       resblock_updown=True)
UNETS = {**PRESETS, "tiny": TINY_UNET}


def build_unet(preset: str, device: torch.device) -> ADMUNet:
    """Random weights, initialised on the device; ADM's zero-initialised layers get small noise."""
    with torch.device(device):
        unet = ADMUNet(UNETS[preset])
        with torch.no_grad():
            for p in unet.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    return unet.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_evals_per_second(den, batch: int, size: int, warmup: int, repeats: int) -> float:
    """Sample evaluations per second of the sampler's x̂0 as PSC runs it (the compute mode's
    denoiser, under PSC's cuDNN settings): one call evaluates the round's batch once."""
    x = torch.randn(batch, 3, size, size, device=den.device)
    times = []
    with deterministic(), torch.no_grad():
        for k in range(warmup + repeats):
            _sync(den.device)
            t0 = time.perf_counter()
            den.x0(x, den.steps // 2)
            _sync(den.device)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def speed(args) -> dict:
    device = torch.device(args.device)
    unet = build_unet(args.preset, device)
    size = args.size or UNETS[args.preset].image_size
    mode = dict(backend=args.backend, dtype=DTYPES.get(args.dtype))
    enc = psc.Encoder(unet, s=args.s, r=args.r, steps=args.steps, device=device, cache=False, **mode)
    dec = psc.Decoder(unet, device=device, cache=False, **mode)
    out = {"device": _describe(device), "preset": args.preset, "size": size, "s": args.s, "r": args.r,
           "steps": args.steps, "compute": str(enc.compute),
           "unet_evals_per_s": unet_evals_per_second(enc.denoiser, args.s, size, args.warmup, args.repeats)}
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    if args.rounds:
        rates = [args.rounds]
    else:
        rates = [psc.rounds_for_bpp(enc.params, bpp, size, size) for bpp in args.bpp]
    out["rates"] = [_time_rate(args, enc, dec, image, rounds) for rounds in rates]
    return out


def _time_rate(args, enc, dec, image, rounds: int) -> dict:
    """Encode and decode ``image`` at ``rounds`` rounds (at most --max-rounds run, then extrapolated)."""
    device, size = enc.device, image.shape[-1]
    run_rounds = min(rounds, args.max_rounds or rounds)
    _sync(device)
    t0 = time.perf_counter()
    data = enc.encode(image, rounds=run_rounds)
    _sync(device)
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec.decode(data, output="tensor")
    _sync(device)
    dec_s = time.perf_counter() - t0
    rows_s, restore_s = dec.last.timings["rows"], dec.last.timings["restoration"]
    h, y, code = dec.measurements(data)
    t1 = time.perf_counter()
    dec.restore(h, y, (1, 3, code.padded_height, code.padded_width), args.steps, "guided")
    _sync(device)
    guided_s = time.perf_counter() - t1
    per_round_enc, per_round_dec = enc_s / run_rounds, rows_s / run_rounds
    return {
        "bpp": 8 * stream.payload_bytes(enc.params, rounds) / (size * size),
        "rounds": rounds,
        "rounds_run": run_rounds,
        "extrapolated": run_rounds < rounds,
        "encode_s_per_round": per_round_enc,
        "decode_rows_s_per_round": per_round_dec,
        "projected_restoration_s": restore_s,
        "guided_restoration_s": guided_s,
        "encode_s_per_image": per_round_enc * rounds,
        "decode_s_per_image": per_round_dec * rounds + restore_s,
        "decode_guided_s_per_image": per_round_dec * rounds + guided_s,
        "measured_encode_s": enc_s,
        "measured_decode_s": dec_s,
    }


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


# --------------------------------------------------------------------------- rate-distortion


def rate_distortion(args) -> dict:
    from PIL import Image

    from idemrt.demo import DEMO_IMAGES, demo_file, load_demo_unet
    from idemrt.images import load_image

    device = torch.device(args.device)
    unet = load_demo_unet(device)
    size = args.size or 64
    with demo_file(f"{args.image or DEMO_IMAGES[0]}.png").open("rb") as f:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
    x = load_image(img)
    mode = dict(backend=args.backend, dtype=DTYPES.get(args.dtype))
    enc = psc.Encoder(unet, s=args.s, r=args.r, steps=args.steps, seed=0, device=device, cache=False, **mode)
    t0 = time.perf_counter()
    data = enc.encode(x, bpp=args.bpp[0]) if args.rounds is None else enc.encode(x, rounds=args.rounds)
    enc_s = time.perf_counter() - t0
    dec = psc.Decoder(unet, device=device, cache=False, **mode)
    t0 = time.perf_counter()
    h, y, code = dec.measurements(data)
    rows_s = time.perf_counter() - t0
    p, shape = code.params, (1, 3, code.padded_height, code.padded_width)
    rows = []
    prefixes = sorted({max(1, round(code.rounds * f)) for f in (0.125, 0.25, 0.5, 1.0)})
    for k in prefixes:
        hk, yk = h[: k * p.r], y[: k * p.r]
        prefix = psc.truncate(data, k) if k < code.rounds else data
        info = bsfmt.describe(bsfmt.decode(prefix))
        row = {"rounds": k, "measurements": k * p.r, "bpp": info["bpp"], "file_bpp": info["file_bpp"]}
        row["psnr_linear"] = _psnr((yk @ hk).reshape(shape), x)
        for mode in psc.RESTORATIONS:
            row[f"psnr_{mode}"] = _psnr(dec.restore(hk, yk, shape, p.steps, mode), x)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    bs = bsfmt.decode(data)
    return {"device": _describe(device), "compute": str(enc.compute),
            "model": "idemrt demo UNet (64x64, 1.9M parameters)",
            "image": args.image or DEMO_IMAGES[0], "size": size, "s": p.s, "r": p.r, "steps": p.steps,
            "hash_bits": p.hash_bits, "entropy": bs.extra["entropy"],
            "measurement_bytes": len(code.codes), "measurement_stream_bytes": len(bs.streams[0]),
            "hash_bytes": len(bs.streams[1]), "encode_s": enc_s, "decode_rows_s": rows_s, "prefixes": rows}


def _psnr(x_pm1: torch.Tensor, ref01: torch.Tensor) -> float:
    img = ((x_pm1.float().cpu() + 1) / 2).clamp(0, 1)[..., : ref01.shape[-2], : ref01.shape[-1]]
    mse = float(((img - ref01) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="ffhq256", choices=sorted(UNETS))
    parser.add_argument("--size", type=int, help="image side (default: the preset's image_size; --rd: 64)")
    parser.add_argument("--s", type=int, default=16, help="posterior samples per round")
    parser.add_argument("--r", type=int, default=12, help="measurements per round")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--bpp", type=float, nargs="+", default=[0.1],
                        help="payload rates to time, each by its own encode and decode (--rd: the first)")
    parser.add_argument("--rounds", type=int, help="instead of --bpp")
    parser.add_argument("--backend", choices=["eager", "fast"], help="PSC compute mode (default: fast on CUDA, "
                                                                    "eager otherwise)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="UNet dtype of --backend fast (default bf16)")
    parser.add_argument("--max-rounds", type=int, help="run at most this many rounds and extrapolate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rd", action="store_true", help="rate-distortion on the demo UNet instead of speed")
    parser.add_argument("--image", help="--rd: demo image name (chelsea or coffee)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI): --device cpu --preset tiny "
                                                            "--size 16 --s 4 --r 2 --steps 3 --bpp 0.125 0.25")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.preset, args.size, args.s, args.r, args.steps = "cpu", "tiny", 16, 4, 2, 3
        args.bpp, args.rounds, args.warmup, args.repeats = [0.125, 0.25], None, 1, 2
    result = rate_distortion(args) if args.rd else speed(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
