"""Windows in one batch against images in one batch: a tiled guided step's time and share of the
GPU's peak (issue 28, item 6).

    python benchmarks/tiled_gpu.py --device cuda --json tiled_gpu.json
    python benchmarks/tiled_gpu.py --device cpu --preset tiny --codec tiny --size 80x112   # a dry run

Two cases of one DPS step (DDPM respaced to 1000 steps, the step at i = 500), the prior's native
size ``n`` (256 for ffhq256):

* ``tiled``: one image of ``--size`` (default 768x1024: 4 x 5 = 20 windows of 256, stride 192),
  stepped by the sampler in windows (:mod:`idemrt.diffusion.window_steps`), ``--chunk`` windows a
  UNet call (default: all of them in one call);
* ``native``: as many n x n images as the tiled one has windows, one batched step (the
  sampler's persistent batch; the fast backend captures it in a CUDA graph on CUDA).

Both through the real engine pieces (``DecodeProgram`` + ``build_step_group``, random weights).
The FLOPs of each step are counted on the eager backend for one image (torch.utils.flop_counter's
formulas; the tiled step's include the windows' forward recomputed for the backward; the native
case's times its images) and give TFLOP/s and % of the bf16 matmul peak measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import (CODECS, UNETS, build_codec, build_unet, count_flops, environment,  # noqa: E402
                     measure_peak_tflops, sync, time_ms)

from idemrt.decode_config import DecodeConfig  # noqa: E402
from idemrt.diffusion.tiling import Tiling, window_count  # noqa: E402
from idemrt.programs import DecodeProgram, build_step_group  # noqa: E402

STEP = 500  # the timed step (any i costs the same)


def sampler_for(unet, codec, device, backend: str, dtype, chunk: int):
    cfg = DecodeConfig(steps=1000, guidance="dps", backend=backend, dtype=dtype, tile=Tiling(chunk=chunk))
    return build_step_group([DecodeProgram.build(cfg, unet, device)], unet, codec).sampler


def states_for(sampler, codec, device, n: int, h: int, w: int) -> list:
    """``n`` images of h x w at step STEP (their targets from random images through the operator)."""
    op = sampler.backend.spec.operator
    states = []
    for k in range(n):
        with torch.no_grad():
            target = op(torch.rand(1, 3, h, w, device=device) * 2 - 1)
        state = sampler.start(target, k, (1, 3, h, w))
        state.position = STEP
        states.append(state)
    return states


def one_step(sampler, states):
    """One step of ``states`` (each back at STEP after it, so it can be repeated)."""
    def run():
        sampler.advance(states)
        for s in states:
            s.position = STEP
            if s.batch is not None:
                s.batch.rows[s.slot] = s.batch.rows_host[s.slot] = s.row
    return run


def measure(case: str, unet, codec, device, args, peak: float, n: int, h: int, w: int, chunk: int) -> dict:
    # FLOPs are linear in the images and do not depend on the chunk: counted on one image, a window a
    # call, in fp32 eager (its memory stays that of one window)
    flop_sampler = sampler_for(unet, codec, device, "eager", None, 1)
    flops = n * count_flops(one_step(flop_sampler, states_for(flop_sampler, codec, device, 1, h, w)))
    sampler = sampler_for(unet, codec, device, args.backend, args.dtype, chunk)
    ms = time_ms(one_step(sampler, states_for(sampler, codec, device, n, h, w)), device, args.warmup, args.repeats)
    row = {"case": case, "images": n, "height": h, "width": w, "chunk": chunk, "backend": args.backend,
           "dtype": args.dtype, "step_ms": ms, "gflop": flops / 1e9, "tflops": flops / 1e9 / ms,
           "pct_peak": 100 * flops / 1e9 / ms / peak}
    print(f"{case:7s} {n} x {h}x{w}: {ms:.2f} ms a step, {flops / 1e9:.1f} GFLOP, {row['tflops']:.2f} TFLOP/s, "
          f"{row['pct_peak']:.1f} % of peak", flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="ffhq256", choices=sorted(UNETS))
    p.add_argument("--codec", default="hyperprior", choices=sorted(CODECS))
    p.add_argument("--size", default="768x1024", help="HxW of the tiled image")
    p.add_argument("--chunk", type=int, default=None, help="windows a UNet call (default: all of the image's)")
    p.add_argument("--backend", default="fast", choices=["fast", "eager"])
    p.add_argument("--dtype", default=None, help="the fast backend's (default: its own, bf16)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    h, w = (int(v) for v in args.size.lower().split("x"))
    unet, codec = build_unet(args.preset, device).eval(), build_codec(args.codec, device)
    native = UNETS[args.preset].image_size
    window, stride = Tiling().resolve(native)
    windows = window_count(h, w, window, stride)
    peak = measure_peak_tflops(device)
    env = environment(device, " ".join(sys.argv))
    print(f"{env.get('device', env['cpu'])}: bf16 matmul peak {peak:.3g} TFLOP/s; {h}x{w} = {windows} windows of "
          f"{window} (stride {stride})", flush=True)
    result = {"environment": env, "preset": args.preset, "codec": args.codec, "peak_bf16_tflops": peak,
              "windows": windows, "rows": []}
    chunk = args.chunk or windows
    for case, n, hh, ww in (("tiled", 1, h, w), ("native", windows, native, native)):
        result["rows"].append(measure(case, unet, codec, device, args, peak, n, hh, ww, chunk))
        sync(device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
