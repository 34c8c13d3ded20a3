"""Posterior samplers given linear measurements (H, y) with orthonormal rows: H⁺ = Hᵀ.

Both walk the ADM diffusion respaced to ``steps`` (``Schedule.create(1000, respacing=steps)``),
from x_T = sqrt(ā_T)·Hᵀy + sqrt(1 - ā_T)·z down to ā = 1, with the UNet's ε (its first 3
output channels) giving x̂0 = (x_t - sqrt(1 - ā_t)·ε̂) / sqrt(ā_t), unclipped.

* :func:`projected_sample` — DDRM with σ_y = 0, η = 1 (docs/reference_code.md §4.2): x̂0 ← x̂0 + Hᵀ(y - Hx̂0), then
  x_{t'} = sqrt(ā_{t'})·x̂0 + sqrt(1 - ā_{t'})·z. The last step returns the projected x̂0, so
  the sample meets Hx = y up to float32 rounding. This is the acquisition sampler (its
  arithmetic must be identical in encoder and decoder) and the "projected" restoration.
* :func:`guided_sample` — ΠGDM: a DDIM(η) step plus √ā_{t'}·√ā_t·scale times the
  vector-Jacobian product of ∂x̂0/∂x_t with Hᵀ(y - Hx̂0) (azula's weighting, docs/reference_code.md §4.2),
  through torch.autograd as ``idemrt.diffusion.guided_step``. Restoration only.

Images are flattened to (batch, n) rows for the projections, n = 3·h·w. ``noise(step)`` supplies
the Gaussian tensors: step ``steps`` for x_T, then i = steps-1 .. 1 (the step to ā = 1 needs none).

x̂0 comes from a :class:`Denoiser` (the eager path: the UNet as given, fp32) or a
:class:`FastDenoiser` (the fast backend's bf16/fp16/fp32 inference copy, CUDA graphs); which one
is the stream's compute mode (:class:`.stream.Compute`, :func:`make_denoiser`).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..backends.cuda_graphs import GraphSet, on_device
from ..backends.inference import inference_unet
from ..defaults import dtype_from_name, dtype_name
from ..diffusion import Schedule
from .stream import Compute

Noise = Iterator[Tensor]  # yields x_T's noise, then one tensor per step i = N-1 .. 1
# Settings that change a UNet's last bits from one process to another: cuDNN autotuning picks
# algorithms by timing them, nondeterministic algorithms reduce in varying order, and TF32 is a
# per-process choice. PSC pins them while its UNet runs (they only affect CUDA).
_PINNED = ((torch.backends.cudnn, "benchmark", False), (torch.backends.cudnn, "deterministic", True),
           (torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False))


@contextlib.contextmanager
def deterministic():
    """Run the enclosed work with cuDNN autotuning off, deterministic cuDNN algorithms and no TF32
    (restored afterwards). Process-wide, like :func:`.rows.one_thread`."""
    before = [getattr(module, name) for module, name, _ in _PINNED]
    for module, name, value in _PINNED:
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name, _), value in zip(_PINNED, before):
            setattr(module, name, value)


class Denoiser:
    """x̂0 of an ADM UNet at position i of the respaced schedule, and the float32 coefficients.

    The eager path: the UNet as given (fp32), coefficients as Python floats."""

    def __init__(self, unet: torch.nn.Module, steps: int, device):
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 1000:
            raise ValueError(f"steps must be an int in [2, 1000], got {steps!r}")
        self.unet = unet
        self.steps = steps
        self.device = torch.device(device)
        self.compute = Compute("eager", "fp32", self.device.type)
        sched = Schedule.create(1000, respacing=steps)
        abar = sched.alphas_cumprod
        abar_prev = sched.alphas_cumprod_prev
        # Computed in float64 and cast once: python floats, identical on every device.
        self.sqrt_abar = np.sqrt(abar).astype(np.float32).tolist()
        self.sqrt_1m_abar = np.sqrt(1 - abar).astype(np.float32).tolist()
        self.sqrt_abar_prev = np.sqrt(abar_prev).astype(np.float32).tolist()
        self.sqrt_1m_abar_prev = np.sqrt(1 - abar_prev).astype(np.float32).tolist()
        self.timesteps = sched.timestep_map.tolist()

    def noise_steps(self) -> list[int]:
        """The noise keys a sampler consumes, in order: x_T's (= steps), then steps-1 .. 1."""
        return [self.steps, *range(self.steps - 1, 0, -1)]

    def x0(self, x_t: Tensor, i: int) -> Tensor:
        t = torch.full((x_t.shape[0],), self.timesteps[i], dtype=torch.long, device=x_t.device)
        eps = self.unet(x_t, t)[:, :3].float()
        return (x_t - self.sqrt_1m_abar[i] * eps) / self.sqrt_abar[i]


class FastDenoiser(Denoiser):
    """:class:`Denoiser` on the fast backend's inference copy of the UNet, replayed from CUDA graphs.

    The copy (:func:`idemrt.backends.inference.inference_unet`, shared with fast backends of the same
    UNet) has frozen weights in channels_last and ADM's mixed precision in ``dtype``. The step
    index lives in a device tensor, and the timesteps and the two coefficients in device tables
    holding Denoiser's float32 values, so one graph per input shape serves every step of every
    round (the acquisition batch (s, 3, H, W) has the same shape in every round). Only x̂0 is
    captured: the projection onto (H, y) changes shape every round (a capture per round) and,
    with the update, costs a few small matmuls next to the UNet.

    ``graphs`` (default: on CUDA) replays graphs; without them the same function runs uncaptured,
    and so does a call whose input requires grad (the guided restoration): a replay records no
    autograd graph. Captures run in the caller's cuDNN settings and never switch autotuning on.
    The weights are snapshotted when the copy is first made.
    """

    def __init__(self, unet: torch.nn.Module, steps: int, device, dtype: torch.dtype = torch.bfloat16,
                 graphs: bool | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(unet, steps, device)
        self.compute = Compute("fast", dtype_name(dtype), device.type)
        graphs = device.type == "cuda" if graphs is None else bool(graphs)
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}; pass graphs=False")
        self.unet = inference_unet(unet, dtype, device)
        self._timesteps = torch.tensor(self.timesteps, dtype=torch.long, device=device)
        self._coef = torch.tensor(list(zip(self.sqrt_1m_abar, self.sqrt_abar)), dtype=torch.float32, device=device)
        self._i = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs = GraphSet("PSC fast denoiser") if graphs else None
        self._lock = threading.Lock()  # the step index and a graph's buffers are shared state

    @property
    def num_graphs(self) -> int:
        """How many CUDA graphs are captured (one per input shape)."""
        return len(self._graphs) if self._graphs is not None else 0

    def x0(self, x_t: Tensor, i: int) -> Tensor:
        with self._lock, on_device(self.device):
            self._i.fill_(i)  # a kernel carrying the value: no host-to-device copy, no sync
            if self._graphs is None or x_t.requires_grad:
                return self._x0(x_t)[0]
            return self._graphs.run(tuple(x_t.shape), self._x0, x_t)[0]

    def _x0(self, x_t: Tensor) -> tuple[Tensor]:
        t = self._timesteps.index_select(0, self._i).expand(x_t.shape[0])
        coef = self._coef.index_select(0, self._i)  # (1, 2): sqrt(1 - ā_i), sqrt(ā_i)
        eps = self.unet(x_t.contiguous(memory_format=torch.channels_last), t)[:, :3].float()
        return ((x_t - coef[:, 0] * eps) / coef[:, 1],)


def make_denoiser(unet: torch.nn.Module, steps: int, device, compute: Compute) -> Denoiser:
    """The denoiser that computes x̂0 in ``compute``'s mode (its device type must be ``device``'s)."""
    if compute.backend == "eager":
        return Denoiser(unet, steps, device)
    return FastDenoiser(unet, steps, device, dtype_from_name(compute.dtype))


def project(x0: Tensor, h: Tensor, y: Tensor) -> Tensor:
    """x0 + Hᵀ(y - H x0) for flat x0 (b, n), rows h (m, n), y (m,)."""
    if h.shape[0] == 0:
        return x0
    return x0 + (y - x0 @ h.T) @ h


def _init(den: Denoiser, h: Tensor, y: Tensor, shape, noise: Noise) -> Tensor:
    start = (y @ h).expand(shape[0], -1).reshape(shape)  # Hᵀy; zeros while H is empty
    return den.sqrt_abar[-1] * start + den.sqrt_1m_abar[-1] * next(noise)


@torch.no_grad()
def projected_sample(den: Denoiser, h: Tensor, y: Tensor, shape, noise: Noise) -> Tensor:
    """Samples (b, 3, H, W) from the projected (DDRM, σ_y = 0, η = 1) sampler; all on h's device."""
    x = _init(den, h, y, shape, noise)
    for i in range(den.steps - 1, -1, -1):
        x0 = project(den.x0(x, i).reshape(shape[0], -1), h, y).reshape(shape)
        if i == 0:
            return x0
        x = den.sqrt_abar_prev[i] * x0 + den.sqrt_1m_abar_prev[i] * next(noise)
    raise AssertionError("unreachable")


def guided_sample(den: Denoiser, h: Tensor, y: Tensor, shape, noise: Noise, *,
                  scale: float = 1.0, eta: float = 1.0) -> Tensor:
    """Samples (b, 3, H, W) from the ΠGDM-guided DDIM(eta) sampler; all on h's device."""
    x = _init(den, h, y, shape, noise)
    b = shape[0]
    for i in range(den.steps - 1, -1, -1):
        a_t, s_t = den.sqrt_abar[i], den.sqrt_1m_abar[i]
        a_s, s_s = den.sqrt_abar_prev[i], den.sqrt_1m_abar_prev[i]
        with torch.enable_grad():
            x_t = x.detach().requires_grad_(True)
            x0 = den.x0(x_t, i)
            with torch.no_grad():
                flat = x0.detach().reshape(b, -1)
                direction = project(flat, h, y) - flat  # Hᵀ(y - H x̂0)
            (vjp,) = torch.autograd.grad(x0, x_t, grad_outputs=direction.reshape(shape))
        with torch.no_grad():
            x0 = x0.detach()
            if i == 0:
                return x0 + scale * a_t * vjp
            # DDIM: tau is the fraction of the step's variance that is fresh noise, eta² times the
            # DDPM posterior's (DDIM's sigma = eta·sqrt((1-ā')/(1-ā))·sqrt(1-ā/ā'); azula scales
            # tau by eta itself, the same at eta = 1).
            tau = min(max(eta**2 * (1 - (a_t / a_s * s_s / s_t) ** 2), 0.0), 1.0)
            x = a_s * x0 + s_s * (1 - tau) ** 0.5 / s_t * (x - a_t * x0) + s_s * tau ** 0.5 * next(noise)
            x = x + scale * a_s * a_t * vjp
    raise AssertionError("unreachable")

