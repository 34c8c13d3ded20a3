"""Fused GroupNorm(32, eps 1e-5, affine) + optional FiLM scale-shift + SiLU, forward and backward.

This is the ``out_layers`` head of an ADM ResBlock with ``use_scale_shift_norm``
(docs/reference_code.md §1.3):

    y = SiLU(GN(x) * (1 + scale) + shift)

GroupNorm32 normalises in float32 and casts back to the input dtype before the scale-shift; the
kernel does the same, keeping everything after that cast in float32 and rounding once on store.

Kernels, for x seen as [N, C, HW] with arbitrary strides (contiguous NCHW and channels_last both
work without a copy); every program owns one (sample, group) pair and one chunk of HW:
1. ``_gn_stats_kernel``: per-chunk count/mean/M2 by per-lane Welford (no E[x²]-E[x]² cancellation).
2. ``_gn_fwd_kernel``: merges the chunk partials of its group, normalises, applies the affine,
   the cast, FiLM and SiLU. Saves mean and rstd per group for the backward.
3. ``_gn_bwd_reduce_kernel``: per-channel partial sums over its chunk of dz and dz*xhat, where dz is
   the gradient at the SiLU input.
4. ``_gn_bwd_dx_kernel``: merges those partials into the group means of dxhat and dxhat*xhat and
   writes dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
Splitting HW into chunks keeps enough programs in flight at batch 1 (32 groups alone would leave
most of a GPU idle); partials are merged in a fixed order, so results are deterministic.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import TARGET_PROGRAMS, check_launchable, nchw_as_3d, next_pow2

__all__ = ["groupnorm_silu", "groupnorm_silu_reference", "GroupNormSiLUFunction", "BACKWARDS", "NUM_GROUPS", "EPS"]

NUM_GROUPS = 32
EPS = 1e-5
# Elements per [channels-of-a-group, HW] tile.
_TILE = 2048


@triton.jit
def _gn_stats_kernel(
    x_ptr, part_ptr,
    G, CPG, HW, HW_PER_SPLIT, SPLIT,
    stride_n, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    base = x_ptr + n.to(tl.int64) * stride_n + (g * CPG + offs_c[:, None]).to(tl.int64) * stride_c
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)

    count = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < hw_end)[None, :]
        v = tl.load(base + offs_hw[None, :].to(tl.int64) * stride_hw, mask=mask, other=0.0).to(tl.float32)
        count += mask.to(tl.float32)
        delta = v - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (v - mean), 0.0)

    # Merge all lanes at once: M2 = sum(M2_l) + sum(n_l * (mean_l - mean)^2).
    total = tl.sum(count)
    chunk_mean = tl.sum(count * mean) / total
    dev = mean - chunk_mean
    chunk_m2 = tl.sum(m2 + count * dev * dev)
    out = part_ptr + (pid_ng * SPLIT + pid_s) * 3
    tl.store(out, total)
    tl.store(out + 1, chunk_mean)
    tl.store(out + 2, chunk_m2)


@triton.jit
def _merge_group_stats(part_ptr, pid_ng, SPLIT, group_size, eps, SPLIT_P2: tl.constexpr):
    """Mean and rstd of one group from its per-chunk (count, mean, M2) partials."""
    offs = tl.arange(0, SPLIT_P2)
    mask = offs < SPLIT
    row = part_ptr + (pid_ng * SPLIT + offs) * 3
    cnt = tl.load(row, mask=mask, other=0.0)
    mu = tl.load(row + 1, mask=mask, other=0.0)
    m2 = tl.load(row + 2, mask=mask, other=0.0)
    mean = tl.sum(cnt * mu, axis=0) / group_size
    dev = mu - mean
    var = tl.sum(m2 + cnt * dev * dev, axis=0) / group_size
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _silu_input(x, mean, rstd, w, b, one_plus_scale, shift, HAS_FILM: tl.constexpr):
    """Normalised xhat, the SiLU input z and sigmoid(z) of a tile; w, b, one_plus_scale, shift are
    [BLOCK_C, 1] columns. SiLU(z) = z * sigmoid(z); SiLU'(z) = sigmoid(z) * (1 + z * (1 - sigmoid(z)))."""
    xhat = (x.to(tl.float32) - mean) * rstd
    # GroupNorm32 returns the input dtype: round there before the scale-shift, as the model does.
    z = (xhat * w + b).to(x.dtype).to(tl.float32)
    if HAS_FILM:
        z = z * one_plus_scale + shift
    return xhat, z, 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _load_channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, chan, mask_c,
                         HAS_FILM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel affine and FiLM parameters of one group as float32 [BLOCK_C, 1] columns."""
    w = tl.load(w_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    b = tl.load(b_ptr + chan, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    if HAS_FILM:
        one_plus_scale = 1.0 + tl.load(scale_ptr + n * C + chan, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        shift = tl.load(shift_ptr + n * C + chan, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    else:
        one_plus_scale = tl.full([BLOCK_C, 1], 1.0, tl.float32)
        shift = tl.zeros([BLOCK_C, 1], tl.float32)
    return w, b, one_plus_scale, shift


@triton.jit
def _gn_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, part_ptr, mean_ptr, rstd_ptr,
    G, C, CPG, HW, HW_PER_SPLIT, SPLIT, group_size, eps,
    stride_xn, stride_xc, stride_xhw, stride_yn, stride_yc, stride_yhw,
    HAS_FILM: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    mean, rstd = _merge_group_stats(part_ptr, pid_ng, SPLIT, group_size, eps, SPLIT_P2)
    if pid_s == 0:
        tl.store(mean_ptr + pid_ng, mean)
        tl.store(rstd_ptr + pid_ng, rstd)

    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    chan = g * CPG + offs_c
    w, b, one_plus_scale, shift = _load_channel_params(
        w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, chan, mask_c, HAS_FILM, BLOCK_C)
    x_base = x_ptr + n.to(tl.int64) * stride_xn + chan[:, None].to(tl.int64) * stride_xc
    y_base = y_ptr + n.to(tl.int64) * stride_yn + chan[:, None].to(tl.int64) * stride_yc
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = (hw0 + tl.arange(0, BLOCK_HW))[None, :]
        mask = mask_c[:, None] & (offs_hw < hw_end)
        x = tl.load(x_base + offs_hw.to(tl.int64) * stride_xhw, mask=mask, other=0.0)
        _, z, sig = _silu_input(x, mean, rstd, w, b, one_plus_scale, shift, HAS_FILM)
        y = z * sig
        tl.store(y_base + offs_hw.to(tl.int64) * stride_yhw, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_reduce_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    G, C, CPG, HW, HW_PER_SPLIT, SPLIT,
    stride_xn, stride_xc, stride_xhw, stride_dn, stride_dc, stride_dhw,
    HAS_FILM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    chan = g * CPG + offs_c
    w, b, one_plus_scale, shift = _load_channel_params(
        w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, chan, mask_c, HAS_FILM, BLOCK_C)
    x_base = x_ptr + n.to(tl.int64) * stride_xn + chan[:, None].to(tl.int64) * stride_xc
    dy_base = dy_ptr + n.to(tl.int64) * stride_dn + chan[:, None].to(tl.int64) * stride_dc
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    sum_dz = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    sum_dz_xhat = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = (hw0 + tl.arange(0, BLOCK_HW))[None, :]
        mask = mask_c[:, None] & (offs_hw < hw_end)
        x = tl.load(x_base + offs_hw.to(tl.int64) * stride_xhw, mask=mask, other=0.0)
        dy = tl.load(dy_base + offs_hw.to(tl.int64) * stride_dhw, mask=mask, other=0.0).to(tl.float32)
        xhat, z, sig = _silu_input(x, mean, rstd, w, b, one_plus_scale, shift, HAS_FILM)
        dz = tl.where(mask, dy * sig * (1.0 + z * (1.0 - sig)), 0.0)
        sum_dz += dz
        sum_dz_xhat += dz * xhat
    # part[n, split, k, c]: k = 0 sums dz, k = 1 sums dz * xhat.
    out = part_ptr + ((n * SPLIT + pid_s) * 2) * C + chan
    tl.store(out, tl.sum(sum_dz, axis=1), mask=mask_c)
    tl.store(out + C, tl.sum(sum_dz_xhat, axis=1), mask=mask_c)


@triton.jit
def _gn_bwd_dx_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr, sums_ptr,
    G, C, CPG, HW, HW_PER_SPLIT, SPLIT, group_size,
    stride_xn, stride_xc, stride_xhw, stride_dn, stride_dc, stride_dhw, stride_gn, stride_gc, stride_ghw,
    HAS_FILM: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_s = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    mean = tl.load(mean_ptr + pid_ng)
    rstd = tl.load(rstd_ptr + pid_ng)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < CPG
    chan = g * CPG + offs_c
    w, b, one_plus_scale, shift = _load_channel_params(
        w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, chan, mask_c, HAS_FILM, BLOCK_C)

    # Per-channel sums over all chunks, then the group means that enter dx.
    offs_s = tl.arange(0, SPLIT_P2)
    part = part_ptr + ((n * SPLIT + offs_s[:, None]) * 2) * C + chan[None, :]
    pmask = (offs_s[:, None] < SPLIT) & mask_c[None, :]
    sum_dz = tl.sum(tl.load(part, mask=pmask, other=0.0), axis=0)
    sum_dz_xhat = tl.sum(tl.load(part + C, mask=pmask, other=0.0), axis=0)
    if pid_s == 0:
        tl.store(sums_ptr + (n * 2) * C + chan, sum_dz, mask=mask_c)
        tl.store(sums_ptr + (n * 2 + 1) * C + chan, sum_dz_xhat, mask=mask_c)
    # dxhat = dz * w * (1 + scale); the cast to the input dtype is the identity for gradients.
    w_eff = w * one_plus_scale
    mean_dxhat = tl.sum(w_eff * sum_dz[:, None]) / group_size
    mean_dxhat_xhat = tl.sum(w_eff * sum_dz_xhat[:, None]) / group_size

    x_base = x_ptr + n.to(tl.int64) * stride_xn + chan[:, None].to(tl.int64) * stride_xc
    dy_base = dy_ptr + n.to(tl.int64) * stride_dn + chan[:, None].to(tl.int64) * stride_dc
    dx_base = dx_ptr + n.to(tl.int64) * stride_gn + chan[:, None].to(tl.int64) * stride_gc
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = (hw0 + tl.arange(0, BLOCK_HW))[None, :]
        mask = mask_c[:, None] & (offs_hw < hw_end)
        x = tl.load(x_base + offs_hw.to(tl.int64) * stride_xhw, mask=mask, other=0.0)
        dy = tl.load(dy_base + offs_hw.to(tl.int64) * stride_dhw, mask=mask, other=0.0).to(tl.float32)
        xhat, z, sig = _silu_input(x, mean, rstd, w, b, one_plus_scale, shift, HAS_FILM)
        dxhat = dy * sig * (1.0 + z * (1.0 - sig)) * w_eff
        dx = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
        tl.store(dx_base + offs_hw.to(tl.int64) * stride_ghw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(n: int, c: int, hw: int) -> dict:
    cpg = c // NUM_GROUPS
    block_c = next_pow2(cpg)
    block_hw = min(max(_TILE // block_c, 16), max(next_pow2(hw), 16))
    split = max(1, min(triton.cdiv(hw, block_hw), TARGET_PROGRAMS // (n * NUM_GROUPS)))
    hw_per_split = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    split = triton.cdiv(hw, hw_per_split)  # no empty chunk
    return dict(CPG=cpg, HW=hw, HW_PER_SPLIT=hw_per_split, SPLIT=split, BLOCK_C=block_c, BLOCK_HW=block_hw)


def _check_inputs(x, weight, bias, scale, shift):
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if c % NUM_GROUPS:
        raise ValueError(f"channels ({c}) must be a multiple of {NUM_GROUPS}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(t.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift go together: pass both or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and t.numel() != n * c:
            raise ValueError(f"{name} must have N*C = {n * c} elements ([N, C] or [N, C, 1, 1]), got {tuple(t.shape)}")


def _forward(x, weight, bias, scale, shift):
    n, c, h, w = x.shape
    x3 = nchw_as_3d(x)
    # As in the model: GN output (x.dtype) * (1 + scale) + shift follows torch's type promotion.
    out_dtype = x.dtype if scale is None else torch.promote_types(torch.promote_types(x.dtype, scale.dtype),
                                                                  shift.dtype)
    y = torch.empty_like(x, dtype=out_dtype)
    y3 = nchw_as_3d(y)
    cfg = _launch_config(n, c, h * w)
    part = torch.empty((n * NUM_GROUPS, cfg["SPLIT"], 3), device=x.device, dtype=torch.float32)
    mean = torch.empty(n * NUM_GROUPS, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    grid = (n * NUM_GROUPS, cfg["SPLIT"])
    check_launchable(_gn_stats_kernel, x, weight, bias, *(t for t in (scale, shift) if t is not None))
    _gn_stats_kernel[grid](
        x3, part, NUM_GROUPS, cfg["CPG"], cfg["HW"], cfg["HW_PER_SPLIT"], cfg["SPLIT"], *x3.stride(),
        BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
    )
    film = scale is not None
    _gn_fwd_kernel[grid](
        x3, y3, weight, bias, scale if film else x3, shift if film else x3, part, mean, rstd,
        NUM_GROUPS, c, cfg["CPG"], cfg["HW"], cfg["HW_PER_SPLIT"], cfg["SPLIT"], float(cfg["CPG"] * h * w), EPS,
        *x3.stride(), *y3.stride(),
        HAS_FILM=film, SPLIT_P2=next_pow2(cfg["SPLIT"]), BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
    )
    return y, mean, rstd


def _backward(dy, x, weight, bias, scale, shift, mean, rstd):
    n, c, h, w = x.shape
    x3 = nchw_as_3d(x)
    dy3 = nchw_as_3d(dy)
    dx = torch.empty_like(x)
    dx3 = nchw_as_3d(dx)
    cfg = _launch_config(n, c, h * w)
    part = torch.empty((n, cfg["SPLIT"], 2, c), device=x.device, dtype=torch.float32)
    sums = torch.empty((n, 2, c), device=x.device, dtype=torch.float32)
    film = scale is not None
    scale_arg, shift_arg = (scale, shift) if film else (x3, x3)
    common = (NUM_GROUPS, c, cfg["CPG"], cfg["HW"], cfg["HW_PER_SPLIT"], cfg["SPLIT"])
    grid = (n * NUM_GROUPS, cfg["SPLIT"])
    check_launchable(_gn_bwd_reduce_kernel, x, dy)
    _gn_bwd_reduce_kernel[grid](
        x3, dy3, weight, bias, scale_arg, shift_arg, mean, rstd, part, *common, *x3.stride(), *dy3.stride(),
        HAS_FILM=film, BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
    )
    _gn_bwd_dx_kernel[grid](
        x3, dy3, dx3, weight, bias, scale_arg, shift_arg, mean, rstd, part, sums, *common, float(cfg["CPG"] * h * w),
        *x3.stride(), *dy3.stride(), *dx3.stride(),
        HAS_FILM=film, SPLIT_P2=next_pow2(cfg["SPLIT"]), BLOCK_C=cfg["BLOCK_C"], BLOCK_HW=cfg["BLOCK_HW"],
    )
    return dx, sums[:, 0], sums[:, 1]


def _backward_torch(dy, x, weight, bias, scale, shift, mean, rstd):
    """:func:`_backward`'s results from PyTorch's own kernels: the SiLU and FiLM derivatives as float32
    elementwise ops, then ``aten.native_group_norm_backward`` (the kernel behind ``F.group_norm``'s
    backward) on the statistics the forward kernel saved. For a GPU where the hand-written backward
    loses to PyTorch's (benchmarks/RESULTS.md: 0.78 vs 0.51 ms fwd+bwd at 128x256², bf16)."""
    n, c, h, w = x.shape
    cpg = c // NUM_GROUPS
    xf = x.float()
    stat = lambda t: t.view(n, NUM_GROUPS, 1, 1).repeat_interleave(cpg, dim=1)  # noqa: E731 - (N, C, 1, 1)
    xhat = (xf - stat(mean)) * stat(rstd)
    # The model rounds GN(x) to x's dtype before FiLM; the forward kernel does the same.
    z = (xhat * weight.float()[:, None, None] + bias.float()[:, None, None]).to(x.dtype).float()
    one_plus_scale = 1.0
    if scale is not None:
        one_plus_scale = 1.0 + scale.float().view(n, c, 1, 1)
        z = z * one_plus_scale + shift.float().view(n, c, 1, 1)
    sig = torch.sigmoid(z)
    dz = dy.float() * sig * (1.0 + z * (1.0 - sig))
    dx = torch.ops.aten.native_group_norm_backward(
        dz * one_plus_scale, xf, mean.view(n, NUM_GROUPS), rstd.view(n, NUM_GROUPS), weight.float(),
        n, c, h * w, NUM_GROUPS, [True, False, False])[0]
    return dx.to(x.dtype), dz.sum((2, 3)), (dz * xhat).sum((2, 3))


BACKWARDS = ("triton", "torch")  # who computes the backward pass: this module's kernels or PyTorch's


class GroupNormSiLUFunction(torch.autograd.Function):
    """Autograd wiring of the fused kernels: gradients for x, scale and shift (and weight/bias if
    asked); the backward by the Triton kernels or, ``backward="torch"``, by :func:`_backward_torch`."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, backward="triton"):
        y, mean, rstd = _forward(x, weight, bias, scale, shift)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.torch_backward = backward == "torch"
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        grads = _backward_torch if ctx.torch_backward else _backward
        dx, sum_dz, sum_dz_xhat = grads(dy, x, weight, bias, scale, shift, mean, rstd)
        d_weight = d_bias = d_scale = d_shift = None
        one_plus_scale = 1.0 if scale is None else 1.0 + scale.float()
        if ctx.needs_input_grad[1]:
            d_weight = (one_plus_scale * sum_dz_xhat).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = (one_plus_scale * sum_dz).sum(0).to(bias.dtype)
        if ctx.needs_input_grad[3]:
            # sum_hw dz * GN(x) with GN(x) = w * xhat + b (before its rounding to the input dtype).
            d_scale = (weight.float() * sum_dz_xhat + bias.float() * sum_dz).to(scale.dtype)
        if ctx.needs_input_grad[4]:
            d_shift = sum_dz.to(shift.dtype)
        return dx, d_weight, d_bias, d_scale, d_shift, None


def groupnorm_silu(x, weight, bias, scale=None, shift=None, backward="triton"):
    """``SiLU(GroupNorm32(x) * (1 + scale) + shift)`` with Triton kernels, differentiable.

    x: [N, C, H, W] float32/float16/bfloat16, contiguous or channels_last (kept in the output);
    C a multiple of 32. weight, bias: [C] (read as float32). scale, shift: [N, C] or [N, C, 1, 1],
    both or neither. Statistics are float32. Output dtype: that of x, promoted with scale/shift's.
    backward: one of :data:`BACKWARDS`, who computes the gradient (the forward is always Triton's).
    """
    _check_inputs(x, weight, bias, scale, shift)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    n, c = x.shape[:2]
    if scale is not None:
        scale = scale.reshape(n, c).contiguous()
        shift = shift.reshape(n, c).contiguous()
    return GroupNormSiLUFunction.apply(x, weight.contiguous(), bias.contiguous(), scale, shift, backward)


def groupnorm_silu_reference(x, weight, bias, scale=None, shift=None):
    """The model's op sequence in torch (float64 inputs stay float64, for gradient checks)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(compute), NUM_GROUPS, weight.to(compute), bias.to(compute), EPS).to(x.dtype)
    if scale is not None:
        n, c = x.shape[:2]
        h = h * (1 + scale.reshape(n, c, 1, 1)) + shift.reshape(n, c, 1, 1)
    return F.silu(h)
