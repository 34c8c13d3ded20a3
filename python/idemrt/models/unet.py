"""The ADM ("guided-diffusion") UNet, inference only.

Same architecture, state_dict keys and numerics as ``guided_diffusion.unet.UNetModel``
built by ``create_model``; differences are purely about speed:

* no gradient checkpointing (the reference always recomputes attention blocks in
  backward and needs ``requires_grad`` parameters for it; results are identical);
* attention through ``F.scaled_dot_product_attention`` on a [B, T, C] token layout,
  so channels_last activations reach the projections without a transpose copy;
* no data-dependent Python control flow and no host syncs in ``forward``, so the
  model works on the ``meta`` device and under ``torch.compile`` / CUDA graphs.

Backend hook: every ``SiLU(GroupNorm(x) [* (1 + scale) + shift])`` of the model goes
through :func:`norm_act`; ``ADMUNet.set_norm_act(fn)`` swaps in e.g. a fused kernel
without touching this file.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .unet_config import GROUPS, PRESETS, UNetConfig, unet_config

__all__ = ["ADMUNet", "PRESETS", "UNetConfig", "norm_act", "norm_act_mixed", "timestep_embedding", "unet_config"]

def _num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels != -1:
        if num_head_channels < 1 or channels % num_head_channels:
            raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"{channels} channels are not divisible into num_heads {num_heads}")
    return num_heads


# --------------------------------------------------------------------------------------
# Functional pieces


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps, cos first."""
    half = dim // 2
    # Same op order as guided-diffusion, so the float32 frequencies are bit-identical.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def norm_act(x: torch.Tensor, norm: nn.GroupNorm,
             scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``SiLU(norm(x) * (1 + scale) + shift)``, or ``SiLU(norm(x))`` without scale_shift.

    scale and shift are [N, C, 1, 1]. This is the default of the hook that
    ``ADMUNet.set_norm_act`` replaces; a replacement must keep this signature.
    """
    h = norm(x)
    if scale_shift is not None:
        scale, shift = scale_shift
        h = h * (1 + scale) + shift
    return F.silu(h)


def norm_act_mixed(x: torch.Tensor, norm: nn.GroupNorm,
                   scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`norm_act` with the GroupNorm computed by one mixed-type kernel: a bf16/fp16 ``x`` and
    fp32 affine parameters, statistics in fp32, the output in ``x``'s dtype — GroupNorm32's result
    (which casts to fp32 and back) without its two cast copies. PyTorch has this kernel on the CPU,
    where the fast backend's inference copies use it."""
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    if scale_shift is not None:
        scale, shift = scale_shift
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so low-precision paths keep ADM numerics."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


# --------------------------------------------------------------------------------------
# Blocks. Containers keep guided-diffusion's nn.Sequential indices so that state_dict
# keys match (in_layers.2, out_layers.3, ...); parameter-free layers sit at their
# original positions only to keep those indices.


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding; optionally resamples by 2."""

    norm_act = staticmethod(norm_act)  # per-instance override: ADMUNet.set_norm_act

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False,
                 up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = "up" if up else "down" if down else None
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.norm_act(x, self.in_layers[0]))
        x = self._resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            h = self.norm_act(h, self.out_layers[0], e.chunk(2, dim=1))
        else:
            h = self.norm_act(h + e, self.out_layers[0])
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, *, new_order: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        nh, d = self.num_heads, c // self.num_heads
        # Tokens [B, T, C]: a view for channels_last inputs. The k=1 Conv1d weights act as Linear.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)
        # The 3C qkv channels are (3, heads, d) in the new order and (heads, 3, d) in the legacy one.
        if self.new_order:
            q, k, v = qkv.unflatten(2, (3, nh, d)).unbind(2)
        else:
            q, k, v = qkv.unflatten(2, (nh, 3, d)).unbind(3)
        # [B, T, nh, d] -> [B, nh, T, d]; SDPA's default 1/sqrt(d) equals ADM's d^-1/4 on q and k.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(b, hgt * wid, c)  # head-major channels, as in ADM
        h = F.linear(a, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return x + h.transpose(1, 2).unflatten(2, (hgt, wid))


class Downsample(nn.Module):
    """Stride-2 3x3 conv (resblock_updown=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (resblock_updown=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbSequential(nn.Sequential):
    """A UNet block: layers in order, ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# --------------------------------------------------------------------------------------


class ADMUNet(nn.Module):
    """guided-diffusion ``UNetModel`` (in_channels 3, 2-D, conv_resample, unconditional).

    ``forward(x, t)``: x [N, 3, H, W] in [-1, 1], t [N] original timesteps (int or float)
    -> [N, config.out_channels, H, W] (eps, then the variance values if learn_sigma).
    H and W must be divisible by 2 ** (levels - 1).

    A :class:`~idemrt.models.prior.Prior`: guided-diffusion's process, no dtype of its own (the
    backend's), its config's ``image_size``, and a norm-act hook (:meth:`set_norm_act`).
    """

    norm_act = staticmethod(norm_act)  # for the output head; see set_norm_act
    diffusion_process = None  # guided-diffusion's (idemrt.diffusion.ADM_PROCESS)
    compute_dtype = None
    norm_act_hook = True

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.channel_mults) - 1)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, mults = config.num_channels, config.channel_mults
        emb_dim = 4 * mc
        attn_ds = config.attention_ds

        def res(ch_in, ch_out=None, **kw):
            return ResBlock(ch_in, emb_dim, ch_out, dropout=config.dropout,
                            use_scale_shift_norm=config.use_scale_shift_norm, **kw)

        def attn(ch, heads_arg):
            heads = _num_heads(ch, heads_arg, config.num_head_channels)
            return AttentionBlock(ch, heads, new_order=config.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([EmbSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chs, ds = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(config.num_res_blocks):
                layers = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, config.num_heads))
                self.input_blocks.append(EmbSequential(*layers))
                skip_chs.append(ch)
            if level != len(mults) - 1:
                down = res(ch, down=True) if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbSequential(down))
                skip_chs.append(ch)
                ds *= 2

        self.middle_block = EmbSequential(res(ch), attn(ch, config.num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, config.decoder_heads))
                if level and i == config.num_res_blocks:
                    layers.append(res(ch, up=True) if config.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))
        self._zero_init()

    def _zero_init(self):
        # As in guided-diffusion: each residual branch and the output start at zero.
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.out_layers[3].weight)
                nn.init.zeros_(m.out_layers[3].bias)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def set_norm_act(self, fn: Callable | None = None) -> ADMUNet:
        """Route every GroupNorm(+scale/shift)+SiLU through ``fn`` (see :func:`norm_act`);
        ``None`` restores the default."""
        fn = fn or norm_act
        self.norm_act = fn
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.norm_act = fn
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected x of shape [N, 3, H, W], got {tuple(x.shape)}")
        factor = self.size_multiple
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(x.shape[2:])}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")

        emb = self.time_embed(timestep_embedding(t, self.config.num_channels))
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = h.to(self.out[2].weight.dtype)
        return self.out[2](self.norm_act(h, self.out[0]))
