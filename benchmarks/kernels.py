"""Micro-benchmarks: each Triton kernel vs its torch reference (eager) vs torch.compile of the reference.

    python benchmarks/kernels.py                       # CUDA: time every case, print a table, write JSON
    python benchmarks/kernels.py --device cpu          # smoke check in the Triton interpreter, no timing
    python benchmarks/kernels.py --only gdn --json out.json

Shapes are those of a 256x256 image at batch 1 (docs/reference_code.md §1.2, §3.2.2). On CUDA,
times are medians of ``triton.testing.do_bench`` (ms, L2 flushed between runs); every case is first
checked against its reference, and the largest relative deviation is reported. ``--device cpu``
runs tiny shapes once through the interpreter and checks them, nothing more: interpreter times mean
nothing, so none are printed.
"""
import argparse
import itertools
import json
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    name: str
    shape: str
    dtype: str
    make: Callable  # () -> (triton_fn, reference_fn); both take no arguments and return tensors
    # Largest accepted max|diff| / max|ref| against the reference.
    tol: float = 1e-4

    def __post_init__(self):
        if self.dtype == "bfloat16":
            self.tol = max(self.tol, 3e-2)


def _rel_err(a, b):
    a, b = [t if isinstance(t, (tuple, list)) else (t,) for t in (a, b)]
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b))


def _groupnorm_cases(device, tiny):
    from idemrt.kernels.groupnorm_silu import groupnorm_silu, groupnorm_silu_reference

    shapes = [(1, 64, 6, 6)] if tiny else [(1, 128, 256, 256), (1, 256, 64, 64), (1, 512, 16, 16)]
    dtypes = [torch.float32] if tiny else [torch.float32, torch.bfloat16]
    for shape in shapes:
        for dtype in dtypes:
            def make(shape=shape, dtype=dtype, backward=False):
                n, c = shape[:2]
                x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
                w, b = torch.randn(c, device=device), torch.randn(c, device=device)
                scale, shift = (0.1 * torch.randn(n, c, device=device, dtype=dtype) for _ in range(2))
                g = torch.randn(shape, device=device, dtype=dtype)

                def run(fn):
                    if not backward:
                        return lambda: fn(x, w, b, scale, shift)
                    return lambda: torch.autograd.grad(fn(x, w, b, scale, shift), x, g)[0]
                return run(groupnorm_silu), run(groupnorm_silu_reference)

            yield Case("groupnorm_silu fwd", str(shape), str(dtype)[6:], make)
            yield Case("groupnorm_silu fwd+bwd(x)", str(shape), str(dtype)[6:],
                       lambda make=make: make(backward=True))


def _gdn_cases(device, tiny):
    from compressai.layers import GDN
    from compressai.models import ScaleHyperprior

    from idemrt.kernels.gdn import PRECISIONS, gdn, gdn_parameters, gdn_reference
    from idemrt.kernels.gdn_chain import GDNChain

    shapes = [(1, 16, 5, 7)] if tiny else [(1, 128, 128, 128), (1, 128, 32, 32), (1, 192, 64, 64)]
    for shape in shapes:
        for backward, precision in itertools.product((False, True), PRECISIONS):
            def make(shape=shape, backward=backward, precision=precision):
                m = GDN(shape[1], inverse=True)
                with torch.no_grad():
                    m.gamma.add_(0.1 * torch.rand_like(m.gamma))
                gamma, beta, _ = gdn_parameters(m)
                gamma, beta = gamma.to(device), beta.to(device)
                x = torch.randn(shape, device=device, requires_grad=backward)
                g = torch.randn(shape, device=device)

                def run(fn, **kw):
                    if not backward:
                        return lambda: fn(x, gamma, beta, True, **kw)
                    return lambda: torch.autograd.grad(fn(x, gamma, beta, True, **kw), x, g)[0]
                return run(gdn, precision=precision), run(gdn_reference)

            name = "igdn " + ("fwd+bwd(x)" if backward else "fwd") + f" [{precision}]"
            # On CUDA the reference's conv1x1 runs in TF32 (cuDNN's default), whatever our precision.
            yield Case(name, str(shape), "float32", make, tol=5e-3)

    def make_chain():
        n, m = (16, 24) if tiny else (128, 192)
        net = ScaleHyperprior(n, m).to(device).eval()
        chain = GDNChain(net.g_s)
        y = torch.randn(1, m, 2 if tiny else 16, 2 if tiny else 16, device=device)
        g = torch.randn(1, 3, y.shape[2] * 16, y.shape[3] * 16, device=device)

        def fused():
            out, saved = chain.forward(y)
            return chain.input_grad(saved, g)

        def reference(module=net.g_s):
            yr = y.clone().requires_grad_(True)
            return torch.autograd.grad(module(yr), yr, g)[0]
        return fused, reference

    hw = "2x2" if tiny else "16x16"
    # On CUDA both sides run their convolutions through cuDNN with TF32 (torch's default).
    yield Case("g_s fwd + input grad (ScaleHyperprior)", f"y_hat {hw}", "float32", make_chain, tol=5e-3)


def _sampler_cases(device, tiny):
    from idemrt.diffusion import DDPMSampler, Schedule
    from idemrt.kernels.sampler_update import (predict_x0_reference, sampler_update, sampler_update_reference,
                                               x0_and_mask)

    shape = (1, 3, 8, 9) if tiny else (1, 3, 256, 256)
    # The table the kernels read is the sampler's own (a 10-step respacing of the 1000-step process).
    table = DDPMSampler(Schedule.create(1000, respacing=10)).coefficients().to(device)

    def make_update():
        n, c, h, w = shape
        out = torch.randn(n, 2 * c, h, w, device=device)
        x, grad, noise = (torch.randn(shape, device=device) for _ in range(3))
        eps, v = out[:, :c], out[:, c:]
        # Step and DPS scale as device tensors, as in a captured graph; the reference gathers the
        # same rows on the device (per_sample broadcasting), as the samplers do.
        step = torch.tensor([5], device=device)
        scale = torch.tensor([0.6], device=device)
        return (lambda: sampler_update(x, eps, v, grad, noise, table, step, scale),
                lambda: sampler_update_reference(x, eps, v, grad, noise, table, step, scale))

    def make_x0():
        x, eps = torch.randn(shape, device=device), torch.randn(shape, device=device)
        step = torch.tensor([5], device=device)
        return (lambda: x0_and_mask(x, eps, table, step)[0], lambda: predict_x0_reference(x, eps, table, step))

    yield Case("sampler_update (DDPM + ps)", str(shape), "float32", make_update)
    yield Case("x0_and_mask", str(shape), "float32", make_x0)


def _loss_cases(device, tiny):
    from idemrt.kernels.loss_seed import residual_norm_and_seed

    shape = (2, 3, 9, 11) if tiny else (1, 3, 256, 256)

    def make():
        target, a = torch.randn(shape, device=device), torch.randn(shape, device=device)

        def reference():
            ar = a.clone().requires_grad_(True)
            dist = torch.linalg.vector_norm((target - ar).reshape(shape[0], -1), dim=1)
            return dist, torch.autograd.grad(dist.sum(), ar)[0]
        return lambda: residual_norm_and_seed(target, a), reference

    yield Case("residual_norm_and_seed", str(shape), "float32", make)


GROUPS = {"groupnorm": _groupnorm_cases, "gdn": _gdn_cases, "sampler": _sampler_cases, "loss": _loss_cases}


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", choices=sorted(GROUPS), action="append", help="run only these groups")
    parser.add_argument("--json", default="kernel_bench.json", help="where to write the results (cuda only)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args(argv)

    tiny = args.device == "cpu"
    if tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu for the interpreter smoke check")
    torch.manual_seed(0)

    rows, failed = [], []
    for group in args.only or sorted(GROUPS):
        for case in GROUPS[group](args.device, tiny):
            fused, reference = case.make()
            row = dict(kernel=case.name, shape=case.shape, dtype=case.dtype, rel_err=_rel_err(fused(), reference()))
            if row["rel_err"] > case.tol:
                failed.append(case.name)
            if not tiny:
                row["triton_ms"] = _bench(fused)
                row["eager_ms"] = _bench(reference)
                if not args.no_compile:
                    try:
                        compiled = torch.compile(reference)
                        compiled()
                        row["compile_ms"] = _bench(compiled)
                    except Exception as e:  # a compile failure is a result to report, not a crash
                        row["compile_error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            _print_row(row, tiny, ok=case.name not in failed)

    if not tiny:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=__import__("triton").__version__, python=platform.python_version())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
        print(f"wrote {args.json}")
    if failed:
        print("MISMATCH against the reference:", ", ".join(failed))
    return 1 if failed else 0


def _print_row(row, tiny, ok):
    head = f"{row['kernel']:<42} {row['shape']:<20} {row['dtype']:<9} rel_err {row['rel_err']:.1e}"
    head += "" if ok else " MISMATCH"
    if tiny:
        print(head, "(interpreter smoke check, not timed)")
        return
    times = f"triton {row['triton_ms']:.4f} ms  eager {row['eager_ms']:.4f} ms"
    if "compile_ms" in row:
        times += f"  compile {row['compile_ms']:.4f} ms"
    elif "compile_error" in row:
        times += "  compile failed"
    print(head, times)


if __name__ == "__main__":
    sys.exit(main())
