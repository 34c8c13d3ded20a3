"""PSC speed (and, with --rd, rate-distortion on the bundled demo UNet).

    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.05 0.1 0.2 --backend fast   # 256², random weights
    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.05 0.1 0.2 --backend eager
    python benchmarks/psc.py --device cuda --preset ffhq256 --bpp 0.1 --max-rounds 4
    python benchmarks/psc.py --smoke [--backend fast]                           # CPU, tiny; numbers mean nothing
    python benchmarks/psc.py --rd --device cpu --size 64 --s 8 --r 7 --steps 10 --bpp 0.4 --image chelsea

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

RD mode (--rd): a held-out demo photograph (--image, resized to --size with PIL bicubic) is
coded three ways, all rows measured on that same image:

* the bundled demo codec (bmshj2018-hyperprior, one rate point) decoded as MSE, and
* the same bitstream decoded by idempotence (idemrt.Decoder with the demo's defaults: DDPM,
  --idem-steps = DEMO_STEPS, DPS scale DEMO_SCALE, seed 0), both through idemrt.demo.Pipeline,
  which also re-compresses them (recompress_mse, symbols_equal in the JSON);
* PSC with the demo UNet at the (first) rate of --bpp: one decode rebuilds and checks all rows,
  then each prefix (--prefixes, fractions of the rounds) is restored, projected and guided; the
  linear estimate Hᵀy_q (projection on the measured rows) is listed as a reference.

Every row has payload bpp (entropy-coded streams; PSC: measurements and row hashes), file bpp
(the whole .idm file) and, for the decode as saved in 8 bits, with idemrt.demo's definitions:

* psnr: dB, peak 255, against the original (mse: on the 0-255 scale);
* sharpness: mean squared finite-difference gradient over the original's (1 = as detailed as the
  original; blur scores below 1, invented or noisy detail above);
* patch_swd: sliced Wasserstein-1 distance between the 7x7 RGB patches of the decode and of the
  original (all positions, 0-255 scale, 128 random directions with seed 0; see patch_swd). It
  ignores where a patch is, so it compares texture statistics rather than pixels: 0 for the
  original, large for blur (too few strong patches) and for noise (too many). A crude stand-in
  for a distribution measure such as FID, which needs many images and Inception weights.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from idemrt import bitstream as bsfmt
from idemrt import psc
from idemrt.demo_assets import DEMO_IMAGES, DEMO_SCALE, DEMO_STEPS, demo_file, load_demo_codec, load_demo_unet
from idemrt.evaluation import Pipeline, as_8bit, gradient_energy, json_safe
from idemrt.images import mse255, psnr
from idemrt.psc import stream
from idemrt.defaults import DTYPE_CHOICES, dtype_from_name
from idemrt.psc.sampling import deterministic
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
    mode = dict(backend=args.backend, dtype=dtype_from_name(args.dtype))
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


def rate_distortion(args, images: dict | None = None) -> dict:
    """The --rd report (see the module docstring). ``images``, if given, receives every row's decode
    in [0, 1] under the row's "name", and "original" (for tests; tensors stay out of the JSON)."""
    from PIL import Image

    from idemrt.images import load_image

    t_start = time.perf_counter()
    device = torch.device(args.device)
    unet = load_demo_unet(device)
    size = args.size or 64
    with demo_file(f"{args.image or DEMO_IMAGES[0]}.png").open("rb") as f:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
    x = load_image(img)
    images = {} if images is None else images
    images["original"] = x
    rows = _mse_codec_rows(args, unet, x, images)
    mode = dict(backend=args.backend, dtype=dtype_from_name(args.dtype))
    enc = psc.Encoder(unet, s=args.s, r=args.r, steps=args.steps, seed=0, device=device, cache=False, **mode)
    t0 = time.perf_counter()
    data = enc.encode(x, bpp=args.bpp[0]) if args.rounds is None else enc.encode(x, rounds=args.rounds)
    enc_s = time.perf_counter() - t0
    dec = psc.Decoder(unet, device=device, cache=False, **mode)
    t0 = time.perf_counter()
    h, y, code = dec.measurements(data)
    rows_s = time.perf_counter() - t0
    p, shape = code.params, (1, 3, code.padded_height, code.padded_width)
    prefixes = sorted({max(1, round(code.rounds * f)) for f in args.prefixes})
    for k in prefixes:
        hk, yk = h[: k * p.r], y[: k * p.r]
        prefix = psc.truncate(data, k) if k < code.rounds else data
        info = bsfmt.describe(bsfmt.unpack(prefix))
        rate = {"rounds": k, "measurements": k * p.r, "bpp": info["bpp"], "file_bpp": info["file_bpp"]}
        # "linear" (Hᵀy_q, the projection on the measured rows) is a reference, not a decode.
        decodes = [("linear", (yk @ hk).reshape(shape), None)]
        for restoration in psc.RESTORATIONS:
            t0 = time.perf_counter()
            restored = dec.restore(hk, yk, shape, p.steps, restoration)
            decodes.append((restoration, restored, time.perf_counter() - t0))
        for name, out, seconds in decodes:
            decoded = ((out.float().cpu() + 1) / 2)[..., : x.shape[-2], : x.shape[-1]]
            row = {"name": f"psc-{name}-{k}", "decode": f"PSC {name}", **rate, **quality(decoded, x)}
            if seconds is not None:
                row["seconds"] = seconds
            images[row["name"]] = decoded
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    bs = bsfmt.unpack(data)
    return {"device": _describe(device), "compute": str(enc.compute),
            "model": "idemrt demo UNet (64x64, 1.9M parameters) and demo codec (bmshj2018-hyperprior N=64 M=96)",
            "image": args.image or DEMO_IMAGES[0], "size": size, "resize": "PIL bicubic from the 128x128 PNG",
            "s": p.s, "r": p.r, "steps": p.steps, "hash_bits": p.hash_bits, "entropy": bs.extra["entropy"],
            "measurement_bytes": len(code.codes), "measurement_stream_bytes": len(bs.streams[0]),
            "hash_bytes": len(bs.streams[1]), "encode_s": enc_s, "decode_rows_s": rows_s,
            "idempotence": {"steps": args.idem_steps, "sampler": "ddpm", "guidance": "dps", "scale": DEMO_SCALE,
                            "seed": 0},
            "metrics": {"psnr": "dB, peak 255, of the decode saved as 8-bit against the original",
                        "sharpness": "idemrt.demo gradient energy of the 8-bit decode over the original's",
                        "patch_swd": f"sliced W1 distance of {SWD_PATCH}x{SWD_PATCH} patches, 0-255 scale "
                                     f"({SWD_DIRECTIONS} directions, seed 0)"},
            "wall_s": time.perf_counter() - t_start, "rows": rows}


def _mse_codec_rows(args, unet, x: torch.Tensor, images: dict) -> list[dict]:
    """The demo codec's MSE decode and the idempotence decode of ``x``, measured by idemrt.demo's
    Pipeline (which also re-compresses both), with the demo's defaults."""
    pipe = Pipeline(load_demo_codec(args.device), unet, steps=args.idem_steps, sampler="ddpm", guidance="dps",
                    scale=DEMO_SCALE, device=args.device, progress=False)
    res = pipe.run(x, seed=0)
    # Pipeline reports the payload rate only; the encode is deterministic, so encoding again gives
    # the same file, whose size is the file rate.
    info = bsfmt.describe(bsfmt.unpack(pipe.encoder.encode(x)))
    assert info["bpp"] == res["bpp"], "the demo codec's encode is not deterministic"
    rows = []
    for name, decode, key, image in (("mse", "MSE codec", "mse", "mse"),
                                     ("idempotence", "idempotence", "perc", "perceptual")):
        decoded = res["images"][image]
        # Pipeline's psnr and sharpness are the same definitions as quality(): kept, not recomputed.
        row = {"name": name, "decode": decode, "bpp": res["bpp"], "file_bpp": info["file_bpp"], **res[key],
               "patch_swd": patch_swd(as_8bit(decoded), x)}
        images[name] = decoded
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def quality(decoded: torch.Tensor, x: torch.Tensor) -> dict:
    """PSNR, MSE, sharpness and patch SWD of ``decoded`` (in [0, 1], any range before the 8-bit cast)
    against the original ``x``, with idemrt.demo's definitions (the decode as saved in 8 bits)."""
    img = as_8bit(decoded)
    err = mse255(x, img)
    return {"psnr": psnr(err), "mse": err, "sharpness": gradient_energy(img) / gradient_energy(x),
            "patch_swd": patch_swd(img, x)}


SWD_PATCH = 7
SWD_DIRECTIONS = 128


def patch_swd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sliced Wasserstein-1 distance between the sets of SWD_PATCH² RGB patches (every position,
    0-255 scale) of two images of one size: the mean, over SWD_DIRECTIONS random unit directions
    (seed 0), of the mean absolute difference of the sorted projections. It ignores where a patch
    is, so it compares texture statistics, not pixels: 0 if b's patches are a rearrangement of a's."""
    pa, pb = (F.unfold(t.double().cpu() * 255, SWD_PATCH)[0] for t in (a, b))  # (3·patch², positions)
    dirs = torch.randn(SWD_DIRECTIONS, pa.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    return float(((dirs @ pa).sort(dim=1).values - (dirs @ pb).sort(dim=1).values).abs().mean())


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="UNet dtype of --backend fast (default bf16)")
    parser.add_argument("--max-rounds", type=int, help="run at most this many rounds and extrapolate")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rd", action="store_true", help="rate-distortion on the demo UNet instead of speed")
    parser.add_argument("--image", help="--rd: demo image name (chelsea or coffee)")
    parser.add_argument("--prefixes", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0],
                        help="--rd: PSC prefixes to restore, as fractions of the encoded rounds")
    parser.add_argument("--idem-steps", type=int, default=DEMO_STEPS,
                        help="--rd: DDPM steps of the idempotence decode (default: the demo's)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (CI): --device cpu --preset tiny "
                                                            "--size 16 --s 4 --r 2 --steps 3 --bpp 0.125 0.25")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.preset, args.size, args.s, args.r, args.steps = "cpu", "tiny", 16, 4, 2, 3
        args.bpp, args.rounds, args.warmup, args.repeats = [0.125, 0.25], None, 1, 2
    return args


def main(argv=None, images: dict | None = None):
    """Run and print (and with --json write) the results; ``images``: see rate_distortion."""
    args = parse_args(argv)
    result = rate_distortion(args, images) if args.rd else speed(args)
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)  # an exact re-compression: "inf"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
