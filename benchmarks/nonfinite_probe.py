"""Where a decode goes non-finite: one image of the load study decoded by the Decoder on each
backend variant, checked after every step, no retry.

Why: on the H200 (2026-12-04) request 29 of ``serve_load.py``'s workload (128 px, ``paper`` at
20 steps, seed 1772735652) went non-finite on the engine's CUDA path (fast backend: bf16, CUDA
graphs, Triton kernels) in every cell, while the same decode is finite on the CPU in fp32 eager
and in the CPU's bf16 fast path. This script names the first non-finite step per variant, so
that the part to blame (Triton kernels, graphs, bf16) can be told apart in one short GPU call::

    python benchmarks/nonfinite_probe.py --device cuda [--request 29]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (the load study's workload and bitstreams)

VARIANTS = {  # name -> Decoder keyword arguments
    "eager-fp32": {"backend": "eager"},
    "fast-bf16-torch": {"backend": "fast", "backend_options": {"kernels": "torch"}},
    "fast-bf16-triton": {"backend": "fast", "backend_options": {"kernels": "triton"}},
    "fast-bf16-triton-nographs": {"backend": "fast", "backend_options": {"kernels": "triton", "graphs": False}},
    "fast-fp32-triton": {"backend": "fast", "backend_options": {"kernels": "triton", "dtype": torch.float32}},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--request", type=int, action="append", help="workload index (repeatable; default 29)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--paper-steps", type=int, default=20)
    args = p.parse_args(argv)
    from idemrt import Decoder
    from idemrt.speeds import SPEEDS
    from idemrt.demo_assets import DEMO_SCALE, load_demo_codec, load_demo_unet

    requests = serve_load.workload(40, 2.0, 0)
    data = serve_load._bitstreams(serve_load.SIZES)
    codec, unet = load_demo_codec(args.device), load_demo_unet(args.device)
    for k in args.request or [29]:
        r = requests[k]
        bitstream = data[r["size"]][k % len(data[r["size"]])]
        for name in args.variants.split(","):
            config = SPEEDS[r["speed"]].replace(check_every=1, nan_retries=0, **VARIANTS[name])
            if r["speed"] == "paper":
                config = config.replace(steps=args.paper_steps, scale=DEMO_SCALE)
            t0 = time.perf_counter()
            try:
                decoder = Decoder(codec, unet, config=config, device=args.device)
                image = decoder.decode(bitstream, seed=r["seed"], output="tensor")
                line = f"finite (mean {float(image.mean()):.4f})"
            except Exception as exc:  # noqa: BLE001 - the message names the step
                line = f"{type(exc).__name__}: {exc}"
            print(f"request {k} ({r['speed']}/{r['size']}, seed {r['seed']}) {name:28s} {line} "
                  f"[{time.perf_counter() - t0:.1f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
