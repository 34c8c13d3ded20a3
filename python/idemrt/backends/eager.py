"""The eager backend: PyTorch autograd, fp32, exactly the composition of ``idemrt.diffusion``.

It is the reference every other backend is tested against.
"""
from __future__ import annotations

import torch

from ..diffusion.step import guided_step, plain_step
from ..diffusion.tiling import TiledModel
from ..errors import BackendError
from .base import StepSpec, register


@register("eager")
class EagerBackend:
    slot_counts = None  # any batch size runs as it is

    def __init__(self, spec: StepSpec, *, device: torch.device, dtype=None):
        if dtype not in (None, torch.float32):
            raise BackendError("the eager backend computes in float32; use backend='fast' for bf16/fp16")
        self.spec = spec
        self.model = spec.unet if spec.tile is None else TiledModel.for_prior(spec.unet, spec.tile, spec.unet)

    def step(self, x_t, i, target, noise, scale=None):
        s = self.spec
        if isinstance(i, (list, tuple)):  # one index per sample, from the host
            i = torch.tensor(i, device=s.sampler.device)
        if s.guidance is None:
            return plain_step(self.model, s.sampler, x_t, i, noise), x_t.new_zeros(x_t.shape[0])
        return guided_step(self.model, s.operator, s.sampler, s.guidance, x_t, i, target, noise, scale)
