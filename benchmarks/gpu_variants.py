"""The fast backend's variants on one device, precision first, then time (issue 30): the table the
CUDA defaults are chosen from.

    bash benchmarks/gpu_session.sh speed                 # on a lent GPU: one call of at most 9 minutes
    python benchmarks/gpu_variants.py --budget-s 500     # the same, by hand
    python benchmarks/gpu_variants.py --device cpu --preset tiny --codec tiny --batch 1,2 \\
        --speeds fast --budget-s 120                     # dry run (tests/test_gpu_variants.py): times mean nothing

What it does, in this order, writing the JSON after every row (so a run cut at its limit keeps what
it measured):

1. The floor of each case (preset x codec x batch): FLOPs of one guided step (DDPM + DPS, step
   500 of 1000) with torch.utils.flop_counter's formulas, the bytes of the UNet's weights and the
   bytes every operator of the uncaptured bf16 step reads and writes (no fusion: an upper bound on
   traffic); with the bf16 matmul peak and the copy bandwidth measured here, the floor
   ``max(FLOPs / peak, 2 x weight bytes / bandwidth)`` (weights read forward and backward) and the
   unfused-traffic time ``traffic / bandwidth`` — the prediction the measured step is held to.
2. Per case (the first preset and codec at every batch — their throughput curve —, then the
   others at batches up to 8, then their larger batches), per variant (:data:`VARIANTS`, the levers
   of backends/fast.py; every variant on the first ``--full-cases`` cases, on later ones eager, the
   current default bf16-triton and the two fastest accurate so far): the precision check
   against eager fp32 (TF32 off) on the same device — per-step relative error of eps (model output
   channels 0-2) and of the guidance gradient at steps 999, 500 and 20 (the gradient as the step
   applies it: ``x_prev(scale 0) - x_prev(scale 1)``, so graphs and fused kernels are included) —
   then the step time (median of --repeats CUDA-event times after --warmup; the first call, which
   captures the graph and compiles, is timed apart as ``setup_s``). ``accuracy_ok``: both errors
   within :data:`EPS_TOL` / :data:`GRAD_TOL` at every checked step.
3. Once the first preset and codec are done: whole decodes (``--speeds``, default fast and
   balanced, batch 1) through ``idemrt.Decoder`` with the variants of ``--decode-variants``: one
   warm-up decode (captures), then one timed.
4. The torch.compile variants last (their compile time is unknown on the GPU: max-autotune did not
   finish in 110 s in the second lease).

Time slicing: every item has an estimate (a measured step time of the same case times the step
count, plus :data:`SETUP_ESTIMATE_S` — a scheduling guess, not a result); an item whose estimate
does not fit the time left of ``--budget-s`` is recorded as ``skipped``; one that runs over its
own cap is interrupted (SIGALRM) and recorded as ``timeout``. Random weights (timing does not
depend on them; the precision of random full-size UNets is what is checked, not trained ones).

JSON (``--out-dir``/``--json-name``, default ``benchmarks/gpu_<date>_<device>/gpu_variants.json``):
``environment``, ``peak_bf16_tflops``, ``bandwidth_gbs``, ``floors`` (one per case), ``rows`` (one
per case x variant: preset, codec, batch, variant, options, status, step_ms, step_ms_per_image,
setup_s, eps_rel_err, grad_rel_err, accuracy_ok, pct_peak), ``decodes`` (speed, variant, batch,
seconds, seconds_per_image, steps, status). The table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import signal
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import (CODECS, STEP_INDEX, UNETS, build_codec, build_unet, count_flops, environment,  # noqa: E402
                     make_spec, measure_peak_tflops, sync, time_ms)

from idemrt.backends.base import create_backend  # noqa: E402

# The accuracy targets of the fast backend (benchmarks/RESULTS.md, "Also not measured, and needed
# before choosing defaults"): eps and guidance-gradient relative error <= 2e-2 per step.
EPS_TOL = 2e-2
GRAD_TOL = 2e-2
CHECK_STEPS = (999, 500, 20)  # indices of the 1000-step schedule whose errors are checked

_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32
# name -> (backend, dtype, backend options). "eager" is the fp32 reference, timed too.
VARIANTS = {
    "eager": ("eager", _F32, {}),
    "bf16": ("fast", _BF16, {"kernels": "torch"}),
    "fp16": ("fast", _F16, {"kernels": "torch"}),
    "bf16-triton": ("fast", _BF16, {"kernels": "triton"}),  # every kernel fwd+bwd: the default so far
    "fp16-triton": ("fast", _F16, {"kernels": "triton"}),
    "bf16-triton-fwd": ("fast", _BF16, {"kernels": "triton",
                                         "triton_passes": {"groupnorm_silu": "fwd", "gdn": "fwd", "step": "fwd"}}),
    "fp16-triton-fwd": ("fast", _F16, {"kernels": "triton",
                                        "triton_passes": {"groupnorm_silu": "fwd", "gdn": "fwd", "step": "fwd"}}),
    "bf16-triton-gn-fwd": ("fast", _BF16, {"kernels": "triton", "triton_passes": {"groupnorm_silu": "fwd"}}),
    "bf16-triton-gdn-torch": ("fast", _BF16, {"kernels": "triton", "triton_passes": {"gdn": "none"}}),
    "bf16-triton-op-fp32": ("fast", _BF16, {"kernels": "triton", "operator_dtype": _F32}),
    "bf16-triton-op-channels-last": ("fast", _BF16, {"kernels": "triton", "operator_channels_last": True}),
    "bf16-triton-no-cudnn-benchmark": ("fast", _BF16, {"kernels": "triton", "cudnn_benchmark": False}),
    "bf16-blocks": ("fast", _BF16, {"compile": "blocks", "compile_mode": "default"}),
    "bf16-compile": ("fast", _BF16, {"compile": "unet", "compile_mode": "default"}),
    "bf16-compile-max-autotune": ("fast", _BF16, {"compile": "unet", "compile_mode": "max-autotune-no-cudagraphs"}),
}
COMPILED = {name for name, (_, _, opts) in VARIANTS.items() if opts.get("compile")}
TRITON = {name for name, (_, _, opts) in VARIANTS.items() if opts.get("kernels") == "triton"}
# Scheduling guesses for the first call of a variant (graph capture, Triton JIT, compile), seconds:
# used only to decide what still fits the budget. max-autotune: lease2 saw > 110 s.
SETUP_ESTIMATE_S = {"eager": 2.0, "fast": 10.0, "blocks": 60.0, "compile": 90.0, "compile-max-autotune": 150.0}
CAP_FACTOR = 2.0  # an item is interrupted after this many times its estimate (at least --min-cap-s)


class Budget:
    """The run's deadline, and an alarm that interrupts one item at its cap."""

    def __init__(self, seconds: float, min_cap: float):
        self.deadline = time.monotonic() + seconds
        self.min_cap = min_cap

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()

    @contextlib.contextmanager
    def cap(self, estimate: float):
        seconds = max(1.0, min(self.left(), max(self.min_cap, CAP_FACTOR * estimate)))

        def interrupt(signum, frame):
            raise TimeoutError(f"ran past its cap of {seconds:.0f} s")

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def setup_estimate(name: str) -> float:
    backend, _, opts = VARIANTS[name]
    if opts.get("compile") == "blocks":
        return SETUP_ESTIMATE_S["blocks"]
    if opts.get("compile"):
        return SETUP_ESTIMATE_S["compile-max-autotune" if "max-autotune" in opts["compile_mode"] else "compile"]
    return SETUP_ESTIMATE_S[backend]


# --------------------------------------------------------------------------- the floor


class _Traffic(TorchDispatchMode):
    """Bytes every dispatched operator reads and writes (tensor arguments and results)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs or {}, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def measure_bandwidth_gbs(device) -> float:
    """A large device copy's read + write bytes per second (GB/s)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, warmup=2, repeats=5)
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9


def floor(case, unet, spec, inputs, device, peak, bandwidth) -> dict:
    x, target, noise = inputs
    eager = create_backend("eager", spec, device=device)
    flops = count_flops(lambda: eager.step(x, STEP_INDEX, target, noise))
    fast = create_backend("fast", spec, device=device, dtype=_BF16, kernels="torch", graphs=False)
    weights = sum(p.numel() * p.element_size() for p in fast.unet.parameters())
    with _Traffic() as traffic:
        fast.step_uncaptured(x, STEP_INDEX, target, noise)
    floor_ms = max(flops / (peak * 1e12), 2 * weights / (bandwidth * 1e9)) * 1e3
    return {**case, "gflop": flops / 1e9, "weight_mb_bf16": weights / 1e6, "traffic_mb_unfused": traffic.bytes / 1e6,
            "floor_ms": floor_ms, "unfused_traffic_ms": traffic.bytes / (bandwidth * 1e9) * 1e3}


# --------------------------------------------------------------------------- one variant


@contextlib.contextmanager
def exact_fp32():
    """No TF32 while the fp32 reference runs: the precision check is against fp32 itself."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def eps_and_grads(backend, model_fn, spec, inputs) -> list:
    """[(eps, grad)] at CHECK_STEPS: eps from the model function, the gradient as the step applies it."""
    x, target, noise = inputs
    n = x.shape[0]
    zero, one = torch.zeros(n, device=x.device), torch.ones(n, device=x.device)
    out = []
    for i in CHECK_STEPS:
        with torch.no_grad():
            eps = model_fn(x, spec.sampler.model_timesteps(i, n))[:, :3].float()
        a, _ = backend.step(x, i, target, noise, zero)
        b, _ = backend.step(x, i, target, noise, one)
        out.append((eps, a - b))
    return out


def run_variant(name, case, spec, unet, inputs, reference, args, device, peak, budget, estimate) -> dict:
    kind, dtype, options = VARIANTS[name]
    row = {**case, "variant": name, "backend": kind, "dtype": str(dtype).replace("torch.", ""),
           "options": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in options.items()},
           "status": "ok", "step_ms": None, "step_ms_per_image": None, "accuracy_ok": None}
    row["status"] = _skipped(name, device, budget, estimate) or "ok"
    if row["status"] != "ok":
        return row
    x, target, noise = inputs
    try:
        with budget.cap(estimate):
            backend = create_backend(kind, spec, device=device, dtype=dtype if kind == "fast" else None, **options)
            t0 = time.perf_counter()
            backend.step(x, STEP_INDEX, target, noise)  # captures, compiles, tunes
            sync(device)
            row["setup_s"] = time.perf_counter() - t0
            model_fn = backend.model_output if kind == "fast" else spec.unet
            checks = eps_and_grads(backend, model_fn, spec, inputs)
            row["eps_rel_err"] = [_rel(e, e_ref) for (e, _), (e_ref, _) in zip(checks, reference)]
            row["grad_rel_err"] = [_rel(g, g_ref) for (_, g), (_, g_ref) in zip(checks, reference)]
            row["accuracy_ok"] = max(row["eps_rel_err"]) <= EPS_TOL and max(row["grad_rel_err"]) <= GRAD_TOL
            row["step_ms"] = time_ms(lambda: backend.step(x, STEP_INDEX, target, noise), device, args.warmup,
                                     args.repeats)
            row["step_ms_per_image"] = row["step_ms"] / case["batch"]
            row["tflops"] = case["gflop"] / row["step_ms"]  # GFLOP / ms = TFLOP/s
            row["pct_peak"] = 100 * row["tflops"] / peak
    except TimeoutError as exc:
        row["status"] = f"timeout: {exc}"
    except Exception as exc:  # noqa: BLE001 - a variant that fails (OOM, a compile error) is a result
        row["status"] = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    finally:
        if row["status"].startswith("timeout"):
            torch._dynamo.reset()  # an interrupted compile leaves dynamo's caches half-filled
        backend = None  # noqa: F841 - frees its graphs and copies before the next variant
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- decodes


def run_decode(speed, name, unet, codec, size, device, budget, estimate) -> dict:
    import numpy as np

    from idemrt import Decoder, Encoder
    from idemrt.speeds import SPEEDS

    kind, dtype, options = VARIANTS[name]
    row = {"speed": speed, "variant": name, "batch": 1, "status": "ok", "seconds": None}
    row["status"] = _skipped(name, device, budget, estimate) or "ok"
    if row["status"] != "ok":
        return row
    try:
        with budget.cap(estimate):
            image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
            bitstream = Encoder(codec).encode(image)
            extra = {"dtype": dtype} if kind == "fast" else {}
            config = SPEEDS[speed].replace(backend=kind, backend_options=options, **extra)
            decoder = Decoder(codec, unet, config=config, device=device)
            decoder.decode(bitstream, seed=0, output="tensor")  # warm-up: captures the step's graphs
            sync(device)
            t0 = time.perf_counter()
            decoder.decode(bitstream, seed=0, output="tensor")
            sync(device)
            row.update(seconds=time.perf_counter() - t0, steps=decoder.last.steps)
            row["seconds_per_image"] = row["seconds"]
    except TimeoutError as exc:
        row["status"] = f"timeout: {exc}"
    except Exception as exc:  # noqa: BLE001 - a decode that fails is a result
        row["status"] = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    finally:
        decoder = None  # noqa: F841 - frees its backend before the next decode
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- the plan


def plan(args) -> list:
    """(preset, codec, batch) cases in order of value: the first preset and codec given at every
    batch (its throughput curve), then the others at batches up to 8, then the others' larger ones."""
    first = (args.preset[0], args.codec[0])
    cases = [(p, c, b) for p in args.preset for c in args.codec for b in args.batch]
    return sorted(cases, key=lambda pcb: ((pcb[0], pcb[1]) != first, pcb[2] > 8, args.codec.index(pcb[1]),
                                          args.preset.index(pcb[0]), pcb[2]))


def selected(rows, plain) -> list:
    """The variants worth timing beyond the first cases: eager, the current default and the two
    fastest per image that passed their accuracy check so far (the two fastest, if none did)."""
    ok = [r for r in rows if r["step_ms"] is not None and r["variant"] in plain]
    accurate = [r for r in ok if r["accuracy_ok"]] or ok
    best = []
    for r in sorted(accurate, key=lambda r: r["step_ms_per_image"]):
        if r["variant"] not in best:
            best.append(r["variant"])
    keep = {"eager", "bf16-triton", *best[:2]}
    return [v for v in plain if v in keep]


LATENT_STD = 4.0  # the latent spread the random codec is scaled to (trained codecs: several units)


def spread_latents(codec, size: int, device) -> None:
    """Scale the last convolution of the random codec's g_a so that its latents spread over several
    units. At random initialisation nearly every latent rounds to 0: A is then a constant, the
    distance of every x0 to the target 0 and the guidance gradient a comparison of rounding noise."""
    conv = [m for m in codec.model.g_a.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        image = torch.rand(1, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(1))
        std = codec.model.g_a(image).std().item()
        conv.weight.mul_(LATENT_STD / std)
        if conv.bias is not None:
            conv.bias.mul_(LATENT_STD / std)


class Case:
    """The models and inputs of one (preset, codec, batch)."""

    def __init__(self, preset, codec_name, batch, args, device):
        torch.manual_seed(0)  # the same random models in every run, whatever ran before
        self.unet = build_unet(preset, device)
        self.size = UNETS[preset].image_size
        self.codec = build_codec(codec_name, device)
        spread_latents(self.codec, self.size, device)
        self.spec = make_spec(self.unet, self.codec, "ddpm", "dps", device)
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (batch, 3, self.size, self.size)
        x = torch.randn(shape, device=device, generator=gen)
        with torch.no_grad():
            target = self.spec.operator(torch.rand(shape, device=device, generator=gen) * 2 - 1)
        noise = torch.randn(shape, device=device, generator=gen)
        self.inputs = (x, target, noise)
        self.key = {"preset": preset, "codec": codec_name, "batch": batch, "size": self.size}


def _skipped(name: str, device, budget, estimate: float):
    """Why a variant's row is not run (recorded as its status), or None."""
    if name in TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "skipped: Triton needs CUDA (or TRITON_INTERPRET=1)"
    if not budget.fits(estimate):
        return f"skipped: estimated {estimate:.0f} s, {max(budget.left(), 0):.0f} s left"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", type=csv, default=["ffhq256", "imagenet256"], help=f"of {sorted(UNETS)}")
    parser.add_argument("--codec", type=csv, default=["hyperprior", "elic"], help=f"of {sorted(CODECS)}")
    parser.add_argument("--batch", type=csv, default=["1", "8", "16", "32"])
    parser.add_argument("--variants", type=csv, default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--full-cases", type=int, default=2,
                        help="every variant on this many of the first cases; later cases time eager, the "
                             "default (bf16-triton) and the two fastest accurate variants so far")
    parser.add_argument("--compile-cases", type=int, default=2,
                        help="the compile variants run on this many of the first cases (last, after the decodes)")
    parser.add_argument("--speeds", type=csv, default=["fast", "balanced"], help="whole decodes (batch 1)")
    parser.add_argument("--decode-variants", type=csv, default=["eager", "bf16-triton", "fp16-triton", "bf16-triton-fwd"])
    parser.add_argument("--budget-s", type=float, default=500.0, help="the whole run's time, setup included")
    parser.add_argument("--min-cap-s", type=float, default=30.0,
                        help="no item is interrupted before this many seconds (its cap is 2x its estimate)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out-dir", help="default: benchmarks/gpu_<date>_<device>")
    parser.add_argument("--json-name", default="gpu_variants.json")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s, args.min_cap_s)

    from idemrt.speeds import SPEEDS

    for what, values, known in (("preset", args.preset, UNETS), ("codec", args.codec, CODECS),
                                ("variant", args.variants + args.decode_variants, VARIANTS),
                                ("speed", args.speeds, SPEEDS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {what} {unknown}; known: {sorted(known)}")
    try:
        args.batch = [int(b) for b in args.batch]
    except ValueError as exc:
        parser.error(str(exc))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu (a dry run)")

    env = environment(device, " ".join(["gpu_variants.py"] + (sys.argv[1:] if argv is None else list(argv))))
    tag = env["device"].replace("NVIDIA ", "").replace(" ", "_").lower() if device.type == "cuda" else "cpu"
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           f"gpu_{datetime.date.today().isoformat()}_{tag}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, args.json_name)
    peak, bandwidth = measure_peak_tflops(device), measure_bandwidth_gbs(device)
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  bf16 matmul {peak:.3g} TFLOP/s  "
          f"copy {bandwidth:.3g} GB/s  budget {args.budget_s:.0f} s", flush=True)
    result = {"environment": env, "peak_bf16_tflops": peak, "bandwidth_gbs": bandwidth, "step_index": STEP_INDEX,
              "check_steps": list(CHECK_STEPS), "eps_tol": EPS_TOL, "grad_tol": GRAD_TOL,
              "floors": [], "rows": [], "decodes": []}

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)

    cases = plan(args)
    plain = [v for v in args.variants if v not in COMPILED]
    compiled = [v for v in args.variants if v in COMPILED]
    step_ms = {}  # case -> a measured step time, for the estimates

    floors = {}  # case -> its floor row

    def run_case(pcb, variants):
        if budget.left() <= 0:  # not even the models are built
            result["rows"].extend({"preset": pcb[0], "codec": pcb[1], "batch": pcb[2], "variant": v,
                                   "status": "skipped: no time left", "step_ms": None, "step_ms_per_image": None,
                                   "accuracy_ok": None} for v in variants)
            save()
            return
        case = Case(*pcb, args, device)
        if pcb not in floors:
            fl = floors[pcb] = floor(case.key, case.unet, case.spec, case.inputs, device, peak, bandwidth)
            result["floors"].append(fl)
            save()
            print(f"[{pcb}] floor {fl['floor_ms']:.3g} ms ({fl['gflop']:.4g} GFLOP), unfused traffic "
                  f"{fl['unfused_traffic_ms']:.3g} ms", flush=True)
        gflop = floors[pcb]["gflop"]
        with exact_fp32():
            reference = eps_and_grads(create_backend("eager", case.spec, device=device), case.spec.unet, case.spec,
                                      case.inputs)
        for name in variants:
            known = step_ms.get(pcb)
            estimate = setup_estimate(name) + (args.warmup + args.repeats + 2 * len(CHECK_STEPS) + 1) * (
                known if known is not None else 1000.0) / 1e3
            row = run_variant(name, {**case.key, "gflop": gflop}, case.spec, case.unet, case.inputs, reference,
                              args, device, peak, budget, estimate)
            if row["step_ms"] is not None and name == "eager":
                step_ms[pcb] = row["step_ms"]
            result["rows"].append(row)
            save()
            print_row(row)

    def run_decodes():
        first = cases[0]
        case = Case(first[0], first[1], 1, args, device)
        for speed in args.speeds:
            for name in args.decode_variants:
                config = SPEEDS[speed]
                steps_run = round(int(config.steps) * config.start)  # a warm start runs the last steps only
                per_step = step_ms.get((first[0], first[1], 1), 1000.0) / 1e3
                estimate = setup_estimate(name) + 2 * steps_run * per_step  # two decodes
                row = run_decode(speed, name, case.unet, case.codec, case.size, device, budget, estimate)
                row.update(preset=first[0], codec=first[1])
                result["decodes"].append(row)
                save()
                print(f"decode {speed:<9} {name:<24} {row['status']:<10} "
                      f"{'-' if row['seconds'] is None else format(row['seconds'], '.3f')} s", flush=True)

    # Every variant on the first cases; then what they found best; the decodes once the first
    # preset and codec have their throughput curve.
    first_pair = sum(1 for pcb in cases if pcb[:2] == cases[0][:2])
    for k, pcb in enumerate(cases):
        run_case(pcb, plain if k < args.full_cases else selected(result["rows"], plain))
        if k == first_pair - 1 and args.speeds and args.decode_variants:
            run_decodes()
    for pcb in cases[: args.compile_cases] if compiled else []:
        run_case(pcb, compiled)

    print_table(result)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- output


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def print_row(row):
    errs = (f"eps {_fmt(max(row['eps_rel_err']))} grad {_fmt(max(row['grad_rel_err']))} "
            f"accurate: {'yes' if row['accuracy_ok'] else 'NO'}" if row.get("eps_rel_err") else "")
    print(f"  {row['preset']:<11} {row['codec']:<10} b{row['batch']:<3} {row['variant']:<30} "
          f"{_fmt(row['step_ms'])} ms  {_fmt(row['step_ms_per_image'])} ms/img  {errs}  {row['status']}", flush=True)


def print_table(result):
    print("\npreset      codec      batch variant                         step ms  ms/image  %peak  "
          "eps err  grad err  ok")
    for r in result["rows"]:
        if r["step_ms"] is None:
            print(f"{r['preset']:<11} {r['codec']:<10} {r['batch']:<5} {r['variant']:<31} {r['status']}")
            continue
        print(f"{r['preset']:<11} {r['codec']:<10} {r['batch']:<5} {r['variant']:<31} {r['step_ms']:>7.3f} "
              f"{r['step_ms_per_image']:>9.3f} {r.get('pct_peak', 0):>6.2f}  {max(r['eps_rel_err']):>7.2g}  "
              f"{max(r['grad_rel_err']):>8.2g}  {'yes' if r['accuracy_ok'] else 'NO'}")
    best = {}
    for r in result["rows"]:
        if r["accuracy_ok"]:
            key = (r["preset"], r["codec"], r["batch"])
            if key not in best or r["step_ms"] < best[key]["step_ms"]:
                best[key] = r
    for (preset, codec, batch), r in best.items():
        fl = next((f for f in result["floors"] if (f["preset"], f["codec"], f["batch"]) == (preset, codec, batch)), None)
        floor_note = f", floor {fl['floor_ms']:.3g} ms" if fl else ""
        print(f"fastest accurate: {preset} {codec} b{batch}: {r['variant']} {r['step_ms']:.3f} ms "
              f"({r['step_ms_per_image']:.3f} ms/image{floor_note})")
    for d in result["decodes"]:
        print(f"decode {d['speed']} {d['variant']}: {_fmt(d['seconds'])} s/image ({d['status']})")


if __name__ == "__main__":
    sys.exit(main())
