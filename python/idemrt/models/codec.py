"""The MSE codec: a compressai image model behind the idempotence operators and the bitstream.

:class:`Codec` wraps one of compressai's image models (built and loaded by
:func:`idemrt.models.codec_loading.load_codec`) with

* the idempotence operators of Xu et al. (ICLR 2024), differentiable in the image::

      operator(x, "x") = synthesis(quantize(analysis(x)))     # A(x) = g_s(round_ste(g_a(x)))
      operator(x, "y") = quantize(analysis(x))

  Images are in [0, 1]; the synthesis output is **not** clamped (the reference operator does not
  clamp either, while compressai's decoder does). ``quantize`` rounds like the real codec does:

  ==========================  ==================  ========================================================
  family (models)             y_hat               mu
  ==========================  ==================  ========================================================
  factorized                  round(y - mu) + mu  entropy-bottleneck median of each channel
  (bmshj2018-factorized)
  hyperprior                  round(y)            none: zero-mean Gaussians
  (bmshj2018-hyperprior)
  mean-scale (mbt2018-mean)   round(y - mu) + mu  h_s(z_hat)
  autoregressive (mbt2018,    round(y - mu) + mu  serial masked-conv context + h_s(z_hat), in raster
  cheng2020-anchor/-attn)                         order exactly as compressai's decoder
  elic (elic2022-official,    round(y - mu) + mu  checkerboard two-pass x channel groups, as compressai's
  elic2022-chandelier)                            eval forward (the reference operator, bit-exact)
  ==========================  ==================  ========================================================

  with ``z_hat = round(h_a(y) - median) + median``. The rounding is straight-through: y_hat is
  computed without autograd and attached to y by an identity-backward function, so the gradient
  is ``J_{g_a}^T J_{g_s}^T`` exactly. The derivative of ``round(y - mu) + mu`` with respect to mu is
  zero, so the entropy-parameter networks need no backward pass (docs/reference_code.md §3.3.5).

* the bitstream: :meth:`Codec.compress` gives the bytes of compressai's own ``model.compress`` as a
  flat :class:`CompressedLatent`; :meth:`Codec.decompress_latent` returns the dequantised latent
  (what g_s receives) and :meth:`Codec.decompress` compressai's clamped reconstruction.

* any image size: :meth:`Codec.pad` (replicate padding, right and bottom, up to a multiple of
  ``pad_multiple``) and :meth:`Codec.crop`.

What differs between the rows of the table lives in one :class:`LatentFamily` object per family
(registered by name in :data:`LATENT_FAMILIES`); :data:`ARCHITECTURES` maps each compressai model
name to its class and family. :class:`Codec` itself is family-agnostic.

For ELIC the latent of the real codec equals the operator's up to float rounding of mu (compressai
computes the entropy parameters of the bitstream path on a re-arranged tensor, ~1e-6 apart); the
integer symbols are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.entropy_models import EntropyModel
from compressai.layers import MaskedConv2d
from compressai.models import (
    Cheng2020Anchor,
    Cheng2020Attention,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from compressai.models.sensetime import Elic2022Chandelier, Elic2022Official

from ..bitstream import weights_digest
from ..deprecation import renamed_argument
from ..errors import BitstreamError, CheckpointError, ImageError

__all__ = [
    "ARCHITECTURES",
    "Arch",
    "Codec",
    "CompressedLatent",
    "KNOWN_CODECS",
    "LATENT_FAMILIES",
    "LatentFamily",
    "architecture",
    "diffusion_operator",
]

# Largest latent side accepted from a bitstream: 4096 latent positions is a 65,536-pixel image side
# for the factorized prior and 262,144 for the others; anything larger is a forged header.
_MAX_LATENT_SIDE = 1 << 12


@dataclass(frozen=True)
class CompressedLatent:
    """One image's entropy-coded latent: compressai's strings, flattened, and the shape it needs.

    ``strings`` is compressai's nested ``strings`` output with the (single-image) batch level removed:
    ``[y]`` for the factorized prior, ``[y, z]`` for the hyperprior models and
    ``[y0_anchor, y0_non_anchor, y1_anchor, ..., z]`` for ELIC. ``shape`` is the spatial size of the
    latent that compressai's decoder starts from: y for the factorized prior, z for all others.
    """

    strings: list[bytes]
    shape: tuple[int, ...]


# --- families ---------------------------------------------------------------------------------------


class LatentFamily:
    """How a family of compressai models rounds its latent and lays out its entropy-coded strings.

    Stateless: one instance per family serves every model of it; each method takes the compressai
    ``model``. The defaults are those of the hyperprior families: two strings ``[y, z]``, decoded
    starting from z's shape.
    """

    name: str
    pad_multiple = 64  # g_a downsamples by 16, the hyper branch by 4 more
    # quantize runs one step per latent position, so the operator is no single static graph (ONNX).
    serial = False

    def quantize(self, model: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The codec's y_hat of ``y`` (no autograd: :meth:`Codec.quantize` adds the straight-through)."""
        raise NotImplementedError

    def decompress(self, model: nn.Module, strings: list, shape) -> torch.Tensor:
        """compressai's nested ``strings`` and decoder ``shape`` -> the dequantised latent y_hat."""
        raise NotImplementedError

    def num_strings(self, model: nn.Module) -> int:
        return 2

    def flat_shape(self, shape):
        """``model.compress(x)["shape"]`` -> the shape stored in :class:`CompressedLatent`."""
        return shape

    def decoder_shape(self, model: nn.Module, shape: tuple[int, int]):
        """The stored shape -> the ``shape`` argument of compressai's decoder."""
        return shape


LATENT_FAMILIES: dict[str, LatentFamily] = {}


def _register_family(cls: type) -> type:
    LATENT_FAMILIES[cls.name] = cls()
    return cls


def _hyper_params(y: torch.Tensor, hyper: nn.Module) -> torch.Tensor:
    """h_s(z_hat) with z_hat rounded around the entropy-bottleneck medians, as the codec does."""
    z = hyper.h_a(y)
    medians = hyper.entropy_bottleneck._get_medians()
    return hyper.h_s(torch.round(z - medians) + medians)


@_register_family
class FactorizedLatent(LatentFamily):
    """bmshj2018-factorized: one string, y rounded around the entropy bottleneck's medians."""

    name = "factorized"
    pad_multiple = 16  # no hyper branch

    def quantize(self, model, y):
        medians = model.entropy_bottleneck._get_medians()
        return torch.round(y - medians) + medians

    def decompress(self, model, strings, shape):
        return model.entropy_bottleneck.decompress(strings[0], shape)

    def num_strings(self, model):
        return 1


class _HyperpriorLatent(LatentFamily):
    """Models with ``h_a``/``h_s`` and an entropy bottleneck for z at the top level."""

    def decompress(self, model, strings, shape):
        z_hat = model.entropy_bottleneck.decompress(strings[1], shape)
        return self._decompress_y(model, strings[0], z_hat, model.h_s(z_hat))

    def _decompress_y(self, model, y_strings, z_hat, params):
        raise NotImplementedError


@_register_family
class HyperpriorLatent(_HyperpriorLatent):
    """bmshj2018-hyperprior: zero-mean Gaussians, so plain rounding."""

    name = "hyperprior"

    def quantize(self, model, y):
        return torch.round(y)

    def _decompress_y(self, model, y_strings, z_hat, params):
        indexes = model.gaussian_conditional.build_indexes(params)
        return model.gaussian_conditional.decompress(y_strings, indexes, z_hat.dtype)


@_register_family
class MeanScaleLatent(_HyperpriorLatent):
    """mbt2018-mean: y rounded around the means predicted by h_s."""

    name = "mean-scale"

    def quantize(self, model, y):
        _, means = _hyper_params(y, model).chunk(2, 1)
        return torch.round(y - means) + means

    def _decompress_y(self, model, y_strings, z_hat, params):
        scales, means = params.chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales)
        return model.gaussian_conditional.decompress(y_strings, indexes, means=means)


@_register_family
class AutoregressiveLatent(_HyperpriorLatent):
    """mbt2018 and cheng2020: means from h_s and a serial masked-convolution context."""

    name = "autoregressive"
    serial = True

    def quantize(self, model, y):
        # The serial decoding order of compressai's JointAutoregressiveHierarchicalPriors: raster scan,
        # each position's mean from the 5x5 masked context of the already decoded ones. The same ops on
        # the same (zero-initialised, padded) buffer as its decoder, so for one image the values are
        # identical. (Batches of several images can differ in the last bit of mu, as any batched net.)
        params = _hyper_params(y, model)
        cp = model.context_prediction
        k = cp.kernel_size[0]
        p = k // 2
        B, C, H, W = y.shape
        y_hat = y.new_zeros((B, C, H + 2 * p, W + 2 * p))
        for h in range(H):
            for w in range(W):
                ctx = F.conv2d(y_hat[:, :, h : h + k, w : w + k], cp.weight, bias=cp.bias)
                gaussian_params = model.entropy_parameters(torch.cat((params[:, :, h : h + 1, w : w + 1], ctx), dim=1))
                _, means = gaussian_params.chunk(2, 1)
                y_hw = y[:, :, h : h + 1, w : w + 1]
                y_hat[:, :, h + p : h + p + 1, w + p : w + p + 1] = torch.round(y_hw - means) + means
        return y_hat[:, :, p : p + H, p : p + W]

    def _decompress_y(self, model, y_strings, z_hat, params):
        # As JointAutoregressiveHierarchicalPriors.decompress, minus g_s.
        k = model.context_prediction.kernel_size[0]
        p = k // 2
        h, w = 4 * z_hat.shape[2], 4 * z_hat.shape[3]  # y is 4x z in both directions
        y_hat = torch.zeros((1, model.M, h + 2 * p, w + 2 * p), device=z_hat.device)
        model._decompress_ar(y_strings[0], y_hat, params, h, w, k, p)
        return y_hat[:, :, p : p + h, p : p + w]


@_register_family
class ElicLatent(LatentFamily):
    """ELIC (compressai's latent codecs): channel groups, each a checkerboard of anchors and non-anchors.

    Strings: two per group (anchors, non-anchors) and z last; compressai's shapes are a dict of
    the per-group y shapes and z's ("hyper"), of which only z's is stored.
    """

    name = "elic"

    def quantize(self, model, y):
        # compressai's eval forward (HyperpriorLatentCodec -> ChannelGroupsLatentCodec ->
        # CheckerboardLatentCodec "twopass") without the likelihoods.
        lc_hyper, lc_y = model.latent_codec["hyper"], model.latent_codec["y"]
        side_params = _hyper_params(y, lc_hyper)
        even = _even_mask(*y.shape[-2:], device=y.device)
        anchors = {"even": even, "odd": ~even}
        y_hat_ = []
        for k, y_k in enumerate(torch.split(y, lc_y.groups, dim=1)):
            cb = lc_y.latent_codec[f"y{k}"]
            anchor = anchors[cb.anchor_parity]
            ctx_params = lc_y._get_ctx_params(k, side_params, y_hat_)
            cp = cb.context_prediction
            # Anchors see no spatial context (zeros); non-anchors see the decoded anchors.
            y_ctx = y_k.new_zeros((y_k.shape[0], cp.out_channels, *y_k.shape[-2:]))
            _, means = cb.latent_codec["y"]._chunk(cb.entropy_parameters(torch.cat((y_ctx, ctx_params), dim=1)))
            y_hat_anchor = torch.where(anchor, torch.round(y_k - means) + means, 0.0)
            y_ctx = F.conv2d(y_hat_anchor, cp.weight, cp.bias, cp.stride, cp.padding)
            _, means = cb.latent_codec["y"]._chunk(cb.entropy_parameters(torch.cat((y_ctx, ctx_params), dim=1)))
            y_hat_non_anchor = torch.where(anchor, 0.0, torch.round(y_k - means) + means)
            y_hat_.append(y_hat_anchor + y_hat_non_anchor)
        return torch.cat(y_hat_, dim=1)

    def decompress(self, model, strings, shape):
        return model.latent_codec.decompress(strings, shape)["y_hat"]

    def num_strings(self, model):
        return 2 * len(model.latent_codec["y"].groups) + 1

    def flat_shape(self, shape):
        return shape["hyper"]

    def decoder_shape(self, model, shape):
        y_size = (4 * shape[0], 4 * shape[1])  # y is 4x z for padded images
        groups = model.latent_codec["y"].groups
        return {"y": [(g, *y_size) for g in groups], "hyper": shape}


# --- architectures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A compressai model name's class and latent family."""

    cls: type
    latent_family: LatentFamily


ARCHITECTURES: dict[str, Arch] = {
    name: Arch(cls, LATENT_FAMILIES[family])
    for name, cls, family in (
        ("bmshj2018-factorized", FactorizedPrior, "factorized"),
        ("bmshj2018-hyperprior", ScaleHyperprior, "hyperprior"),
        ("mbt2018-mean", MeanScaleHyperprior, "mean-scale"),
        ("mbt2018", JointAutoregressiveHierarchicalPriors, "autoregressive"),
        ("cheng2020-anchor", Cheng2020Anchor, "autoregressive"),
        ("cheng2020-attn", Cheng2020Attention, "autoregressive"),
        ("elic2022-official", Elic2022Official, "elic"),
        ("elic2022-chandelier", Elic2022Chandelier, "elic"),
    )
}
KNOWN_CODECS = tuple(ARCHITECTURES)


def architecture(name: str) -> Arch:
    """The registry entry of codec ``name`` (:class:`idemrt.CheckpointError` naming the known ones if none)."""
    if name not in ARCHITECTURES:
        raise CheckpointError(f"unknown codec {name!r}; known codecs: {', '.join(KNOWN_CODECS)}")
    return ARCHITECTURES[name]


class _StraightThrough(torch.autograd.Function):
    """Forward: the precomputed ``y_hat`` (bit-exact); backward: identity onto ``y``."""

    @staticmethod
    def forward(ctx, y, y_hat):
        return y_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Codec(nn.Module):
    """A compressai model as the MSE codec of the perceptual decoder (see the module docstring).

    Always in eval mode with frozen parameters (requires_grad False): only input gradients exist.
    Build it with :func:`~idemrt.models.codec_loading.load_codec`, or directly from a compressai model
    whose weights and CDF tables are loaded (``Codec(name, model)``; masked-convolution weights get
    their mask applied).
    """

    def __init__(self, name: str, model: nn.Module, quality: Optional[int] = None):
        super().__init__()
        self.latent_family = architecture(name).latent_family
        self.name = name
        self.quality = quality
        self.pad_multiple = self.latent_family.pad_multiple
        self.model = model
        with torch.no_grad():
            # compressai re-applies the mask on every forward; applying it once keeps the weights
            # (and weights_hash) fixed and lets the operator call the convolution directly.
            for m in model.modules():
                if isinstance(m, MaskedConv2d):
                    m.weight.mul_(m.mask)
        model.requires_grad_(False)
        self.train(False)
        self._hash: Optional[bytes] = None
        # compressai's default coder; its streams can be sanity-checked before decoding (see _unflatten).
        self._rans = {m.entropy_coder.name for m in model.modules() if isinstance(m, EntropyModel)} == {"ans"}
        if self._rans:
            # The native coder writes the same bytes, without Python lists and with bounds checks;
            # without the extension this is a no-op and compressai's coder stays.
            from ..entropy import install

            install(model)

    @property
    def family(self) -> str:
        """The name of the latent family (a row of the module docstring's table)."""
        return self.latent_family.name

    def train(self, mode: bool = True):
        # Training mode would switch compressai's quantizers to additive noise: never wanted here.
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, quality={self.quality}, pad_multiple={self.pad_multiple}"

    # --- identity ---------------------------------------------------------------------------------

    def weights_hash(self) -> bytes:
        """The 16-byte ``weights_hash`` recorded by the ``.idm`` container.

        :func:`idemrt.bitstream.weights_digest` of the state_dict: truncated sha256 over every
        entry's name, dtype, shape and bytes.

        Computed once and cached (``load_codec`` computes it before moving the model to its
        device), so it identifies the weights as loaded; CDF tables are included since the
        bitstream depends on them.
        """
        if self._hash is None:
            self._hash = weights_digest(self.model.state_dict())
        return self._hash

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- image size -------------------------------------------------------------------------------

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Replicate-pad (N, C, H, W) on the right and bottom up to multiples of ``pad_multiple``.

        Returns ``(x_padded, padding)`` with ``padding = (0, right, 0, bottom)`` in ``F.pad`` order.
        Undo with ``crop(x_padded, (H, W))``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ImageError(f"expected an image batch (N, C, H, W), got {_describe(x)}")
        H, W = x.shape[-2:]
        padding = (0, -W % self.pad_multiple, 0, -H % self.pad_multiple)
        if any(padding):
            x = F.pad(x, padding, mode="replicate")
        return x, padding

    @staticmethod
    def crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The top-left ``size = (H, W)`` part of ``x`` (the inverse of :meth:`pad`)."""
        return x[..., : size[0], : size[1]]

    # --- operators --------------------------------------------------------------------------------

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """g_a: image in [0, 1] (N, 3, H, W), H and W multiples of ``pad_multiple`` -> latent y."""
        return self.model.g_a(x)

    def synthesis(self, y_hat: torch.Tensor) -> torch.Tensor:
        """g_s: latent -> image on the [0, 1] scale, not clamped."""
        return self.model.g_s(y_hat)

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """The codec's y_hat of ``y`` (see the module docstring), straight-through in y."""
        with torch.no_grad():
            y_hat = self.latent_family.quantize(self.model, y.detach())
        if y.requires_grad:
            return _StraightThrough.apply(y, y_hat)
        return y_hat

    def operator(self, x: torch.Tensor, constraint: str = "x", *, domain: Optional[str] = None) -> torch.Tensor:
        """Idempotence operator of a ``constraint``: ``"x"``: g_s(Q(g_a(x))) (unclamped), ``"y"``:
        Q(g_a(x)). ``domain`` is the deprecated name of ``constraint``."""
        constraint = renamed_argument("domain", domain, "constraint", constraint)
        if constraint not in ("x", "y"):
            raise ValueError(f"constraint must be 'x' or 'y', got {constraint!r}")
        y_hat = self.quantize(self.analysis(x))
        return self.synthesis(y_hat) if constraint == "x" else y_hat

    forward = operator

    # --- bitstream --------------------------------------------------------------------------------

    def compress(self, x: torch.Tensor) -> CompressedLatent:
        """Entropy-code one padded image (1, 3, H, W) in [0, 1]: compressai's ``model.compress``, flattened."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[:2] != (1, 3):
            raise ImageError(f"compress expects one RGB image (1, 3, H, W), got {_describe(x)}")
        H, W = x.shape[-2:]
        if H % self.pad_multiple or W % self.pad_multiple:
            raise ImageError(
                f"{self.name}: image size {H}x{W} is not a multiple of {self.pad_multiple}; pad() it first"
            )
        with torch.no_grad():
            out = self.model.compress(x)
        strings = [batch[0] for batch in out["strings"]]
        shape = self.latent_family.flat_shape(out["shape"])
        return CompressedLatent(strings=strings, shape=tuple(int(s) for s in shape))

    def decompress_latent(self, strings, shape) -> torch.Tensor:
        """Entropy-decode :meth:`compress`'s output to the dequantised latent y_hat (1, M, h, w)."""
        nested, shape = self._unflatten(strings, shape)
        try:
            with torch.no_grad():
                return self.latent_family.decompress(self.model, nested, shape)
        except (ValueError, RuntimeError, AssertionError, IndexError, TypeError, OverflowError) as exc:
            raise BitstreamError(f"{self.name}: entropy decoding failed: {exc}") from exc

    def decompress(self, strings, shape) -> torch.Tensor:
        """Decode to the image in [0, 1]: equals compressai's ``model.decompress(...)["x_hat"]`` (clamped)."""
        y_hat = self.decompress_latent(strings, shape)
        with torch.no_grad():
            return self.synthesis(y_hat).clamp_(0, 1)

    def _unflatten(self, strings, shape):
        """Flat strings and shape -> the arguments of compressai's decoders (BitstreamError if malformed)."""
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, (bytes, bytearray)) for s in strings):
            raise BitstreamError(f"{self.name}: latent strings must be a list of bytes")
        strings = [bytes(s) for s in strings]
        expected = self.latent_family.num_strings(self.model)
        if len(strings) != expected:
            raise BitstreamError(f"{self.name}: expected {expected} latent strings, got {len(strings)}")
        # A rANS stream is whole 32-bit words, at least the 8-byte final state. The decoder does not
        # bounds-check, so shorter input would be read past its end. (Corruption inside a well-formed
        # stream is not detectable here: it decodes to wrong values; the container must checksum.)
        if self._rans and any(len(s) < 8 or len(s) % 4 for s in strings):
            raise BitstreamError(f"{self.name}: truncated latent string (not a whole rANS stream)")
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) != 2
            or not all(isinstance(s, int) and 0 < s <= _MAX_LATENT_SIDE for s in shape)
        ):
            raise BitstreamError(f"{self.name}: invalid latent shape {shape!r}")
        nested = [[s] for s in strings]
        return nested, self.latent_family.decoder_shape(self.model, tuple(shape))


def _even_mask(H: int, W: int, device) -> torch.Tensor:
    """(H, W) bool, True where i + j is even (the checkerboard anchors of anchor_parity "even")."""
    rows = torch.arange(H, device=device)[:, None]
    cols = torch.arange(W, device=device)[None, :]
    return (rows + cols) % 2 == 0


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def diffusion_operator(codec: Codec, constraint: str = "x", *, domain: Optional[str] = None):
    """The idempotence operator A in the diffusion model's units, as the reference forms it.

    x0 lives in [-1, 1]. "x": ``2·codec.operator((x0+1)/2, "x") - 1``, i.e. 2·g_s(round_ste(g_a)) - 1,
    not clamped; "y": ``codec.operator((x0+1)/2, "y")``, the straight-through rounded latent.
    Every backend builds A with this one function. ``domain`` is the deprecated name of ``constraint``.
    """
    constraint = renamed_argument("domain", domain, "constraint", constraint)
    if constraint not in ("x", "y"):
        raise ValueError(f"constraint must be 'x' or 'y', got {constraint!r}")

    def operator(x0: torch.Tensor) -> torch.Tensor:
        out = codec.operator((x0 + 1) / 2, constraint)
        return 2 * out - 1 if constraint == "x" else out

    return operator
