"""Latency of the guided step and of whole decodes: the reference's way vs idemrt's backends.

    python benchmarks/latency.py --json latency.json              # CUDA: every preset x codec x batch x mode
    python benchmarks/latency.py --preset ffhq256 --codec hyperprior --batch 1 --modes eager,fast
    python benchmarks/latency.py --device cpu --preset tiny --codec tiny --batch 1 \\
        --decode-steps 2 --repeats 1 --warmup 0                    # smoke test (CI); numbers mean nothing

Models have random weights (timing does not depend on them) and are built on the device directly.
Guidance is DPS with a DDPM sampler (the paper's configuration) unless ``--sampler/--guidance`` say
otherwise; the constraint is the "x" operator of ``idemrt.Decoder``: ||2·A((x0+1)/2)-1 - target||.

Modes:
  reference     fp32 eager, run the way the official code runs (docs/reference_code.md §1.5): UNet parameters
                require grad and every attention block is checkpointed by guided-diffusion's
                CheckpointFunction (forward recomputed in backward, parameter gradients computed
                and discarded). Its per-step host syncs and coefficient uploads
                (docs/reference_code.md §2.11) are NOT emulated: this row is a lower bound for it.
  eager         idemrt's eager backend (fp32, frozen weights, no graphs).
  fast          idemrt's fast backend (--dtype, default bf16; CUDA graphs on CUDA); fast-triton and
                fast-compile are the same with kernels="triton" / kernels="compile".
  onnxruntime,  the exporting backends; "unavailable: <reason>" when their module is missing or
  tensorrt      they raise BackendError.

Per mode: ms of the UNet forward, UNet forward+VJP (d/dx of <out, v>), operator forward+VJP, one whole
guided step (median of --repeats after --warmup; CUDA events on CUDA; the fast modes' components are
replayed from CUDA graphs, as in their step), and seconds of whole decodes of N steps (one run each:
N steps of the mode's step function driven by idemrt's own sampling loop — StepBatcher over
GuidedSampler, as Decoder runs it: per-image generators on the device, a finiteness check every 10
steps; if N x step would exceed --max-decode-seconds the decode is not run and the value is the step time x
N, marked "extrapolated"); with ``--speeds``, seconds of one whole decode per speed preset through
``idemrt.Decoder`` with the mode's backend (entropy decode, warm start, the preset's steps, exact
refinement; batch 1, a random image encoded by the codec; the first call of the backend, so
per-shape setup such as graph captures is included — except the exporting backends' export or
load of their graphs, done by ``prepare`` first and recorded apart as ``setup_seconds``). FLOPs
per step are counted with torch.utils.flop_counter's formulas on one
uncaptured step: "useful" = the eager step's (the algorithm), "executed" = the mode's own (the
reference also recomputes attention and computes parameter gradients). TFLOP/s = useful FLOPs / step
time, against the bf16 matmul peak measured here (an 8192^3 matmul on CUDA).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import types
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from idemrt.backends.base import StepSpec, create_backend
from idemrt.backends.cuda_graphs import capture, cudnn_autotune
from idemrt.defaults import DTYPE_CHOICES, cpu_flags, dtype_from_name, physical_cores
from idemrt.batching import StepBatcher, sample_jobs
from idemrt.diffusion import GUIDANCE, SAMPLERS, GuidedSampler, Schedule, distance, guided_step
from idemrt.errors import BackendError
from idemrt.models.codec import diffusion_operator
from idemrt.models.unet import PRESETS, ADMUNet, AttentionBlock, UNetConfig

TINY_UNET = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                       attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True,
                       resblock_updown=True)
UNETS = {**PRESETS, "tiny": TINY_UNET}
# The CPU features that decide the CPU fast path's arithmetic (printed and recorded with the results).
CPU_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile"}
CODECS = {
    "hyperprior": ("bmshj2018-hyperprior", 1),  # quality 1 widths: N=128, M=192
    "elic": ("elic2022-chandelier", None),  # compressai's defaults: N=192, M=320
    "tiny": ("bmshj2018-hyperprior", None),  # N=M=16, for smoke tests
}
TORCH_MODES = ("reference", "eager", "fast", "fast-triton", "fast-compile")
EXPORT_MODES = ("onnxruntime", "tensorrt")
COMPONENTS = ("unet_fwd", "unet_fwd_vjp", "operator_fwd_vjp")
STEP_INDEX = 500  # the timed single step: mid-schedule of 1000 steps (any i costs the same)


# --------------------------------------------------------------------------- the reference's UNet


class _CheckpointFunction(torch.autograd.Function):
    """guided-diffusion's ``nn.CheckpointFunction``, which every AttentionBlock goes through with the
    flag hard-wired on: forward without autograd, then in backward the block is re-run and
    differentiated w.r.t. its input *and all its parameters* (the parameter gradients are discarded)."""

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])
        grads = torch.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        return (None, None) + grads


class _CheckpointedAttention(nn.Module):
    def __init__(self, block: AttentionBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        return _CheckpointFunction.apply(self.block, 1, x, *self.block.parameters())


def reference_unet(unet: ADMUNet) -> nn.Module:
    """A view of ``unet`` (same parameter tensors) whose attention blocks are checkpointed as in
    guided-diffusion. The caller sets ``requires_grad`` on the shared parameters (the reference needs
    it on: its checkpoint differentiates w.r.t. them)."""
    view = copy.deepcopy(unet, {id(p): p for p in unet.parameters()})
    for name, module in list(view.named_modules()):
        if isinstance(module, AttentionBlock):
            parent, _, attr = name.rpartition(".")
            setattr(view.get_submodule(parent), attr, _CheckpointedAttention(module))
    return view


# --------------------------------------------------------------------------- models and inputs


def build_unet(preset: str, device: torch.device) -> ADMUNet:
    """Random weights, initialised on the device (no 550M-parameter init on the CPU)."""
    with torch.device(device):
        unet = ADMUNet(UNETS[preset])
        with torch.no_grad():
            for p in unet.parameters():
                if not p.any():  # ADM zero-initialises residual branches and the head
                    p.normal_(0.0, 0.02)
    return unet.eval()


def build_codec(name: str, device: torch.device):
    from compressai.models import ScaleHyperprior

    from idemrt.models.codec import Codec
    from idemrt.models.codec_loading import load_codec

    arch, quality = CODECS[name]
    if name == "tiny":
        model = ScaleHyperprior(N=16, M=16)
        model.update(force=True)
        return Codec(arch, model).to(device)
    return load_codec(arch, quality, random_init=True, device=device)


def make_spec(unet, codec, sampler_name: str, guidance_name: str, device) -> StepSpec:
    sampler = SAMPLERS[sampler_name](Schedule.create(1000)).to(device)
    guidance = GUIDANCE[guidance_name]()  # DPS(0.6) or DSG(interval=1): the shipped settings
    return StepSpec(unet=unet, operator=diffusion_operator(codec, "x"), codec=codec, constraint="x", sampler=sampler,
                    guidance=guidance)


# --------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events around each call on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graphed(fn, device):
    """``fn`` captured in a CUDA graph as the fast backend captures (cuDNN autotuned, warmed up on a
    side stream first); returns its replay."""
    if device.type != "cuda":
        return fn
    with cudnn_autotune(device):
        graph, _ = capture(fn, device)
    return graph.replay


class _FlopCount(TorchDispatchMode):
    """FlopCounterMode's formulas without its module tracker (whose backward hooks do not support
    torch.autograd.grad, which every guided step calls)."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.registry = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn) -> int:
    with _FlopCount() as counter:
        fn()
    return counter.total


def measure_peak_tflops(device) -> float:
    """bf16 matmul throughput measured here (TFLOP/s): 8192^3 on CUDA, 512^3 on CPU."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------- one mode


class Mode:
    """How one mode computes the pieces that are timed."""

    def __init__(self, name, spec, unet, args, device):
        self.name, self.device = name, device
        self.graphs = False
        self.backend = None
        self.uncaptured = None  # a step without CUDA graphs, for counting FLOPs
        op = spec.operator
        if name == "reference":
            unet.requires_grad_(True)
            model = reference_unet(unet)
            self.unet_fn, self.operator_fn = model, op
            self.step_fn = lambda x, i, target, noise: guided_step(
                model, op, spec.sampler, spec.guidance, x, i, target, noise)
            self.uncaptured = self.step_fn
        elif name == "eager":
            unet.requires_grad_(False)
            self.backend = create_backend("eager", spec, device=device)
            self.unet_fn, self.operator_fn = unet, op
            self.step_fn = self.uncaptured = self.backend.step
        elif name.startswith("fast"):
            from idemrt.backends.fast import FastBackend

            unet.requires_grad_(False)
            kernels = name.partition("-")[2] or "torch"
            self.backend = FastBackend(spec, device=device, dtype=dtype_from_name(args.dtype),
                                       operator_dtype=dtype_from_name(args.operator_dtype or args.dtype), kernels=kernels)
            self.graphs = self.backend.graphs
            self.unet_fn, self.operator_fn = self.backend.model_output, self.backend.apply_operator
            self.step_fn = self.backend.step
            # torch.compile'd code refuses to run under a dispatch mode (the FLOP counter); the math,
            # hence the count, is that of the plain fast mode.
            self.uncaptured = None if kernels == "compile" else self.backend.step_uncaptured
        else:  # exporting backends: only the step is theirs
            unet.requires_grad_(False)
            self.backend = create_backend(name, spec, device=device, dtype=None)
            self.unet_fn = self.operator_fn = None
            self.step_fn = self.backend.step

    def components(self, x, t, x0, target, cotangent):
        """name -> zero-argument function, for the pieces this mode exposes."""
        if self.unet_fn is None:
            return {}

        def unet_fwd():
            with torch.no_grad():
                self.unet_fn(x, t)

        def unet_fwd_vjp():
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(self.unet_fn(xg, t), xg, cotangent)

        def operator_fwd_vjp():
            x0g = x0.detach().requires_grad_(True)
            torch.autograd.grad(distance(target, self.operator_fn(x0g)).sum(), x0g)

        return {"unet_fwd": unet_fwd, "unet_fwd_vjp": unet_fwd_vjp, "operator_fwd_vjp": operator_fwd_vjp}


def run_mode(name, spec, unet, inputs, args, device, useful_flops, peak) -> dict:
    """One row: the mode's timings and FLOPs, or why it could not run."""
    row = {"mode": name}
    try:
        mode = Mode(name, spec, unet, args, device)
        row.update(status="ok", **measure(mode, inputs, args, device, useful_flops, peak))
    except (BackendError, ImportError) as exc:
        row["status"] = f"unavailable: {exc}"
    except Exception as exc:  # noqa: BLE001 - an exporting backend failing is a result, not a crash
        if name not in EXPORT_MODES:
            raise
        row["status"] = f"error: {type(exc).__name__}: {exc}"
    finally:
        unet.requires_grad_(False)
    return row


def measure(mode: Mode, inputs, args, device, useful_flops, peak) -> dict:
    x, t, x0, target, noise, cotangent = inputs
    ms = {}
    for key, fn in mode.components(x, t, x0, target, cotangent).items():
        if key not in args.components:
            continue
        replay = graphed(fn, device) if mode.graphs else fn
        ms[key] = time_ms(replay, device, args.warmup, args.repeats)
        del replay  # frees a captured graph's memory pool
    # At least one warm-up call: the fast modes capture their graph in their first step.
    ms["step"] = time_ms(lambda: mode.step_fn(x, STEP_INDEX, target, noise), device, max(args.warmup, 1), args.repeats)
    out = {"ms": ms, "gflop_useful": useful_flops / 1e9}
    if mode.uncaptured is not None:
        out["gflop_executed"] = count_flops(lambda: mode.uncaptured(x, STEP_INDEX, target, noise)) / 1e9
    out["tflops"] = useful_flops / (ms["step"] * 1e-3) / 1e12
    out["pct_peak"] = 100 * out["tflops"] / peak

    out["decode_s"] = {}
    for n in args.decode_steps:
        estimate = ms["step"] * n / 1e3
        if estimate > args.max_decode_seconds:
            out["decode_s"][str(n)] = {"seconds": estimate, "extrapolated": True}
            continue
        out["decode_s"][str(n)] = {"seconds": time_ms(lambda n=n: decode(mode, n, target, x.shape, device), device, 0, 1) / 1e3,
                                   "extrapolated": False}
    return out


class _StepOf:
    """A mode's step as the backend the sampling loop drives (the reference mode has no backend)."""

    slot_counts = None  # the Backend protocol's: the batch runs at its own size

    def __init__(self, step_fn):
        self.step = lambda x, i, target, noise, scale=None: step_fn(x, i, target, noise)
        # the Backend protocol's spec: only its tile is read (None: whole images, no window steps)
        self.spec = types.SimpleNamespace(tile=None)


def decode(mode: Mode, n: int, target, shape, device) -> None:
    """An n-step decode of the batch through idemrt's own loop (StepBatcher over GuidedSampler:
    per-image generators on the device, the finiteness check every 10 steps), as Decoder runs it."""
    sampler = GuidedSampler(_StepOf(mode.step_fn), n, device=device, scale=0.6)
    # The steps are positions n-1 .. 0 of the mode's 1000-step schedule: any step costs the same.
    batch = shape[0]
    sample_jobs(StepBatcher(sampler, max_slots=batch, max_queue=batch),
                [(target[k : k + 1], k, (1, *shape[1:]), None, None) for k in range(batch)])


def decoder_backend(name: str):
    """(backend, backend_options) of ``idemrt.Decoder`` for a mode, or None (the reference has none)."""
    if name == "reference":
        return None
    if name.startswith("fast"):
        return "fast", {"kernels": name.partition("-")[2] or "torch"}
    return name, {}


def speed_decodes(name, unet, codec, size, args, device) -> dict:
    """speed -> seconds of one whole ``Decoder.decode`` (batch 1) with this mode's backend."""
    import numpy as np

    from idemrt import Decoder, Encoder
    from idemrt.speeds import SPEEDS

    chosen = decoder_backend(name)
    if chosen is None or not args.speeds:
        return {}
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    bitstream = Encoder(codec).encode(image)
    dtype = {"dtype": args.dtype} if name.startswith("fast") else {}
    out = {}
    for speed in args.speeds:
        config = SPEEDS[speed].replace(backend=chosen[0], backend_options=chosen[1], **dtype)
        decoder = Decoder(codec, unet, config=config, device=device)
        setup = 0.0
        if hasattr(decoder.backend, "prepare"):
            # Exporting backends export (or load) their graphs once per shape: minutes for the
            # full-size UNets. Timed apart, so that the decode is comparable to the torch backends'.
            t0 = time.perf_counter()
            prepared = decoder.prepare(bitstream, seed=0)
            decoder.backend.prepare(prepared.shape, None if prepared.target is None else tuple(prepared.target.shape[1:]))
            setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoder.decode(bitstream, seed=0, output="tensor")
        sync(device)
        out[speed] = {"seconds": time.perf_counter() - t0, "steps": decoder.last.steps, "setup_seconds": setup}
        del decoder
        gc.collect()
    return out


def run_case(preset, codec_name, batch, args, device, peak, rows, save):
    print(f"[{preset} / {codec_name} / batch {batch}] building models", file=sys.stderr, flush=True)
    unet = build_unet(preset, device)
    codec = build_codec(codec_name, device)
    spec = make_spec(unet, codec, args.sampler, args.guidance, device)
    size = args.size or UNETS[preset].image_size
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, 3, size, size)
    x = torch.randn(shape, device=device, generator=gen)
    x0 = torch.rand(shape, device=device, generator=gen) * 2 - 1
    with torch.no_grad():
        target = spec.operator(torch.rand(shape, device=device, generator=gen) * 2 - 1)
    noise = torch.randn(shape, device=device, generator=gen)
    t = spec.sampler.model_timesteps(STEP_INDEX, batch)
    cotangent = torch.randn((batch, UNETS[preset].out_channels, size, size), device=device, generator=gen)
    inputs = (x, t, x0, target, noise, cotangent)

    unet.requires_grad_(False)
    useful = count_flops(lambda: guided_step(unet, spec.operator, spec.sampler, spec.guidance,
                                             x, STEP_INDEX, target, noise))
    for name in args.modes:
        print(f"  {name}", file=sys.stderr, flush=True)
        row = run_mode(name, spec, unet, inputs, args, device, useful, peak)
        row.update(preset=preset, codec=codec_name, batch=batch, size=size)
        if row["status"] == "ok" and batch == 1:
            row["speed_decode_s"] = speed_decodes(name, unet, codec, size, args, device)
        rows.append(row)
        save()
        print_row(row)
        gc.collect()  # the mode's backend, graphs and model copies
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- output


def environment(device, command) -> dict:
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_physical_cores": physical_cores(),
        "cpu_flags": sorted(cpu_flags() & CPU_FLAGS),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown (nvidia-smi failed)"
    else:
        env["device"] = "cpu"
    return env


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_row(row):
    head = f"{row['preset']:<11} {row['codec']:<10} b{row['batch']:<2} {row['mode']:<12}"
    if row["status"] != "ok":
        print(f"{head} {row['status']}", flush=True)
        return
    ms = row["ms"]
    decode = "  ".join(
        f"N={n}: {d['seconds']:.2f}s{'*' if d['extrapolated'] else ''}" for n, d in row["decode_s"].items())
    decode += "".join(f"  {speed}: {d['seconds']:.2f}s ({d['steps']} steps"
                      + (f", setup {d['setup_seconds']:.1f}s)" if d.get("setup_seconds") else ")")
                      for speed, d in row.get("speed_decode_s", {}).items())
    print(f"{head} unet_fwd {_fmt(ms.get('unet_fwd'))}  unet_fwd+vjp {_fmt(ms.get('unet_fwd_vjp'))}  "
          f"op_fwd+vjp {_fmt(ms.get('operator_fwd_vjp'))}  step {_fmt(ms['step'])} ms | "
          f"GFLOP/step useful {row['gflop_useful']:.1f} executed {_fmt(row.get('gflop_executed'), '.1f')} | "
          f"{row['tflops']:.3g} TFLOP/s ({row['pct_peak']:.3g}% of peak) | decode {decode}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", type=csv, default=["ffhq256", "imagenet256"], help=f"of {sorted(UNETS)}")
    parser.add_argument("--codec", type=csv, default=["hyperprior", "elic"], help=f"of {sorted(CODECS)}")
    parser.add_argument("--batch", type=csv, default=["1", "8"])
    parser.add_argument("--modes", type=csv, default=list(TORCH_MODES + EXPORT_MODES))
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="compute dtype of the fast modes")
    parser.add_argument("--operator-dtype", choices=DTYPE_CHOICES, help="the fast modes' operator dtype (default: --dtype)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--guidance", choices=["dps", "dsg", "pir"], default="dps")
    parser.add_argument("--size", type=int, help="image side (default: the preset's image_size)")
    parser.add_argument("--decode-steps", type=csv, default=["100", "250", "1000"])
    parser.add_argument("--max-decode-seconds", type=float, default=60.0,
                        help="longer decodes are extrapolated from the step time (and marked so)")
    parser.add_argument("--speeds", type=csv, default=[],
                        help="also time one whole Decoder decode per speed preset (batch 1), e.g. balanced,fast")
    parser.add_argument("--components", type=csv, default=list(COMPONENTS),
                        help=f"which step components to time besides the step, of {list(COMPONENTS)} "
                             "(none: '')")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from idemrt.speeds import SPEEDS

    for name, values, known in (("preset", args.preset, UNETS), ("codec", args.codec, CODECS),
                                ("mode", args.modes, TORCH_MODES + EXPORT_MODES), ("speed", args.speeds, SPEEDS),
                                ("component", args.components, COMPONENTS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {name} {unknown}; known: {sorted(known)}")
    try:
        args.batch = [int(b) for b in args.batch]
        args.decode_steps = [int(n) for n in args.decode_steps]
    except ValueError as exc:
        parser.error(str(exc))
    if any(b < 1 for b in args.batch) or any(not 1 <= n <= 1000 for n in args.decode_steps):
        parser.error("batch sizes must be >= 1 and decode steps in [1, 1000]")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu (smoke test only)")

    torch.manual_seed(0)
    env = environment(device, " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:] if argv is None else argv))
    peak = measure_peak_tflops(device)
    print(f"device {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"bf16 matmul peak (measured) {peak:.3g} TFLOP/s", flush=True)
    if device.type == "cpu":
        print(f"cpu {env['cpu']}  {env['cpu_threads']} threads  {env['cpu_physical_cores']} physical cores  "
              f"flags {' '.join(env['cpu_flags']) or '-'}", flush=True)
    rows = []

    def save():  # after every mode, so that a run stopped at a time limit keeps what it measured
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({"environment": env, "peak_bf16_tflops": peak, "step_index": STEP_INDEX,
                           "sampler": args.sampler, "guidance": args.guidance, "rows": rows}, f, indent=2)
            os.replace(args.json + ".tmp", args.json)

    for preset in args.preset:
        for codec_name in args.codec:
            for batch in args.batch:
                run_case(preset, codec_name, batch, args, device, peak, rows, save)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
