"""Idempotence guidance: the constraint distance, DPS, DSG and the retry rule.

The constraint is ``||y - A(x0_hat)||_2`` with y the MSE-codec reconstruction
and A the codec round trip, both in [-1, 1] units (DIFFUSION_AND_DPS.md §8).

Deviation from the reference, on purpose: every norm here is taken **per
sample** (over C, H, W). The reference takes each norm over the whole tensor,
batch included, which couples the images of a batch (each gradient is divided
by the joint norm). At batch 1 the two agree; with per-sample norms an image
decodes the same alone or in a batch.

``update(sample, pred, grad, i)`` takes a precomputed ``grad = d dist / d x_t``
(one sample's distance differentiated w.r.t. its own step input), so backends
that compute the gradient elsewhere reuse it. Guidance objects hold constants
only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .samplers import Prediction

_EPS = 1e-8  # DSG's guard against a zero norm (reference constant)


def _per_sample_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Shape an (N,) tensor to broadcast over (N, C, H, W)."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def distance(target: Tensor, a_x0: Tensor) -> Tensor:
    """``||target - A(x0)||_2`` per sample, plain (not squared): shape (N,)."""
    if target.shape != a_x0.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from A(x0) shape {tuple(a_x0.shape)}")
    return _per_sample_norm(target - a_x0)


def _check_finite(name: str, value: float, minimum: float = 0.0) -> float:
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class DPS:
    """Diffusion posterior sampling ('ps'): ``x_{t-1} = sample - scale·grad``.

    grad has a fixed length scale (the distance is a plain norm), so ``scale``
    is a step length; 0.6 in the shipped configs.
    """

    scale: float = 0.6

    def __post_init__(self):
        _check_finite("DPS scale", self.scale)

    def active(self, i) -> bool:
        return True

    def update(self, sample: Tensor, pred: Prediction, grad: Tensor, i) -> Tensor:
        return sample - grad * self.scale


@dataclass(frozen=True)
class DSG:
    """Diffusion with spherical Gaussian constraint (the reference's 'DSG').

    On guided steps (``i % interval == 0``) the step is re-aimed on the sphere
    of radius ``r = sqrt(C·H·W)·sigma_t`` around the mean, between the sampled
    direction and the steepest descent of the distance:
    ``mix = d_sample + rate·(d_star - d_sample)``, ``x = mean + r·mix/||mix||``.
    sigma_t is the first element of each sample's std (a scalar for DDIM; at
    i == 0 it is 0, so DDIM's last step returns the mean). Off-interval steps
    return the sample unguided (and :func:`guided_step` reports distance 0).
    The config's ``scale`` is not used by DSG, as in the reference.
    """

    interval: int = 1
    guidance_rate: float = 0.1  # hard-coded to 0.1 in the reference

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"DSG interval must be an int >= 1, got {self.interval!r}")
        _check_finite("DSG guidance_rate", self.guidance_rate)

    def active(self, i) -> bool | Tensor:
        """Whether step ``i`` is guided: a bool, or a bool tensor for a tensor ``i``."""
        if self.interval == 1:
            return True
        return i % self.interval == 0

    def update(self, sample: Tensor, pred: Prediction, grad: Tensor, i) -> Tensor:
        on = self.active(i)
        if on is False:
            return sample
        c_h_w = sample[0].numel()
        r = _per_sample(math.sqrt(c_h_w) * pred.sigma.expand_as(sample).flatten(1)[:, 0], sample)
        d_star = -r * grad / (_per_sample(_per_sample_norm(grad), grad) + _EPS)
        d_sample = sample - pred.mean
        mix = d_sample + self.guidance_rate * (d_star - d_sample)
        guided = pred.mean + mix / (_per_sample(_per_sample_norm(mix), mix) + _EPS) * r
        # A tensor i (graph capture) selects without a host sync.
        return guided if on is True else torch.where(on, guided, sample)


@dataclass(frozen=True)
class RetryPolicy:
    """run_codec.py's outer loop: re-sample (fresh x_T) while the final
    distance exceeds ``threshold``, multiplying the guidance scale by
    ``factor`` each time, at most ``max_retries`` times (0 in every shipped
    config: ``maxrepeat = 1``). The last attempt is kept even if worse.

    Unlike the reference, a non-finite distance counts as above the threshold.
    """

    threshold: float = 20.0
    factor: float = 1.5
    max_retries: int = 0

    def __post_init__(self):
        _check_finite("retry threshold", self.threshold)
        _check_finite("retry factor", self.factor)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")

    def needs_retry(self, distances: Tensor, retries_done: int) -> Tensor:
        """Per sample (bool (N,)): retry this image?"""
        if retries_done >= self.max_retries:
            return torch.zeros_like(distances, dtype=torch.bool)
        return ~(distances <= self.threshold)

    def next_scale(self, scale: float) -> float:
        return scale * self.factor
