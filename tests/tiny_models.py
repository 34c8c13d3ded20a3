"""Tiny random models shared by the API, CLI and backend tests.

Weights are random and non-zero everywhere (ADM's zero-initialised layers included) so that
every path of the computation influences the result.
"""
import torch

from idemrt.models.codec import load_codec
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
