"""Where the guided step's time goes on the CPU: PyTorch's profiler over whole steps, by kind of op.

    python benchmarks/cpu_profile.py --preset ffhq256 --modes eager,fast --json profile.json

Models, inputs and modes are :mod:`latency`'s (random weights, DDPM + DPS at step 500, or
``--guidance pir``). Each mode runs ``--warmup`` steps, then ``--repeats`` steps under
``torch.profiler``; every aten op's *self* CPU time (time not spent in the ops it calls) is put in
one bucket by its name (:data:`BUCKETS`, first match wins), so the buckets add up to the profiled
time. What is not an aten op (Python, the autograd engine's bookkeeping) is the difference between
the wall time of the profiled steps and that sum.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import STEP_INDEX, UNETS, Mode, build_codec, build_unet, environment, make_spec  # noqa: E402

# (bucket, substrings of the aten op name); the first bucket with a matching substring wins.
BUCKETS = (
    ("convolution", ("conv", "mkldnn_convolution", "slow_conv")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "bmm", "baddbmm")),
    ("matmul (linear)", ("addmm", "mm", "linear", "matmul")),
    ("group norm", ("group_norm",)),
    ("casts and copies", ("copy_", "_to_copy", "to", "contiguous", "clone", "empty", "zeros", "fill_")),
    ("resampling", ("avg_pool", "upsample", "interpolate")),
    ("elementwise", ("silu", "add", "mul", "sub", "div", "sqrt", "rsqrt", "exp", "clamp", "where", "sum",
                     "mean", "pow", "neg", "sigmoid", "norm", "cat", "sin", "cos", "round")),
)


def bucket_of(name: str) -> str:
    name = name.removeprefix("aten::")
    for bucket, keys in BUCKETS:
        if any(k in name for k in keys):
            return bucket
    return "other aten"


def profile_mode(mode: Mode, inputs, warmup: int, repeats: int) -> dict:
    x, _t, _x0, target, noise, _cot = inputs
    step = lambda: mode.step_fn(x, STEP_INDEX, target, noise)  # noqa: E731
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - t0) / repeats
    seconds, top = {}, []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        s = ev.self_cpu_time_total / 1e6 / repeats
        seconds[bucket_of(ev.key)] = seconds.get(bucket_of(ev.key), 0.0) + s
        top.append((s, ev.key))
    seconds["not an aten op (Python, autograd engine)"] = max(wall - sum(seconds.values()), 0.0)
    top.sort(reverse=True)
    return {"step_s": wall, "buckets_s": seconds, "top_ops": [{"op": k, "s": s} for s, k in top[:12]]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ffhq256", help=f"of {sorted(UNETS)}")
    parser.add_argument("--codec", default="hyperprior")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="eager,fast")
    parser.add_argument("--guidance", choices=["dps", "pir"], default="dps")
    parser.add_argument("--dtype", default="bf16", help="the fast modes' compute dtype")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    args.operator_dtype = None
    device = torch.device("cpu")

    unet = build_unet(args.preset, device)
    codec = build_codec(args.codec, device)
    spec = make_spec(unet, codec, "ddpm", args.guidance, device)
    size = UNETS[args.preset].image_size
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, size, size)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        target = spec.operator(torch.rand(shape, generator=gen) * 2 - 1)
    noise = torch.randn(shape, generator=gen)
    inputs = (x, None, None, target, noise, None)

    results = {"env": environment(device, " ".join(sys.argv)), "args": vars(args), "modes": {}}
    for name in args.modes.split(","):
        unet.requires_grad_(False)
        res = profile_mode(Mode(name, spec, unet, args, device), inputs, args.warmup, args.repeats)
        results["modes"][name] = res
        print(f"{name}: step {res['step_s']:.3f} s", flush=True)
        for b, s in sorted(res["buckets_s"].items(), key=lambda kv: -kv[1]):
            print(f"    {b:<42} {s:7.3f} s  {100 * s / res['step_s']:5.1f} %", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
