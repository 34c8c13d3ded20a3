"""Tiled codec operator: A(x) = g_s(round(g_a(x))) and its VJP in spatial tiles with halos.

A tiled decode (:mod:`idemrt.diffusion.tiling`) bounds the UNet's memory, but the guided step's
constraint still differentiates the codec operator on the whole image, and its autograd graph grows
with the pixels (benchmarks/RESULTS.md, "Tiled decoding (issue 28)": 6.85 GB at 2048²). The operator
is local — convolutions, per-position GDN and an elementwise round — so it can be computed tile by tile::

    x (N, 3, H, W) ─┬─ tile k: x[y0−halo : y1+halo, x0−halo : x1+halo] (clipped to the image)
                    │          ──A──▶ keep the output of the interior [y0:y1, x0:x1] only
                    └─ A(x) = the interiors side by side (they partition the image)

An interior output pixel depends on inputs at most ``r`` pixels away (the receptive field, measured in
tests/test_tiled_operator.py); with ``halo ≥ r`` a tile's interior output is the whole image's there:
a tile at the image border is cut at the true border (the same zero padding), and the halo hides a
cut inside the image. Tile origins and the halo are multiples of the codec's ``pad_multiple`` (a
multiple of g_a's stride, 16), so every tile's latent grid lies on the whole image's; the decoder's
image is padded to that multiple, so every tile is too. Only summation order differs, and through
it round() may flip a latent lying within float error of a .5 boundary.

Bounded memory: :class:`_TiledOperatorFn` runs the forward tile by tile without autograd and keeps
only x; its backward recomputes one tile at a time with autograd and adds that tile's VJP (of its
interior's output gradient) into the input gradient, so the held graph is one tile's. The cost is one
extra operator forward per guided step. Only x is differentiated: the codec's parameters get none.

Which codecs: the halo is measured per architecture (:data:`OPERATOR_HALO`). The others — whose
rounding reads the hyper branch's means (mean-scale, ELIC) or a serial context model — run the
whole-image operator: their receptive field was not measured.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["OPERATOR_HALO", "TiledOperator", "tiled_operator"]

# Halo in pixels per codec architecture: a multiple of the pad multiple (64) no smaller than the
# operator's measured receptive-field radius (g_a's four 5×5 stride-2 convs and g_s's four
# transposed ones: 60 px for "x", see tests/test_tiled_operator.py::test_receptive_field).
OPERATOR_HALO = {"bmshj2018-factorized": 64, "bmshj2018-hyperprior": 64}


class TiledOperator:
    """``operator(x)`` computed on ``tile``² interiors with ``halo`` pixels of context (see the module
    docstring); images no larger than ``tile`` in both axes run ``operator`` itself (bit for bit).
    ``align``: tile origins' multiple (the codec's pad multiple; ``tile`` and ``halo`` must be multiples)."""

    def __init__(self, operator: Callable[[Tensor], Tensor], tile: int, halo: int, align: int):
        if tile < 1 or tile % align or halo < 0 or halo % align:
            raise ValueError(f"operator tile {tile} and halo {halo} must be positive multiples of {align}")
        self.operator, self.tile, self.halo, self.align = operator, tile, halo, align

    def tiles(self, height: int, width: int) -> bool:
        return height > self.tile or width > self.tile

    def __call__(self, x: Tensor) -> Tensor:
        if not self.tiles(*x.shape[-2:]):
            return self.operator(x)
        if x.shape[-2] % self.align or x.shape[-1] % self.align:
            from ..errors import ImageError

            raise ImageError(f"the tiled operator needs an image padded to a multiple of {self.align}, "
                             f"got {tuple(x.shape[-2:])}")
        return _TiledOperatorFn.apply(x, self)

    def regions(self, height: int, width: int):
        """``(interior (y0, y1, x0, x1), crop (cy0, cy1, cx0, cx1))`` of every tile, raster order."""
        out = []
        for y0 in range(0, height, self.tile):
            y1 = min(height, y0 + self.tile)
            for x0 in range(0, width, self.tile):
                x1 = min(width, x0 + self.tile)
                out.append(((y0, y1, x0, x1), (max(0, y0 - self.halo), min(height, y1 + self.halo),
                                               max(0, x0 - self.halo), min(width, x1 + self.halo))))
        return out

    @staticmethod
    def _interior(out: Tensor, interior, crop) -> Tensor:
        """The part of a tile's output ``out`` (of input ``crop``) over ``interior``: the output's
        scale is its size over the crop's (1 for the image operator, 1/16 for the latent one)."""
        (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = interior, crop
        sy, sx = out.shape[-2] / (cy1 - cy0), out.shape[-1] / (cx1 - cx0)
        return out[..., round((y0 - cy0) * sy):round((y1 - cy0) * sy), round((x0 - cx0) * sx):round((x1 - cx0) * sx)]


def tiled_operator(operator: Callable[[Tensor], Tensor], codec, tile: Optional[int]) -> Callable[[Tensor], Tensor]:
    """``operator`` (codec's A) tiled in ``tile``-pixel interiors, or ``operator`` itself where
    ``tile`` is None or the codec's receptive field was not measured (:data:`OPERATOR_HALO`)."""
    from ..models.codec import Codec

    if tile is None or operator is None or not isinstance(codec, Codec) or codec.name not in OPERATOR_HALO:
        return operator
    return TiledOperator(operator, tile, OPERATOR_HALO[codec.name], codec.pad_multiple)


class _TiledOperatorFn(torch.autograd.Function):
    """A(x) tile by tile, differentiable with respect to x only; backward recomputes each tile."""

    @staticmethod
    def forward(ctx, x: Tensor, tiled: TiledOperator) -> Tensor:
        full = None
        for interior, (cy0, cy1, cx0, cx1) in tiled.regions(*x.shape[-2:]):
            part = TiledOperator._interior(tiled.operator(x[..., cy0:cy1, cx0:cx1]), interior, (cy0, cy1, cx0, cx1))
            if full is None:  # the output's scale from the first tile
                sy, sx = part.shape[-2] / (interior[1] - interior[0]), part.shape[-1] / (interior[3] - interior[2])
                full = part.new_empty((*part.shape[:-2], round(x.shape[-2] * sy), round(x.shape[-1] * sx)))
                ctx.scale = (sy, sx)
            y0, y1, x0, x1 = interior
            full[..., round(y0 * sy):round(y1 * sy), round(x0 * sx):round(x1 * sx)] = part
        ctx.tiled = tiled
        # The backward's recomputation runs under the forward's autocast (the fast backend's bf16/fp16
        # operator), which has been left by the time the gradient is taken.
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x)
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        (x,) = ctx.saved_tensors
        tiled, (sy, sx), (device, dtype, enabled) = ctx.tiled, ctx.scale, ctx.autocast
        grad_x = torch.zeros_like(x)
        for interior, crop in tiled.regions(*x.shape[-2:]):
            (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = interior, crop
            g = grad_full[..., round(y0 * sy):round(y1 * sy), round(x0 * sx):round(x1 * sx)]
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled, cache_enabled=False):
                xc = x[..., cy0:cy1, cx0:cx1].detach().requires_grad_(True)
                part = TiledOperator._interior(tiled.operator(xc), interior, crop)
                (g_crop,) = torch.autograd.grad(part, xc, g.to(part.dtype))
            grad_x[..., cy0:cy1, cx0:cx1] += g_crop.to(x.dtype)
            del part, g_crop, xc
        return grad_x, None
