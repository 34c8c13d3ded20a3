"""Load an ADM UNet checkpoint into :class:`~idemrt.models.unet.ADMUNet`.

The model is built on the ``meta`` device and the checkpoint tensors are assigned to
it, so a 550M-parameter model is never allocated twice. Any mismatch fails loudly
(guided-diffusion silently falls back to random weights).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint_io import check_keys, load_state_dict
from .unet import ADMUNet, UNetConfig, unet_config

__all__ = ["load_unet"]


def load_unet(source, preset: str | UNetConfig | None = None, *, device=None, sha256: str | None = None,
              **config) -> nn.Module:
    """Return an inference-ready ADM UNet (eval mode, fp32, parameters without gradients), or for a
    directory, a diffusers prior.

    A directory is a local diffusers ``UNet2DModel`` folder with its scheduler config
    (:func:`idemrt.models.diffusers_unet.load_diffusers_unet`; needs ``idemrt[diffusers]``): its
    config.json is the architecture, so ``preset`` is ignored (the command line always passes one)
    and ``config`` keywords are refused; ``sha256`` pins its weights file.

    source: a checkpoint path or a state_dict, bare or wrapped as {"state_dict": ...},
        {"model": ...} or {"ema": ...}; fp16 or fp32 tensors. A path is a safetensors file (read
        with ``safetensors.torch.load_file``) or a PyTorch one (``torch.load(weights_only=True)``),
        told apart by content, not name.
    preset: "ffhq256" or "imagenet256" (or a UNetConfig); ``config`` keyword arguments
        (guided-diffusion ``create_model`` names) override it or, without a preset,
        define the architecture. The architecture is never guessed from the checkpoint.
    device: where the weights go (default: where they are, i.e. CPU for a file).
    sha256: optional pin of the checkpoint file's digest (full, or a prefix of >= 8 hex digits).

    Raises CheckpointError if the file is unreadable or unsafe, or its keys, shapes,
    dtypes or values do not fit the architecture; ValueError/TypeError for a bad config.
    """
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        if config:
            raise TypeError(f"a diffusers folder's config.json defines the architecture; "
                            f"unexpected config keywords {sorted(config)}")
        from .diffusers_unet import load_diffusers_unet

        return load_diffusers_unet(source, device=device, sha256=sha256)
    cfg = unet_config(preset, **config)
    with torch.device("meta"):
        model = ADMUNet(cfg)
    what = f"ADM UNet ({preset if isinstance(preset, str) else 'custom config'})"

    state = load_state_dict(source, sha256)
    check_keys(state, {k: v.shape for k, v in model.state_dict().items()}, what)
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{what}: non floating-point tensors: {', '.join(not_float[:10])}")

    # Copy a caller's dict so the model never shares storage with it; tensors read
    # from a file are private and are converted (or moved) only if needed, one at a
    # time so that an fp16 file and its fp32 copy are never held in full together.
    copy = isinstance(source, Mapping)
    weights = {}
    for k in list(state):
        weights[k] = state.pop(k).to(device=device, dtype=torch.float32, copy=copy).contiguous()
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what}: non-finite values in {', '.join(bad[:10])}")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval().requires_grad_(False)
