"""DDPM and DDIM reverse steps split into ``predict`` and ``step``.

``predict(model_out, x_t, i)`` turns one UNet output into the clipped x0
estimate, the step mean and the noise std; it is differentiable in ``x_t``
(DPS needs d||y - A(x0)|| / d x_t). ``step(pred, noise, i)`` adds the noise.
Neither draws random numbers nor keeps state, so any backend that computes the
UNet output elsewhere (ONNX Runtime, TensorRT, a CUDA graph) reuses them.

``i`` is the position in the respaced schedule (N'-1 down to 0). It may be a
Python int or a 0-dim integer tensor on the sampler's device: all per-step
coefficients sit in one float32 ``(N', K)`` table, one gather per step,
and the "no noise at i == 0" rule is a precomputed ``nonzero`` mask, so a
tensor ``i`` never forces a host sync (CUDA-graph friendly). The tables are
computed in float64 from the schedule and cast once; the reference casts each
float64 coefficient to float32 at use and computes the DDIM sigma in float32,
so coefficients can differ from it by one float32 ulp.

Only ``model_mean_type = epsilon`` with ``learned_range`` variance (a
``2·C``-channel output: eps | v) is supported by DDPM, as in every shipped
config; DDIM reads eps only and also accepts a ``C``-channel output.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .schedule import Schedule


class Prediction(NamedTuple):
    x0: Tensor  # clamped to [-1, 1]
    mean: Tensor  # mean of x_{t-1}
    sigma: Tensor  # std of x_{t-1} (x's shape); step() drops it at i == 0


def _at(table: Tensor, i) -> Tensor:
    """``table[i]``; a tensor ``i`` is gathered on the device (plain indexing
    with a 0-dim tensor may read the index back to the host)."""
    if isinstance(i, Tensor):
        return table.index_select(0, i.reshape(1)).squeeze(0)
    return table[i]


class _Sampler:
    """Float32 per-step tables on one device, built once from a float64 schedule."""

    def __init__(self, schedule: Schedule, columns: list[np.ndarray]):
        self.schedule = schedule
        self.coef = torch.from_numpy(np.stack(columns, axis=1)).float()
        self.timesteps = torch.from_numpy(schedule.timestep_map).long()
        nonzero = np.ones(schedule.num_steps)
        nonzero[0] = 0.0
        self.nonzero = torch.from_numpy(nonzero).float()

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def device(self) -> torch.device:
        return self.coef.device

    def to(self, device) -> _Sampler:
        """A copy whose tables live on ``device`` (the schedule is shared)."""
        moved = copy.copy(self)
        moved.coef = self.coef.to(device)
        moved.timesteps = self.timesteps.to(device)
        moved.nonzero = self.nonzero.to(device)
        return moved

    def _check_index(self, i) -> None:
        if isinstance(i, Tensor):
            # The value is not checked: that would sync with the device.
            if i.ndim != 0 or i.dtype.is_floating_point or i.dtype == torch.bool:
                raise ValueError("a tensor step index must be a 0-dim integer tensor")
        elif isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_steps:
            raise ValueError(f"step index must be an int in [0, {self.num_steps}), got {i!r}")

    def _row(self, i) -> tuple[Tensor, ...]:
        self._check_index(i)
        return _at(self.coef, i).unbind()

    def model_timesteps(self, i, batch: int) -> Tensor:
        """The UNet time input for step ``i``: ``timestep_map[i]`` as a long ``(batch,)`` tensor."""
        self._check_index(i)
        return _at(self.timesteps, i).expand(batch)

    def _split(self, model_out: Tensor, x_t: Tensor, allow_eps_only: bool) -> tuple[Tensor, Tensor | None]:
        n, c = x_t.shape[:2]
        if model_out.ndim != x_t.ndim or model_out.shape[0] != n or model_out.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"model output shape {tuple(model_out.shape)} does not match x_t {tuple(x_t.shape)}")
        if model_out.shape[1] == 2 * c:
            eps, v = model_out.split(c, dim=1)
            return eps, v
        if allow_eps_only and model_out.shape[1] == c:
            return model_out, None
        want = f"{2 * c} (eps | v)" + (f" or {c} (eps)" if allow_eps_only else "")
        raise ValueError(f"model output has {model_out.shape[1]} channels, expected {want}")

    def step(self, pred: Prediction, noise: Tensor, i) -> Tensor:
        """x_{t-1} = mean + sigma·noise, and mean alone at i == 0."""
        self._check_index(i)
        return pred.mean + pred.sigma * noise * _at(self.nonzero, i)


class DDPMSampler(_Sampler):
    """Ancestral sampling with the learned-range variance (guided-diffusion "ddpm")."""

    def __init__(self, schedule: Schedule):
        s = schedule
        super().__init__(s, [
            s.sqrt_recip_alphas_cumprod,
            s.sqrt_recipm1_alphas_cumprod,
            s.posterior_mean_coef1,
            s.posterior_mean_coef2,
            np.log(s.betas),  # upper bound of the learned log-variance
            s.posterior_log_variance_clipped,  # lower bound
        ])

    def predict(self, model_out: Tensor, x_t: Tensor, i) -> Prediction:
        recip, recipm1, coef1, coef2, max_log, min_log = self._row(i)
        eps, v = self._split(model_out, x_t, allow_eps_only=False)
        x0 = (recip * x_t - recipm1 * eps).clamp(-1, 1)
        mean = coef1 * x0 + coef2 * x_t
        frac = (v + 1) / 2  # v is not clamped, as in the reference
        log_var = frac * max_log + (1 - frac) * min_log
        return Prediction(x0, mean, torch.exp(0.5 * log_var))


class DDIMSampler(_Sampler):
    """DDIM (guided-diffusion "ddim"); eta = 1 as in the shipped configs.

    eps is re-derived from the clipped x0, and
    ``sigma = eta·sqrt((1 - abar_prev)/(1 - abar))·sqrt(1 - abar/abar_prev)``
    is one scalar per step (0 at i == 0, where abar_prev = 1).
    """

    def __init__(self, schedule: Schedule, eta: float = 1.0):
        eta = float(eta)
        if not np.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        s = schedule
        abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar)) * np.sqrt(1 - abar / abar_prev)
        eps_var = 1 - abar_prev - sigma**2
        if (eps_var < -1e-12).any():
            raise ValueError(f"eta = {eta} makes the DDIM noise variance exceed 1 - abar_prev")
        super().__init__(s, [
            s.sqrt_recip_alphas_cumprod,
            s.sqrt_recipm1_alphas_cumprod,
            np.sqrt(abar_prev),
            sigma,
            np.sqrt(np.maximum(eps_var, 0.0)),
        ])
        self.eta = eta

    def predict(self, model_out: Tensor, x_t: Tensor, i) -> Prediction:
        recip, recipm1, sqrt_abar_prev, sigma, eps_coef = self._row(i)
        eps, _ = self._split(model_out, x_t, allow_eps_only=True)
        x0 = (recip * x_t - recipm1 * eps).clamp(-1, 1)
        eps = (recip * x_t - x0) / recipm1
        mean = x0 * sqrt_abar_prev + eps_coef * eps
        return Prediction(x0, mean, sigma.expand_as(x_t))
