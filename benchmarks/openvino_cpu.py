"""OpenVINO against the torch CPU paths (issue 19 item 2), FFHQ-256 configuration, random weights.

Measured in one process, the variants interleaved call by call (so that a busy machine slows them
alike): the UNet forward (what the codec-gradient ``fast`` preset needs per step) and the guided
DPS step's gradient (UNet forward + VJP + operator, the exported step-gradient graph), each as

* torch eager fp32 (the reference),
* torch fast: bf16 where the CPU has AVX-512 BF16, channels-last (idemrt's fast backend),
* OpenVINO on the exported ONNX graph, ``INFERENCE_PRECISION_HINT`` bf16 (and f32 for the error),
* with ``--int8``, the UNet forward with 8-bit weights and activations (NNCF post-training
  quantization of OpenVINO's own conversion of the UNet; issue 19's stretch: forward-only presets).

The rule of the issue: keep ``backend="openvino"`` only if it beats the torch CPU path by >= 20 %.

    .venv/bin/python benchmarks/openvino_cpu.py --json benchmarks/openvino_cpu.json
    .venv/bin/python benchmarks/openvino_cpu.py --parts unet --int8 --json benchmarks/openvino_cpu_int8.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency  # noqa: E402  (the benchmark models: build_unet, build_codec, make_spec)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rel_err(got, want) -> float:
    got, want = torch.as_tensor(got).float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ffhq256")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="unet,step,pir",
                   help="unet (forward), step (DPS: the gradient graph), pir (the fast preset's codec-gradient step)")
    p.add_argument("--int8", action="store_true",
                   help="also the UNet forward with 8-bit weights and activations (NNCF post-training "
                        "quantization; pip install nncf==3.4.0)")
    p.add_argument("--calibration", type=int, default=16, help="x_t samples that calibrate --int8")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import openvino as ov

    from idemrt.backends.base import create_backend
    from idemrt.defaults import cpu_flags, default_fast_dtype
    from idemrt.export.onnx_export import export_step_gradient, export_unet, step_gradient_inputs

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    unet, codec = latency.build_unet(args.preset, cpu), latency.build_codec("hyperprior", cpu)
    spec = latency.make_spec(unet, codec, "ddpm", "dps", cpu)
    fast_dtype = default_fast_dtype(cpu)
    fast = create_backend("fast", spec, device=cpu, dtype=fast_dtype)
    core = ov.Core()
    env = {"cpu": latency_cpu(), "threads": torch.get_num_threads(), "openvino": ov.__version__,
           "torch": torch.__version__, "python": platform.python_version(), "fast_dtype": str(fast_dtype),
           "avx512_bf16": "avx512_bf16" in cpu_flags(), "amx_bf16": "amx_bf16" in cpu_flags(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": args.preset, "size": args.size, "batch": 1}
    print(json.dumps(env), flush=True)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="idemrt_ov_"))
    s = args.size
    x, t, target, table_rows = step_gradient_inputs(1, s, s, tuple(spec.operator(torch.zeros(1, 3, s, s)).shape[1:]),
                                                    spec.sampler)
    i = int(spec.sampler.num_steps // 2)
    noise = torch.randn_like(x)

    if "unet" in args.parts:
        t0 = time.perf_counter()
        graph = export_unet(unet, tmp / "unet.onnx", s, s)
        export_s = time.perf_counter() - t0
        ov_bf16, ov_f32 = compile_model(core, graph.path, "bf16"), compile_model(core, graph.path, "f32")
        feed = {"x_t": x.numpy(), "t": t.numpy()}
        extra = {"export_s": round(export_s, 1)}
        with torch.no_grad():
            want = unet(x, t)
            variants = {
                "torch eager fp32": lambda: unet(x, t),
                f"torch fast {fast_dtype}".replace("torch.", ""): lambda: fast.model_output(x, t),
                "openvino bf16": lambda: ov_bf16(feed),
            }
            if args.int8:
                t0 = time.perf_counter()
                ov_int8 = quantized_unet(core, unet, spec.sampler, tuple(x.shape), args.calibration)
                extra["quantize_s"] = round(time.perf_counter() - t0, 1)
                variants["openvino int8 (NNCF)"] = lambda: ov_int8((x.numpy(), t.numpy()))
            errors = {name: rel_err(fn()[0] if name.startswith("openvino") else fn(), want)
                      for name, fn in variants.items()}
            errors["openvino f32"] = rel_err(ov_f32(feed)[0], want)
            rows += measure("unet forward", variants, errors, args.repeats, extra)
    def guided(what, step_spec, path, compare, index):
        """One guided step: torch eager and fast against OpenVINO on the exported graph, which is
        all of the step but the elementwise update (negligible); ``compare`` names output ``index``,
        compared between OpenVINO bf16 and f32."""
        eager_b = create_backend("eager", step_spec, device=cpu)
        fast_b = create_backend("fast", step_spec, device=cpu, dtype=fast_dtype)
        t0 = time.perf_counter()
        graph = export_step_gradient(unet, tmp / path, s, s, codec=codec, sampler=step_spec.sampler,
                                     guidance=step_spec.guidance)
        export_s = time.perf_counter() - t0
        ov_bf16, ov_f32 = compile_model(core, graph.path, "bf16"), compile_model(core, graph.path, "f32")
        feed = {"x_t": x.numpy(), "t": t.numpy(), "target": target.numpy(), "rows": table_rows.numpy()}
        want = eager_b.step(x, i, target, noise)[0]
        variants = {
            "torch eager fp32": lambda: eager_b.step(x, i, target, noise),
            f"torch fast {fast_dtype}".replace("torch.", ""): lambda: fast_b.step(x, i, target, noise),
            "openvino bf16": lambda: ov_bf16(feed),
        }
        errors = {"torch fast": rel_err(fast_b.step(x, i, target, noise)[0], want),
                  f"openvino bf16 {compare} vs f32": rel_err(ov_bf16(feed)[index], torch.as_tensor(ov_f32(feed)[index]))}
        return measure(what, variants, errors, args.repeats, {"export_s": round(export_s, 1)})

    if "step" in args.parts:
        rows += guided("DPS step (gradient graph for OpenVINO)", spec, "step.onnx", "grad", 2)
    if "pir" in args.parts:
        rows += guided("PIR step (proximal graph for OpenVINO)", latency.make_spec(unet, codec, "ddpm", "pir", cpu),
                       "pir.onnx", "x0'", 1)
    result = {"environment": env, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def compile_model(core, model, precision: str):
    """An OpenVINO model (or the graph file at ``model``) compiled for latency on torch's intra-op
    thread count."""
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    return core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads())})


def quantized_unet(core, unet, sampler, shape, n, x0=None):
    """``unet``'s forward at ``shape`` with 8-bit weights and activations, compiled like the others
    (bf16 where an op stays unquantized): OpenVINO's PyTorch frontend converts it (NNCF fails on
    the ONNX export's graph: a KeyError on its select nodes, NNCF 3.4.0), NNCF's post-training
    quantization (the mixed preset: symmetric weights, asymmetric activations) quantizes it,
    calibrated on ``n`` inputs the sampler would feed it: x_t = sqrt(abar)·x0 + sqrt(1-abar)·noise
    at timesteps spread over the schedule, x0 from ``x0(generator)`` (in [-1, 1], of ``shape``;
    default uniform noise: enough for timing). Called with ``(x_t, t)`` as numpy arrays."""
    import nncf
    import openvino as ov

    gen = torch.Generator().manual_seed(1)
    samples = []
    for k in range(n):
        i = (k * sampler.num_steps) // n
        t = sampler.model_timesteps(i, 1).to(torch.float32)
        abar = float(sampler.rows(i)[0]) ** -2  # column 0 is sqrt(1/abar)
        clean = x0(gen) if x0 is not None else torch.rand(shape, generator=gen) * 2 - 1
        x_t = abar ** 0.5 * clean + (1 - abar) ** 0.5 * torch.randn(shape, generator=gen)
        samples.append((x_t.numpy(), t.numpy()))
    with torch.no_grad():
        model = ov.convert_model(unet, example_input=(torch.zeros(shape), torch.tensor([500.0])))
    model = nncf.quantize(model, nncf.Dataset(samples), subset_size=n, preset=nncf.QuantizationPreset.MIXED)
    return compile_model(core, model, "bf16")


class QuantizedUNet(torch.nn.Module):
    """``unet(x_t, t)`` on OpenVINO with 8-bit weights and activations, converted and quantized on
    the first call of each (H, W) (:func:`quantized_unet`, x0 cut at random from ``images``: (1, 3,
    H', W') in [0, 1], at least as large). Forward-only: what the codec-gradient (PIR) step needs;
    ``benchmarks/modes.py --backend openvino-int8`` decodes with it."""

    def __init__(self, unet, sampler, images, n: int = 16):
        super().__init__()
        import openvino as ov

        self.unet, self.sampler, self.images, self.n = unet, sampler, images, n
        self.core, self.models = ov.Core(), {}

    def _crop(self, gen, h, w):
        img = self.images[int(torch.randint(len(self.images), (1,), generator=gen))]
        top = int(torch.randint(img.shape[-2] - h + 1, (1,), generator=gen))
        left = int(torch.randint(img.shape[-1] - w + 1, (1,), generator=gen))
        return img[..., top : top + h, left : left + w] * 2 - 1

    def forward(self, x, t):
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the 8-bit UNet is forward-only: decode with a codec-gradient (pir) configuration")
        h, w = x.shape[-2:]
        model = self.models.get((h, w))
        if model is None:
            model = self.models[(h, w)] = quantized_unet(self.core, self.unet, self.sampler, (1, 3, h, w), self.n,
                                                         x0=lambda gen: self._crop(gen, h, w))
        out = model((x.detach().float().numpy(), t.float().numpy()))[0]
        return torch.from_numpy(out)


def measure(what, variants, errors, repeats, extra) -> list:
    for fn in variants.values():  # warm-up (OpenVINO's first inference, allocations)
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    base = statistics.median(times[next(iter(variants))])
    out = []
    for name, ts in times.items():
        row = {"what": what, "variant": name, "median_s": round(statistics.median(ts), 3),
               "min_s": round(min(ts), 3), "speedup_vs_eager": round(base / statistics.median(ts), 2), **extra}
        out.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"what": what, "relative_errors": errors}), flush=True)
    out.append({"what": what, "relative_errors": errors})
    return out


def latency_cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    raise SystemExit(main())
