"""What a backend is: a swap of *how* one guided step runs, never of *what* it computes.

Every backend is built from the same ingredients and exposes one call::

    x_prev, distance = backend.step(x_t, i, target, noise, scale=None)

with ``x_t`` the fp32 diffusion state (N, 3, H, W) in [-1, 1], ``i`` the position in the
respaced schedule (counting down to 0) — an int, or one per sample (a list of ints or an (N,)
integer tensor; a list costs a graph-capturing backend no device sync; a :class:`StepRows`, a
list that also holds the same indices on the device, costs it no copy either) —
``target`` the constraint target (N, ...), ``noise`` the step's Gaussian noise (same shape as
``x_t``), ``scale`` None (the guidance's own) or the (N,) per-sample DPS scales, ``x_prev`` fp32
and ``distance`` the per-sample constraint distance (N,) measured at this step's x0 prediction.
The result is a :class:`~idemrt.diffusion.step.StepResult`: it unpacks as that pair, and its
``x0`` is the step's x0 estimate (N, 3, H, W) fp32. The math of that step is
:mod:`idemrt.diffusion.step`'s; backends differ in how it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Callable, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import BackendError

if TYPE_CHECKING:
    from ..diffusion.guidance import Guidance
    from ..diffusion.samplers import Sampler
    from ..models.codec import Codec


@dataclass
class StepSpec:
    """Everything that defines the math of a guided step (shared by all backends).

    unet:      the ADM UNet (``model(x, t) -> (N, 6, H, W)``, t original timesteps).
    operator:  A(x0) in the target's units; ``None`` for unguided sampling.
    codec:      the :class:`idemrt.Codec` behind ``operator`` (exporting backends rebuild A from it
                with :func:`idemrt.models.codec.diffusion_operator`, as the Decoder does).
    constraint: "x" or "y": which idempotence operator ``operator`` is.
    sampler:    an ``idemrt.diffusion`` sampler (its table, predict/step).
    guidance:   an ``idemrt.diffusion`` guidance object (update), or None.
    tile:       a :class:`idemrt.diffusion.tiling.Tiling`: the backend runs its model function on
                overlapping windows of images larger than the window (:class:`~idemrt.diffusion.
                tiling.TiledModel`); None: on the whole image.
    """

    unet: torch.nn.Module  # an idemrt.models.prior.Prior, or a plain module
    operator: Optional[Callable[[torch.Tensor], torch.Tensor]]
    codec: Optional["Codec"]
    constraint: str
    sampler: "Sampler"
    guidance: Optional["Guidance"]
    tile: Optional[object] = None


@runtime_checkable
class Backend(Protocol):
    """What every backend is (see the module doc): the ``spec`` it was made for, ``step``, and
    ``slot_counts`` — the batch sizes a step should be padded to (a graph-capturing backend's
    captured sizes), or None: any size runs as it is."""

    spec: StepSpec

    @property
    def slot_counts(self) -> Optional[tuple]: ...

    def step(self, x_t: torch.Tensor, i, target, noise: torch.Tensor, scale=None) -> tuple: ...


class StepRows(list):
    """Per-sample step indices known on both sides: the host's ints (the list itself, from which a
    backend decides what to run without a sync) and ``tensor``, the same (N,) int64 values on the
    device (what the step reads, without a host-to-device copy): a persistent batch keeps both."""

    def __init__(self, host, tensor: torch.Tensor):
        super().__init__(host)
        self.tensor = tensor


def step_index(i, device: torch.device):
    """``i`` as a step function takes it: an int as is, per-sample indices as a device tensor (a
    :class:`StepRows`' own, else one copy)."""
    if isinstance(i, StepRows) and i.tensor.device == device:
        return i.tensor
    if isinstance(i, (list, tuple)):
        return torch.tensor(i, dtype=torch.long, device=device)
    return i


def check_step_inputs(device: torch.device, num_steps: int, x_t, i, target, noise, *, guided: bool) -> list[int]:
    """Validate one step's inputs (on ``device``, shapes agreeing); returns the step index of
    each sample as Python ints — the host's copy, from which a backend decides what to run (a
    device tensor ``i`` is read back, which syncs)."""
    if not isinstance(x_t, torch.Tensor) or x_t.ndim != 4 or x_t.dtype != torch.float32:
        raise ValueError(f"x_t must be a float32 (N, C, H, W) tensor, got {_describe(x_t)}")
    n = x_t.shape[0]
    if not isinstance(noise, torch.Tensor) or noise.shape != x_t.shape or noise.dtype != torch.float32:
        raise ValueError(f"noise must be float32 of x_t's shape {tuple(x_t.shape)}, got {_describe(noise)}")
    tensors = [x_t, noise]
    if guided:
        if not isinstance(target, torch.Tensor) or target.ndim < 1 or target.shape[0] != n:
            raise ValueError(f"target must be a tensor with batch size {n}, got {_describe(target)}")
        tensors.append(target)
    for t in tensors:
        if t.device != device:
            raise ValueError(f"tensors must be on {device}, got one on {t.device}")
    bad = f"step index must be an int in [0, {num_steps}) or one per sample, got {i!r}"
    if isinstance(i, torch.Tensor):
        if i.dtype.is_floating_point or i.dtype == torch.bool or i.ndim > 1:
            raise ValueError(bad)
        i = i.tolist()
    steps = list(i) if isinstance(i, (list, tuple)) else [i] * n
    if len(steps) != n or not all(isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
                                  and 0 <= s < num_steps for s in steps):
        raise ValueError(bad)
    return [int(s) for s in steps]


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


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
