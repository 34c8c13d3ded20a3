"""Tiny models shared by the export and exporting-backend tests (imported by them), and checks
that the models make those tests meaningful.

Exported graphs are shared across test modules through one on-disk graph cache per test session
(:func:`shared_cache`): the weights here are seeded, so every module finds the graphs that an
earlier one exported.
"""
import torch
import torch.nn.functional as F
from compressai.models import MeanScaleHyperprior, ScaleHyperprior
from torch import nn

from idemrt.backends.base import StepSpec
from idemrt.diffusion import DPS, DDPMSampler, Schedule
from idemrt.models.codec import Codec
from idemrt.models.unet import ADMUNet, UNetConfig

TINY_UNET = UNetConfig(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
                       attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True,
                       resblock_updown=True)
SIZE = 32  # image side of the tiny graphs


def randomize_zero_init(module: nn.Module, seed: int) -> nn.Module:
    """ADM zero-initialises every residual branch's last layer: give them weights, else the UNet
    output would not depend on x and the gradient test would be trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval().requires_grad_(False)


def tiny_unet(seed: int = 0) -> ADMUNet:
    torch.manual_seed(seed)
    return randomize_zero_init(ADMUNet(TINY_UNET), seed)


class ToyUNet(nn.Module):
    """A cheap stand-in with the UNet interface (x, t) -> (N, 6, H, W) and the same kinds of layers
    (GroupNorm, SiLU, strided conv, average-pool, nearest upsampling, SDPA attention): for the
    graph tests whose subject is the codec side."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(3, 32, 3, padding=1)
        self.emb = nn.Linear(1, 32)
        self.norm = nn.GroupNorm(8, 32)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Conv2d(32, 6, 3, padding=1)

    def forward(self, x, t):
        h = F.silu(self.norm(self.inp(x) + self.emb(t[:, None].float() / 1000)[:, :, None, None]))
        d = self.down(h)
        n, c, hh, ww = d.shape
        q, k, v = self.qkv(d.flatten(2).transpose(1, 2)).unflatten(2, (3, 2, 16)).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(n, hh * ww, c).transpose(1, 2).unflatten(2, (hh, ww))
        h = h + F.interpolate(F.avg_pool2d(h, 2) + a, scale_factor=2.0, mode="nearest")
        return self.out(h)


class ConvUNet(nn.Module):
    """The smallest stand-in with the UNet interface: for graphs whose subject is the codec."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t[:, None, None, None].float() / 1000)


def conv_unet(seed: int = 0) -> ConvUNet:
    torch.manual_seed(seed)
    return ConvUNet().eval().requires_grad_(False)


def toy_unet(seed: int = 0) -> ToyUNet:
    torch.manual_seed(seed)
    return ToyUNet().eval().requires_grad_(False)


def tiny_codec(name: str = "bmshj2018-hyperprior", seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    model = {"bmshj2018-hyperprior": ScaleHyperprior, "mbt2018-mean": MeanScaleHyperprior}[name](8, 12)
    return Codec(name, model)


def step_spec(unet, codec, constraint="x", sampler=None, guidance=DPS(0.6)) -> StepSpec:
    """A StepSpec as idemrt.Decoder builds it (A from the codec, in [-1, 1] units)."""
    from idemrt.export.onnx_export import codec_operator

    sampler = sampler or DDPMSampler(Schedule.create(steps=1000, respacing=10))
    return StepSpec(unet=unet, operator=codec_operator(codec, constraint) if guidance else None, codec=codec,
                    constraint=constraint, sampler=sampler, guidance=guidance)


def shared_cache(tmp_path_factory):
    """One graph cache for the whole test session (the same base temp directory in every module)."""
    return tmp_path_factory.getbasetemp() / "idemrt-graph-cache"


def test_tiny_unet_output_depends_on_x_and_t():
    unet = tiny_unet()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = unet(x, torch.tensor([10, 900]))
    assert out.shape == (2, 6, SIZE, SIZE)
    assert out.abs().mean() > 1e-2
    assert (unet(x, torch.tensor([11, 900])) - out)[0].abs().max() > 1e-4
    assert (unet(x * 1.1, torch.tensor([10, 900])) - out).abs().max() > 1e-3


def test_toy_unet_and_codecs_are_nontrivial():
    x = torch.rand(1, 3, 64, 64)
    assert toy_unet()(x, torch.tensor([5])).abs().mean() > 1e-3
    assert conv_unet()(x, torch.tensor([5])).abs().mean() > 1e-3
    for name in ("bmshj2018-hyperprior", "mbt2018-mean"):
        y = tiny_codec(name).analysis(x)
        assert y.shape == (1, 12, 4, 4) and y.abs().max() > 0
