"""The fast backend: :mod:`idemrt.diffusion.step`'s math in low precision, replayed from CUDA graphs.

What changes against :mod:`.eager` (the math does not: the backend calls
:func:`~idemrt.diffusion.step.step_gradient` and :func:`~idemrt.diffusion.step.finish_step`
with its own model and operator functions):

* **Frozen weights.** The UNet runs as an inference copy (:func:`.inference.inference_unet`)
  whose parameters do not require grad, so autograd only differentiates with respect to x_t.
* **bf16 (or fp16) compute.** The copy follows ADM's fp16 convention (convolutions of the
  input, middle and output blocks in ``dtype``, channels_last; time embedding, GroupNorm and
  the output head fp32). The codec operator runs under ``torch.autocast(operator_dtype)``
  (default: ``dtype``), which leaves the codec shared with the Decoder untouched. x_t, the x0
  formula, the clamp, the distance and the update stay fp32.
* **One CUDA graph per step kind and batch shape.** UNet forward, the vector-Jacobian product
  through the operator and the UNet and the sampler update are captured together (with PIR
  guidance: the UNet forward, the fixed number of codec-only data steps and the update)
  (:mod:`.cuda_graphs`). The per-sample step indices and DPS scales are graph *inputs* copied
  into static buffers, so one capture serves every step, every mix of steps in a batch and
  every retry scale. Steps that the guidance skips for every sample (DSG off-interval) replay
  a second, unguided graph: the host knows the indices, so it picks the graph and the VJP is
  not wasted on them.
* cuDNN autotuning is on while a shape is warmed up and captured, unless determinism was asked.

Options (``FastBackend(spec, device=..., dtype=None, operator_dtype=None, graphs=None, kernels=None)``):

* ``graphs``: default on with CUDA. Off (or on CPU) the same step runs as ordinary PyTorch, which is
  how the CPU tests exercise this code.
* ``kernels``: ``"torch"``, ``"triton"`` (fused GroupNorm+SiLU in the UNet, fused GDN/IGDN
  in a private copy of the codec, and, when the sampler's table is the fused kernels' (DDPM) and
  the guidance is DPS, the fused x0 / loss-seed / sampler-update kernels: the documented
  equivalent of the step functions, tested equal to them) or ``"compile"`` (``torch.compile`` of
  the UNet). "triton" needs CUDA (or the Triton interpreter, for tests). The default is "triton" on
  CUDA where its kernels fit the model and codec, and "torch" elsewhere: on an H200 the Triton path halved the FFHQ-256 guided step against
  the plain torch path (9.7 vs 19.6 ms at batch 1, 55.5 vs 94.9 at batch 8; benchmarks/RESULTS.md).

The backend snapshots the weights when it is created: later in-place changes to the UNet or codec
are not seen. Steps are serialised by a lock, because every graph owns one set of static buffers.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
from torch import nn

from ..diffusion.step import finish_step, plain_step, proximal_step, step_gradient
from ..diffusion.tiling import TiledModel
from ..defaults import default_fast_dtype
from ..errors import BackendError
from ..models.codec import Codec
from .base import StepSpec, check_step_inputs, register
from .cuda_graphs import GraphSet, cudnn_autotune, on_device
from .inference import DTYPES, fused_gdn_operator, inference_unet

__all__ = ["FastBackend", "KERNELS", "SLOT_COUNTS", "default_kernels"]

KERNELS = ("torch", "triton", "compile")
SLOT_COUNTS = (1, 2, 4, 8, 16)  # batch sizes a step scheduler pads to, so few graphs are captured


def default_kernels(spec: StepSpec, device: torch.device) -> str:
    """"triton", the measured winner on CUDA (benchmarks/RESULTS.md), where its kernels fit this
    model and codec; "torch" otherwise (off CUDA Triton only runs interpreted)."""
    return "triton" if torch.device(device).type == "cuda" and _triton_misfit(spec) is None else "torch"


def _triton_misfit(spec: StepSpec) -> Optional[str]:
    """Why the fused kernels cannot run this spec, or None."""
    from idemrt.kernels.groupnorm_silu import EPS, NUM_GROUPS

    if not hasattr(spec.unet, "set_norm_act"):
        return "the fused GroupNorm kernel is wired through idemrt's ADM UNet (set_norm_act)"
    for m in spec.unet.modules():
        if isinstance(m, nn.GroupNorm) and (m.num_groups != NUM_GROUPS or m.eps != EPS):
            return f"the fused GroupNorm kernel needs {NUM_GROUPS} groups and eps {EPS}"
    if spec.operator is not None and not isinstance(spec.codec, Codec):
        return "kernels='triton' rebuilds the operator from StepSpec.codec, which must be an idemrt Codec"
    return None


@register("fast")
class FastBackend:
    """``step(x_t, i, target, noise, scale=None) -> (x_prev, distance)`` as the eager backend, faster.

    ``dtype``: compute dtype of the UNet, ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``
    (default: :func:`idemrt.defaults.default_fast_dtype` — bf16 on CUDA and on CPUs with AVX-512
    BF16 or AMX, fp32 on other CPUs, where emulated bf16 is slower); ``operator_dtype``: that of the codec operator (default: ``dtype``).
    ``graphs``: replay CUDA graphs (default: on CUDA). ``kernels``: one of :data:`KERNELS` (default:
    :func:`default_kernels` of the device).
    """

    def __init__(self, spec: StepSpec, *, device, dtype: Optional[torch.dtype] = None,
                 operator_dtype: Optional[torch.dtype] = None, graphs: Optional[bool] = None,
                 kernels: Optional[str] = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = default_fast_dtype(device) if dtype is None else dtype
        operator_dtype = dtype if operator_dtype is None else operator_dtype
        for d in (dtype, operator_dtype):
            if d not in DTYPES:
                raise BackendError(f"the fast backend computes in bfloat16, float16 or float32, not {d}")
        kernels = default_kernels(spec, device) if kernels is None else kernels
        if kernels not in KERNELS:
            raise BackendError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        graphs = device.type == "cuda" if graphs is None else bool(graphs)
        if graphs and device.type != "cuda":
            raise BackendError(f"CUDA graphs need a CUDA device, got {device}; pass graphs=False")
        if spec.guidance is not None and spec.operator is None:
            raise BackendError("guided sampling needs an operator (StepSpec.operator is None)")

        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.operator_dtype = operator_dtype
        self.graphs = graphs
        self.kernels = kernels
        self.sampler = spec.sampler.to(device)
        self.unet = inference_unet(spec.unet, dtype, device, kernels)
        self.operator = spec.operator
        self._fused = None  # the sampler table, when the fused step kernels run
        if kernels == "triton":
            self._use_triton_kernels()
        self._unet_fn = self.unet
        if kernels == "compile":
            mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"
            self._unet_fn = torch.compile(self.unet, mode=mode, fullgraph=True, dynamic=False)
        if spec.tile is not None:  # windows of a large image (idemrt.diffusion.tiling), compiled or not
            self._unet_fn = TiledModel.for_prior(self._unet_fn, spec.tile, spec.unet)
        self._graphs = GraphSet("fast backend", lambda: cudnn_autotune(device))
        self._lock = threading.Lock()

    # -- the model and operator functions the step math is given ----------------------------------
    def model_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet output (N, C_out, H, W) for x_t at original timesteps t, float32.

        No autocast here: the UNet copy holds its weights in the ADM mixed-precision layout and
        ADMUNet casts its activations to match."""
        return self._unet_fn(x_t.contiguous(memory_format=torch.channels_last), t).float()

    def apply_operator(self, x0: torch.Tensor) -> torch.Tensor:
        """A(x0) computed in ``operator_dtype`` (autocast over the shared codec), returned as float32."""
        # No autocast weight cache: it is not allowed in graph capture (the codec's weights are a
        # few MB, so recasting them every step is cheap).
        with torch.autocast(self.device.type, dtype=self.operator_dtype,
                            enabled=self.operator_dtype != torch.float32, cache_enabled=False):
            return self.operator(x0).float()

    # -- the functions a graph captures: (x_t, target, noise, i (N,), scale (N,)) -> (x_prev, dist)
    def guided_fn(self, x_t, target, noise, i, scale):
        if self._fused is not None:
            return self._fused_step(x_t, target, noise, i, scale)
        sampler = self.sampler
        if self.spec.guidance.step_kind == "proximal":  # PIR: UNet forward + codec-only data step
            return proximal_step(self.model_output, self.apply_operator, sampler, self.spec.guidance, x_t, i,
                                 target, noise)
        rows = sampler.rows(i)
        g = step_gradient(self.model_output, self.apply_operator, sampler, x_t,
                          sampler.model_timesteps(i, x_t.shape[0]), rows, target)
        return finish_step(sampler, self.spec.guidance, g, noise, i, rows, scale)

    def plain_fn(self, x_t, target, noise, i, scale):
        x_prev = plain_step(self.model_output, self.sampler, x_t, i, noise)
        return x_prev, x_prev.new_zeros(x_t.shape[0])

    # -- driving -----------------------------------------------------------------------------
    def step(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor, scale=None):
        """One reverse step: ``(x_prev, distance)``, fresh tensors the caller may keep.

        ``i``: an int, or one int per sample (a sequence or an integer tensor; a device tensor is
        read back to the host, which syncs); ``scale``: None (the guidance's) or (N,) per sample.
        """
        fn, inputs = self._prepare(x_t, i, target, noise, scale)
        with self._lock, on_device(self.device):
            if not self.graphs:
                with cudnn_autotune(self.device):
                    return fn(*inputs)
            key = (fn.__name__, tuple(x_t.shape), None if inputs[1] is None else tuple(inputs[1].shape))
            return self._graphs.run(key, fn, *inputs)

    def step_uncaptured(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor, scale=None):
        """:meth:`step` without CUDA graphs (same kernels): for tests and for counting FLOPs, which
        a graph replay hides from PyTorch's dispatcher."""
        fn, inputs = self._prepare(x_t, i, target, noise, scale)
        with self._lock, on_device(self.device), cudnn_autotune(self.device):
            return fn(*inputs)

    @property
    def slot_counts(self):
        """Batch sizes to pad to (:class:`~idemrt.diffusion.StepScheduler`): with CUDA graphs each
        batch size is a capture, so a few sizes serve every batch; without graphs, any size."""
        return SLOT_COUNTS if self.graphs else None

    @property
    def num_graphs(self) -> int:
        """How many CUDA graphs are captured (one per step kind and shape)."""
        return len(self._graphs)

    def _prepare(self, x_t, i, target, noise, scale):
        """The function to run (guided or plain) and its five inputs, all on the device."""
        guidance = self.spec.guidance
        n = x_t.shape[0] if isinstance(x_t, torch.Tensor) else 0
        steps = check_step_inputs(self.device, self.sampler.num_steps, x_t, i, target, noise,
                                  guided=guidance is not None)
        guided = guidance is not None and any(bool(guidance.active(s)) for s in set(steps))
        # The indices reach the device as data: a fill for one value, else one small copy.
        if len(set(steps)) == 1:
            i_dev = torch.full((n,), steps[0], dtype=torch.long, device=self.device)
        else:
            i_dev = torch.tensor(steps, dtype=torch.long, device=self.device)
        if scale is None:
            scale = torch.full((n,), float(guidance.default_scale() or 0.0) if guidance is not None else 0.0, device=self.device)
        else:
            scale = torch.as_tensor(scale, dtype=torch.float32).to(self.device).expand(n)
        if guided:
            return self.guided_fn, (x_t, target, noise, i_dev, scale)
        return self.plain_fn, (x_t, None, noise, i_dev, scale)

    # -- Triton kernels ----------------------------------------------------------------------
    def _use_triton_kernels(self) -> None:
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("kernels='triton' needs a CUDA device (or, for tests, the Triton interpreter: "
                               "TRITON_INTERPRET=1 set before triton is imported)")
        from idemrt.kernels.groupnorm_silu import groupnorm_silu
        from idemrt.kernels.sampler_update import COEFFICIENTS

        misfit = _triton_misfit(self.spec)
        if misfit is not None:
            raise BackendError(misfit)

        def norm_act(x, norm, scale_shift=None):
            scale, shift = scale_shift if scale_shift is not None else (None, None)
            return groupnorm_silu(x, norm.weight, norm.bias, scale, shift)

        self.unet.set_norm_act(norm_act)
        if self.spec.operator is not None:
            self.operator = fused_gdn_operator(self.spec.codec, self.spec.constraint)
        # The fused step kernels read the sampler's own table: usable when it has their columns
        # (DDPM's) and the update is DPS's ``sample - scale·grad``.
        if tuple(self.sampler.columns) == tuple(COEFFICIENTS) and self.spec.guidance is not None and self.spec.guidance.name == "dps":
            self._fused = self.sampler.coefficients()

    def _fused_step(self, x_t, target, noise, i, scale):
        """The guided DDPM + DPS step on the fused kernels: x0 (with its clamp-masked backward),
        the per-sample residual norm and the sampler update in one pass each."""
        from idemrt.kernels.loss_seed import residual_norm
        from idemrt.kernels.sampler_update import predict_x0, sampler_update

        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = self.model_output(x, self.sampler.model_timesteps(i, x.shape[0]))
            c = x.shape[1]
            x0, _ = predict_x0(x, out[:, :c], self._fused, i)
            dist = residual_norm(target, self.apply_operator(x0))
            (grad,) = torch.autograd.grad(dist.sum(), x)
        out = out.detach()
        x_prev = sampler_update(x_t, out[:, :c], out[:, c:], grad, noise, self._fused, i, scale)
        return x_prev, dist.detach()
