"""Tiny random models shared by the API, CLI and backend tests (and random FID Inception weights).

Weights are random and non-zero everywhere (ADM's zero-initialised layers included) so that
every path of the computation influences the result.
"""
import math

import torch

from idemrt.models.codec_loading import load_codec
from idemrt.models.unet import ADMUNet, UNetConfig

TINY_UNET = dict(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="16",
    num_head_channels=16,
    learn_sigma=True,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def tiny_unet_state(seed: int = 0, std: float = 0.05) -> dict:
    torch.manual_seed(seed)
    model = ADMUNet(UNetConfig(**TINY_UNET))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.state_dict()


def tiny_unet(seed: int = 0):
    from idemrt import load_unet

    return load_unet(tiny_unet_state(seed), **TINY_UNET)


def tiny_codec_state(seed: int = 0) -> dict:
    """A small bmshj2018-hyperprior whose latents reach several units, so rounding matters."""
    from compressai.models import ScaleHyperprior

    torch.manual_seed(seed)
    model = ScaleHyperprior(N=8, M=12)
    with torch.no_grad():
        model.g_a[-1].weight.mul_(20)
        model.h_a[-1].weight.mul_(5)
    model.update(force=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_codec(seed: int = 0):
    return load_codec("bmshj2018-hyperprior", quality=1, checkpoint=tiny_codec_state(seed))


def random_inception_state(seed: int = 0) -> dict:
    """A state_dict of the FID Inception (idemrt.fid) whose activations neither vanish nor explode
    (He-scaled convs, BatchNorm statistics near the identity), so that features differ between images."""
    from idemrt.fid import build_inception

    g = torch.Generator().manual_seed(seed)
    state = build_inception().state_dict()
    for key, v in state.items():
        if v.ndim == 4:
            v.copy_(torch.randn(v.shape, generator=g) * math.sqrt(2 / v[0].numel()))
        elif key.endswith("running_var") or (key.endswith("weight") and v.ndim == 1):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return state
