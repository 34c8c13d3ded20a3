"""Fused DDPM + DPS ('ps') sampler step (docs/reference_code.md §2.4, §2.5, §2.8), one pass over the image.

    x0     = clamp(sqrt_recip_abar·x - sqrt_recipm1_abar·eps, -1, 1)
    mean   = c1·x0 + c2·x
    frac   = (v + 1) / 2
    logvar = frac·log_beta + (1 - frac)·plv
    sample = mean + nonzero·exp(0.5·logvar)·noise
    x_prev = sample - scale·grad

The per-step scalars are the rows of the sampler's own float32 table,
``DDPMSampler(schedule).coefficients()`` (columns ``COEFFICIENTS == DDPMSampler.columns``): the
kernels and ``idemrt.diffusion`` read one table, so they cannot drift apart. The step index and
the DPS scale are per sample and read from device tensors inside the kernels (sample b uses
``step[b]`` and ``scale[b]``, or the single element for all samples): nothing is synchronised with
or uploaded from the host per step, so a whole step can be captured in a CUDA graph and replayed
with new step values, and a retry at a larger scale replays the same graph.

``predict_x0`` is the differentiable x0 (the operator A and the loss are evaluated on it); its
backward is the clamp-masked x0 formula: dx = sqrt_recip_abar·mask·g, deps = -sqrt_recipm1_abar·mask·g,
with mask = x0 strictly inside (-1, 1) (the reference clamp's gradient; exactly at ±1 it is
measure-zero and torch-version dependent, docs/reference_code.md §2.4).

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
    "predict_x0",
    "x0_and_mask",
    "sampler_update",
    "X0Function",
    "predict_x0_reference",
    "sampler_update_reference",
]

# Column order of the table the kernels index: the DDPM sampler's (a test keeps the two equal; the
# kernels import nothing from idemrt.diffusion, so they stay leaves). A backend checks
# ``sampler.columns == COEFFICIENTS`` before handing ``sampler.coefficients()`` to the kernels.
COEFFICIENTS = ("sqrt_recip_abar", "sqrt_recipm1_abar", "c1", "c2", "log_beta", "plv", "nonzero")
_NCOEF = len(COEFFICIENTS)
_BLOCK = 1024


@triton.jit
def _step_row(table_ptr, step_ptr, step_stride, b, NCOEF: tl.constexpr):
    # Sample b's row of the table; step_stride is 0 when one step index serves the whole batch.
    return table_ptr + tl.load(step_ptr + b * step_stride).to(tl.int64) * NCOEF


@triton.jit
def _clamped_x0(x, eps, row):
    raw = tl.load(row) * x - tl.load(row + 1) * eps
    # where() rather than minimum/maximum: a NaN must stay NaN, as with torch.clamp.
    x0 = tl.where(raw < -1.0, -1.0, tl.where(raw > 1.0, 1.0, raw))
    return x0, (raw > -1.0) & (raw < 1.0)


@triton.jit
def _x0_kernel(x_ptr, eps_ptr, table_ptr, step_ptr, x0_ptr, mask_ptr, M, stride_x, stride_e, step_stride,
               NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = _step_row(table_ptr, step_ptr, step_stride, b, NCOEF)
    x = tl.load(x_ptr + b * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * stride_e + offs, mask=m, other=0.0).to(tl.float32)
    x0, inside = _clamped_x0(x, eps, row)
    tl.store(x0_ptr + b * M + offs, x0, mask=m)
    tl.store(mask_ptr + b * M + offs, inside.to(tl.uint8), mask=m)


@triton.jit
def _x0_bwd_kernel(g_ptr, mask_ptr, table_ptr, step_ptr, dx_ptr, deps_ptr, M, stride_g, step_stride,
                   NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = _step_row(table_ptr, step_ptr, step_stride, b, NCOEF)
    g = tl.load(g_ptr + b * stride_g + offs, mask=m, other=0.0).to(tl.float32)
    inside = tl.load(mask_ptr + b * M + offs, mask=m, other=0) != 0
    g = tl.where(inside, g, 0.0)
    tl.store(dx_ptr + b * M + offs, (tl.load(row) * g).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(deps_ptr + b * M + offs, (-tl.load(row + 1) * g).to(deps_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sampler_update_kernel(
    x_ptr, eps_ptr, v_ptr, grad_ptr, noise_ptr, table_ptr, step_ptr, scale_ptr, out_ptr, M,
    stride_x, stride_e, stride_v, stride_g, stride_n, stride_o, step_stride, scale_stride,
    NCOEF: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < M
    row = _step_row(table_ptr, step_ptr, step_stride, b, NCOEF)
    scale = tl.load(scale_ptr + b * scale_stride).to(tl.float32)
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
    tl.store(out_ptr + b * stride_o + offs, sample - grad * scale, mask=m)


def _per_sample_arg(name, value, batch, device, floating):
    """``value`` as (device tensor, element stride): one element for every sample (stride 0) or one
    per sample (a (B,) tensor). Tensor values are not inspected: that would sync with the device."""
    kind = "float" if floating else "integer"
    if isinstance(value, torch.Tensor):
        ok_dtype = value.dtype.is_floating_point if floating else (
            not value.dtype.is_floating_point and not value.dtype.is_complex and value.dtype != torch.bool)
        if not ok_dtype or value.dim() > 1:
            raise ValueError(f"{name} must be a one-element or ({batch},) {kind} tensor, "
                             f"got {value.dtype} {tuple(value.shape)}")
        if value.numel() == 1:
            return value, 0
        if value.shape != (batch,):
            raise ValueError(f"{name} has {value.numel()} elements for a batch of {batch}")
        return value, value.stride(0)
    # A Python number costs a host-to-device copy per call: pass device tensors in graph-captured loops.
    if floating:
        return torch.tensor([float(value)], device=device, dtype=torch.float32), 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or an integer tensor, got {value!r}")
    return torch.tensor([value], device=device, dtype=torch.int64), 0


def _step_arg(step, table, batch, device):
    if not isinstance(step, torch.Tensor) and isinstance(step, int) and not 0 <= step < table.shape[0]:
        raise ValueError(f"step {step} is outside the table's {table.shape[0]} rows")
    return _per_sample_arg("step", step, batch, device, floating=False)


def _check_table(table):
    if table.dim() != 2 or table.shape[1] != _NCOEF or table.dtype != torch.float32:
        raise ValueError(f"table must be float32 [T, {_NCOEF}] (DDPMSampler(...).coefficients()), "
                         f"got {table.dtype} {tuple(table.shape)}")
    return table.contiguous()


def _check_same_shape(ref, **tensors):
    for name, t in tensors.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")


def _x0_and_mask(x, eps, table, step, step_stride):
    x2, e2 = per_sample_rows(x), per_sample_rows(eps)
    batch, m = x2.shape
    x0 = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    mask = torch.empty(x.shape, device=x.device, dtype=torch.uint8)
    check_launchable(_x0_kernel, x, eps, table, step)
    _x0_kernel[(triton.cdiv(m, _BLOCK), batch)](x2, e2, table, step, x0, mask, m, x2.stride(0), e2.stride(0),
                                                step_stride, NCOEF=_NCOEF, BLOCK=_BLOCK)
    return x0, mask.view(torch.bool)


def x0_and_mask(x, eps, table, step):
    """x0 (float32, contiguous) and the bool mask of x0 strictly inside (-1, 1); no autograd.

    ``step``: an int, a one-element integer tensor (every sample) or a (B,) integer tensor."""
    _check_same_shape(x, eps=eps)
    table = _check_table(table)
    step, step_stride = _step_arg(step, table, x.shape[0], x.device)
    return _x0_and_mask(x, eps, table, step, step_stride)


class X0Function(torch.autograd.Function):
    """x0 = clamp(sqrt_recip_abar·x - sqrt_recipm1_abar·eps, -1, 1) with gradients for x and eps."""

    @staticmethod
    def forward(ctx, x, eps, table, step):
        _check_same_shape(x, eps=eps)
        table = _check_table(table)
        step, step_stride = _step_arg(step, table, x.shape[0], x.device)
        x0, mask = _x0_and_mask(x, eps, table, step, step_stride)
        ctx.save_for_backward(mask, table, step)
        ctx.step_stride = step_stride
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
                                                        g2.stride(0), ctx.step_stride, NCOEF=_NCOEF, BLOCK=_BLOCK)
        return dx, deps, None, None


def predict_x0(x, eps, table, step):
    """Differentiable clamped x0 and its mask (see module docstring). Returns (x0 float32, mask bool)."""
    return X0Function.apply(x, eps, table, step)


def sampler_update(x, eps, v, grad, noise, table, step, scale, out=None):
    """x_{t-1} (float32) of one DDPM step with the DPS correction ``- scale·grad``; no autograd.

    x, eps, v, grad, noise: [B, ...] of one shape. table: ``DDPMSampler(...).coefficients()`` on x's
    device. step: an int, a one-element integer tensor (every sample) or a (B,) integer device tensor
    (sample b at step[b]). scale: the DPS step length, a float, a one-element float tensor or a (B,)
    float32 device tensor. Python numbers cost an upload per call; device tensors make the call
    graph-capturable. ``out``: optional float32 [B, ...] destination with contiguous samples; it
    may be ``x`` itself (each element is read before it is written).
    """
    _check_same_shape(x, eps=eps, v=v, grad=grad, noise=noise)
    table = _check_table(table)
    batch = x.shape[0]
    step, step_stride = _step_arg(step, table, batch, x.device)
    scale, scale_stride = _per_sample_arg("scale", scale, batch, x.device, floating=True)
    if out is None:
        out = torch.empty(x.shape, device=x.device, dtype=torch.float32)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out[0].is_contiguous():
        raise ValueError(f"out must be float32 {tuple(x.shape)} with contiguous samples, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()}")
    rows = [per_sample_rows(t) for t in (x, eps, v, grad, noise)]
    o2 = per_sample_rows(out)
    m = rows[0].shape[1]
    check_launchable(_sampler_update_kernel, x, eps, v, grad, noise, table, step, scale, out)
    _sampler_update_kernel[(triton.cdiv(m, _BLOCK), batch)](
        *rows, table, step, scale, o2, m, *(r.stride(0) for r in rows), o2.stride(0), step_stride, scale_stride,
        NCOEF=_NCOEF, BLOCK=_BLOCK)
    return out


# --- torch references: the reference's op sequence in x's dtype (float64 for checks) -------------

def per_sample(v, like):
    """An (N,) tensor shaped to broadcast over ``like`` (N, ...); a 0-dim one stays as is."""
    return v if v.ndim == 0 else v.view(-1, *([1] * (like.ndim - 1)))


def _columns(table, step, like):
    """The table columns of each sample's step, cast to like's dtype and shaped to broadcast over it."""
    if isinstance(step, torch.Tensor):
        rows = table.index_select(0, step.reshape(-1).to(table.device))  # (1 or B, K): gathered on the device
    else:
        rows = table[int(step)]
    rows = rows.to(like.dtype)
    return dict(zip(COEFFICIENTS, (per_sample(c, like) for c in rows.unbind(-1))))


def predict_x0_reference(x, eps, table, step):
    """The reference's x0 (clamped), in x's dtype (float64 for gradient checks)."""
    c = _columns(table, step, x)
    return torch.clamp(c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps, -1, 1)


def sampler_update_reference(x, eps, v, grad, noise, table, step, scale):
    """The reference's op sequence (p_mean_variance, p_sample, 'ps' guidance) in x's dtype."""
    c = _columns(table, step, x)
    scale = per_sample(torch.as_tensor(scale, device=x.device).to(x.dtype).reshape(-1), x)
    x0 = predict_x0_reference(x, eps, table, step)
    mean = c["c1"] * x0 + c["c2"] * x
    frac = (v + 1) / 2
    log_var = frac * c["log_beta"] + (1 - frac) * c["plv"]
    sample = mean + c["nonzero"] * torch.exp(0.5 * log_var) * noise
    return sample - grad * scale
