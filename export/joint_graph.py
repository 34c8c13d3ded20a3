"""Trace a guided step, forward *and* backward, into one inference-only FX graph.

ONNX has no autograd (TensorRT neither), so the input gradient of a guided step
has to be written out as ordinary forward operators. ``make_fx`` runs the Python
function once on symbolic (fake) tensors *below* autograd: the ops that
``torch.autograd.grad`` dispatches for the backward are recorded like any others.
What is left to do:

* decompose the backward ops into forward ops the exporter and TensorRT know —
  ``convolution_backward`` (input gradient only) becomes the transposed
  convolution (a plain one for a transposed convolution), the average-pool
  gradient an Expand, the slice gradient a Pad (not a scatter); the others go
  through PyTorch's core-ATen decompositions. Splits become Slices (ONNX's
  SplitToSequence, which a partly used Split turns into, is not in TensorRT);
* keep attention as MatMul + Softmax and nearest upsampling as Expand + Reshape
  (their backward is then a MatMul / a ReduceSum instead of a fused kernel or a
  scatter), by rewriting those two calls at the ``torch.nn.functional`` level;
* freeze the weights: they become graph constants, and no weight gradient is
  ever traced.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.overrides import TorchFunctionMode

from idemrt.diffusion.step import proximal_x0, step_gradient

__all__ = ["ExportableOps", "frozen", "proximal_fn", "step_gradient_fn", "trace"]

aten = torch.ops.aten


def _conv_input_grad(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                     output_padding, groups, output_mask):
    """``aten.convolution_backward`` for the input gradient, as one forward convolution.

    The gradient of a convolution w.r.t. its input is the transposed convolution with
    the same weight (and vice versa); ``output_padding`` restores the input rows that
    a strided convolution drops.
    """
    if output_mask[1] or output_mask[2]:
        raise RuntimeError("a weight or bias gradient was requested: the traced modules must be frozen")
    spatial = range(weight.dim() - 2)
    if transposed:
        grad_in = aten.convolution(grad_out, weight, None, stride, padding, dilation, False,
                                   [0] * len(spatial), groups)
    else:
        extra = [
            int(inp.shape[2 + d] - ((grad_out.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                                    + dilation[d] * (weight.shape[2 + d] - 1) + 1))
            for d in spatial
        ]
        grad_in = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)
    return grad_in if output_mask[0] else None, None, None


def _slice_backward(grad, input_sizes, dim, start, end, step):
    """Zero-padding instead of a scatter into zeros (ScatterND in ONNX)."""
    if step != 1:
        return core_aten_decompositions()[aten.slice_backward.default](grad, input_sizes, dim, start, end, step)
    size = input_sizes[dim]
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    pad = [0, 0] * (grad.dim() - 1 - dim) + [start, size - end]
    return aten.constant_pad_nd(grad, pad, 0.0)


def _expand_nearest(x: Tensor, fh: int, fw: int) -> Tensor:
    """Nearest upsampling by integer factors as Expand + Reshape."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, fh, w, fw).reshape(n, c, h * fh, w * fw)


def _avg_pool2d_backward(grad, inp, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    """Non-overlapping average pooling: the gradient spreads each cell evenly over its window."""
    kh, kw = (kernel_size * 2)[:2] if len(kernel_size) == 1 else kernel_size
    sh, sw = ((stride * 2)[:2] if len(stride) == 1 else stride) if stride else (kh, kw)
    if ((kh, kw) != (sh, sw) or any(padding) or divisor_override
            or inp.shape[-2] != grad.shape[-2] * kh or inp.shape[-1] != grad.shape[-1] * kw):
        return NotImplemented
    return _expand_nearest(grad, kh, kw) / (kh * kw)


def _split_with_sizes(x, split_sizes, dim=0):
    """Slices: a Split whose outputs are not all used becomes SplitToSequence in ONNX, which
    TensorRT's parser lacks."""
    out, start = [], 0
    for size in split_sizes:
        out.append(aten.slice.Tensor(x, dim, start, start + size))
        start += size
    return out


def _split(x, split_size, dim=0):
    size = x.shape[dim]
    if not isinstance(size, int):
        return NotImplemented
    return _split_with_sizes(x, [min(split_size, size - s) for s in range(0, size, split_size)], dim)


def _decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten.slice_backward.default] = _slice_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten.split_with_sizes.default] = _split_with_sizes
    table[aten.split.Tensor] = _split
    return table


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("only plain (unmasked, non-causal) attention is exportable")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    # MatMul -> Mul -> Softmax -> MatMul: the pattern TensorRT fuses into its MHA kernels.
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def _nearest(x, size=None, scale_factor=None, mode="nearest", align_corners=None,
             recompute_scale_factor=None, antialias=False):
    factors = scale_factor if isinstance(scale_factor, (tuple, list)) else [scale_factor] * (x.dim() - 2)
    if size is not None or x.dim() != 4 or any(f is None or f != int(f) or f < 1 for f in factors):
        return NotImplemented
    return _expand_nearest(x, *(int(f) for f in factors))


class ExportableOps(TorchFunctionMode):
    """Rewrite the two functional calls whose traced backward would not be plain ONNX.

    ``F.scaled_dot_product_attention`` -> explicit MatMul/Softmax; ``F.interpolate``
    (nearest, integer factors) -> Expand + Reshape. Everything else passes through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest") == "nearest":
            out = _nearest(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def frozen(modules: Iterable[nn.Module]):
    """Parameters without ``requires_grad`` for the duration (restored after)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def trace(fn: Callable[..., Sequence[Tensor]], example_inputs: Sequence[Tensor],
          modules: Iterable[nn.Module] = (), dynamic_axes: Sequence[Iterable[int]] = ()) -> torch.fx.GraphModule:
    """``fn`` traced to an ATen graph of forward ops.

    ``dynamic_axes[k]`` lists the symbolic axes of input k (all others are fixed to the
    example's sizes: fewer symbols make tracing several times faster). ``modules`` are the
    modules ``fn`` closes over: their parameters are frozen while tracing and end up as
    graph constants. The example inputs are not modified.
    """
    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    axes = list(dynamic_axes) + [()] * (len(example_inputs) - len(dynamic_axes))
    fakes = []
    for x, dyn in zip(example_inputs, axes):
        dyn = set(dyn)
        sizes = [DimDynamic.DYNAMIC if d in dyn else DimDynamic.STATIC for d in range(x.dim())]
        fakes.append(fake_mode.from_tensor(x, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    with frozen(list(modules)), ExportableOps():
        # make_fx finds the inputs' fake mode and keeps their (partly) symbolic shapes.
        return make_fx(fn, decomposition_table=_decompositions(), tracing_mode="symbolic",
                       _allow_non_fake_inputs=True)(*fakes)


def step_gradient_fn(unet: nn.Module, operator: Callable[[Tensor], Tensor], sampler):
    """The guided step's differentiable part as a function of plain tensors, for tracing:
    :func:`idemrt.diffusion.step.step_gradient` itself.

    ``(x_t (N,3,H,W), t (N,) original timesteps as float, target, rows (N, K) the sampler's
    table rows of each sample's step) -> (model_out, dist (N,), grad (N,3,H,W))``.
    """

    def step_gradient_graph(x_t: Tensor, t: Tensor, target: Tensor, rows: Tensor):
        g = step_gradient(unet, operator, sampler, x_t, t, rows, target)
        return g.model_out, g.dist, g.grad

    return step_gradient_graph


def proximal_fn(unet: nn.Module, operator: Callable[[Tensor], Tensor], sampler, guidance):
    """The proximal (PIR) step's network part as a function of plain tensors, for tracing:
    :func:`idemrt.diffusion.step.proximal_x0` itself — one UNet forward, then the guidance's
    fixed number of data steps, each a VJP through the operator only (no UNet backward is traced).

    ``(x_t, t, target, rows) -> (model_out, x0 (x0' after the data step), dist (N,))``.
    """

    def proximal_graph(x_t: Tensor, t: Tensor, target: Tensor, rows: Tensor):
        p = proximal_x0(unet, operator, sampler, guidance, x_t, t, rows, target)
        return p.model_out, p.x0, p.dist

    return proximal_graph
