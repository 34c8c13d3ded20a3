"""One reverse step, written once: every backend computes exactly this.

    x_t ──model──▶ model_out ──sampler.predict──▶ (x0, mean, sigma)
                                   │                    │
                   dist = ||y - A(x0)||, grad = d dist/d x_t
                                   ▼                    ▼
            sampler.step(pred, noise) = sample ──guidance.update(grad)──▶ x_{t-1}

:func:`step_gradient` is the differentiable part — ``(model_out, prediction, distance,
grad)`` from a model function, an operator function and a sampler's table rows — and
:func:`finish_step` the rest. Proximal guidance (PIR) has no x_t gradient: :func:`proximal_x0`
(model forward, data step through the operator) and :func:`finish_proximal` are its two parts,
split the same way. The eager backend calls :func:`guided_step` (both, in fp32);
the fast backend calls :func:`step_gradient` with its low-precision model and operator
functions inside a CUDA graph; the ONNX/TensorRT step graph is :func:`step_gradient`
traced (:mod:`idemrt.export.joint_graph`) and its backend calls :func:`finish_step`. Only
the fused Triton kernels compute the same numbers their own way
(``idemrt.kernels.sampler_update``, tested equal to this module).

Step indices are per sample (see :mod:`.samplers`): ``i`` is an int or an (N,) tensor,
``scale`` an optional (N,) tensor of DPS step lengths. A step returns a :class:`StepResult`: the
pair ``(x_{t-1}, distance)`` with the x0 estimate the step computed on the way.

RNG draw order (the caller owns the loop and the generators): see
:class:`idemrt.diffusion.loop.GuidedSampler`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .guidance import Guidance, distance
from .samplers import Prediction, Sampler, per_sample

Model = Callable[[Tensor, Tensor], Tensor]
Operator = Callable[[Tensor], Tensor]


class StepResult(tuple):
    """What a step returns: the pair ``(x_prev, distance)`` — it unpacks as one — and ``x0``, the
    step's x0 estimate (N, C, H, W) fp32 (after PIR's data step: x0'). The x0 is computed by the step
    anyway; keeping it costs nothing, and it is what a decode service previews."""

    x0: Tensor

    def __new__(cls, x_prev: Tensor, distance: Tensor, x0: Tensor):
        result = super().__new__(cls, (x_prev, distance))
        result.x0 = x0
        return result

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_prev, distance, x0)``: what a captured graph outputs (a plain tuple of tensors)."""
        return (self[0], self[1], self.x0)


class StepGradient(NamedTuple):
    model_out: Tensor  # the model output (N, C_out, H, W)
    pred: Prediction  # x0, mean and sigma of the step
    dist: Tensor  # (N,) ||target - A(x0)||
    grad: Tensor  # d dist / d x_t, per sample


def step_gradient(model: Model, operator: Operator, sampler: Sampler, x_t: Tensor, t: Tensor, rows: Tensor,
                  target: Tensor) -> StepGradient:
    """The guided step's differentiable part, all outputs detached.

    ``t``: the model's time input (N,) (:meth:`Sampler.model_timesteps`); ``rows``: the
    sampler's table rows of the step (:meth:`Sampler.rows`). Only ``x_t`` is differentiated:
    the model's and the operator's parameters are constants here."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        out = model(x, t)
        pred = sampler.predict_rows(out, x, rows)
        dist = distance(target, operator(pred.x0))
        # Samples are independent, so d(sum)/d x_t holds each sample's own gradient.
        (grad,) = torch.autograd.grad(dist.sum(), x)
    return StepGradient(out.detach(), Prediction(*(p.detach() for p in pred)), dist.detach(), grad)


def output_gradient(operator: Operator, sampler: Sampler, x_t: Tensor, model_out: Tensor, rows: Tensor,
                    target: Tensor) -> tuple[StepGradient, Tensor]:
    """:func:`step_gradient` cut at the model, for a step whose model runs apart (a tiled image's
    windows, :mod:`.window_steps`): from ``model_out`` = model(x_t) (computed without autograd),
    ``(g, g_out)`` with ``g.grad`` the gradient through the prediction alone and ``g_out`` = d dist /
    d model_out. By the chain rule the step's gradient is ``g.grad + J_model(x_t)^T g_out``: the
    caller adds the model's vector-Jacobian product (a sum of two terms, the same in either order)."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        out = model_out.detach().requires_grad_(True)
        pred = sampler.predict_rows(out, x, rows)
        dist = distance(target, operator(pred.x0))
        grad, g_out = torch.autograd.grad(dist.sum(), (x, out))
    return StepGradient(out.detach(), Prediction(*(p.detach() for p in pred)), dist.detach(), grad), g_out


def finish_step(sampler: Sampler, guidance: Guidance, g: StepGradient, noise: Tensor, i, rows: Tensor,
                scale: Tensor | None = None) -> StepResult:
    """``(x_{t-1}, distance)`` from a step's gradient: noise, then the guidance update. The
    distance is 0 for samples whose step the guidance skips (DSG off its interval)."""
    with torch.no_grad():
        x_prev = guidance.update(sampler.step_rows(g.pred, noise, rows), g.pred, g.grad, i, scale)
        active = guidance.active(i)
        dist = g.dist if active is True else torch.where(active, g.dist, torch.zeros_like(g.dist))
    return StepResult(x_prev, dist, g.pred.x0)


class ProximalStep(NamedTuple):
    model_out: Tensor  # the model output (N, C_out, H, W)
    x0: Tensor  # x0' after the guidance's data step
    dist: Tensor  # (N,) ||target - A(x0')||


def proximal_x0(model: Model, operator: Operator, sampler: Sampler, guidance, x_t: Tensor, t: Tensor,
                rows: Tensor, target: Tensor) -> ProximalStep:
    """The proximal (PIR) step's network part: x0 from one model forward — never differentiated —
    then the guidance's data step through the operator alone (:meth:`PIR.data_step`)."""
    with torch.no_grad():
        out = model(x_t, t)
    return proximal_from_output(operator, sampler, guidance, x_t, out, rows, target)


def proximal_from_output(operator: Operator, sampler: Sampler, guidance, x_t: Tensor, model_out: Tensor,
                         rows: Tensor, target: Tensor) -> ProximalStep:
    """:func:`proximal_x0` from the model's output ``model_out`` = model(x_t)."""
    with torch.no_grad():
        x0 = sampler.predict_rows(model_out, x_t, rows).x0
    x0, dist = guidance.data_step(operator, x0, target, rows)
    return ProximalStep(model_out.detach(), x0, dist)


@torch.no_grad()
def finish_proximal(sampler: Sampler, guidance, x_t: Tensor, x0: Tensor, noise: Tensor, i, rows: Tensor) -> Tensor:
    """``x_{t-1} = sqrt(abar')·x0' + sqrt(1-abar')·(sqrt(1-zeta)·eps_hat + sqrt(zeta)·eps)``, with
    eps_hat = (x_t - sqrt(abar)·x0')/sqrt(1-abar) the noise x0' implies and abar' that of step i-1
    (1 at i == 0: the last step returns x0')."""
    recip, recipm1 = (per_sample(c, x_t) for c in rows[..., :2].unbind(-1))
    eps_hat = (recip * x_t - x0) / recipm1
    sqrt_abar_prev = per_sample(sampler.sqrt_abar_prev(i), x_t)
    sqrt_one_minus = (1 - sqrt_abar_prev.square()).clamp_min(0).sqrt()
    zeta = guidance.zeta
    return sqrt_abar_prev * x0 + sqrt_one_minus * ((1 - zeta) ** 0.5 * eps_hat + zeta**0.5 * noise)


def proximal_step(model: Model, operator: Operator, sampler: Sampler, guidance, x_t: Tensor, i,
                  target: Tensor, noise: Tensor) -> StepResult:
    """A proximal (PIR) reverse step: ``(x_{t-1}, distance (N,))``, detached; graph-capturable
    (fixed iterations, per-sample rows gathered on the device, no host sync)."""
    rows = sampler.rows(i)
    p = proximal_x0(model, operator, sampler, guidance, x_t, sampler.model_timesteps(i, x_t.shape[0]), rows, target)
    return StepResult(finish_proximal(sampler, guidance, x_t, p.x0, noise, i, rows), p.dist, p.x0)


@torch.no_grad()
def unguided_step(model: Model, sampler: Sampler, x_t: Tensor, i, noise: Tensor) -> StepResult:
    """An unguided reverse step: ``(x_{t-1}, distance 0)`` and its x0."""
    out = model(x_t, sampler.model_timesteps(i, x_t.shape[0]))
    return unguided_from_output(sampler, x_t, out, i, noise)


@torch.no_grad()
def unguided_from_output(sampler: Sampler, x_t: Tensor, model_out: Tensor, i, noise: Tensor) -> StepResult:
    """:func:`unguided_step` from the model's output ``model_out`` = model(x_t)."""
    pred = sampler.predict(model_out, x_t, i)
    return StepResult(sampler.step(pred, noise, i), x_t.new_zeros(x_t.shape[0]), pred.x0)


def plain_step(model: Model, sampler: Sampler, x_t: Tensor, i, noise: Tensor) -> Tensor:
    """An unguided reverse step: x_{t-1}."""
    return unguided_step(model, sampler, x_t, i, noise)[0]


def guided_step(model: Model, operator: Operator, sampler: Sampler, guidance: Guidance, x_t: Tensor, i,
                target: Tensor, noise: Tensor, scale: Tensor | None = None) -> StepResult:
    """A guided reverse step in the caller's precision: ``(x_{t-1}, distance (N,))``, detached, and its x0.

    The distance is that of this step's x0 estimate, before the update. When the guidance
    skips the step for every sample, the gradient is not computed (deciding that for a tensor
    ``i`` reads it on the host: this path does not need to be graph-capturable).
    """
    if guidance.step_kind == "proximal":
        return proximal_step(model, operator, sampler, guidance, x_t, i, target, noise)
    active = guidance.active(i)
    if active is False or (isinstance(active, Tensor) and not bool(active.any())):
        return unguided_step(model, sampler, x_t, i, noise)
    rows = sampler.rows(i)
    g = step_gradient(model, operator, sampler, x_t, sampler.model_timesteps(i, x_t.shape[0]), rows, target)
    return finish_step(sampler, guidance, g, noise, i, rows, scale)
