"""Fused DDPM + DPS ('ps') sampler step (DIFFUSION_AND_DPS.md §4, §5, §8), one pass over the image.

    x0     = clamp(sqrt_recip_abar·x - sqrt_recipm1_abar·eps, -1, 1)
    mean   = c1·x0 + c2·x
    frac   = (v + 1) / 2
    logvar = frac·log_beta + (1 - frac)·plv
    sample = mean + nonzero·exp(0.5·logvar)·noise
    x_prev = sample - zeta·grad

The per-step scalars are rows of a float32 device table (``coefficient_table``) and the step index
is read from a device tensor inside the kernels: nothing is synchronised with or uploaded from the
host per step, so a whole step can be captured in a CUDA graph and replayed with a new step value.

``predict_x0`` is the differentiable x0 (the operator A and the loss are evaluated on it); its
backward is the clamp-masked x0 formula: dx = sqrt_recip_abar·mask·g, deps = -sqrt_recipm1_abar·mask·g,
with mask = x0 strictly inside (-1, 1) (the reference clamp's gradient; exactly at ±1 it is
measure-zero and torch-version dependent, DIFFUSION_AND_DPS.md §4).

Tensors are read per sample row ([B, ...] with each sample contiguous and any batch stride), so the
eps and v halves of a [B, 6, H, W] model output are used without copies. eps and v may be
float32/bfloat16/float16; all arithmetic is float32, as in the reference.
"""
import torch
import triton
import triton.language as tl

from ._launch import check_launchable, per_sample_rows

__all__ = [
    "COEFFICIENTS",
    "coefficient_table",
    "predict_x0",
    "x0_and_mask",
    "sampler_update",
    "X0Function",
    "predict_x0_reference",
    "sampler_update_reference",
]

# Column order of the coefficient table.
COEFFICIENTS = ("sqrt_recip_abar", "sqrt_recipm1_abar", "c1", "c2", "log_beta", "plv", "nonzero", "zeta")
_NCOEF = len(COEFFICIENTS)
_BLOCK = 1024


def coefficient_table(sqrt_recip_abar, sqrt_recipm1_abar, c1, c2, log_beta, plv, zeta, device=None):
    """[T, 8] float32 table, row i = the scalars of respaced step i (float64 arrays are rounded to
    float32 once, as the reference does at each use). ``zeta`` is a scalar or a length-T sequence;
    the ``nonzero`` column is (i > 0)."""
    cols = [torch.as_tensor(a, dtype=torch.float64).reshape(-1)
            for a in (sqrt_recip_abar, sqrt_recipm1_abar, c1, c2, log_beta, plv)]
    steps = cols[0].numel()
    if any(c.numel() != steps for c in cols):
        raise ValueError(f"coefficient arrays must all have length {steps}, got {[c.numel() for c in cols]}")
    nonzero = (torch.arange(steps) > 0).to(torch.float64)
    zeta = torch.as_tensor(zeta, dtype=torch.float64).expand(steps)
    return torch.stack([*cols, nonzero, zeta], dim=1).to(device=device, dtype=torch.float32).contiguous()


@triton.jit
def _clamped_x0(x, eps, row):
    raw = tl.load(row) * x - tl.load(row + 1) * eps
    # where() rather than minimum/maximum: a NaN must stay NaN, as with torch.clamp.
    x0 = tl.where(raw < -1.0, -1.0, tl.where(raw > 1.0, 1.0, raw))
    return x0, (raw > -1.0) & (raw < 1.0)


@triton.jit
def _x0_kernel(x_ptr, eps_ptr, table_ptr, step_ptr, x0_ptr, mask_ptr, M, stride_x, stride_e,
               NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = table_ptr + tl.load(step_ptr).to(tl.int64) * NCOEF
    x = tl.load(x_ptr + b * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * stride_e + offs, mask=m, other=0.0).to(tl.float32)
    x0, inside = _clamped_x0(x, eps, row)
    tl.store(x0_ptr + b * M + offs, x0, mask=m)
    tl.store(mask_ptr + b * M + offs, inside.to(tl.uint8), mask=m)


@triton.jit
def _x0_bwd_kernel(g_ptr, mask_ptr, table_ptr, step_ptr, dx_ptr, deps_ptr, M, stride_g,
                   NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = table_ptr + tl.load(step_ptr).to(tl.int64) * NCOEF
    g = tl.load(g_ptr + b * stride_g + offs, mask=m, other=0.0).to(tl.float32)
    inside = tl.load(mask_ptr + b * M + offs, mask=m, other=0) != 0
    g = tl.where(inside, g, 0.0)
    tl.store(dx_ptr + b * M + offs, (tl.load(row) * g).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(deps_ptr + b * M + offs, (-tl.load(row + 1) * g).to(deps_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sampler_update_kernel(
    x_ptr, eps_ptr, v_ptr, grad_ptr, noise_ptr, table_ptr, step_ptr, out_ptr, M,
    stride_x, stride_e, stride_v, stride_g, stride_n, stride_o,
    NCOEF: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = table_ptr + tl.load(step_ptr).to(tl.int64) * NCOEF
    x = tl.load(x_ptr + b * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * stride_e + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * stride_v + offs, mask=m, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + b * stride_g + offs, mask=m, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + b * stride_n + offs, mask=m, other=0.0).to(tl.float32)
    x0, _ = _clamped_x0(x, eps, row)
    mean = tl.load(row + 2) * x0 + tl.load(row + 3) * x
    frac = (v + 1.0) / 2.0
    log_var = frac * tl.load(row + 4) + (1.0 - frac) * tl.load(row + 5)
    sample = mean + tl.load(row + 6) * tl.exp(0.5 * log_var) * noise
    tl.store(out_ptr + b * stride_o + offs, sample - grad * tl.load(row + 7), mask=m)


def _step_tensor(step, device):
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.dtype == torch.bool:
            raise ValueError(f"step must be a one-element integer tensor, got {step.dtype} {tuple(step.shape)}")
        return step
    # A Python int costs a host-to-device copy per call: pass a device tensor in graph-captured loops.
    return torch.tensor([int(step)], device=device, dtype=torch.int64)


def _check_table(table):
    if table.dim() != 2 or table.shape[1] != _NCOEF or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [T, {_NCOEF}] (see coefficient_table), "
                         f"got {table.dtype} {tuple(table.shape)}")
    return table.contiguous()


def _check_same_shape(ref, **tensors):
    for name, t in tensors.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")


def x0_and_mask(x, eps, table, step):
    """x0 (float32, contiguous) and the bool mask of x0 strictly inside (-1, 1); no autograd."""
    _check_same_shape(x, eps=eps)
    table = _check_table(table)
    step = _step_tensor(step, x.device)
    x2, e2 = per_sample_rows(x), per_sample_rows(eps)
    batch, m = x2.shape
    x0 = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    mask = torch.empty(x.shape, device=x.device, dtype=torch.uint8)
    check_launchable(_x0_kernel, x, eps, table, step)
    _x0_kernel[(triton.cdiv(m, _BLOCK), batch)](x2, e2, table, step, x0, mask, m, x2.stride(0), e2.stride(0),
                                                NCOEF=_NCOEF, BLOCK=_BLOCK)
    return x0, mask.view(torch.bool)


class X0Function(torch.autograd.Function):
    """x0 = clamp(sqrt_recip_abar·x - sqrt_recipm1_abar·eps, -1, 1) with gradients for x and eps."""

    @staticmethod
    def forward(ctx, x, eps, table, step):
        table, step = _check_table(table), _step_tensor(step, x.device)
        x0, mask = x0_and_mask(x, eps, table, step)
        ctx.save_for_backward(mask, table, step)
        ctx.dtypes = (x.dtype, eps.dtype)
        ctx.mark_non_differentiable(mask)
        return x0, mask

    @staticmethod
    def backward(ctx, g, _):
        mask, table, step = ctx.saved_tensors
        g2 = per_sample_rows(g)
        batch, m = g2.shape
        dx = torch.empty(g.shape, device=g.device, dtype=ctx.dtypes[0])
        deps = torch.empty(g.shape, device=g.device, dtype=ctx.dtypes[1])
        _x0_bwd_kernel[(triton.cdiv(m, _BLOCK), batch)](g2, mask.view(torch.uint8), table, step, dx, deps, m,
                                                        g2.stride(0), NCOEF=_NCOEF, BLOCK=_BLOCK)
        return dx, deps, None, None


def predict_x0(x, eps, table, step):
    """Differentiable clamped x0 and its mask (see module docstring). Returns (x0 float32, mask bool)."""
    return X0Function.apply(x, eps, table, step)


def sampler_update(x, eps, v, grad, noise, table, step, out=None):
    """x_{t-1} (float32) of one DDPM step with the DPS correction ``- zeta·grad``; no autograd.

    x, eps, v, grad, noise: [B, ...] of one shape. table/step: see ``coefficient_table``; step is a
    one-element integer device tensor (or an int, at the cost of an upload). ``out``: optional float32
    [B, ...] contiguous destination; it may be ``x`` itself (each element is read before it is written).
    """
    _check_same_shape(x, eps=eps, v=v, grad=grad, noise=noise)
    table = _check_table(table)
    step = _step_tensor(step, x.device)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out[0].is_contiguous():
        raise ValueError(f"out must be float32 {tuple(x.shape)} with contiguous samples, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    rows = [per_sample_rows(t) for t in (x, eps, v, grad, noise)]
    o2 = per_sample_rows(out)
    batch, m = rows[0].shape
    check_launchable(_sampler_update_kernel, x, eps, v, grad, noise, table, step, out)
    _sampler_update_kernel[(triton.cdiv(m, _BLOCK), batch)](
        *rows, table, step, o2, m, *(r.stride(0) for r in rows), o2.stride(0), NCOEF=_NCOEF, BLOCK=_BLOCK)
    return out


def _row(table, step, dtype):
    row = table[int(step)].to(dtype)
    return dict(zip(COEFFICIENTS, row))


def predict_x0_reference(x, eps, table, step):
    """The reference's x0 (clamped), in x's dtype (float64 for gradient checks)."""
    c = _row(table, step, x.dtype)
    return torch.clamp(c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps, -1, 1)


def sampler_update_reference(x, eps, v, grad, noise, table, step):
    """The reference's op sequence (p_mean_variance, p_sample, 'ps' guidance) in x's dtype."""
    c = _row(table, step, x.dtype)
    x0 = predict_x0_reference(x, eps, table, step)
    mean = c["c1"] * x0 + c["c2"] * x
    frac = (v + 1) / 2
    log_var = frac * c["log_beta"] + (1 - frac) * c["plv"]
    sample = mean + c["nonzero"] * torch.exp(0.5 * log_var) * noise
    return sample - grad * c["zeta"]
