"""Tiled model function: the prior at its native size on overlapping windows of a large image.

A diffusion prior is trained at one size (256×256 for the FFHQ/ImageNet ADM UNets, 64×64 for the
demo prior). Run on a whole 2048×1536 photograph, it works far from its training resolution and
its activations (attention's grow with the square of the pixels) grow with the image. Tiling
replaces the *model function* of the step, and nothing else::

    x_t (N, C, H, W) ──windows──▶ (N·K, C, h, w) ──UNet, ≤ chunk windows a call──▶ outputs
                                                                                     │
        model_out (N, C_out, H, W) ◀──Σ_k W_k · out_k (blend, weights sum to 1)───────┘

The codec operator A(x) = g_s(round(g_a(x))) is fully convolutional and cheap, so the constraint
stays global: :func:`idemrt.diffusion.step.step_gradient` forms x̂0 from the blended output on the
whole image, measures ‖target − A(x̂0)‖ on the whole image and differentiates back through the blend
into every window's UNet (A itself runs in tiles with halos above ``Tiling.operator_tile``, the
same function: :mod:`idemrt.diffusion.tiled_operator`). DPS, DSG, PIR, warm start and exact
refinement therefore work unchanged.
All output channels are blended (ε, and the variance interpolation where the prior learns it).

Windows: ``window`` pixels a side (default: the prior's native size), ``K = Ky·Kx`` of them with
``Ky = ceil((H − h)/stride) + 1`` spread evenly from edge to edge (the offsets are rounded, so
neighbours overlap by at least ``window − stride``); an axis no longer than the window is one window
of the axis' length. An image no larger than the window in both axes is not tiled at all: the model
is called exactly as without tiling (bit for bit).

Blend weights (per axis, multiplied; every window's weights divided by their sum over the windows
at each pixel, so they sum to 1 everywhere): ``"ramp"`` — 1 inside, falling linearly over the last
``window − stride`` pixels to each edge (``min(i + ½, L − i − ½, r)/r``: with evenly spaced windows
the ramps of two neighbours already sum to 1 in their overlap, a linear cross-fade); ``"gaussian"``
— exp(−d²/2σ²) around the window centre, σ = window/4 (StableSR/DiffBIR's aggregation);
``"uniform"`` — a plain average where windows overlap (MultiDiffusion's).

Bounded memory: a guided step differentiates the model output. :class:`_TiledForward` keeps only
x_t; its backward re-runs each chunk of windows with autograd, takes that chunk's vector-Jacobian
product and frees it before the next, so the UNet activations held at any time are one chunk's,
whatever the image size (benchmarks/tiled_memory.py). The cost is one extra UNet forward per window
in a guided step (recomputation). Only x_t is differentiated: the model's parameters get no gradient.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..models.prior import prior_traits

__all__ = ["BLEND_WEIGHTS", "TileLayout", "TiledModel", "Tiling", "describe_tiling", "tile_layout", "window_count"]

BLEND_WEIGHTS = ("ramp", "gaussian", "uniform")
# Windows per UNet call. On the CPU an FFHQ-256 window's forward + backward holds about 2 GB of fp32
# activations: a 512² DPS decode peaked at 3.5 GB with 1 window a call and passed 12 GB with 8
# (benchmarks/RESULTS.md, "Tiled decoding"); 2 sits between them (its peak was not measured).
DEFAULT_CHUNK = 2
# The codec operator's tile side: images up to 512² keep the whole-image operator (bit for bit); a
# multiple of every codec's pad multiple (16 or 64), as tile origins must be.
DEFAULT_OPERATOR_TILE = 512


@dataclass(frozen=True)
class Tiling:
    """How a decode tiles the prior (``DecodeConfig(tile=Tiling())``; JSON/YAML as a mapping).

    ``window``: the window side in pixels (None: the prior's native size, its ``image_size``);
    ``stride``: the distance between window offsets (None: ¾ of the window, a quarter overlap);
    ``weights``: one of :data:`BLEND_WEIGHTS`; ``chunk``: at most this many windows per UNet call
    (with the guided step's backward, the memory the UNet's activations take); ``operator_tile``:
    the codec operator runs in tiles of this many pixels a side (plus a halo) on images larger than
    that (:mod:`idemrt.diffusion.tiled_operator`; None: always on the whole image)."""

    window: Optional[int] = None
    stride: Optional[int] = None
    weights: str = "ramp"
    chunk: int = DEFAULT_CHUNK
    operator_tile: Optional[int] = DEFAULT_OPERATOR_TILE

    def __post_init__(self):
        for name in ("window", "stride", "chunk", "operator_tile"):
            value = getattr(self, name)
            if value is None and name != "chunk":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tile {name} must be a positive int{'' if name == 'chunk' else ' or None'}, "
                                 f"got {value!r}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"tile stride {self.stride} is larger than the window {self.window}: pixels would be missed")
        if self.operator_tile is not None and self.operator_tile % 64:
            raise ValueError(f"tile operator_tile must be a multiple of 64 (the codecs' pad multiple), "
                             f"got {self.operator_tile}")
        if self.weights not in BLEND_WEIGHTS:
            raise ValueError(f"tile weights must be one of {BLEND_WEIGHTS}, got {self.weights!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_value(cls, value) -> Optional[Tiling]:
        """A config field's value as a Tiling: a Tiling, a mapping of its fields (JSON/YAML), True
        (the defaults) — or None for False/None (no tiling)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown tile options {unknown}; the fields are {list(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"tile must be a Tiling, a mapping of its fields, True, False or None, got {value!r}")

    def resolve(self, native: Optional[int]) -> tuple[int, int]:
        """``(window, stride)`` in pixels for a prior of native size ``native`` (None: unknown)."""
        window = self.window if self.window is not None else native
        if window is None:
            from ..errors import BackendError

            raise BackendError("tiling needs the window size: this prior does not say its native size; "
                               "pass Tiling(window=...)")
        stride = self.stride if self.stride is not None else max(1, (3 * window) // 4)
        if stride > window:
            raise ValueError(f"tile stride {stride} is larger than the window {window}: pixels would be missed")
        return window, stride


def describe_tiling(tiling: Optional[Tiling], unet, height: int, width: int) -> str:
    """One line for a user: how a decode with ``tiling`` (None: off) runs an image of this (padded) size."""
    if tiling is None:
        return f"tiling off: the prior runs on the whole {width}x{height} image"
    return TiledModel.for_prior(None, tiling, unet).describe(height, width)


class TileLayout(NamedTuple):
    """The windows of one image size: ``offsets`` (y, x) of each window, its ``size`` (h, w), and
    ``weights`` (K, 1, h, w), each window's blend weights, summing to 1 over the windows at every pixel."""

    offsets: tuple
    size: tuple
    weights: Tensor

    @property
    def count(self) -> int:
        return len(self.offsets)


def window_count(height: int, width: int, window: int, stride: int) -> int:
    """How many windows an image of this size is tiled into (1 if it is not): pure Python, so a
    service can refuse a request by its size before any device work."""
    return len(_axis_offsets(height, window, stride)[1]) * len(_axis_offsets(width, window, stride)[1])


def _axis_offsets(length: int, window: int, stride: int) -> tuple[int, list[int]]:
    """``(window length on this axis, offsets)``: windows spread evenly from edge to edge."""
    if length <= window:
        return length, [0]
    n = math.ceil((length - window) / stride) + 1
    return window, [round(k * (length - window) / (n - 1)) for k in range(n)]


def _axis_profile(length: int, overlap: int, kind: str) -> Tensor:
    """One axis' unnormalised weights of a window of ``length`` pixels (float64)."""
    i = torch.arange(length, dtype=torch.float64) + 0.5  # pixel centres
    if kind == "uniform" or overlap <= 0:
        return torch.ones(length, dtype=torch.float64)
    if kind == "ramp":
        return torch.minimum(torch.minimum(i, length - i), torch.tensor(float(overlap))) / overlap
    sigma = length / 4
    return torch.exp(-((i - length / 2) ** 2) / (2 * sigma**2))


def tile_layout(height: int, width: int, window: int, stride: int, weights: str = "ramp") -> TileLayout:
    """The windows and normalised blend weights of an image of ``height`` × ``width`` (float64 weights)."""
    h, ys = _axis_offsets(height, window, stride)
    w, xs = _axis_offsets(width, window, stride)
    overlap = window - stride
    profile = _axis_profile(h, overlap if len(ys) > 1 else 0, weights)[:, None] * \
        _axis_profile(w, overlap if len(xs) > 1 else 0, weights)[None, :]
    offsets = tuple((y, x) for y in ys for x in xs)
    total = torch.zeros(height, width, dtype=torch.float64)
    for y, x in offsets:
        total[y:y + h, x:x + w] += profile
    per_window = torch.stack([profile / total[y:y + h, x:x + w] for y, x in offsets])[:, None]
    return TileLayout(offsets, (h, w), per_window)


class TiledModel:
    """``model(x, t)`` on overlapping windows of x, blended: a model function for
    :mod:`idemrt.diffusion.step` (see the module docstring). ``model``: ``(x (B, C, h, w), t (B,)) ->
    (B, C_out, h, w)``; ``window``/``stride`` in pixels; ``weights`` one of :data:`BLEND_WEIGHTS`;
    ``chunk``: at most this many windows per model call."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], window: int, stride: int,
                 weights: str = "ramp", chunk: int = DEFAULT_CHUNK):
        Tiling(window=window, stride=stride, weights=weights, chunk=chunk)  # the same checks
        self.model, self.window, self.stride, self.weights, self.chunk = model, window, stride, weights, chunk
        self._layouts: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def for_prior(cls, model, tiling: Tiling, unet) -> TiledModel:
        """The tiled ``model`` function of prior ``unet`` (whose native size is the default window)."""
        window, stride = tiling.resolve(prior_traits(unet).image_size)
        return cls(model, window, stride, tiling.weights, tiling.chunk)

    def tiles(self, height: int, width: int) -> bool:
        """Whether an image of this size is tiled (larger than the window on some axis)."""
        return height > self.window or width > self.window

    def layout(self, height: int, width: int, device=None, dtype=torch.float32) -> TileLayout:
        """The windows of an image of this size, weights on ``device`` in ``dtype`` (cached)."""
        key = (height, width, str(device), dtype)
        with self._lock:
            if key not in self._layouts:
                base = tile_layout(height, width, self.window, self.stride, self.weights)
                self._layouts[key] = base._replace(weights=base.weights.to(device=device, dtype=dtype))
            return self._layouts[key]

    def describe(self, height: int, width: int) -> str:
        """One line for a user: how an image of this size is tiled."""
        if not self.tiles(height, width):
            return f"tiling off: {width}x{height} is within the prior's {self.window}x{self.window} window"
        n = self.layout(height, width).count
        return (f"tiling {width}x{height}: {n} windows of {self.window}x{self.window}, stride {self.stride}, "
                f"{self.weights} weights, {self.chunk} windows a UNet call")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if not self.tiles(*x.shape[-2:]):
            return self.model(x, t)
        return _TiledForward.apply(x, t, self)

    # -- the pieces _TiledForward runs; one chunk of windows at a time --------------------------------
    def _chunks(self, n: int, layout: TileLayout):
        """Index lists of (image, window) pairs, at most ``chunk`` each, image-major."""
        pairs = [(b, k) for b in range(n) for k in range(layout.count)]
        return [pairs[s:s + self.chunk] for s in range(0, len(pairs), self.chunk)]

    @staticmethod
    def _windows(x: Tensor, t: Tensor, layout: TileLayout, pairs) -> tuple[Tensor, Tensor]:
        (h, w), off = layout.size, layout.offsets
        win = torch.stack([x[b, :, off[k][0]:off[k][0] + h, off[k][1]:off[k][1] + w] for b, k in pairs])
        # int indexing and stack only: no host-built index tensor, so a CUDA graph can capture it
        return win, torch.stack([t[b] for b, _ in pairs])

    @staticmethod
    def _scatter(full: Tensor, out: Tensor, layout: TileLayout, pairs) -> None:
        """``full += Σ W_k · out`` over the chunk's windows (in place, no autograd)."""
        (h, w), off = layout.size, layout.offsets
        weights = layout.weights.to(out.dtype)
        for j, (b, k) in enumerate(pairs):
            full[b, :, off[k][0]:off[k][0] + h, off[k][1]:off[k][1] + w] += weights[k] * out[j]


class _TiledForward(torch.autograd.Function):
    """Blended windowed model output, differentiable with respect to x only, with the windows'
    forward recomputed chunk by chunk in backward (the saved state is x and t, not activations)."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, tiled: TiledModel) -> Tensor:
        layout = tiled.layout(*x.shape[-2:], x.device, x.dtype)
        full = None
        for pairs in tiled._chunks(x.shape[0], layout):
            out = tiled.model(*TiledModel._windows(x, t, layout, pairs))
            if full is None:
                full = out.new_zeros((x.shape[0], out.shape[1], *x.shape[-2:]))
            TiledModel._scatter(full, out, layout, pairs)
        ctx.tiled = tiled
        ctx.save_for_backward(x, t)
        return full

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        x, t = ctx.saved_tensors
        tiled = ctx.tiled
        layout = tiled.layout(*x.shape[-2:], x.device, x.dtype)
        grad_x = torch.zeros_like(x)
        (h, w), off = layout.size, layout.offsets
        for pairs in tiled._chunks(x.shape[0], layout):
            win, tw = TiledModel._windows(x, t, layout, pairs)
            # The blend's adjoint: each window's share of the output gradient.
            g_out, _ = TiledModel._windows(grad_full, t, layout, pairs)
            weights = layout.weights.to(g_out.dtype)
            g_out = g_out * torch.stack([weights[k] for _, k in pairs])
            with torch.enable_grad():
                win = win.detach().requires_grad_(True)
                out = tiled.model(win, tw)
                (g_win,) = torch.autograd.grad(out, win, g_out.to(out.dtype))
            for j, (b, k) in enumerate(pairs):  # the window extraction's adjoint: add back in place
                grad_x[b, :, off[k][0]:off[k][0] + h, off[k][1]:off[k][1] + w] += g_win[j].to(x.dtype)
            del out, g_win, win
        return grad_x, None, None
