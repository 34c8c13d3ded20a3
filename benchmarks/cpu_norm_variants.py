"""The CPU fast path's GroupNorm+SiLU, three ways, in whole guided steps (issue 19: the non-convolution
time of the bf16 step).

    python benchmarks/cpu_norm_variants.py --preset ffhq256 --rounds 3 --json norm_variants.json

Variants of the UNet's norm hook (``ADMUNet.set_norm_act``) on the fast backend's inference copy:

  adm        ADM's path (the default hook; the CPU fast path's until this measurement): GroupNorm32
             casts the bf16 activation to fp32, normalises, casts back; scale/shift and SiLU in bf16;
  native     ``idemrt.models.unet.norm_act_mixed``: ``F.group_norm`` on the bf16 activation with the
             fp32 affine parameters (PyTorch's CPU mixed-type kernel: fp32 statistics, bf16 output,
             no cast copies), then ``addcmul`` + SiLU — the CPU fast path's since this measurement;
  compiled   ``native`` under ``torch.compile`` (inductor's CPU backend: one fused kernel per shape,
             forward and backward; one compile per activation shape).

Rounds alternate the variants (adm, native, compiled, adm, ...) so that a slow period of a shared
machine hits all of them; each round times ``--repeats`` steps after one warm-up step. Also printed:
the largest difference of x_{t-1} against ``adm`` (the same math, other roundings).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import STEP_INDEX, UNETS, build_codec, build_unet, environment, make_spec  # noqa: E402

from idemrt.backends.fast import FastBackend  # noqa: E402
from idemrt.models.unet import norm_act, norm_act_mixed  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ffhq256", help=f"of {sorted(UNETS)}")
    parser.add_argument("--guidance", choices=["dps", "pir"], default="dps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # one compile per activation shape of the UNet

    unet = build_unet(args.preset, torch.device("cpu"))
    spec = make_spec(unet, build_codec("hyperprior", torch.device("cpu")), "ddpm", args.guidance, "cpu")
    size = UNETS[args.preset].image_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=gen)
    noise = torch.randn(1, 3, size, size, generator=gen)
    with torch.no_grad():
        target = spec.operator(torch.rand(1, 3, size, size, generator=gen) * 2 - 1)
    backend = FastBackend(spec, device="cpu", kernels="torch")
    variants = {"adm": norm_act, "native": norm_act_mixed, "compiled": torch.compile(norm_act_mixed, dynamic=False)}

    times = {name: [] for name in variants}
    outputs, first_call = {}, {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            backend.unet.set_norm_act(fn)
            t0 = time.perf_counter()
            outputs[name] = backend.step(x, STEP_INDEX, target, noise)[0]  # warm-up (compiles, the first time)
            first_call.setdefault(name, time.perf_counter() - t0)
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                backend.step(x, STEP_INDEX, target, noise)
                times[name].append(time.perf_counter() - t0)
    backend.unet.set_norm_act(norm_act_mixed)  # the shipped CPU bf16 path (backends/inference.py)

    result = {"environment": environment(torch.device("cpu"), " ".join(sys.argv)), "args": vars(args), "variants": {}}
    for name in variants:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs["adm"]).abs().max().item()
        result["variants"][name] = {"step_s_median": med, "step_s_all": times[name],
                                    "first_call_s": first_call[name], "max_abs_diff_vs_adm": diff}
        print(f"{name:<9} step {med:.3f} s (median of {len(times[name])}; min {min(times[name]):.3f}, max "
              f"{max(times[name]):.3f})  first call {first_call[name]:.1f} s  max |dx| vs adm {diff:.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
