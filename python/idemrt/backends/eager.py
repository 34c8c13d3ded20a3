"""The eager backend: PyTorch autograd, fp32, exactly the composition of ``idemrt.diffusion``.

It is the reference every other backend is tested against.
"""
from __future__ import annotations

import torch

from ..diffusion.step import guided_step, unguided_step
from ..diffusion.tiled_operator import tiled_operator
from ..diffusion.tiling import TiledModel
from ..errors import BackendError
from .base import StepSpec, register, step_index


@register("eager")
class EagerBackend:
    slot_counts = None  # any batch size runs as it is

    def __init__(self, spec: StepSpec, *, device: torch.device, dtype=None):
        if dtype not in (None, torch.float32):
            raise BackendError("the eager backend computes in float32; use backend='fast' for bf16/fp16")
        self.spec = spec
        self.model = spec.unet if spec.tile is None else TiledModel.for_prior(spec.unet, spec.tile, spec.unet)
        # A tiled decode's operator in tiles too, above Tiling.operator_tile (idemrt.diffusion.tiled_operator).
        self.operator = spec.operator if spec.tile is None else \
            tiled_operator(spec.operator, spec.codec, spec.tile.operator_tile)

    # The pieces a tiled image's windowed steps use (idemrt.diffusion.window_steps).
    @property
    def sampler(self):
        return self.spec.sampler

    def model_output(self, x_t, t):
        return self.model(x_t, t)

    def apply_operator(self, x0):
        return self.operator(x0)

    def step(self, x_t, i, target, noise, scale=None):
        s = self.spec
        i = step_index(i, s.sampler.device)  # one index per sample: on the device
        if s.guidance is None:
            return unguided_step(self.model, s.sampler, x_t, i, noise)
        return guided_step(self.model, self.operator, s.sampler, s.guidance, x_t, i, target, noise, scale)
