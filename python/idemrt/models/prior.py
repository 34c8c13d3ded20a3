"""What idemrt reads of a diffusion prior besides calling it: the :class:`Prior` protocol.

A prior is a module ``unet(x, t) -> model output`` (x in [-1, 1], t the original timesteps).
idemrt's own priors (:class:`~idemrt.models.unet.ADMUNet`, :class:`~idemrt.models.diffusers_unet.
DiffusersUNet`) declare the facts below; any other module (a test's network, a user's wrapper) is a
*plain* prior: guided-diffusion's process, no compute dtype of its own, size unknown, no norm-act
hook. :func:`prior_traits` answers for both, so callers read declared properties, never probe.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..diffusion.process import DiffusionProcess

__all__ = ["PLAIN_PRIOR", "Prior", "prior_traits"]


@runtime_checkable
class Prior(Protocol):
    """The declared facts of a prior.

    ``diffusion_process``: what its output means (None: guided-diffusion's, every ADM UNet's);
    ``compute_dtype``: the dtype it must compute in (None: the backend's choice; a diffusers prior:
    float32); ``image_size``: the side it was trained at (None: unknown); ``size_multiple``: image
    sides must be multiples of it; ``norm_act_hook``: whether it has ``set_norm_act(fn)``, which
    routes its GroupNorm+SiLU through a given function (the fast backend's fused kernels)."""

    diffusion_process: Optional["DiffusionProcess"]
    compute_dtype: Optional["torch.dtype"]
    norm_act_hook: bool

    @property
    def image_size(self) -> Optional[int]: ...

    @property
    def size_multiple(self) -> int: ...


class _PlainPrior:
    """The facts of a module that declares none (see the module doc)."""

    diffusion_process = None
    compute_dtype = None
    norm_act_hook = False
    image_size = None
    size_multiple = 1


PLAIN_PRIOR = _PlainPrior()


def prior_traits(unet) -> Prior:
    """``unet`` itself if it declares the :class:`Prior` facts, else those of a plain prior (also for
    no prior at all, None)."""
    return unet if isinstance(unet, Prior) else PLAIN_PRIOR
