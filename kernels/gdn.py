"""GDN / IGDN (compressai, docs/reference_code.md §3.2.2) forward and input-gradient backward.

Per pixel, with s = beta + Gamma @ x² (Gamma [C, C] and beta [C] the *effective* parameters, i.e.
after compressai's NonNegativeParametrizer) and p = -1/2 for GDN, +1/2 for IGDN:

    y  = x * s^p
    dx = g * s^p + 2p * x * Gammaᵀ @ (g * x * s^(p-1))

(d y_i / d x_k = δ_ik s_i^p + 2p x_i s_i^(p-1) Gamma_ik x_k, summed against g_i.) So
IGDN: dx = g·sqrt(s) + x·Gammaᵀ(g·x/sqrt(s)); GDN: dx = g·rsqrt(s) - x·Gammaᵀ(g·x·s^(-3/2)).

Each kernel is a [C, C] x [C, pixels] matmul with a fused prologue (x²) and epilogue, so x is read
and y written once, where compressai runs four kernels (x², conv1x1 + beta, sqrt, multiply) over
C-channel float32 intermediates; a torch matmul + fused epilogue would still write and re-read the
[C, pixels] product.
Precision of the in-kernel product (``precision``): per pixel the mix costs 2C² FLOP against 8C
bytes of float32 in + out, i.e. C/4 FLOP/byte (32-48 for C = 128-192). That is above the ridge
point of plain fp32 FMA on an H100 (spec sheet: ~67 TFLOP/s over 3.35 TB/s = 20), so "ieee" would
make the kernel compute-bound, and below that of TF32 tensor cores. The default "tf32x3" (three
TF32 products, about float32 accuracy) keeps it on tensor cores and memory-bound; "tf32" matches
what cuDNN does for the reference's conv1x1 by default (torch.backends.cudnn.allow_tf32 = True);
"ieee" is exact float32. The benchmark times all three. (The interpreter always computes exactly.)
The backward needs two dependent channel mixes (u needs every channel of s at a pixel before
Gammaᵀ @ u can start), hence two kernels: ``_gdn_bwd_u_kernel`` recomputes s and writes u and the
first term, ``_gdn_bwd_dx_kernel`` adds x·Gammaᵀu.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import check_launchable, nchw_as_3d, next_pow2

__all__ = ["gdn", "gdn_backward", "gdn_backward_torch", "gdn_reference", "gdn_parameters", "GDNFunction", "BACKWARDS",
           "PRECISIONS"]

_BLOCK_P = 64
_BLOCK_CI = 32
PRECISIONS = ("tf32x3", "tf32", "ieee")


@triton.jit
def _channel_mix(mat_ptr, stride_mo, stride_mi, src_base, stride_sc, stride_sp, offs_co, offs_p, C, P,
                 SQUARE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr):
    """acc[co, p] = sum_ci M[co, ci] * f(src[ci, p]), f(v) = v² if SQUARE else v; float32 accumulation."""
    mask_co = offs_co < C
    mask_p = offs_p < P
    acc = tl.zeros([BLOCK_CO, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_CI):
        offs_ci = k0 + tl.arange(0, BLOCK_CI)
        mask_ci = offs_ci < C
        m = tl.load(mat_ptr + offs_co[:, None] * stride_mo + offs_ci[None, :] * stride_mi,
                    mask=mask_co[:, None] & mask_ci[None, :], other=0.0)
        v = tl.load(src_base + offs_ci[:, None].to(tl.int64) * stride_sc + offs_p[None, :].to(tl.int64) * stride_sp,
                    mask=mask_ci[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        if SQUARE:
            v = v * v
        acc += tl.dot(m, v, input_precision=PRECISION)
    return acc


@triton.jit
def _gdn_fwd_kernel(
    x_ptr, gamma_ptr, beta_ptr, y_ptr, C, P,
    stride_xn, stride_xc, stride_xp, stride_yn, stride_yc, stride_yp,
    INVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask = (offs_co < C)[:, None] & (offs_p < P)[None, :]
    x_base = x_ptr + n * stride_xn
    s = _channel_mix(gamma_ptr, C, 1, x_base, stride_xc, stride_xp, offs_co, offs_p, C, P,
                     True, PRECISION, BLOCK_CI, BLOCK_CO, BLOCK_P)
    s += tl.load(beta_ptr + offs_co, mask=offs_co < C, other=1.0)[:, None]
    co = offs_co[:, None].to(tl.int64)
    p = offs_p[None, :].to(tl.int64)
    x = tl.load(x_base + co * stride_xc + p * stride_xp, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        y = x * tl.sqrt(s)
    else:
        y = x * tl.rsqrt(s)
    tl.store(y_ptr + n * stride_yn + co * stride_yc + p * stride_yp, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gdn_bwd_u_kernel(
    x_ptr, dy_ptr, gamma_ptr, beta_ptr, t_ptr, u_ptr, C, P,
    stride_xn, stride_xc, stride_xp, stride_dn, stride_dc, stride_dp,
    INVERSE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """t = g·s^p (first term of dx) and u = 2p·g·x·s^(p-1), both float32 [N, C, P] contiguous."""
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask = (offs_co < C)[:, None] & (offs_p < P)[None, :]
    x_base = x_ptr + n * stride_xn
    s = _channel_mix(gamma_ptr, C, 1, x_base, stride_xc, stride_xp, offs_co, offs_p, C, P,
                     True, PRECISION, BLOCK_CI, BLOCK_CO, BLOCK_P)
    s += tl.load(beta_ptr + offs_co, mask=offs_co < C, other=1.0)[:, None]
    co = offs_co[:, None].to(tl.int64)
    p = offs_p[None, :].to(tl.int64)
    x = tl.load(x_base + co * stride_xc + p * stride_xp, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + n * stride_dn + co * stride_dc + p * stride_dp, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        root = tl.sqrt(s)
        t = g * root
        u = g * x / root
    else:
        rroot = tl.rsqrt(s)
        t = g * rroot
        u = -(g * x * rroot * rroot * rroot)
    out = n * C * P + co * P + p
    tl.store(t_ptr + out, t, mask=mask)
    tl.store(u_ptr + out, u, mask=mask)


@triton.jit
def _gdn_bwd_dx_kernel(
    x_ptr, gamma_ptr, t_ptr, u_ptr, dx_ptr, C, P,
    stride_xn, stride_xc, stride_xp, stride_gn, stride_gc, stride_gp,
    PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dx = t + x · (Gammaᵀ @ u)."""
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask = (offs_co < C)[:, None] & (offs_p < P)[None, :]
    # Gammaᵀ[co, ci] = Gamma[ci, co]: strides (1, C).
    mixed = _channel_mix(gamma_ptr, 1, C, u_ptr + n * C * P, P, 1, offs_co, offs_p, C, P,
                         False, PRECISION, BLOCK_CI, BLOCK_CO, BLOCK_P)
    co = offs_co[:, None].to(tl.int64)
    p = offs_p[None, :].to(tl.int64)
    x = tl.load(x_ptr + n * stride_xn + co * stride_xc + p * stride_xp, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + n * C * P + co * P + p, mask=mask, other=0.0)
    dx = t + x * mixed
    tl.store(dx_ptr + n * stride_gn + co * stride_gc + p * stride_gp, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(c: int, p: int, n: int):
    block_co = min(64, max(16, next_pow2(c)))
    return block_co, (triton.cdiv(p, _BLOCK_P), triton.cdiv(c, block_co), n)


def _check(x, gamma, beta, precision):
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if gamma.shape != (c, c) or beta.shape != (c,):
        raise ValueError(f"gamma must be [{c}, {c}] and beta [{c}], got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _as_params(gamma, beta):
    return gamma.to(torch.float32).contiguous(), beta.to(torch.float32).contiguous()


def _forward(x, gamma, beta, inverse: bool, precision: str):
    n, c, h, w = x.shape
    x3 = nchw_as_3d(x)
    y = torch.empty_like(x)
    y3 = nchw_as_3d(y)
    block_co, grid = _blocks(c, h * w, n)
    check_launchable(_gdn_fwd_kernel, x, gamma, beta)
    _gdn_fwd_kernel[grid](x3, gamma, beta, y3, c, h * w, *x3.stride(), *y3.stride(), INVERSE=inverse,
                          PRECISION=precision, BLOCK_CO=block_co, BLOCK_CI=_BLOCK_CI, BLOCK_P=_BLOCK_P)
    return y


def gdn_backward(x, dy, gamma, beta, inverse: bool, precision: str = "tf32x3"):
    """Input gradient of ``gdn(x, gamma, beta, inverse)`` for the output gradient dy (in x's dtype and layout)."""
    _check(x, gamma, beta, precision)
    if dy.shape != x.shape:
        raise ValueError(f"dy shape {tuple(dy.shape)} does not match x shape {tuple(x.shape)}")
    gamma, beta = _as_params(gamma, beta)
    n, c, h, w = x.shape
    x3 = nchw_as_3d(x)
    dy3 = nchw_as_3d(dy)
    t = torch.empty((n, c, h * w), device=x.device, dtype=torch.float32)
    u = torch.empty_like(t)
    dx = torch.empty_like(x)
    dx3 = nchw_as_3d(dx)
    block_co, grid = _blocks(c, h * w, n)
    check_launchable(_gdn_bwd_u_kernel, x, dy, gamma, beta)
    _gdn_bwd_u_kernel[grid](x3, dy3, gamma, beta, t, u, c, h * w, *x3.stride(), *dy3.stride(), INVERSE=inverse,
                            PRECISION=precision, BLOCK_CO=block_co, BLOCK_CI=_BLOCK_CI, BLOCK_P=_BLOCK_P)
    _gdn_bwd_dx_kernel[grid](x3, gamma, t, u, dx3, c, h * w, *x3.stride(), *dx3.stride(),
                             PRECISION=precision, BLOCK_CO=block_co, BLOCK_CI=_BLOCK_CI, BLOCK_P=_BLOCK_P)
    return dx


def gdn_backward_torch(x, dy, gamma, beta, inverse: bool):
    """:func:`gdn_backward`'s closed form (module docstring) in PyTorch ops, float32: two 1x1
    convolutions (Gamma, then Gammaᵀ) and elementwise terms. For a GPU where the hand-written
    backward loses to PyTorch's (benchmarks/RESULTS.md: IGDN fwd+bwd 0.21-0.58 vs 0.19-0.40 ms)."""
    c = x.shape[1]
    xf, g = x.float(), dy.float()
    s = F.conv2d(xf * xf, gamma.reshape(c, c, 1, 1), beta)
    root = torch.sqrt(s) if inverse else torch.rsqrt(s)  # s^p
    # u = g·x·s^(p-1): IGDN g·x/sqrt(s), GDN g·x·s^(-3/2)
    u = g * xf / root if inverse else g * xf * root * root * root
    mix = F.conv2d(u, gamma.t().reshape(c, c, 1, 1))  # Gammaᵀ u
    dx = g * root + xf * mix if inverse else g * root - xf * mix
    return dx.to(x.dtype)


BACKWARDS = ("triton", "torch")  # who computes the backward pass: this module's kernels or PyTorch's


class GDNFunction(torch.autograd.Function):
    """Autograd wiring: gradient for x only (Gamma and beta are frozen codec weights); by the
    Triton kernels or, ``backward="torch"``, by :func:`gdn_backward_torch`."""

    @staticmethod
    def forward(ctx, x, gamma, beta, inverse, precision, backward="triton"):
        ctx.save_for_backward(x, gamma, beta)
        ctx.inverse, ctx.precision, ctx.torch_backward = inverse, precision, backward == "torch"
        return _forward(x, gamma, beta, inverse, precision)

    @staticmethod
    def backward(ctx, dy):
        x, gamma, beta = ctx.saved_tensors
        if ctx.torch_backward:
            dx = gdn_backward_torch(x, dy, gamma, beta, ctx.inverse)
        else:
            dx = gdn_backward(x, dy, gamma, beta, ctx.inverse, ctx.precision)
        return dx, None, None, None, None, None


def gdn(x, gamma, beta, inverse: bool = False, precision: str = "tf32x3", backward: str = "triton"):
    """GDN (``x * rsqrt(beta + Gamma x²)``) or IGDN (``x * sqrt(...)``) with Triton kernels.

    x: [N, C, H, W] float32/float16/bfloat16, contiguous or channels_last (kept in the output);
    gamma [C, C] and beta [C]: the effective (reparametrised) parameters, see ``gdn_parameters``,
    read as float32; they must not require grad. precision: of the channel mix on GPU, one of
    PRECISIONS (module docstring). Differentiable w.r.t. x; backward: one of :data:`BACKWARDS`, who
    computes that gradient (the forward is always Triton's).
    """
    _check(x, gamma, beta, precision)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if torch.is_grad_enabled() and (gamma.requires_grad or beta.requires_grad):
        raise ValueError("gdn: gamma and beta are frozen here (no gradient); pass detached tensors")
    gamma, beta = _as_params(gamma, beta)
    return GDNFunction.apply(x, gamma, beta, bool(inverse), precision, backward)


def gdn_reference(x, gamma, beta, inverse: bool = False):
    """compressai's GDN.forward on effective parameters (any float dtype, float64 included)."""
    c = x.shape[1]
    norm = F.conv2d(x * x, gamma.to(x.dtype).reshape(c, c, 1, 1), beta.to(x.dtype))
    return x * (torch.sqrt(norm) if inverse else torch.rsqrt(norm))


def gdn_parameters(module):
    """(gamma [C, C], beta [C], inverse) of a compressai ``GDN`` module, reparametrised, float32, detached."""
    from compressai.layers import GDN

    if type(module) is not GDN:  # GDN1 (|x| instead of x²) and other subclasses compute something else
        raise TypeError(f"expected compressai.layers.GDN, got {type(module).__name__}")
    with torch.no_grad():
        gamma = module.gamma_reparam(module.gamma).float().contiguous()
        beta = module.beta_reparam(module.beta).float().contiguous()
    return gamma, beta, module.inverse
