"""What a prior's network output means: its diffusion process (the training schedule), its
prediction type and its variance type.

The samplers (:mod:`.samplers`) read a :class:`DiffusionProcess` to turn one model output into x0,
the step mean and the noise std; the Decoder takes it from the prior (:func:`diffusion_process`):
an idemrt ADM UNet is guided-diffusion's process (1000-step linear betas, epsilon prediction,
learned-range variance, x0 clipped to [-1, 1]); a diffusers ``UNet2DModel`` folder carries the one
its ``scheduler_config.json`` describes (:mod:`idemrt.models.diffusers_unet`).

Prediction and variance types are small classes registered by their diffusers names
(:data:`PREDICTIONS`, :data:`VARIANCES`), with diffusers' ``DDPMScheduler`` semantics:

* ``epsilon``: x0 = sqrt(1/abar)·x_t - sqrt(1/abar - 1)·out; ``sample``: x0 = out;
  ``v_prediction``: x0 = sqrt(abar)·x_t - sqrt(1 - abar)·out.
* ``learned_range``: log var = frac·log(beta) + (1 - frac)·log(posterior var), frac = (v + 1)/2
  (guided-diffusion's LEARNED_RANGE); ``fixed_small`` (and ``fixed_small_log``, the same std):
  the posterior variance; ``fixed_large``: beta; ``learned``: the model's second half *is* the
  variance (diffusers' reading; guided-diffusion's LEARNED is a log-variance).

All coefficients come from the sampler's float32 table (columns ``sqrt(1/abar)``,
``sqrt(1/abar - 1)``, ``log beta`` and the clipped ``log posterior variance``), so backends that
gather table rows on the device (CUDA graphs, the ONNX step graph) need nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch
from torch import Tensor

from ..models.prior import prior_traits
from .schedule import Schedule, linear_betas

__all__ = ["ADM_PROCESS", "DiffusionProcess", "PREDICTIONS", "VARIANCES", "PredictionType", "VarianceType",
           "diffusion_process"]


class PredictionType:
    """What the model's first C channels predict; :meth:`x0` is the unclipped x0 estimate."""

    name: ClassVar[str]

    def x0(self, out: Tensor, x_t: Tensor, recip: Tensor, recipm1: Tensor) -> Tensor:
        raise NotImplementedError


class EpsilonPrediction(PredictionType):
    name = "epsilon"

    def x0(self, out, x_t, recip, recipm1):
        return recip * x_t - recipm1 * out


class SamplePrediction(PredictionType):
    name = "sample"

    def x0(self, out, x_t, recip, recipm1):
        return out


class VPrediction(PredictionType):
    name = "v_prediction"

    def x0(self, out, x_t, recip, recipm1):
        # sqrt(abar)·x_t - sqrt(1 - abar)·v, with sqrt(abar) = 1/recip and sqrt(1 - abar) = recipm1/recip
        return (x_t - recipm1 * out) / recip


class VarianceType:
    """The std of x_{t-1}. ``learned``: the model outputs 2·C channels, the second half ``v``
    feeding :meth:`sigma`; ``max_log``/``min_log`` are log beta and the clipped log posterior
    variance of the step (0-dim or (N, 1, 1, 1))."""

    name: ClassVar[str]
    learned: ClassVar[bool] = False

    def sigma(self, v: Optional[Tensor], max_log: Tensor, min_log: Tensor, like: Tensor) -> Tensor:
        raise NotImplementedError


class LearnedRange(VarianceType):
    name = "learned_range"
    learned = True

    def sigma(self, v, max_log, min_log, like):
        frac = (v + 1) / 2  # v is not clamped, as in the reference
        log_var = frac * max_log + (1 - frac) * min_log
        return torch.exp(0.5 * log_var)


class Learned(VarianceType):
    name = "learned"
    learned = True

    def sigma(self, v, max_log, min_log, like):
        return v.sqrt()  # diffusers: the predicted variance itself (NaN where the model outputs v < 0)


class FixedSmall(VarianceType):
    name = "fixed_small"

    def sigma(self, v, max_log, min_log, like):
        return torch.exp(0.5 * min_log).expand_as(like)


class FixedLarge(VarianceType):
    name = "fixed_large"

    def sigma(self, v, max_log, min_log, like):
        return torch.exp(0.5 * max_log).expand_as(like)


PREDICTIONS: dict[str, PredictionType] = {p.name: p() for p in (EpsilonPrediction, SamplePrediction, VPrediction)}
VARIANCES: dict[str, VarianceType] = {v.name: v() for v in (LearnedRange, Learned, FixedSmall, FixedLarge)}
VARIANCES["fixed_small_log"] = VARIANCES["fixed_small"]  # diffusers' variant: the same std


@dataclass(frozen=True, eq=False)
class DiffusionProcess:
    """A prior's diffusion: ``alphas_cumprod`` (float64, one per training step T), its prediction
    and variance types and ``clip`` (x0 clamped to [-clip, clip]; None: not clipped).
    ``name`` says where it comes from (for messages)."""

    alphas_cumprod: np.ndarray
    prediction: PredictionType = PREDICTIONS["epsilon"]
    variance: VarianceType = VARIANCES["learned_range"]
    clip: Optional[float] = 1.0
    name: str = "adm"

    def __post_init__(self):
        abar = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or len(abar) < 2 or not np.isfinite(abar).all():
            raise ValueError(f"{self.name}: alphas_cumprod must be a finite 1-D array of at least 2 steps")
        if not ((abar > 0).all() and (abar <= 1).all() and (np.diff(abar) <= 0).all()):
            raise ValueError(f"{self.name}: alphas_cumprod must decrease within (0, 1]")
        if self.clip is not None and not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"{self.name}: clip must be a positive number or None, got {self.clip!r}")
        object.__setattr__(self, "alphas_cumprod", abar)

    @classmethod
    def adm(cls, steps: int = 1000) -> DiffusionProcess:
        """guided-diffusion's: linear betas over ``steps``, epsilon, learned range, clipped x0."""
        return cls(Schedule.from_betas(linear_betas(steps)).alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def kind(self) -> tuple:
        """What the samplers' step functions depend on (their tables aside)."""
        return (self.prediction.name, self.variance.name, self.clip)

    def schedule(self, respacing=None) -> Schedule:
        """This process respaced (:meth:`Schedule.respace`)."""
        return Schedule.respace(self.alphas_cumprod, respacing)

    def x0(self, out: Tensor, x_t: Tensor, recip: Tensor, recipm1: Tensor) -> Tensor:
        """The (clipped) x0 estimate of one model output (its first C channels)."""
        x0 = self.prediction.x0(out, x_t, recip, recipm1)
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)


ADM_PROCESS = DiffusionProcess.adm()


def diffusion_process(unet) -> DiffusionProcess:
    """The prior's process: the one it declares (:class:`idemrt.models.prior.Prior`; a diffusers
    folder's UNet has one), else guided-diffusion's (every idemrt ADM UNet, a plain module, and no
    UNet at all)."""
    process = prior_traits(unet).diffusion_process
    return ADM_PROCESS if process is None else process
