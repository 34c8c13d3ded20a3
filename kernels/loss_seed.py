"""Seed of the DPS backward: dist_b = ||target_b - A_b||₂ and d dist_b / d A_b = -(target_b - A_b) / dist_b.

docs/reference_code.md §2.8: the guidance differentiates the plain (not squared) L2 norm of
r = y - A(x0). The reference takes one norm over the whole batch; idemrt takes one per sample so
that batched images stay independent (pass ``per_sample=False`` for the whole-tensor norm).
At dist_b = 0 the seed is defined as 0 (no NaN), which is also what torch's norm backward gives.

Two stages, deterministic (no atomics): ``_sq_partial_kernel`` writes per-chunk sums of r² (float32
tree sums within a block, float32 accumulation across blocks); ``_seed_kernel`` adds a sample's
partials in a fixed order, writes dist_b and recomputes r to write the seed.
"""
import torch
import triton
import triton.language as tl

from ._launch import TARGET_PROGRAMS, check_launchable, next_pow2, per_sample_rows

__all__ = ["residual_norm", "residual_norm_and_seed", "residual_norm_reference", "ResidualNormFunction"]

_BLOCK = 1024


@triton.jit
def _sq_partial_kernel(t_ptr, a_ptr, part_ptr, M, CHUNK, SPLIT, stride_t, stride_a, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, M)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(start, end, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < end
        t = tl.load(t_ptr + b.to(tl.int64) * stride_t + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + b.to(tl.int64) * stride_a + offs, mask=m, other=0.0).to(tl.float32)
        r = t - a
        acc += r * r
    tl.store(part_ptr + b * SPLIT + pid_s, tl.sum(acc, axis=0))


@triton.jit
def _seed_kernel(t_ptr, a_ptr, part_ptr, dist_ptr, seed_ptr, M, CHUNK, SPLIT, stride_t, stride_a,
                 SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_s = tl.arange(0, SPLIT_P2)
    dist = tl.sqrt(tl.sum(tl.load(part_ptr + b * SPLIT + offs_s, mask=offs_s < SPLIT, other=0.0), axis=0))
    if pid_s == 0:
        tl.store(dist_ptr + b, dist)
    # d||r||/dA = -r/||r||; 0 at r = 0.
    neg_inv = tl.where(dist > 0.0, -1.0 / tl.where(dist > 0.0, dist, 1.0), 0.0)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, M)
    for k in range(start, end, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < end
        t = tl.load(t_ptr + b.to(tl.int64) * stride_t + offs, mask=m, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + b.to(tl.int64) * stride_a + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(seed_ptr + b.to(tl.int64) * M + offs, (t - a) * neg_inv, mask=m)


def residual_norm_and_seed(target, a, per_sample: bool = True):
    """(dist [B] float32, seed float32 shaped like ``a``) with seed = d dist_b / d a (no autograd).

    target, a: [B, ...] of one shape, float32/bfloat16/float16, each sample contiguous (any batch
    stride). per_sample=False: one norm over the whole tensor (the reference), dist has shape [1].
    """
    if target.shape != a.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match {tuple(a.shape)}")
    shape = a.shape
    if not per_sample:
        target, a = target.reshape(1, -1), a.reshape(1, -1)
    t2, a2 = per_sample_rows(target), per_sample_rows(a)
    batch, m = t2.shape
    split = max(1, min(triton.cdiv(m, _BLOCK), TARGET_PROGRAMS // batch))
    chunk = triton.cdiv(triton.cdiv(m, split), _BLOCK) * _BLOCK
    split = triton.cdiv(m, chunk)
    part = torch.empty((batch, split), device=a.device, dtype=torch.float32)
    dist = torch.empty(batch, device=a.device, dtype=torch.float32)
    seed = torch.empty(shape, device=a.device, dtype=torch.float32)
    check_launchable(_sq_partial_kernel, target, a)
    grid = (batch, split)
    _sq_partial_kernel[grid](t2, a2, part, m, chunk, split, t2.stride(0), a2.stride(0), BLOCK=_BLOCK)
    _seed_kernel[grid](t2, a2, part, dist, seed, m, chunk, split, t2.stride(0), a2.stride(0),
                       SPLIT_P2=next_pow2(split), BLOCK=_BLOCK)
    return dist, seed


class ResidualNormFunction(torch.autograd.Function):
    """dist = ||target - a|| per sample, with gradients for a (and target) from the fused seed."""

    @staticmethod
    def forward(ctx, target, a, per_sample):
        dist, seed = residual_norm_and_seed(target, a, per_sample)
        ctx.save_for_backward(seed)
        ctx.dtypes = (target.dtype, a.dtype)
        return dist

    @staticmethod
    def backward(ctx, g_dist):
        (seed,) = ctx.saved_tensors
        scale = g_dist.reshape(-1, *([1] * (seed.dim() - 1))) if g_dist.numel() > 1 else g_dist.reshape(())
        d_a = seed * scale
        d_target = -d_a if ctx.needs_input_grad[0] else None
        return (None if d_target is None else d_target.to(ctx.dtypes[0])), d_a.to(ctx.dtypes[1]), None


def residual_norm(target, a, per_sample: bool = True):
    """Differentiable ``||target - a||₂`` per sample ([B]) or over the whole tensor ([1])."""
    return ResidualNormFunction.apply(target, a, per_sample)


def residual_norm_reference(target, a, per_sample: bool = True):
    """torch reference in the inputs' dtype (float64 for gradient checks)."""
    r = target - a
    return torch.linalg.vector_norm(r.reshape(r.shape[0], -1) if per_sample else r.reshape(1, -1), dim=1)
