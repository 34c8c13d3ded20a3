"""The fast backend: :mod:`idemrt.diffusion.step`'s math in low precision, replayed from CUDA graphs.

What changes against :mod:`.eager` (the math does not: the backend calls
:func:`~idemrt.diffusion.step.step_gradient` and :func:`~idemrt.diffusion.step.finish_step`
with its own model and operator functions):

* **Frozen weights.** The UNet runs as an inference copy (:func:`.inference.inference_unet`)
  whose parameters do not require grad, so autograd only differentiates with respect to x_t.
* **bf16 (or fp16) compute.** The copy follows ADM's fp16 convention (convolutions of the
  input, middle and output blocks in ``dtype``, channels_last; time embedding, GroupNorm and
  the output head fp32). The codec operator runs under ``torch.autocast(operator_dtype)``
  (default: ``dtype``), which leaves the codec shared with the Decoder untouched (on the CPU, by
  default, on a private channels_last copy of it: ``operator_channels_last``). x_t, the x0
  formula, the clamp, the distance and the update stay fp32.
* **One CUDA graph per step kind and batch shape.** UNet forward, the vector-Jacobian product
  through the operator and the UNet and the sampler update are captured together (with PIR
  guidance: the UNet forward, the fixed number of codec-only data steps and the update)
  (:mod:`.cuda_graphs`). The per-sample step indices and DPS scales are graph *inputs* copied
  into static buffers, so one capture serves every step, every mix of steps in a batch and
  every retry scale. Steps that the guidance skips for every sample (DSG off-interval) replay
  a second, unguided graph: the host knows the indices, so it picks the graph and the VJP is
  not wasted on them.
* cuDNN autotuning is on while a shape is warmed up and captured (``cudnn_benchmark``), unless
  determinism was asked.

Options (``FastBackend(spec, device=..., dtype=None, operator_dtype=None, graphs=None, kernels=None,
triton_passes=None, compile=None, compile_mode=None, compile_cache=None, cudnn_benchmark=True,
operator_channels_last=None)``;
the same names in ``DecodeConfig.backend_options``; :class:`FastBackend` says what each does;
``benchmarks/gpu_variants.py`` measures them against each other):

* ``graphs``: default on with CUDA. Off (or on CPU) the same step runs as ordinary PyTorch, which is
  how the CPU tests exercise this code.
* ``kernels``: ``"torch"``, ``"triton"`` (fused GroupNorm+SiLU in the UNet, fused GDN/IGDN
  in a private copy of the codec, and, when the sampler's table is the fused kernels' (DDPM) and
  the guidance is DPS, the fused x0 / loss-seed / sampler-update kernels: the documented
  equivalent of the step functions, tested equal to them; ``triton_passes`` chooses per family)
  or ``"compile"`` (``torch.compile`` of the UNet; ``compile`` chooses the scope). "triton" needs CUDA (or the Triton interpreter, for tests). The default is "triton" on
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

from ..diffusion.step import StepResult, finish_step, proximal_step, step_gradient, unguided_step
from ..diffusion.tiled_operator import tiled_operator
from ..diffusion.tiling import TiledModel
from ..defaults import default_fast_dtype
from ..errors import BackendError
from ..models.codec import Codec
from ..models.prior import prior_traits
from .base import StepRows, StepSpec, check_step_inputs, register
from .compile_cache import CompileCache, default_directory, model_digest
from .cuda_graphs import GraphSet, cudnn_autotune, on_device
from .inference import DTYPES, inference_unet, operator_copy

__all__ = ["COMPILES", "FastBackend", "KERNELS", "PASSES", "SLOT_COUNTS", "TRITON_KERNELS", "default_kernels",
           "default_triton_passes"]

KERNELS = ("torch", "triton", "compile")
# With kernels="triton": which pass of each fused kernel family is Triton's (see triton_passes).
TRITON_KERNELS = ("groupnorm_silu", "gdn", "step")
PASSES = ("fwd+bwd", "fwd", "none")
COMPILES = ("unet", "blocks")  # torch.compile of the whole UNet copy, or of each ResBlock/AttentionBlock
SLOT_COUNTS = (1, 2, 4, 8, 16)  # batch sizes a step batcher pads to, so few graphs are captured


# CUDA DEFAULTS FROM MEASUREMENT (issue 30 item 4). The fast backend's defaults on CUDA — kernels
# (default_kernels), the Triton passes (default_triton_passes), dtype (idemrt.defaults.
# default_fast_dtype), compile (None), cudnn_benchmark (on) and serve's max_slots (serve/config.py)
# — are to be the fastest variant of the benchmarks/gpu_variants.py table that passes its accuracy
# check, per GPU kind if they differ, each naming its table row (benchmarks/RESULTS.md) beside it.
# No GPU run has measured the variants yet: what stands is the one configuration measured so far.
def default_kernels(spec: StepSpec, device: torch.device) -> str:
    """"triton", the measured winner on CUDA (benchmarks/RESULTS.md), where its kernels fit this
    model and codec; "torch" otherwise (off CUDA Triton only runs interpreted)."""
    return "triton" if torch.device(device).type == "cuda" and _triton_misfit(spec) is None else "torch"


def default_triton_passes(device: torch.device) -> dict:
    """The pass of each Triton kernel family that kernels="triton" runs by default (see CUDA
    DEFAULTS FROM MEASUREMENT above): every kernel forward and backward, the one configuration
    measured so far (`fast-triton`, 9.66 ms per FFHQ-256 step at batch 1 on an H200). ``device``:
    the choice may differ per GPU kind once measured; today it does not."""
    return {name: "fwd+bwd" for name in TRITON_KERNELS}


def _triton_misfit(spec: StepSpec) -> Optional[str]:
    """Why the fused kernels cannot run this spec, or None."""
    from idemrt.kernels.groupnorm_silu import EPS, NUM_GROUPS

    if not prior_traits(spec.unet).norm_act_hook:
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
    :func:`default_kernels` of the device); "compile" is short for ``kernels="torch",
    compile="unet"``.
    ``triton_passes``: with kernels="triton", ``{family: pass}`` for the families of
    :data:`TRITON_KERNELS` — "fwd+bwd" (Triton forward and backward), "fwd" (Triton forward,
    PyTorch's backward: GroupNorm+SiLU and GDN through ``backward="torch"``; for "step", PyTorch's
    x0, distance and gradient and only the sampler-update kernel) or "none" (PyTorch's); families
    not named keep :func:`default_triton_passes`.
    ``compile``: None, "unet" (``torch.compile`` of the UNet copy, fullgraph) or "blocks" (regional:
    each ResBlock and AttentionBlock compiled; repeated blocks of one shape share their code, so
    it compiles in a fraction of the whole UNet's time); ``compile_mode``: torch.compile's mode
    (default: "max-autotune-no-cudagraphs" on CUDA for "unet", else "default"). Compiling needs
    kernels="torch" (the Triton kernels' autograd wrappers are not traced).
    ``compile_cache``: where compiled code is kept between processes (:mod:`.compile_cache`):
    a directory, None for ``$IDEMRT_COMPILE_CACHE`` or the user's cache directory, False for no cache.
    ``cudnn_benchmark``: cuDNN autotuning while shapes are warmed up and captured (default on;
    determinism, when asked for, turns it off regardless; no effect off CUDA).
    ``operator_channels_last``: run the operator on a private channels_last copy of the codec
    (default: on the CPU, where it measured 1.3-6.6x faster than the shared NCHW codec,
    benchmarks/RESULTS.md; off on CUDA, where it is unmeasured); needs StepSpec.codec to be an
    idemrt Codec.
    """

    def __init__(self, spec: StepSpec, *, device, dtype: Optional[torch.dtype] = None,
                 operator_dtype: Optional[torch.dtype] = None, graphs: Optional[bool] = None,
                 kernels: Optional[str] = None, triton_passes: Optional[dict] = None,
                 compile: Optional[str] = None, compile_mode: Optional[str] = None,
                 compile_cache=None, cudnn_benchmark: bool = True, operator_channels_last: Optional[bool] = None):
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
        if kernels == "compile":
            kernels, compile = "torch", compile or "unet"
        passes = _check_passes(triton_passes, kernels, device)
        if compile is not None and compile not in COMPILES:
            raise BackendError(f"compile must be None or one of {COMPILES}, got {compile!r}")
        if compile is not None and kernels != "torch":
            raise BackendError("compile needs kernels='torch': the Triton kernels are not traced by torch.compile")
        if compile is None and compile_mode is not None:
            raise BackendError("compile_mode without compile: pass compile='unet' or 'blocks'")
        if compile is not None and compile_mode is None:
            compile_mode = "max-autotune-no-cudagraphs" if device.type == "cuda" and compile == "unet" else "default"
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
        self.triton_passes = passes
        self.compile, self.compile_mode = compile, compile_mode
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.sampler = spec.sampler.to(device)
        # The copy's norm hook and compiled blocks depend on these, so each choice has its own copy;
        # the plain copy is the one PSC's fast denoiser uses too (psc/sampling.py).
        variant = "torch" if (kernels, compile) == ("torch", None) else (
            kernels, passes.get("groupnorm_silu"), compile, compile_mode)
        self.unet = inference_unet(spec.unet, dtype, device, variant)
        self.operator = spec.operator
        self._fused = None  # the sampler table, when the fused step kernels run
        self._fused_update = None  # the sampler table, when only the update kernel runs
        gdn_backward = self._use_triton_kernels() if kernels == "triton" else None
        if operator_channels_last is None:
            operator_channels_last = device.type == "cpu" and isinstance(spec.codec, Codec)
        self.operator_channels_last = bool(operator_channels_last) and spec.operator is not None
        if spec.operator is not None and (gdn_backward is not None or self.operator_channels_last):
            self.operator = operator_copy(spec.codec, spec.constraint, gdn_backward=gdn_backward,
                                          channels_last=self.operator_channels_last)
        if spec.tile is not None:  # a large image's operator in tiles (idemrt.diffusion.tiled_operator)
            self.operator = tiled_operator(self.operator, spec.codec, spec.tile.operator_tile)
        self._unet_fn = self.unet
        self._cache, self._cached_keys = None, set()
        if compile is not None:
            if compile_cache is not False:
                digest = model_digest(self.unet, options=(compile, compile_mode, str(dtype), device.type))
                self._cache = CompileCache(default_directory() if compile_cache is None else compile_cache,
                                           device=device, digest=digest)
                self._cache.load()
            self._unet_fn = _compiled(self.unet, compile, compile_mode)
        if spec.tile is not None:  # windows of a large image (idemrt.diffusion.tiling), compiled or not
            self._unet_fn = TiledModel.for_prior(self._unet_fn, spec.tile, spec.unet)
        self._graphs = GraphSet("fast backend", lambda: cudnn_autotune(device, self.cudnn_benchmark))
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
        if self.operator_channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.operator_dtype,
                            enabled=self.operator_dtype != torch.float32, cache_enabled=False):
            return self.operator(x0).float()

    # -- the functions a graph captures: (x_t, target, noise, i (N,), scale (N,)) -> (x_prev, dist, x0)
    def guided_fn(self, x_t, target, noise, i, scale):
        if self._fused is not None:
            return self._fused_step(x_t, target, noise, i, scale)
        sampler = self.sampler
        if self.spec.guidance.step_kind == "proximal":  # PIR: UNet forward + codec-only data step
            return proximal_step(self.model_output, self.apply_operator, sampler, self.spec.guidance, x_t, i,
                                 target, noise).tensors()
        rows = sampler.rows(i)
        g = step_gradient(self.model_output, self.apply_operator, sampler, x_t,
                          sampler.model_timesteps(i, x_t.shape[0]), rows, target)
        if self._fused_update is not None:  # triton_passes step="fwd": only the update kernel
            from idemrt.kernels.sampler_update import sampler_update

            c = x_t.shape[1]
            out = g.model_out
            x_prev = sampler_update(x_t, out[:, :c], out[:, c:], g.grad, noise, self._fused_update, i, scale)
            return x_prev, g.dist, g.pred.x0
        return finish_step(sampler, self.spec.guidance, g, noise, i, rows, scale).tensors()

    def plain_fn(self, x_t, target, noise, i, scale):
        return unguided_step(self.model_output, self.sampler, x_t, i, noise).tensors()

    # -- driving -----------------------------------------------------------------------------
    def step(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor, scale=None):
        """One reverse step: ``(x_prev, distance)``, fresh tensors the caller may keep.

        ``i``: an int, or one int per sample (a sequence or an integer tensor; a device tensor is
        read back to the host, which syncs); ``scale``: None (the guidance's) or (N,) per sample.
        """
        fn, inputs = self._prepare(x_t, i, target, noise, scale)
        key = (fn.__name__, tuple(x_t.shape), None if inputs[1] is None else tuple(inputs[1].shape))
        with self._lock, on_device(self.device):
            if not self.graphs:
                with cudnn_autotune(self.device, self.cudnn_benchmark):
                    out = fn(*inputs)
            else:
                out = self._graphs.run(key, fn, *inputs)
            self._save_compiled(key)
            return StepResult(*out)

    def step_uncaptured(self, x_t: torch.Tensor, i, target: torch.Tensor, noise: torch.Tensor, scale=None):
        """:meth:`step` without CUDA graphs (same kernels): for tests and for counting FLOPs, which
        a graph replay hides from PyTorch's dispatcher."""
        fn, inputs = self._prepare(x_t, i, target, noise, scale)
        with self._lock, on_device(self.device), cudnn_autotune(self.device, self.cudnn_benchmark):
            return StepResult(*fn(*inputs))

    def _save_compiled(self, key) -> None:
        """After the first run (the warm-up, which compiles) of a step kind and shape: keep what was
        compiled in the compile cache, for the next process."""
        if self._cache is not None and key not in self._cached_keys:
            self._cached_keys.add(key)
            self._cache.save(part=key)

    @property
    def slot_counts(self):
        """Batch sizes to pad to (:class:`~idemrt.batching.StepBatcher`): with CUDA graphs each
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
        # The indices reach the device as data: a persistent batch's own, a fill for one value, else one small copy.
        if isinstance(i, StepRows) and i.tensor.device == self.device:
            i_dev = i.tensor
        elif len(set(steps)) == 1:
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
    def _use_triton_kernels(self) -> Optional[str]:
        """Wire the Triton kernels as ``triton_passes`` says; returns who computes the GDN layers'
        backward in the operator copy (None: the operator keeps compressai's GDN)."""
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendError("kernels='triton' needs a CUDA device (or, for tests, the Triton interpreter: "
                               "TRITON_INTERPRET=1 set before triton is imported)")
        from idemrt.kernels.groupnorm_silu import groupnorm_silu
        from idemrt.kernels.sampler_update import COEFFICIENTS

        misfit = _triton_misfit(self.spec)
        if misfit is not None:
            raise BackendError(misfit)
        backward = {"fwd+bwd": "triton", "fwd": "torch"}  # a pass choice -> who computes the backward
        passes = self.triton_passes

        if passes["groupnorm_silu"] != "none":
            gn_backward = backward[passes["groupnorm_silu"]]

            def norm_act(x, norm, scale_shift=None):
                scale, shift = scale_shift if scale_shift is not None else (None, None)
                return groupnorm_silu(x, norm.weight, norm.bias, scale, shift, backward=gn_backward)

            self.unet.set_norm_act(norm_act)
        # The fused step kernels read the sampler's own table: usable when it has their columns
        # (DDPM's) and the update is DPS's ``sample - scale·grad``.
        if tuple(self.sampler.columns) == tuple(COEFFICIENTS) and self.spec.guidance is not None and self.spec.guidance.name == "dps":
            if passes["step"] == "fwd+bwd":
                self._fused = self.sampler.coefficients()
            elif passes["step"] == "fwd":
                self._fused_update = self.sampler.coefficients()
        return None if passes["gdn"] == "none" else backward[passes["gdn"]]

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
        return x_prev, dist.detach(), x0.detach()


def _check_passes(triton_passes, kernels: str, device: torch.device) -> dict:
    """The Triton pass of every kernel family ({} unless kernels="triton"), checked."""
    if kernels != "triton":
        if triton_passes:
            raise BackendError("triton_passes needs kernels='triton'")
        return {}
    passes = default_triton_passes(device)
    for name, value in dict(triton_passes or {}).items():
        if name not in TRITON_KERNELS:
            raise BackendError(f"triton_passes: unknown kernel family {name!r}; known: {list(TRITON_KERNELS)}")
        if value not in PASSES:
            raise BackendError(f"triton_passes[{name!r}] must be one of {PASSES}, got {value!r}")
        passes[name] = value
    return passes


def _compiled(unet: nn.Module, scope: str, mode: str):
    """The UNet copy's function under torch.compile: the whole copy ("unet"), or each of its
    repeated blocks compiled in place ("blocks", once per shared copy) and the copy itself."""
    from ..models.unet import AttentionBlock, ResBlock

    if scope == "unet":
        return torch.compile(unet, mode=mode, fullgraph=True, dynamic=False)
    blocks = [m for m in unet.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    # Every compiled block is one code object to dynamo (nn.Module's call), guarded per block
    # shape: blocks of different widths and resolutions are recompiles of it, each a cache entry
    # under dynamo's limit (8 by default; an ADM UNet has tens of block shapes, fullgraph turns
    # hitting the limit into an error). Raised to what this UNet needs, never lowered.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    for m in blocks:
        if getattr(m, "_compiled_call_impl", None) is None:
            m.compile(mode=mode, fullgraph=True, dynamic=False)
    return unet
