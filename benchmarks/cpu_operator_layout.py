"""The guided step on the CPU with the codec operator on the shared NCHW codec or on the fast
backend's channels_last copy (``operator_channels_last``), against eager fp32 (issue 30 item 5).

    python benchmarks/cpu_operator_layout.py --preset ffhq256 --codec elic,hyperprior --json out.json

Per codec: the step (DDPM + DPS, step 500 of 1000, random weights, batch 1) of eager fp32, of the
fast backend (its CPU default dtype) with ``operator_channels_last=False`` and ``=True``, and the
operator's forward+VJP alone in each; the variants interleaved, ``--repeats`` rounds after one
warm-up round; medians in ms.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import STEP_INDEX, build_codec, build_unet, environment, make_spec  # noqa: E402

from idemrt.backends.base import create_backend  # noqa: E402
from idemrt.diffusion import distance  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ffhq256")
    parser.add_argument("--codec", default="elic,hyperprior")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    unet = build_unet(args.preset, cpu)
    out = {"environment": environment(cpu, " ".join(sys.argv)), "rows": []}
    for codec_name in args.codec.split(","):
        codec = build_codec(codec_name, cpu)
        spec = make_spec(unet, codec, "ddpm", "dps", cpu)
        size = unet.config.image_size
        gen = torch.Generator().manual_seed(0)
        x, noise = torch.randn(1, 3, size, size, generator=gen), torch.randn(1, 3, size, size, generator=gen)
        with torch.no_grad():
            target = spec.operator(torch.rand(1, 3, size, size, generator=gen) * 2 - 1)
        x0 = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
        backends = {"eager": create_backend("eager", spec, device=cpu),
                    "fast, operator NCHW": create_backend("fast", spec, device=cpu, operator_channels_last=False),
                    "fast, operator channels_last": create_backend("fast", spec, device=cpu,
                                                                   operator_channels_last=True)}

        def operator_vjp(b):
            op = b.apply_operator if hasattr(b, "apply_operator") else spec.operator
            x0g = x0.detach().requires_grad_(True)
            torch.autograd.grad(distance(target, op(x0g)).sum(), x0g)

        jobs = {(name, part): (lambda b=b: b.step(x, STEP_INDEX, target, noise)) if part == "step"
                else (lambda b=b: operator_vjp(b))
                for name, b in backends.items() for part in ("step", "operator_fwd_vjp")}
        times = {k: [] for k in jobs}
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for key, job in jobs.items():
                t0 = time.perf_counter()
                job()
                if round_:
                    times[key].append((time.perf_counter() - t0) * 1e3)
        for name in backends:
            row = {"preset": args.preset, "codec": codec_name, "variant": name,
                   "dtype": str(getattr(backends[name], "dtype", torch.float32)).replace("torch.", ""),
                   "step_ms": statistics.median(times[(name, "step")]),
                   "operator_fwd_vjp_ms": statistics.median(times[(name, "operator_fwd_vjp")])}
            out["rows"].append(row)
            print(f"{args.preset} {codec_name:<10} {name:<30} {row['dtype']:<8} step {row['step_ms']:9.1f} ms  "
                  f"operator fwd+VJP {row['operator_fwd_vjp_ms']:8.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
