"""The fast backend: the eager step's math, in low precision, replayed from CUDA graphs.

What changes against :mod:`.eager` (the math does not):

* **Frozen weights.** The backend snapshots the UNet into a private copy whose parameters do not
  require grad, so autograd only ever differentiates with respect to ``x_t`` (the reference keeps
  parameter gradients alive and recomputes attention in backward, ADM_UNET.md §5).
* **bf16 (or fp16) compute.** The UNet copy follows ADM's fp16 convention (guided-diffusion's
  ``convert_to_fp16``): the convolutions of its input, middle and output blocks hold ``dtype``
  weights in channels_last, while the time embedding, GroupNorm (fp32 inside GroupNorm32) and the
  output head stay fp32; ADMUNet casts activations at those boundaries, so no autocast is needed.
  The codec operator runs under ``torch.autocast(operator_dtype)`` (default: ``dtype``), which leaves
  the codec shared with the Decoder untouched. The sampler state x_t, the x0 formula, the clamp, the
  distance and the update stay fp32: the UNet output is cast to fp32 before ``sampler.predict`` and
  A(x0) before the distance.
* **One CUDA graph per step kind and shape.** UNet forward, the vector-Jacobian product through the
  operator and the UNet (``torch.autograd.grad`` w.r.t. x_t only) and the sampler update are
  captured together and replayed every step. The step index lives in a device tensor, set with
  ``fill_`` (a kernel launch carrying the value, no host-to-device copy, no sync) before each replay,
  so one capture serves all steps. Steps that the guidance skips (DSG off-interval) replay a second,
  unguided graph: the host knows ``i``, so it picks the graph and the VJP is not wasted on them.
* cuDNN autotuning (``benchmark``) is switched on while a shape is warmed up and captured (every
  shape is static there) and restored afterwards; it stays off when deterministic algorithms are
  requested.

Options (``FastBackend(spec, device=..., dtype=None, operator_dtype=None, graphs=None, kernels="torch")``):

* ``graphs``: default on with CUDA. Off (or on CPU) the same step runs as ordinary PyTorch, which is
  how the CPU tests exercise this code.
* ``kernels``: ``"torch"`` (default), ``"triton"`` (fused GroupNorm+SiLU in the UNet through its
  ``set_norm_act`` hook, fused GDN/IGDN in a private copy of the codec, and for DDPM + DPS the fused
  x0 / loss-seed / sampler-update kernels) or ``"compile"`` (``torch.compile`` of the UNet,
  ``mode="max-autotune-no-cudagraphs"`` on CUDA, inside this backend's own graph). "triton" needs
  CUDA (or the Triton interpreter, for tests). The default is
  the plain torch path because no GPU measurement exists yet to prefer another one;
  ``benchmarks/latency.py`` measures all three (modes ``fast``, ``fast-triton``, ``fast-compile``).

The backend snapshots the weights when it is created: later in-place changes to the UNet or codec
are not seen. Steps are serialised by a lock, because every graph owns one set of static buffers.
"""
from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
import weakref
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..diffusion import DDPMSampler, DPS, Prediction, distance
from ..errors import BackendError
from ..models.unet import ADMUNet
from .base import StepSpec, register

__all__ = ["FastBackend", "GraphSet", "KERNELS", "capture", "cudnn_autotune", "inference_unet"]

KERNELS = ("torch", "triton", "compile")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Warm-up runs before capture (PyTorch's CUDA-graph notes: lazy init, cuDNN autotuning, Triton JIT
# and autograd's stream bookkeeping must all happen outside the capture).
_WARMUP = 3


@register("fast")
class FastBackend:
    """``step(x_t, i, target, noise) -> (x_prev, distance)`` as the eager backend, faster.

    ``dtype``: compute dtype of the UNet, ``torch.bfloat16`` (default), ``torch.float16`` or
    ``torch.float32``; ``operator_dtype``: that of the codec operator (default: ``dtype``).
    ``graphs``: replay CUDA graphs (default: on CUDA). ``kernels``: one of :data:`KERNELS` (see the
    module docstring).
    """

    def __init__(self, spec: StepSpec, *, device, dtype: Optional[torch.dtype] = None,
                 operator_dtype: Optional[torch.dtype] = None, graphs: Optional[bool] = None,
                 kernels: str = "torch"):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.bfloat16 if dtype is None else dtype
        operator_dtype = dtype if operator_dtype is None else operator_dtype
        for d in (dtype, operator_dtype):
            if d not in _DTYPES:
                raise BackendError(f"the fast backend computes in bfloat16, float16 or float32, not {d}")
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
        self._fused_update = None
        if kernels == "triton":
            self._use_triton_kernels()
        self._unet_fn = self.unet
        if kernels == "compile":
            mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"
            self._unet_fn = torch.compile(self.unet, mode=mode, fullgraph=True, dynamic=False)
        # The step index of every graph: updated in place before each replay.
        self._i = torch.zeros((), dtype=torch.long, device=device)
        self._graphs = GraphSet("fast backend", lambda: cudnn_autotune(device))
        self._lock = threading.Lock()

    # -- the math ----------------------------------------------------------------------------

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet output (N, C_out, H, W) for x_t at original timesteps t, float32.

        No autocast here: the UNet copy holds its weights in the ADM mixed-precision layout and
        ADMUNet casts its activations to match (see :func:`_inference_copy`)."""
        return self._unet_fn(x_t.contiguous(memory_format=torch.channels_last), t).float()

    def apply_operator(self, x0: torch.Tensor) -> torch.Tensor:
        """A(x0) computed in ``operator_dtype`` (autocast over the shared codec), returned as float32."""
        # No autocast weight cache: it is not allowed in graph capture (the codec's weights are a
        # few MB, so recasting them every step is cheap).
        with torch.autocast(self.device.type, dtype=self.operator_dtype,
                            enabled=self.operator_dtype != torch.float32, cache_enabled=False):
            return self.operator(x0).float()

    def distance_and_grad(self, x_t: torch.Tensor, i, target: torch.Tensor):
        """``(distance (N,), d distance / d x_t)`` of step ``i``, as the step computes them, detached."""
        _, dist, grad = self._vjp(x_t, i, target)
        return dist, grad

    def _vjp(self, x_t, i, target):
        """UNet forward, operator and the VJP back to x_t: ``(pred, dist, grad)``; with the fused
        sampler kernels ``pred`` is the UNet output."""
        if self._fused_update is not None:
            return self._fused_vjp(x_t, i, target)
        sampler = self.sampler
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = self.model_output(x, sampler.model_timesteps(i, x.shape[0]))
            pred = sampler.predict(out, x, i)
            dist = distance(target, self.apply_operator(pred.x0))
            # Samples are independent, so d(sum)/d x_t holds each sample's own gradient.
            (grad,) = torch.autograd.grad(dist.sum(), x)
        return Prediction(*(t.detach() for t in pred)), dist.detach(), grad

    def _guided_step(self, x_t, i, target, noise):
        if self._fused_update is not None:
            return self._fused_guided_step(x_t, i, target, noise)
        pred, dist, grad = self._vjp(x_t, i, target)
        with torch.no_grad():
            x_prev = self.spec.guidance.update(self.sampler.step(pred, noise, i), pred, grad, i)
        return x_prev, dist

    def _plain_step(self, x_t, i, target, noise):
        sampler = self.sampler
        with torch.no_grad():
            out = self.model_output(x_t, sampler.model_timesteps(i, x_t.shape[0]))
            x_prev = sampler.step(sampler.predict(out, x_t, i), noise, i)
        return x_prev, x_prev.new_zeros(x_t.shape[0])

    # -- driving -----------------------------------------------------------------------------
    def step(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor):
        """One reverse step: ``(x_prev, distance)``, fresh tensors the caller may keep.

        ``i`` is a Python int (a tensor is read back to the host, which syncs).
        """
        i = self._check(x_t, i, target, noise)
        guided = self.spec.guidance is not None and bool(self.spec.guidance.active(i))
        fn = self._guided_step if guided else self._plain_step
        target = target if guided else None
        with self._lock, _on_device(self.device):
            self._i.fill_(i)
            if not self.graphs:
                with cudnn_autotune(self.device):
                    return fn(x_t, self._i, target, noise)
            key = (guided, tuple(x_t.shape), None if target is None else tuple(target.shape))
            return self._graphs.run(key, lambda x, tg, z: fn(x, self._i, tg, z), x_t, target, noise)

    def step_uncaptured(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor):
        """:meth:`step` without CUDA graphs (same kernels, same step-index tensor): for tests and
        for counting FLOPs, which a graph replay hides from PyTorch's dispatcher."""
        i = self._check(x_t, i, target, noise)
        guided = self.spec.guidance is not None and bool(self.spec.guidance.active(i))
        fn = self._guided_step if guided else self._plain_step
        with self._lock, _on_device(self.device), cudnn_autotune(self.device):
            self._i.fill_(i)
            return fn(x_t, self._i, target if guided else None, noise)

    @property
    def num_graphs(self) -> int:
        """How many CUDA graphs are captured (one per step kind and shape)."""
        return len(self._graphs)

    def release_graphs(self) -> None:
        """Drop every captured graph and its memory pool."""
        with self._lock:
            self._graphs.clear()

    def _check(self, x_t, i, target, noise) -> int:
        if isinstance(i, torch.Tensor):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.sampler.num_steps:
            raise ValueError(f"step index must be an int in [0, {self.sampler.num_steps}), got {i!r}")
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.dtype != torch.float32:
            raise ValueError(f"x_t must be a float32 (N, C, H, W) tensor, got {_describe(x_t)}")
        if not isinstance(noise, torch.Tensor) or noise.shape != x_t.shape or noise.dtype != torch.float32:
            raise ValueError(f"noise must be float32 of x_t's shape {tuple(x_t.shape)}, got {_describe(noise)}")
        tensors = [x_t, noise]
        if self.spec.guidance is not None:
            if not isinstance(target, torch.Tensor) or target.ndim < 1 or target.shape[0] != x_t.shape[0]:
                raise ValueError(f"target must be a tensor with batch size {x_t.shape[0]}, got {_describe(target)}")
            tensors.append(target)
        for t in tensors:
            if t.device != self.device:
                raise ValueError(f"tensors must be on {self.device}, got one on {t.device}")
        return int(i)

    # -- Triton kernels ----------------------------------------------------------------------
    def _use_triton_kernels(self) -> None:
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("kernels='triton' needs a CUDA device (or, for tests, the Triton interpreter: "
                               "TRITON_INTERPRET=1 set before triton is imported)")
        from idemrt.kernels.groupnorm_silu import EPS, NUM_GROUPS, groupnorm_silu

        for m in self.unet.modules():
            if isinstance(m, nn.GroupNorm) and (m.num_groups != NUM_GROUPS or m.eps != EPS):
                raise BackendError(f"the fused GroupNorm kernel needs {NUM_GROUPS} groups and eps {EPS}")

        def norm_act(x, norm, scale_shift=None):
            scale, shift = scale_shift if scale_shift is not None else (None, None)
            return groupnorm_silu(x, norm.weight, norm.bias, scale, shift)

        self.unet.set_norm_act(norm_act)
        if self.spec.operator is not None:
            self.operator = _operator_with_fused_gdn(self.spec.codec, self.spec.domain)
        if isinstance(self.sampler, DDPMSampler) and isinstance(self.spec.guidance, DPS):
            from idemrt.kernels.sampler_update import coefficient_table

            sch = self.sampler.schedule
            self._fused_update = coefficient_table(
                sch.sqrt_recip_alphas_cumprod, sch.sqrt_recipm1_alphas_cumprod, sch.posterior_mean_coef1,
                sch.posterior_mean_coef2, np.log(sch.betas), sch.posterior_log_variance_clipped,
                zeta=self.spec.guidance.scale, device=self.device,
            )

    def _fused_vjp(self, x_t, i, target):
        from idemrt.kernels.loss_seed import residual_norm
        from idemrt.kernels.sampler_update import predict_x0

        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = self.model_output(x, self.sampler.model_timesteps(i, x.shape[0]))
            eps = out[:, : x.shape[1]]
            x0, _ = predict_x0(x, eps, self._fused_update, self._step_tensor(i))
            dist = residual_norm(target, self.apply_operator(x0))
            (grad,) = torch.autograd.grad(dist.sum(), x)
        return out.detach(), dist.detach(), grad

    def _fused_guided_step(self, x_t, i, target, noise):
        from idemrt.kernels.sampler_update import sampler_update

        out, dist, grad = self._fused_vjp(x_t, i, target)
        c = x_t.shape[1]
        x_prev = sampler_update(x_t, out[:, :c], out[:, c:], grad, noise, self._fused_update, self._step_tensor(i))
        return x_prev, dist

    def _step_tensor(self, i) -> torch.Tensor:
        return i if isinstance(i, torch.Tensor) else torch.tensor(i, device=self.device)


class GraphSet:
    """CUDA graphs of functions of static-shaped tensors, one per key, captured on first use.

    ``run(key, fn, *inputs)`` replays the graph of ``key`` (capturing ``fn(*inputs)`` the first
    time) and returns fresh copies of ``fn``'s outputs, a tuple of tensors. ``fn`` must read any
    other changing state (a step index) from device tensors it closes over. A key whose capture
    fails runs uncaptured from then on, after a warning. ``settings()`` is the context (cuDNN
    flags) that warm-up, capture and uncaptured runs happen in. Callers serialise ``run``: every
    graph owns one set of static buffers.
    """

    def __init__(self, owner: str, settings: Callable = contextlib.nullcontext):
        self.owner = owner
        self.settings = settings
        self._graphs: dict = {}

    def run(self, key, fn: Callable, *inputs):
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(key, fn, inputs)
        if graph is False:
            with self.settings():
                return fn(*inputs)
        return graph.replay(*inputs)

    def __len__(self) -> int:
        return sum(1 for g in self._graphs.values() if g)

    def clear(self) -> None:
        self._graphs.clear()

    def _capture(self, key, fn, inputs):
        try:
            with self.settings():
                return _Graph(fn, *inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
            warnings.warn(
                f"{self.owner}: CUDA graph capture failed for {key} ({type(exc).__name__}: {exc}); "
                f"this shape runs without graphs",
                RuntimeWarning,
                stacklevel=4,
            )
            return False


def capture(fn: Callable, device: torch.device):
    """``(graph, outputs)``: ``fn()`` warmed up on a side stream, then captured (the order
    PyTorch's CUDA-graph notes require); replaying ``graph`` rewrites ``outputs`` in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class _Graph:
    """One captured call ``fn(*inputs)``: static input buffers (None stays None), the graph and
    its static outputs."""

    def __init__(self, fn: Callable, *inputs):
        self.inputs = [None if t is None else t.clone() for t in inputs]
        device = next(t for t in inputs if t is not None).device
        self.graph, self.outputs = capture(lambda: fn(*self.inputs), device)

    def replay(self, *inputs):
        for static, t in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(t)
        self.graph.replay()
        # Copies, so that results survive the next replay (a few hundred KB: negligible).
        return tuple(t.clone() for t in self.outputs)


# Backends of one UNet (a Decoder's retries with a larger DPS scale build new ones) share its
# inference copy instead of holding another (about 1.1 GB in bf16 for imagenet256).
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def inference_unet(unet: nn.Module, dtype: torch.dtype, device: torch.device, kernels: str = "torch") -> nn.Module:
    """The UNet's inference copy for ``dtype`` (one of bfloat16, float16, float32), shared by every
    user of this UNet, device, dtype and ``kernels`` (see :func:`_inference_copy`)."""
    if dtype != torch.float32 and not isinstance(unet, ADMUNet):
        raise BackendError(f"bfloat16/float16 need an idemrt ADMUNet (its mixed-precision layout), got "
                           f"{type(unet).__name__}; use dtype=torch.float32")
    return _shared_inference_copy(unet, dtype, device, kernels)


def _shared_inference_copy(module: nn.Module, dtype: torch.dtype, device: torch.device, kernels: str) -> nn.Module:
    # kernels="triton" rewires the copy's norm hook, so each kernel choice has a copy of its own.
    key = (dtype, str(device), kernels)
    with _COPIES_LOCK:
        per_module = _COPIES.setdefault(module, {})
        if key not in per_module:
            per_module[key] = _inference_copy(module, dtype, device)
        return per_module[key]


def _inference_copy(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A private copy of the UNet on ``device``: parameters frozen, 4-D weights channels_last and,
    following ADM's fp16 convention (guided-diffusion's ``convert_to_fp16``), the convolutions of
    ``input_blocks``, ``middle_block`` and ``output_blocks`` in ``dtype``. The time embedding,
    GroupNorm (computed in fp32 by GroupNorm32) and the output head stay fp32; ADMUNet casts
    activations at those boundaries itself."""
    low = set()
    if dtype != torch.float32:
        for name in ("input_blocks", "middle_block", "output_blocks"):
            low.update(m for m in getattr(module, name).modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
    memo = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            t = p.detach().to(device=device, dtype=dtype if m in low else p.dtype, copy=True)
            if t.ndim == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            memo[id(p)] = nn.Parameter(t, requires_grad=False)
    return copy.deepcopy(module, memo).eval()


def _operator_with_fused_gdn(codec, domain: str):
    """The Decoder's operator on a private codec copy whose GDN/IGDN layers run the Triton kernel.

    Same convention as ``idemrt.Decoder._operator`` (tests/test_backend_fast.py compares both
    domains with it): images in [-1, 1]; "x" returns 2·A((x0 + 1)/2) - 1, "y" the quantised latent.
    """
    from compressai.layers import GDN

    from ..models.codec import Codec

    if not isinstance(codec, Codec):
        raise BackendError("kernels='triton' rebuilds the operator from StepSpec.codec, which must be an idemrt Codec")
    model = copy.deepcopy(codec.model)
    for name, m in list(model.named_modules()):
        if type(m) is GDN:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, _FusedGDN(m))
    fused = Codec(codec.name, model, quality=codec.quality)
    if domain == "x":
        return lambda x0: 2 * fused.operator((x0 + 1) / 2, "x") - 1
    return lambda x0: fused.operator((x0 + 1) / 2, "y")


class _FusedGDN(nn.Module):
    """compressai's GDN/IGDN through ``idemrt.kernels.gdn`` (parameters reparametrised once)."""

    def __init__(self, gdn_module):
        super().__init__()
        from idemrt.kernels.gdn import gdn_parameters

        gamma, beta, self.inverse = gdn_parameters(gdn_module)
        self.register_buffer("gamma", gamma)
        self.register_buffer("beta", beta)

    def forward(self, x):
        from idemrt.kernels.gdn import gdn

        return gdn(x, self.gamma, self.beta, self.inverse)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """cuDNN benchmark mode for static shapes, unless determinism was asked for; restored after."""
    if device.type != "cuda" or torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
