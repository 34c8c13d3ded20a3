"""Where a decode goes non-finite: one image of the load study decoded by the Decoder on each
backend variant, checked after every step, no retry.

Why: on the H200 (2026-12-04) request 29 of ``serve_load.py``'s workload (128 px, ``paper`` at
20 steps, seed 1772735652) went non-finite on the engine's CUDA path (fast backend: bf16, CUDA
graphs, Triton kernels) in every cell, while the same decode is finite on the CPU in fp32 eager
and in the CPU's bf16 fast path. This script names the first non-finite step per variant, so
that the part to blame (Triton kernels, graphs, bf16) can be told apart in one short GPU call.
The two ``engine-*`` variants decode the same request through the service's engine (the device's
default backend) as the load study builds it: with every speed allowed (the ``paper`` and
``balanced`` programs then share one stacked step table) and with ``paper`` alone — the load study
saw the failure there, also at one image per step (policy ``none``). :func:`verdict` names the part
from which variants went non-finite::

    python benchmarks/nonfinite_probe.py --device cuda [--request 29] [--json probe.json]
    TRITON_INTERPRET=1 python benchmarks/nonfinite_probe.py --device cpu   # the Triton kernels interpreted
"""
from __future__ import annotations

import argparse
import json
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
ENGINE_VARIANTS = {  # name -> the speeds the engine allows (its programs and step groups)
    "engine-load-study": list(serve_load.SPEEDS),
    "engine-paper-only": ["paper"],
}


def verdict(finite: dict) -> list:
    """What the variants' outcomes (name -> True finite / False not; missing: not run) point to."""
    bad = {name for name, ok in finite.items() if ok is False}
    ok = {name for name, good in finite.items() if good}
    if not bad:
        return ["finite in every variant run: not reproduced"]
    if "eager-fp32" in bad:
        return ["non-finite in eager fp32 too: the decode itself, not an acceleration"]
    out = []
    if "fast-bf16-torch" in bad:
        out.append("bf16 without the Triton kernels (fast-bf16-torch)")
    if "fast-bf16-triton" in bad and "fast-bf16-torch" in ok:
        out.append("the Triton kernels" + (" (in fp32 too)" if "fast-fp32-triton" in bad else
                                           " in bf16 (fast-fp32-triton finite)" if "fast-fp32-triton" in ok else ""))
    if "fast-bf16-triton" in bad and "fast-bf16-triton-nographs" in ok:
        out.append("CUDA graphs (the same kernels without graphs are finite)")
    if "fast-bf16-triton-nographs" in bad and "fast-bf16-triton" in ok:
        out.append("the Triton kernels without graphs only")
    decoder = set(VARIANTS) & set(finite)
    if bad <= set(ENGINE_VARIANTS) and decoder and decoder <= ok:
        out.append("the engine's path only (every Decoder variant finite)"
                   + (": the stacked step table of several speeds (paper alone finite)"
                      if "engine-paper-only" in ok else ""))
    return out or [f"non-finite in {sorted(bad)}: no single part"]


def engine_decode(device: str, speeds: list, bitstream, request: dict, paper_steps: int):
    """Decode one request through a DecodeEngine built as the load study builds it."""
    from idemrt.serve import ServeConfig
    from idemrt.serve.core import DecodeEngine

    config = ServeConfig.demo(steps_allowed=[str(paper_steps)], speeds_allowed=speeds, max_slots=8, preview_every=5)
    engine = DecodeEngine(config, device=device)
    try:
        return engine.submit(bitstream, seed=request["seed"], speed=request["speed"],
                             on_event=lambda event: None).result(timeout=600).image
    finally:
        engine.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--request", type=int, action="append", help="workload index (repeatable; default 29)")
    p.add_argument("--variants", default=",".join([*VARIANTS, *ENGINE_VARIANTS]))
    p.add_argument("--paper-steps", type=int, default=20)
    p.add_argument("--json", default=None, help="write the outcomes and the verdict here")
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = set(names) - set(VARIANTS) - set(ENGINE_VARIANTS)
    if unknown or not names:
        p.error(f"unknown variants {sorted(unknown)}; choose from {[*VARIANTS, *ENGINE_VARIANTS]}")
    from idemrt import Decoder
    from idemrt.speeds import SPEEDS
    from idemrt.demo_assets import DEMO_SCALE, load_demo_codec, load_demo_unet

    requests = serve_load.workload(40, 2.0, 0)
    data = serve_load._bitstreams(serve_load.SIZES)
    codec, unet = load_demo_codec(args.device), load_demo_unet(args.device)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"environment": {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "paper_steps": args.paper_steps}, "requests": []}
    for k in args.request or [29]:
        r = requests[k]
        bitstream = data[r["size"]][k % len(data[r["size"]])]
        outcomes, finite = [], {}
        for name in names:
            t0 = time.perf_counter()
            try:
                if name in ENGINE_VARIANTS:
                    image = engine_decode(args.device, ENGINE_VARIANTS[name], bitstream, r, args.paper_steps)
                else:
                    config = SPEEDS[r["speed"]].replace(check_every=1, nan_retries=0, **VARIANTS[name])
                    if r["speed"] == "paper":
                        config = config.replace(steps=args.paper_steps, scale=DEMO_SCALE)
                    decoder = Decoder(codec, unet, config=config, device=args.device)
                    image = decoder.decode(bitstream, seed=r["seed"], output="tensor")
                finite[name] = bool(torch.isfinite(image).all())
                line = f"finite (mean {float(image.mean()):.4f})"
            except Exception as exc:  # noqa: BLE001 - the message names the step
                finite[name] = False if "non-finite" in str(exc) else None
                line = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t0
            outcomes.append({"variant": name, "finite": finite[name], "outcome": line, "seconds": round(seconds, 2)})
            print(f"request {k} ({r['speed']}/{r['size']}, seed {r['seed']}) {name:28s} {line} [{seconds:.1f} s]",
                  flush=True)
            entry = {**r, "outcomes": outcomes, "verdict": verdict(finite)}
            if args.json:  # after every variant: a run cut short keeps what it found
                Path(args.json).write_text(json.dumps(dict(result, requests=[*result["requests"], entry]), indent=1))
        print(f"request {k}: {'; '.join(entry['verdict'])}", flush=True)
        result["requests"].append(entry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
