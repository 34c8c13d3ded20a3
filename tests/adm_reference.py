"""Independent float64 functional ADM UNet, written from docs/reference_code.md §1, for tests only.

Takes a guided-diffusion state_dict and the ``create_model`` keyword arguments as a plain
dict. Nothing here imports idemrt: GroupNorm, SiLU, resampling and attention are spelled
out by hand, and the block layout is derived from the config, not from the model code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


def to64(state: dict) -> dict:
    return {k: v.detach().to(torch.float64) for k, v in state.items()}


def random_state(shapes: dict, seed: int = 0) -> dict:
    """Non-zero random weights for every tensor (also the layers ADM zero-initialises).

    Scaled so activations stay O(1) through a deep net: weights ~ N(0, 1/fan_in),
    GroupNorm gains 1 + N(0, 0.2^2), biases N(0, 0.2^2).
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        r = torch.randn(shape, generator=gen)
        if len(shape) >= 2:
            state[name] = r / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):  # the only 1-D weights are GroupNorm gains
            state[name] = 1 + 0.2 * r
        else:
            state[name] = 0.2 * r
    return state


# ---------------------------------------------------------------------------- primitives


def group_norm(x, weight, bias, groups=32, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


def silu(x):
    return x / (1 + torch.exp(-x))


def linear(x, weight, bias):
    return x @ weight.T + bias


def conv(x, weight, bias, stride=1):
    return F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)


def avg_down(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def nearest_up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def timestep_embedding(t, dim):
    """Frequencies and arguments in float32 as in the reference (at t ~ 1000 the float32
    rounding of the argument is ~6e-5, which a pure float64 formula would not reproduce);
    cos/sin in float64, cos first, a zero column for odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = (t.to(torch.float32)[:, None] * freqs[None, :]).to(torch.float64)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(len(t), 1, dtype=emb.dtype)], dim=1)
    return emb


# ---------------------------------------------------------------------------- blocks


def resblock(sd, p, x, emb, *, scale_shift, resample=None):
    """ResBlock at key prefix ``p``; resample is None, avg_down or nearest_up."""
    h = silu(group_norm(x, sd[p + "in_layers.0.weight"], sd[p + "in_layers.0.bias"]))
    if resample is not None:
        h, x = resample(h), resample(x)
    h = conv(h, sd[p + "in_layers.2.weight"], sd[p + "in_layers.2.bias"])
    e = linear(silu(emb), sd[p + "emb_layers.1.weight"], sd[p + "emb_layers.1.bias"])[:, :, None, None]
    gn_w, gn_b = sd[p + "out_layers.0.weight"], sd[p + "out_layers.0.bias"]
    if scale_shift:
        c = e.shape[1] // 2
        h = group_norm(h, gn_w, gn_b) * (1 + e[:, :c]) + e[:, c:]
    else:
        h = group_norm(h + e, gn_w, gn_b)
    h = conv(silu(h), sd[p + "out_layers.3.weight"], sd[p + "out_layers.3.bias"])
    if p + "skip_connection.weight" in sd:
        x = conv(x, sd[p + "skip_connection.weight"], sd[p + "skip_connection.bias"])
    return x + h


def attention(sd, p, x, heads, *, new_order):
    b, c, hh, ww = x.shape
    xf = x.reshape(b, c, hh * ww)
    n = group_norm(xf, sd[p + "norm.weight"], sd[p + "norm.bias"])
    qkv = torch.einsum("oc,bct->bot", sd[p + "qkv.weight"][:, :, 0], n) + sd[p + "qkv.bias"][None, :, None]
    d = c // heads
    if new_order:  # q | k | v blocks of C channels, each split into heads
        q, k, v = qkv.reshape(b, 3, heads, d, -1).unbind(1)
    else:  # head-major: head n owns [3d n, 3d (n+1)) = its q, k, v
        q, k, v = qkv.reshape(b, heads, 3, d, -1).unbind(2)
    s = d ** -0.25
    w = torch.softmax(torch.einsum("bnct,bncs->bnts", q * s, k * s), dim=-1)
    a = torch.einsum("bnts,bncs->bnct", w, v).reshape(b, c, -1)
    h = torch.einsum("oc,bct->bot", sd[p + "proj_out.weight"][:, :, 0], a) + sd[p + "proj_out.bias"][None, :, None]
    return (xf + h).reshape(b, c, hh, ww)


# ---------------------------------------------------------------------------- model


def _heads(cfg, channels, decoder):
    if cfg.get("num_head_channels", -1) != -1:
        return channels // cfg["num_head_channels"]
    heads = cfg.get("num_heads", 1)
    if decoder and cfg.get("num_heads_upsample", -1) != -1:
        heads = cfg["num_heads_upsample"]
    return heads


class _Tracked(dict):
    """Records which keys were read, so a state_dict tensor the layout never uses is caught."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def unet(sd, cfg, x, t):
    """Full forward in float64. ``sd`` float64 state_dict, ``cfg`` create_model kwargs.

    Asserts that every tensor of ``sd`` was used."""
    sd = _Tracked(sd)
    size, mc, nrb = cfg["image_size"], cfg["num_channels"], cfg["num_res_blocks"]
    mult = cfg.get("channel_mult", "")
    mult = _DEFAULT_MULT[size] if mult == "" else tuple(int(m) for m in mult.split(","))
    res = str(cfg.get("attention_resolutions", "16"))
    attn = {size // int(r) for r in res.split(",")}
    ss = cfg.get("use_scale_shift_norm", False)
    updown = cfg.get("resblock_updown", False)
    new = cfg.get("use_new_attention_order", False)

    emb = timestep_embedding(t, mc)
    emb = linear(silu(linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                 sd["time_embed.2.weight"], sd["time_embed.2.bias"])

    h = conv(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"])
    stack, i, ds = [h], 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            h = resblock(sd, f"input_blocks.{i}.0.", h, emb, scale_shift=ss)
            if ds in attn:
                h = attention(sd, f"input_blocks.{i}.1.", h, _heads(cfg, int(m * mc), False), new_order=new)
            stack.append(h)
            i += 1
        if level != len(mult) - 1:
            p = f"input_blocks.{i}.0."
            if updown:
                h = resblock(sd, p, h, emb, scale_shift=ss, resample=avg_down)
            else:
                h = conv(h, sd[p + "op.weight"], sd[p + "op.bias"], stride=2)
            stack.append(h)
            i += 1
            ds *= 2

    width = int(mult[-1] * mc)
    h = resblock(sd, "middle_block.0.", h, emb, scale_shift=ss)
    h = attention(sd, "middle_block.1.", h, _heads(cfg, width, False), new_order=new)
    h = resblock(sd, "middle_block.2.", h, emb, scale_shift=ss)

    j = 0
    for level in reversed(range(len(mult))):
        for k in range(nrb + 1):
            h = torch.cat([h, stack.pop()], dim=1)
            h = resblock(sd, f"output_blocks.{j}.0.", h, emb, scale_shift=ss)
            idx = 1
            if ds in attn:
                h = attention(sd, f"output_blocks.{j}.1.", h, _heads(cfg, int(mult[level] * mc), True), new_order=new)
                idx = 2
            if level and k == nrb:
                p = f"output_blocks.{j}.{idx}."
                if updown:
                    h = resblock(sd, p, h, emb, scale_shift=ss, resample=nearest_up)
                else:
                    h = conv(nearest_up(h), sd[p + "conv.weight"], sd[p + "conv.bias"])
                ds //= 2
            j += 1
    assert not stack
    h = silu(group_norm(h, sd["out.0.weight"], sd["out.0.bias"]))
    out = conv(h, sd["out.2.weight"], sd["out.2.bias"])
    assert sd.used == set(sd), f"unused tensors: {sorted(set(sd) - sd.used)}"
    return out
