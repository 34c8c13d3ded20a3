"""The MSE codec: a compressai image model behind the idempotence operators and the bitstream.

:func:`load_codec` builds one of compressai's image models, with weights from compressai's model
zoo (``pretrained=True``, downloads), from a local checkpoint, or (tests, benchmarks) at random.
:class:`Codec` wraps it with

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
  zero, so the entropy-parameter networks need no backward pass (CODEC_OPERATORS.md, section 3.5).

* the bitstream: :meth:`Codec.compress` gives the bytes of compressai's own ``model.compress`` as a
  flat :class:`CompressedLatent`; :meth:`Codec.decompress_latent` returns the dequantised latent
  (what g_s receives) and :meth:`Codec.decompress` compressai's clamped reconstruction.

* any image size: :meth:`Codec.pad` (replicate padding, right and bottom, up to a multiple of
  ``pad_multiple``) and :meth:`Codec.crop`.

For ELIC the latent of the real codec equals the operator's up to float rounding of mu (compressai
computes the entropy parameters of the bitstream path on a re-arranged tensor, ~1e-6 apart); the
integer symbols are the same.
"""
from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from typing import Callable, Optional

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
from compressai.zoo.image import cfgs as _ZOO_WIDTHS
from compressai.zoo.image import model_urls as _ZOO_URLS

from ..bitstream import weights_digest
from ..errors import BitstreamError, CheckpointError, ImageError
from . import checkpoint_io
from .codec_convert import detect_codec_name, entropy_bottleneck_style, is_elic_reimpl, normalize_state_dict

__all__ = ["Codec", "CompressedLatent", "KNOWN_CODECS", "load_codec"]

# Buffers whose size is set by update() / the checkpoint rather than by the architecture.
_CDF_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
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


def _widths_nm(state):
    return {"N": state["g_a.0.weight"].shape[0], "M": state["g_a.6.weight"].shape[0]}


def _widths_cheng(state):
    return {"N": state["g_a.0.conv1.weight"].shape[0]}


def _widths_elic(state):
    groups = []
    while (key := f"latent_codec.y.latent_codec.y{len(groups)}.context_prediction.weight") in state:
        groups.append(state[key].shape[1])
    if not groups:
        raise KeyError("latent_codec.y.latent_codec.y0.context_prediction.weight")
    N, M = state["g_a.0.weight"].shape[0], state["g_a.13.weight"].shape[0]
    if sum(groups) != M:
        raise CheckpointError(f"ELIC checkpoint: channel groups {groups} do not add up to M = {M}")
    return {"N": N, "M": M, "groups": groups}


@dataclass(frozen=True)
class _Arch:
    cls: type
    family: str
    pad_multiple: int  # g_a downsamples by 16; a hyper branch by 4 more
    widths: Callable[[dict], dict]  # constructor arguments inferred from a state_dict


_ARCHS = {
    "bmshj2018-factorized": _Arch(FactorizedPrior, "factorized", 16, _widths_nm),
    "bmshj2018-hyperprior": _Arch(ScaleHyperprior, "hyperprior", 64, _widths_nm),
    "mbt2018-mean": _Arch(MeanScaleHyperprior, "mean-scale", 64, _widths_nm),
    "mbt2018": _Arch(JointAutoregressiveHierarchicalPriors, "autoregressive", 64, _widths_nm),
    "cheng2020-anchor": _Arch(Cheng2020Anchor, "autoregressive", 64, _widths_cheng),
    "cheng2020-attn": _Arch(Cheng2020Attention, "autoregressive", 64, _widths_cheng),
    "elic2022-official": _Arch(Elic2022Official, "elic", 64, _widths_elic),
    "elic2022-chandelier": _Arch(Elic2022Chandelier, "elic", 64, _widths_elic),
}
KNOWN_CODECS = tuple(_ARCHS)


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
    Build it with :func:`load_codec`, or directly from a compressai model whose weights and CDF
    tables are loaded (``Codec(name, model)``; masked-convolution weights get their mask applied).
    """

    def __init__(self, name: str, model: nn.Module, quality: Optional[int] = None, *, native_coder: bool = True):
        super().__init__()
        if name not in _ARCHS:
            raise CheckpointError(_unknown_name(name))
        arch = _ARCHS[name]
        self.name = name
        self.quality = quality
        self.family = arch.family
        self.pad_multiple = arch.pad_multiple
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
        if self._rans and native_coder:
            # The native coder writes the same bytes, without Python lists and with bounds checks;
            # without the extension this is a no-op and compressai's coder stays.
            from ..entropy import install

            install(model)
        self._quantize_values = {
            "factorized": self._quantize_factorized,
            "hyperprior": self._quantize_hyperprior,
            "mean-scale": self._quantize_mean_scale,
            "autoregressive": self._quantize_autoregressive,
            "elic": self._quantize_elic,
        }[arch.family]

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

        Computed once and cached (:func:`load_codec` computes it before moving the model to its
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
            y_hat = self._quantize_values(y.detach())
        if y.requires_grad:
            return _StraightThrough.apply(y, y_hat)
        return y_hat

    def operator(self, x: torch.Tensor, domain: str = "x") -> torch.Tensor:
        """Idempotence operator: ``"x"``: g_s(Q(g_a(x))) (unclamped), ``"y"``: Q(g_a(x))."""
        if domain not in ("x", "y"):
            raise ValueError(f"domain must be 'x' or 'y', got {domain!r}")
        y_hat = self.quantize(self.analysis(x))
        return self.synthesis(y_hat) if domain == "x" else y_hat

    forward = operator

    def _z_hat_params(self, y, hyper):
        """h_s(z_hat) with z_hat rounded around the entropy-bottleneck medians, as the codec does."""
        z = hyper.h_a(y)
        medians = hyper.entropy_bottleneck._get_medians()
        return hyper.h_s(torch.round(z - medians) + medians)

    def _quantize_factorized(self, y):
        medians = self.model.entropy_bottleneck._get_medians()
        return torch.round(y - medians) + medians

    def _quantize_hyperprior(self, y):
        return torch.round(y)

    def _quantize_mean_scale(self, y):
        _, means = self._z_hat_params(y, self.model).chunk(2, 1)
        return torch.round(y - means) + means

    def _quantize_autoregressive(self, y):
        # The serial decoding order of compressai's JointAutoregressiveHierarchicalPriors: raster scan,
        # each position's mean from the 5x5 masked context of the already decoded ones. The same ops on
        # the same (zero-initialised, padded) buffer as its decoder, so for one image the values are
        # identical. (Batches of several images can differ in the last bit of mu, as any batched net.)
        m = self.model
        params = self._z_hat_params(y, m)
        cp = m.context_prediction
        k = cp.kernel_size[0]
        p = k // 2
        B, C, H, W = y.shape
        y_hat = y.new_zeros((B, C, H + 2 * p, W + 2 * p))
        for h in range(H):
            for w in range(W):
                ctx = F.conv2d(y_hat[:, :, h : h + k, w : w + k], cp.weight, bias=cp.bias)
                gaussian_params = m.entropy_parameters(torch.cat((params[:, :, h : h + 1, w : w + 1], ctx), dim=1))
                _, means = gaussian_params.chunk(2, 1)
                y_hw = y[:, :, h : h + 1, w : w + 1]
                y_hat[:, :, h + p : h + p + 1, w + p : w + p + 1] = torch.round(y_hw - means) + means
        return y_hat[:, :, p : p + H, p : p + W]

    def _quantize_elic(self, y):
        # compressai's eval forward (HyperpriorLatentCodec -> ChannelGroupsLatentCodec ->
        # CheckerboardLatentCodec "twopass") without the likelihoods.
        lc_hyper, lc_y = self.model.latent_codec["hyper"], self.model.latent_codec["y"]
        side_params = self._z_hat_params(y, lc_hyper)
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
        shape = out["shape"]["hyper"] if self.family == "elic" else out["shape"]
        return CompressedLatent(strings=strings, shape=tuple(int(s) for s in shape))

    def decompress_latent(self, strings, shape) -> torch.Tensor:
        """Entropy-decode :meth:`compress`'s output to the dequantised latent y_hat (1, M, h, w)."""
        nested, shape = self._unflatten(strings, shape)
        m = self.model
        try:
            with torch.no_grad():
                if self.family == "factorized":
                    return m.entropy_bottleneck.decompress(nested[0], shape)
                if self.family == "elic":
                    return m.latent_codec.decompress(nested, shape)["y_hat"]
                z_hat = m.entropy_bottleneck.decompress(nested[1], shape)
                params = m.h_s(z_hat)
                if self.family == "hyperprior":
                    indexes = m.gaussian_conditional.build_indexes(params)
                    return m.gaussian_conditional.decompress(nested[0], indexes, z_hat.dtype)
                if self.family == "mean-scale":
                    scales, means = params.chunk(2, 1)
                    indexes = m.gaussian_conditional.build_indexes(scales)
                    return m.gaussian_conditional.decompress(nested[0], indexes, means=means)
                return self._decompress_autoregressive(nested[0][0], z_hat, params)
        except (ValueError, RuntimeError, AssertionError, IndexError, TypeError, OverflowError) as exc:
            raise BitstreamError(f"{self.name}: entropy decoding failed: {exc}") from exc

    def _decompress_autoregressive(self, y_string, z_hat, params):
        # As JointAutoregressiveHierarchicalPriors.decompress, minus g_s.
        m = self.model
        k = m.context_prediction.kernel_size[0]
        p = k // 2
        h, w = 4 * z_hat.shape[2], 4 * z_hat.shape[3]  # y is 4x z in both directions
        y_hat = torch.zeros((1, m.M, h + 2 * p, w + 2 * p), device=z_hat.device)
        m._decompress_ar(y_string, y_hat, params, h, w, k, p)
        return y_hat[:, :, p : p + h, p : p + w]

    def decompress(self, strings, shape) -> torch.Tensor:
        """Decode to the image in [0, 1]: equals compressai's ``model.decompress(...)["x_hat"]`` (clamped)."""
        y_hat = self.decompress_latent(strings, shape)
        with torch.no_grad():
            return self.synthesis(y_hat).clamp_(0, 1)

    def _num_strings(self) -> int:
        if self.family == "factorized":
            return 1
        if self.family == "elic":
            return 2 * len(self.model.latent_codec["y"].groups) + 1
        return 2

    def _unflatten(self, strings, shape):
        """Flat strings and shape -> the arguments of compressai's decoders (BitstreamError if malformed)."""
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, (bytes, bytearray)) for s in strings):
            raise BitstreamError(f"{self.name}: latent strings must be a list of bytes")
        strings = [bytes(s) for s in strings]
        if len(strings) != self._num_strings():
            raise BitstreamError(f"{self.name}: expected {self._num_strings()} latent strings, got {len(strings)}")
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
        shape = tuple(shape)
        nested = [[s] for s in strings]
        if self.family == "elic":
            y_size = (4 * shape[0], 4 * shape[1])  # y is 4x z for padded images
            groups = self.model.latent_codec["y"].groups
            shape = {"y": [(g, *y_size) for g in groups], "hyper": shape}
        return nested, shape


def _even_mask(H: int, W: int, device) -> torch.Tensor:
    """(H, W) bool, True where i + j is even (the checkerboard anchors of anchor_parity "even")."""
    rows = torch.arange(H, device=device)[:, None]
    cols = torch.arange(W, device=device)[None, :]
    return (rows + cols) % 2 == 0


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _unknown_name(name) -> str:
    return f"unknown codec {name!r}; known codecs: {', '.join(KNOWN_CODECS)}"


# --- loading --------------------------------------------------------------------------------------


def load_codec(
    name: str,
    quality: Optional[int] = None,
    checkpoint=None,
    pretrained: bool = False,
    *,
    device=None,
    random_init: bool = False,
    sha256: Optional[str] = None,
) -> Codec:
    """Build codec ``name`` (one of :data:`KNOWN_CODECS`) with its weights.

    Exactly one weight source:

    * ``checkpoint``: a path or a state_dict mapping, read safely (``torch.load(weights_only=True)``).
      Any compressai version's state_dict, or an ELiC-ReImplemetation ``TestModel`` checkpoint for
      ``elic2022-chandelier`` (see :mod:`idemrt.models.codec_convert`). The architecture widths are
      inferred from the tensors; ``quality`` is only recorded.
    * ``pretrained=True``: compressai's MSE model-zoo weights for ``quality`` (downloads; hash checked).
      The zoo has no ELIC weights.
    * ``random_init=True``: untrained weights (tests, benchmarks) with the zoo widths of ``quality``
      (ELIC: N=192, M=320).

    ``sha256`` pins the checkpoint file's digest (full or a prefix of >= 8 hex digits); files named
    the compressai-zoo way (``...-HASH8.pth.tar``) are checked against their name's prefix anyway.

    CDF tables missing from the checkpoint are computed (``update(force=True)``). Raises
    :class:`idemrt.CheckpointError` for unknown names, missing weights and checkpoints that do not fit.
    """
    if name not in _ARCHS:
        raise CheckpointError(_unknown_name(name))
    arch = _ARCHS[name]
    sources = [s for s, on in (("checkpoint", checkpoint is not None), ("pretrained", pretrained),
                               ("random_init", random_init)) if on]
    if len(sources) != 1:
        raise CheckpointError(
            f"{name}: give exactly one weight source (checkpoint=PATH, pretrained=True to download "
            f"compressai's zoo weights, or random_init=True for tests), got {sources or 'none'}"
        )
    if quality is not None and (not isinstance(quality, int) or isinstance(quality, bool) or quality < 1):
        raise CheckpointError(f"{name}: quality must be a positive int, got {quality!r}")

    if random_init:
        model = arch.cls(**_zoo_widths(name, quality))
        model.update(force=True)
    else:
        state = _download(name, quality) if pretrained else checkpoint_io.load_state_dict(checkpoint, sha256)
        model = _model_from_state_dict(name, state)

    codec = Codec(name, model, quality=quality)
    codec.weights_hash()
    if device is not None:
        codec.to(device)
    return codec


def _zoo_widths(name: str, quality: Optional[int]) -> dict:
    if name not in _ZOO_WIDTHS:  # ELIC: compressai's default widths, as released
        return {}
    if quality not in _ZOO_WIDTHS[name]:
        raise CheckpointError(f"{name}: quality must be one of {sorted(_ZOO_WIDTHS[name])}, got {quality!r}")
    widths = _ZOO_WIDTHS[name][quality]
    return dict(zip(("N", "M"), widths))


def _download(name: str, quality: Optional[int]) -> dict:
    urls = _ZOO_URLS.get(name, {}).get("mse", {})
    if not urls:
        raise CheckpointError(
            f"{name}: compressai's model zoo has no pretrained weights for it; pass checkpoint=PATH "
            "(ELiC-ReImplemetation checkpoints are converted automatically)"
        )
    if quality not in urls:
        raise CheckpointError(f"{name}: pretrained quality must be one of {sorted(urls)}, got {quality!r}")
    try:
        state = torch.hub.load_state_dict_from_url(
            urls[quality], map_location="cpu", check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{name}: could not download {urls[quality]}: {exc}") from None
    return checkpoint_io.unwrap_state_dict(state)


def _model_from_state_dict(name: str, state: dict) -> nn.Module:
    arch = _ARCHS[name]
    hint = ""
    detected = detect_codec_name(state)
    if detected is not None and detected != name:
        hint = f" (the checkpoint looks like a {detected!r} model)"
    if is_elic_reimpl(state) and name != "elic2022-chandelier":
        raise CheckpointError(f"{name}: an ELiC-ReImplemetation checkpoint is an 'elic2022-chandelier' model{hint}")

    state = normalize_state_dict(state, _installed_style())
    try:
        widths = arch.widths(state)
    except KeyError as exc:
        raise CheckpointError(f"{name}: checkpoint lacks {exc.args[0]!r}, needed to size the model{hint}") from None
    try:
        model = arch.cls(**widths)
    except (ValueError, RuntimeError, AssertionError, TypeError) as exc:
        raise CheckpointError(f"{name}: cannot build the model with widths {widths}{hint}: {exc}") from None

    expected = model.state_dict()
    cdf_keys = {k for k in expected if k.rsplit(".", 1)[-1] in _CDF_BUFFERS}
    try:
        checkpoint_io.check_keys(
            {k: v for k, v in state.items() if k not in cdf_keys},
            {k: tuple(v.shape) for k, v in expected.items() if k not in cdf_keys},
            name,
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{hint}") from None
    masks = {k: v.clone() for k, v in expected.items() if k.endswith(".mask")}

    try:
        if all(k in state and state[k].numel() > 0 for k in cdf_keys):
            _check_cdf_tables(state, cdf_keys, name)
            model.load_state_dict(state)  # compressai's: resizes the CDF buffers first
        else:
            static = {k: v for k, v in state.items() if k not in cdf_keys}
            nn.Module.load_state_dict(model, static, strict=False)  # only CDF buffers are missing (checked)
            model.update(force=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{name}: cannot load the checkpoint: {exc}") from None

    loaded = model.state_dict()
    wrong = [k for k, mask in masks.items() if not torch.equal(loaded[k], mask)]
    if wrong:
        raise CheckpointError(f"{name}: context-model masks differ from the architecture's: {', '.join(wrong)}")
    return model


@functools.cache
def _installed_style() -> str:
    """How the installed compressai spells entropy-bottleneck parameters (from a tiny instance)."""
    return entropy_bottleneck_style(FactorizedPrior(1, 1).state_dict())


def _check_cdf_tables(state: dict, cdf_keys: set, name: str) -> None:
    """Reject CDF tables whose sizes disagree: the C++ entropy coder does not bounds-check them."""
    for prefix in {k.rsplit(".", 1)[0] for k in cdf_keys}:
        cdf = state[f"{prefix}._quantized_cdf"]
        rows = cdf.shape[0] if cdf.dim() == 2 else -1
        ok = cdf.dim() == 2 and not cdf.is_floating_point()
        for buf in ("_offset", "_cdf_length", "scale_table"):
            t = state.get(f"{prefix}.{buf}")
            if t is not None:
                ok = ok and t.dim() == 1 and t.shape[0] == rows
        lengths = state[f"{prefix}._cdf_length"]
        ok = ok and not lengths.is_floating_point() and bool(((lengths >= 2) & (lengths <= cdf.shape[-1])).all())
        if not ok:
            raise CheckpointError(f"{name}: inconsistent CDF tables under {prefix!r}")


def diffusion_operator(codec: Codec, domain: str = "x"):
    """The idempotence operator A in the diffusion model's units, as the reference forms it.

    x0 lives in [-1, 1]. "x": ``2·codec.operator((x0+1)/2, "x") - 1``, i.e. 2·g_s(round_ste(g_a)) - 1,
    not clamped; "y": ``codec.operator((x0+1)/2, "y")``, the straight-through rounded latent.
    Every backend builds A with this one function.
    """
    if domain not in ("x", "y"):
        raise ValueError(f"domain must be 'x' or 'y', got {domain!r}")

    def operator(x0: torch.Tensor) -> torch.Tensor:
        out = codec.operator((x0 + 1) / 2, domain=domain)
        return 2 * out - 1 if domain == "x" else out

    return operator
