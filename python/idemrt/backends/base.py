"""What a backend is: a swap of *how* one guided step runs, never of *what* it computes.

Every backend is built from the same ingredients and exposes one call::

    x_prev, distance = backend.step(x_t, i, target, noise)

with ``x_t`` the fp32 diffusion state (N, 3, H, W) in [-1, 1], ``i`` the position in the
respaced schedule (counting down to 0), ``target`` the constraint target (N, ...), ``noise``
the step's Gaussian noise (same shape as ``x_t``), ``x_prev`` fp32 and ``distance`` the
per-sample constraint distance (N,) measured at this step's x0 prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Optional

import torch

from ..errors import BackendError


@dataclass
class StepSpec:
    """Everything that defines the math of a guided step (shared by all backends).

    unet:      the ADM UNet (``model(x, t) -> (N, 6, H, W)``, t original timesteps).
    operator:  A(x0) in the target's domain; ``None`` for unguided sampling.
    codec:     the :class:`idemrt.Codec` behind ``operator`` (exporting backends rebuild A from it).
    domain:    "x" or "y": which idempotence operator ``operator`` is.
    sampler:   an ``idemrt.diffusion`` sampler (predict/step).
    guidance:  an ``idemrt.diffusion`` guidance object (update), or None.
    """

    unet: torch.nn.Module
    operator: Optional[Callable[[torch.Tensor], torch.Tensor]]
    codec: object
    domain: str
    sampler: object
    guidance: object


_REGISTRY: dict[str, Callable[..., object]] = {}
# Backend name -> module that registers it; imported on demand so optional dependencies stay optional.
_MODULES = {"eager": "eager", "fast": "fast", "onnxruntime": "ort", "tensorrt": "trt"}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_backends() -> list[str]:
    return sorted(_MODULES)


def create_backend(name: str, spec: StepSpec, *, device: torch.device, dtype: Optional[torch.dtype] = None,
                   **options):
    """Instantiate backend ``name`` for ``spec`` on ``device``; ``options`` are the backend's own."""
    if name not in _MODULES:
        raise BackendError(f"unknown backend {name!r}; choose one of {available_backends()}")
    if name not in _REGISTRY:
        import_module(f"{__package__}.{_MODULES[name]}")
    try:
        return _REGISTRY[name](spec, device=device, dtype=dtype, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise BackendError(f"backend {name!r} does not take these options: {sorted(options)}") from None
        raise
