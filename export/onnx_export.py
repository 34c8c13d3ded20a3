"""ONNX graphs of the codec transforms, the UNet and the guided-step gradient.

Every graph goes the same way: the function is traced by :func:`joint_graph.trace`
(weights frozen into constants, backward ops rewritten as forward ops, attention as
MatMul + Softmax), then the FX graph is exported by ``torch.onnx.export(dynamo=True)``
at opset :data:`OPSET` with a dynamic batch (and, if asked, dynamic height/width).

Graphs (input names -> output names, N the dynamic batch):

=============== ================================================ ==========================
graph           inputs                                           outputs
=============== ================================================ ==========================
synthesis       y_hat (N, M, h, w)                               x_hat (N, 3, 16h, 16w)
analysis        x (N, 3, H, W) in [0, 1]                         y (N, M, H/16, W/16)
unet            x_t (N, 3, H, W), t (N,) float original steps    model_out (N, 6, H, W)
step_gradient   x_t, t, target, rows (N, K)                      model_out, dist (N,), grad
  (PIR)         x_t, t, target, rows (N, K)                      model_out, x0, dist (N,)
=============== ================================================ ==========================

With proximal guidance (PIR) the step graph is :func:`idemrt.diffusion.step.proximal_x0` traced
(:func:`joint_graph.proximal_fn`): a UNet forward, then the guidance's fixed number of data steps
through the operator (its constants — iters, lam, jac_norm2, step_size, clip — are baked in);
``x0`` is x0' and ``dist`` is ``||target - A(x0')||``.

``step_gradient`` is :func:`idemrt.diffusion.step.step_gradient` traced
(:func:`joint_graph.step_gradient_fn`): ``rows`` are the sampler's coefficient-table rows of
each sample's step (``sampler.rows(i)``; K columns, ``sampler.columns``), ``dist`` the
per-sample ``||target - A(x0)||`` and ``grad = d dist / d x_t``. The graph is specific to the
sampler's table layout (DDPM's or DDIM's), not to its schedule.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from idemrt.deprecation import renamed_argument
from idemrt.diffusion import DDPMSampler, Schedule
from idemrt.errors import BackendError
from idemrt.models.codec import diffusion_operator as codec_operator  # A as every backend forms it

from .joint_graph import proximal_fn, step_gradient_fn, trace

__all__ = [
    "OPSET",
    "PROXIMAL_OUTPUTS",
    "STEP_INPUTS",
    "STEP_OUTPUTS",
    "ExportedGraph",
    "check_exportable_codec",
    "codec_operator",
    "default_sampler",
    "export_analysis",
    "export_graph",
    "export_step_gradient",
    "export_synthesis",
    "export_unet",
    "file_sha256",
    "interior_step_inputs",
    "max_relative_errors",
    "step_gradient_inputs",
    "validate_with_onnxruntime",
]

OPSET = 18  # >= 17, as TensorRT 10's parser wants; ONNX Runtime supports it fully
MAX_BATCH = 64  # upper bound of the dynamic batch dimension
_TRACE_BATCH = 2  # traced at batch 2: symbolic tracing specialises dims of size 1
_MAX_SIDE = 4096  # upper bound of a dynamic image side
_HW_STEP = 64  # dynamic H/W are multiples of this (the codecs' and UNets' total stride)


@dataclass(frozen=True)
class ExportedGraph:
    """An exported ONNX file and how to call it."""

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_dims: tuple[str, ...]  # names of the symbolic dims (ONNX dim_param)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of an ONNX file together with its external-data files (sorted by name)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    h = hashlib.sha256()
    h.update(path.read_bytes())
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({
        entry.value
        for init in model.graph.initializer if uses_external_data(init)
        for entry in init.external_data if entry.key == "location"
    })
    for loc in locations:
        with open(path.parent / loc, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _dims(dynamic: Mapping[str, Mapping[int, str]], names: Sequence[str]):
    """``{input: {axis: dim name}}`` -> torch.export dynamic_shapes (dims shared by name)."""
    made: dict[str, object] = {}

    def dim(name: str):
        if name not in made:
            if name == "batch":
                made[name] = torch.export.Dim(name, min=1, max=MAX_BATCH)
            else:
                # Image sides must stay multiples of the networks' total stride (see _check_hw),
                # so that every strided layer -- and its gradient's output padding -- is the same
                # for all sizes. (A derived dim, 64*k, would say so, but torch.export mis-solves it.)
                made[name] = torch.export.Dim(name, min=2, max=_MAX_SIDE)
        return made[name]

    return tuple({axis: dim(n) for axis, n in dynamic.get(name, {}).items()} or None for name in names)


def export_graph(fn: Callable[..., Sequence[Tensor]], example_inputs: Sequence[Tensor], path: str | os.PathLike,
                 *, input_names: Sequence[str], output_names: Sequence[str],
                 dynamic: Mapping[str, Mapping[int, str]], modules: Sequence[nn.Module] = ()) -> ExportedGraph:
    """Trace ``fn`` (closing over ``modules``) and write it to ``path`` as ONNX.

    ``dynamic`` names the symbolic axes per input, e.g. ``{"x": {0: "batch"}}``;
    other axes are fixed to the example's sizes. Raises BackendError if the
    function cannot be traced or exported.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(example_inputs)
    axes = [tuple(dynamic.get(name, {})) for name in input_names]
    try:
        gm = trace(fn, inputs, modules, axes).eval()
        with warnings.catch_warnings():
            # Every input's batch axis is the one dim "batch"; the exporter notes each repetition.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            # optimize=False: the exporter's ONNX optimizer would double the export time;
            # onnxruntime and TensorRT fold constants themselves when they load the graph.
            program = torch.onnx.export(
                gm, inputs, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=_dims(dynamic, input_names), opset_version=OPSET, dynamo=True,
                optimize=False, verbose=False,
            )
            program.save(str(path))
    except Exception as exc:  # noqa: BLE001 - tracing/exporter failures surface as one typed error
        raise BackendError(f"cannot export {path.name} to ONNX: {type(exc).__name__}: {exc}") from exc
    names = sorted({n for axes in dynamic.values() for n in axes.values()})
    return ExportedGraph(path, tuple(input_names), tuple(output_names), tuple(names))


def _check_hw(height: int, width: int, dynamic_hw: bool) -> None:
    step = _HW_STEP if dynamic_hw else 16
    if not (isinstance(height, int) and isinstance(width, int)) or min(height, width) <= 0 \
            or height % step or width % step:
        raise ValueError(f"height and width must be positive multiples of {step}"
                         f"{' for a dynamic size' if dynamic_hw else ''}, got {height}x{width}")


def _image_axes(dynamic_hw: bool) -> dict[int, str]:
    return {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}


def _codec_modules(codec) -> list[nn.Module]:
    if isinstance(codec, nn.Module):
        return [codec]
    return [codec.model] if isinstance(getattr(codec, "model", None), nn.Module) else []


def check_exportable_codec(codec) -> None:
    """Raise BackendError for codecs whose operator cannot become one static graph."""
    latent_family = getattr(codec, "latent_family", None)
    if latent_family is not None and latent_family.serial:
        raise BackendError(
            f"codec {codec.name!r}: its serial autoregressive context model (one "
            "decoding step per latent position) is not exported to ONNX; exportable codecs: "
            "bmshj2018-factorized, bmshj2018-hyperprior, mbt2018-mean, elic2022-*"
        )


def _randn(*shape) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def export_synthesis(codec, path, latent_shape: Sequence[int], *, dynamic_hw: bool = False) -> ExportedGraph:
    """``x_hat = codec.synthesis(y_hat)``, the MSE decode (unclamped); latent_shape = (M, h, w)."""
    m, h, w = latent_shape
    _check_hw(16 * h, 16 * w, dynamic_hw)
    axes = {0: "batch", 2: "latent_height", 3: "latent_width"} if dynamic_hw else {0: "batch"}
    return export_graph(lambda y: (codec.synthesis(y),), (_randn(_TRACE_BATCH, m, h, w),), path,
                        input_names=["y_hat"], output_names=["x_hat"], dynamic={"y_hat": axes},
                        modules=_codec_modules(codec))


def export_analysis(codec, path, height: int, width: int, *, dynamic_hw: bool = False) -> ExportedGraph:
    """``y = codec.analysis(x)`` for x in [0, 1]."""
    _check_hw(height, width, dynamic_hw)
    x = torch.rand(_TRACE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    return export_graph(lambda x: (codec.analysis(x),), (x,), path, input_names=["x"], output_names=["y"],
                        dynamic={"x": _image_axes(dynamic_hw)}, modules=_codec_modules(codec))


def export_unet(unet: nn.Module, path, height: int, width: int, *, dynamic_hw: bool = False) -> ExportedGraph:
    """``model_out = unet(x_t, t)``; t holds the original timesteps as float32."""
    _check_hw(height, width, dynamic_hw)
    inputs = (_randn(_TRACE_BATCH, 3, height, width), torch.tensor([999.0, 0.0][:_TRACE_BATCH]))
    return export_graph(lambda x, t: (unet(x, t),), inputs, path, input_names=["x_t", "t"],
                        output_names=["model_out"],
                        dynamic={"x_t": _image_axes(dynamic_hw), "t": {0: "batch"}}, modules=[unet])


STEP_INPUTS = ("x_t", "t", "target", "rows")
STEP_OUTPUTS = ("model_out", "dist", "grad")
PROXIMAL_OUTPUTS = ("model_out", "x0", "dist")


def default_sampler():
    """The sampler whose table layout a step graph takes when none is given: DDPM's."""
    return DDPMSampler(Schedule.create(1000))


def step_gradient_inputs(batch: int, height: int, width: int, target_shape: Sequence[int],
                         sampler=None) -> tuple[Tensor, ...]:
    """Example inputs of the step-gradient graph: a mid-schedule step of ``sampler`` (default
    :func:`default_sampler`), the same for every sample (sqrt(1/abar) about 1.5)."""
    sampler = sampler or default_sampler()
    g = torch.Generator().manual_seed(0)
    i = int((sampler.coefficients()[:, 0] - 1.5).abs().argmin())
    return (
        torch.randn(batch, 3, height, width, generator=g),
        sampler.model_timesteps(i, batch).to(torch.float32),
        torch.randn(batch, *target_shape, generator=g) * 0.5,
        sampler.rows(torch.full((batch,), i)),
    )


def interior_step_inputs(unet: nn.Module, batch: int, height: int, width: int,
                         target_shape: Sequence[int], sampler=None) -> tuple[Tensor, ...]:
    """Step-gradient inputs whose x0 stays inside [-0.9, 0.9] (|x_t| <= 0.6, |c_b·eps| <= 0.3,
    with the rows' two x0 coefficients c_a = 1 and c_b set so).

    For validating big graphs: where some x0 lands within float error of ±1, the clamp's
    gradient mask can differ between two correct fp32 implementations (the reference calls
    that value measure-zero), and with ~10^5 elements per image that happens.
    """
    x, t, target, rows = step_gradient_inputs(batch, height, width, target_shape, sampler)
    x = 0.5 * x.clamp(-1.2, 1.2)
    with torch.no_grad():
        eps = unet(x, t)[:, :3]
    rows = rows.clone()
    rows[:, 0] = 1.0
    rows[:, 1] = 0.3 / eps.abs().amax(dim=(1, 2, 3)).clamp_min(1e-6)
    return x, t, target, rows


def export_step_gradient(unet: nn.Module, path, height: int, width: int, *, codec=None, constraint: str = "x",
                         operator: Callable[[Tensor], Tensor] | None = None, sampler=None,
                         target_shape: Sequence[int] | None = None, dynamic_hw: bool = False,
                         domain: str | None = None, guidance=None) -> ExportedGraph:
    """The guided step's gradient graph (see the module table).

    A is ``operator`` if given (e.g. a :class:`~idemrt.backends.base.StepSpec`'s),
    else :func:`codec_operator` (codec, constraint). ``sampler`` fixes the rows' layout (default
    :func:`default_sampler`). ``target_shape`` (C, h, w) defaults to A's output for one image.
    ``codec`` is also where the frozen codec weights come from. ``domain`` is the deprecated
    name of ``constraint``. ``guidance``: a proximal guidance (PIR) exports its step instead
    (outputs :data:`PROXIMAL_OUTPUTS`); others need no guidance here (their update is torch's).
    """
    constraint = renamed_argument("domain", domain, "constraint", constraint)
    _check_hw(height, width, dynamic_hw)
    check_exportable_codec(codec)
    sampler = sampler or default_sampler()
    if operator is None:
        if codec is None:
            raise ValueError("pass the codec (and constraint) or the operator A")
        operator = codec_operator(codec, constraint)
    if target_shape is None:
        with torch.no_grad():
            target_shape = tuple(operator(torch.zeros(1, 3, height, width)).shape[1:])
    if dynamic_hw and constraint != "x":
        raise BackendError("dynamic height/width is supported for the x-constraint step graph only")
    inputs = step_gradient_inputs(_TRACE_BATCH, height, width, target_shape, sampler)
    image = _image_axes(dynamic_hw)
    dynamic = {"x_t": image, "t": {0: "batch"}, "target": image, "rows": {0: "batch"}}
    if guidance is not None and guidance.step_kind == "proximal":
        fn, outputs = proximal_fn(unet, operator, sampler, guidance), PROXIMAL_OUTPUTS
    else:
        fn, outputs = step_gradient_fn(unet, operator, sampler), STEP_OUTPUTS
    return export_graph(fn, inputs, path, input_names=STEP_INPUTS, output_names=outputs, dynamic=dynamic,
                        modules=[unet, *_codec_modules(codec)])


def max_relative_errors(got: Sequence, want: Sequence[Tensor], names: Sequence[str]) -> dict[str, float]:
    """Per output: ``max|got - want| / max|want|`` (relative to the output's scale, so
    elements near zero do not blow the measure up); the absolute difference where the
    reference is all zeros."""
    errors = {}
    for name, a, b in zip(names, got, want):
        a = torch.as_tensor(a).double()
        b = b.detach().double().cpu()
        if a.shape != b.shape:
            raise BackendError(f"output {name}: shape {tuple(a.shape)} differs from PyTorch's {tuple(b.shape)}")
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        errors[name] = diff / scale if scale > 0 else diff
    return errors


def validate_with_onnxruntime(graph: ExportedGraph, reference: Callable[..., Sequence[Tensor]],
                              inputs: Sequence[Tensor], *, rtol: float = 1e-4) -> dict[str, float]:
    """Run ``graph`` on onnxruntime (CPU, fp32) and compare with ``reference(*inputs)``.

    Returns :func:`max_relative_errors`; raises BackendError if any exceeds ``rtol``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(graph.input_names, inputs)}
    got = session.run(list(graph.output_names), feeds)
    with torch.no_grad():
        want = reference(*inputs)
    errors = max_relative_errors(got, want, graph.output_names)
    bad = {k: v for k, v in errors.items() if not v <= rtol}
    if bad:
        raise BackendError(f"{graph.path.name}: onnxruntime differs from PyTorch beyond {rtol}: {bad}")
    return errors
