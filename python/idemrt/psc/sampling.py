"""Posterior samplers given linear measurements (H, y) with orthonormal rows: H⁺ = Hᵀ.

Both walk the ADM diffusion respaced to ``steps`` (``Schedule.create(1000, respacing=steps)``),
from x_T = sqrt(ā_T)·Hᵀy + sqrt(1 - ā_T)·z down to ā = 1, with the UNet's ε (its first 3
output channels) giving x̂0 = (x_t - sqrt(1 - ā_t)·ε̂) / sqrt(ā_t), unclipped.

* :func:`projected_sample` — DDRM with σ_y = 0, η = 1 (PSC.md §2): x̂0 ← x̂0 + Hᵀ(y - Hx̂0), then
  x_{t'} = sqrt(ā_{t'})·x̂0 + sqrt(1 - ā_{t'})·z. The last step returns the projected x̂0, so
  the sample meets Hx = y up to float32 rounding. This is the acquisition sampler (its
  arithmetic must be identical in encoder and decoder) and the "projected" restoration.
* :func:`guided_sample` — ΠGDM: a DDIM(η) step plus √ā_{t'}·√ā_t·scale times the
  vector-Jacobian product of ∂x̂0/∂x_t with Hᵀ(y - Hx̂0) (azula's weighting, PSC.md §2),
  through torch.autograd as ``idemrt.diffusion.guided_step``. Restoration only.

Images are flattened to (batch, n) rows for the projections, n = 3·h·w. ``noise(step)`` supplies
the Gaussian tensors: step ``steps`` for x_T, then i = steps-1 .. 1 (the step to ā = 1 needs none).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from ..diffusion import Schedule

Noise = Iterator[Tensor]  # yields x_T's noise, then one tensor per step i = N-1 .. 1


class Denoiser:
    """x̂0 of an ADM UNet at position i of the respaced schedule, and the float32 coefficients."""

    def __init__(self, unet: torch.nn.Module, steps: int, device):
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 1000:
            raise ValueError(f"steps must be an int in [2, 1000], got {steps!r}")
        self.unet = unet
        self.steps = steps
        self.device = torch.device(device)
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

