"""One reverse step, composed eagerly: the reference for every other backend.

    x_t ──model──▶ model_out ──sampler.predict──▶ (x0, mean, sigma)
                                   │                    │
                   dist = ||y - A(x0)||, grad = d dist/d x_t
                                   ▼                    ▼
            sampler.step(pred, noise) = sample ──guidance.update(grad)──▶ x_{t-1}

Backends that compute ``model_out``, ``dist`` and ``grad`` elsewhere (ONNX
Runtime, TensorRT, CUDA graphs) reuse ``predict``, ``step`` and ``update``.

RNG draw order (the caller owns the loop and the generator): draw x_T first,
then one standard-normal tensor of x's shape per step, for i = N'-1 down to 0,
*including* i = 0 where it is multiplied by 0, as the reference's
``randn_like`` every step. The reference also draws a second tensor per step
for a noisy measurement that 'ps' and 'DSG' never read; idemrt does not (the
reference sets no seed, so its runs are not reproducible anyway).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .guidance import DPS, DSG, distance
from .samplers import DDIMSampler, DDPMSampler

Sampler = DDPMSampler | DDIMSampler
Guidance = DPS | DSG
Model = Callable[[Tensor, Tensor], Tensor]
Operator = Callable[[Tensor], Tensor]


@torch.no_grad()
def plain_step(model: Model, sampler: Sampler, x_t: Tensor, i, noise: Tensor) -> Tensor:
    """An unguided reverse step: x_{t-1}."""
    out = model(x_t, sampler.model_timesteps(i, x_t.shape[0]))
    return sampler.step(sampler.predict(out, x_t, i), noise, i)


def guided_step(model: Model, operator: Operator, sampler: Sampler, guidance: Guidance,
                x_t: Tensor, i, target: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """A guided reverse step: (x_{t-1}, per-sample distance ||target - A(x0_hat)||), both detached.

    The distance is that of this step's x0 estimate, before the update; it is
    0 on steps the guidance skips (DSG off-interval). A tensor ``i`` is
    synced to the host here to decide that skip; this eager path does not
    need to be graph-capturable.
    """
    if not bool(guidance.active(i)):
        return plain_step(model, sampler, x_t, i, noise), x_t.new_zeros(x_t.shape[0])
    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        out = model(x_t, sampler.model_timesteps(i, x_t.shape[0]))
        pred = sampler.predict(out, x_t, i)
        dist = distance(target, operator(pred.x0))
        # Samples are independent, so d(sum)/d x_t holds each sample's own gradient.
        (grad,) = torch.autograd.grad(dist.sum(), x_t)
    with torch.no_grad():
        pred = type(pred)(*(t.detach() for t in pred))
        x_prev = guidance.update(sampler.step(pred, noise, i), pred, grad, i)
    return x_prev, dist.detach()
