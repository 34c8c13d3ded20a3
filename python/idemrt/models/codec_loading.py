"""Build an MSE :class:`~idemrt.models.codec.Codec` with its weights, and convert codec checkpoints.

:func:`load_codec` builds one of compressai's image models (:data:`~idemrt.models.codec.KNOWN_CODECS`)
with weights from compressai's model zoo (``pretrained=True``, downloads), from a local checkpoint,
or (tests, benchmarks) at random. :func:`convert_checkpoint` writes the normalised, fully loaded
(CDF tables included) state_dict of a codec, readable by ``compressai.models.*.from_state_dict``, as a
safetensors file (or, for ``.pt``/``.pth`` names, a ``torch.load(weights_only=True)`` one).

Checkpoints accepted on input (all are normalised by :func:`normalize_state_dict`):

* compressai state_dicts of any version. The entropy-bottleneck parameters have had three
  spellings: ``_matrices.{i}`` / ``_biases.{i}`` / ``_factors.{i}`` (compressai 1.0.x, which wrote the
  model-zoo "v1" files), ``_matrix{i}`` / ``_bias{i}`` / ``_factor{i}`` (1.1 - 1.2.6) and
  ``matrices.{i}`` / ``biases.{i}`` / ``factors.{i}`` (>= 1.2.7). They are renamed to the spelling of
  the installed compressai. DataParallel ``module.`` prefixes and the old ``.downsample.`` name of
  ``ResidualBlockWithStride.skip`` are handled like compressai's zoo loader does.
* ELiC-ReImplemetation ``TestModel`` checkpoints (VincentChandelier/ELiC-ReImplemetation, used by the
  Idempotence paper's "elic" operator). They are recognised by their ``ParamAggregation.*`` /
  ``cc_transforms.*`` keys and renamed onto compressai's ``Elic2022Chandelier``: the layers are identical
  and no tensor needs a transpose or reshape; only the single ``gaussian_conditional`` buffer set is
  copied into each of the per-group Gaussian conditionals. The key layout of both lives in one
  table, :data:`_ELIC_KEYS`.

This module imports :mod:`idemrt.models.codec`, never the reverse: the codec knows nothing of files.
"""
from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn as nn
from compressai.models import FactorizedPrior
from compressai.zoo.image import cfgs as _ZOO_WIDTHS
from compressai.zoo.image import model_urls as _ZOO_URLS

from ..errors import CheckpointError
from ..fileio import check_output_path
from . import checkpoint_io
from .codec import Codec, architecture

__all__ = [
    "FLAT_STYLE",
    "LIST_STYLE",
    "convert_checkpoint",
    "convert_elic_reimpl",
    "detect_codec_name",
    "entropy_bottleneck_style",
    "is_elic_reimpl",
    "load_codec",
    "normalize_entropy_bottleneck_keys",
    "normalize_state_dict",
    "strip_wrappers",
]

# Buffers whose size is set by update() / the checkpoint rather than by the architecture.
_CDF_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")

# --- entropy-bottleneck parameter spellings -------------------------------------------------------

_EB_KEY = re.compile(
    r"^(?P<prefix>(?:.+\.)?entropy_bottleneck)\."
    r"(?:_(?P<old>matrices|biases|factors)\.(?P<i_old>\d+)"  # compressai 1.0.x
    r"|_(?P<flat>matrix|bias|factor)(?P<i_flat>\d+)"  # compressai 1.1 - 1.2.6
    r"|(?P<new>matrices|biases|factors)\.(?P<i_new>\d+))$"  # compressai >= 1.2.7
)
_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}
_SINGULAR = {v: k for k, v in _PLURAL.items()}

# Styles of the entropy-bottleneck parameter names.
LIST_STYLE = "list"  # matrices.{i}
FLAT_STYLE = "flat"  # _matrix{i}


def entropy_bottleneck_style(keys) -> str:
    """The spelling used by a (model's) state_dict: ``"list"`` or ``"flat"``."""
    return FLAT_STYLE if any(_EB_KEY.match(k) and "._matrix" in k for k in keys) else LIST_STYLE


def normalize_entropy_bottleneck_keys(state: Mapping[str, torch.Tensor], style: str = LIST_STYLE) -> dict:
    """Rename every entropy-bottleneck parameter, whatever its spelling, to ``style``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _EB_KEY.match(key)
        if m:
            plural = m["old"] or m["new"] or _PLURAL[m["flat"]]
            index = m["i_old"] or m["i_new"] or m["i_flat"]
            if style == LIST_STYLE:
                key = f"{m['prefix']}.{plural}.{index}"
            else:
                key = f"{m['prefix']}._{_SINGULAR[plural]}{index}"
        if key in out:
            raise CheckpointError(f"checkpoint holds the same entropy-bottleneck tensor twice (as {key!r})")
        out[key] = value
    return out


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict:
    """Undo DataParallel prefixes and compressai's ``downsample`` -> ``skip`` rename (as its zoo loader does)."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k.replace(".downsample.", ".skip."): v for k, v in state.items()}


@functools.cache
def _installed_style() -> str:
    """How the installed compressai spells entropy-bottleneck parameters (from a tiny instance)."""
    return entropy_bottleneck_style(FactorizedPrior(1, 1).state_dict())


# --- the ELIC key layout ------------------------------------------------------------------------------

# role: (ELiC-ReImplemetation TestModel key pattern, compressai Elic2022* key template). {k} is the
# channel group of the compressai key, {rest} the tail both keys share.
_ELIC_KEYS = {
    "transforms": (r"(?P<rest>(?:g_a|g_s)\..+)", "{rest}"),
    "hyper": (r"(?P<rest>(?:h_a|h_s|entropy_bottleneck)\..+)", "latent_codec.hyper.{rest}"),
    # cc_transforms[j] predicts group j + 1 from the already decoded groups.
    "channel_context": (r"cc_transforms\.(?P<j>\d+)\.(?P<rest>.+)", "latent_codec.y.channel_context.y{k}.{rest}"),
    "spatial_context": (r"context_prediction\.(?P<k>\d+)\.(?P<rest>.+)",
                        "latent_codec.y.latent_codec.y{k}.context_prediction.{rest}"),
    "entropy_parameters": (r"ParamAggregation\.(?P<k>\d+)\.(?P<rest>.+)",
                           "latent_codec.y.latent_codec.y{k}.entropy_parameters.{rest}"),
    # TestModel has one set of Gaussian-conditional buffers, compressai one per group: copied to all.
    "gaussian_conditional": (r"gaussian_conditional\.(?P<rest>.+)",
                             "latent_codec.y.latent_codec.y{k}.y.gaussian_conditional.{rest}"),
}
_ELIC_PATTERNS = {role: re.compile(pattern) for role, (pattern, _) in _ELIC_KEYS.items()}
# Keys only a TestModel has.
_ELIC_REIMPL_MARKERS = ("ParamAggregation.", "cc_transforms.")


def _elic_key(role: str, k, rest: str) -> str:
    """The compressai Elic2022* key of ``role`` for channel group ``k``."""
    return _ELIC_KEYS[role][1].format(k=k, rest=rest)


def is_elic_reimpl(state: Mapping[str, torch.Tensor]) -> bool:
    """True for an ELiC-ReImplemetation ``TestModel`` state_dict."""
    return any(k.startswith(_ELIC_REIMPL_MARKERS) for k in state)


def convert_elic_reimpl(state: Mapping[str, torch.Tensor]) -> dict:
    """Rename a ``TestModel`` state_dict onto ``Elic2022Chandelier`` (entropy bottleneck in list style).

    Tensors are shared, not copied; the one ``gaussian_conditional`` buffer set goes to every group.
    """
    state = normalize_entropy_bottleneck_keys(state, LIST_STYLE)
    matches = {key: _elic_match(key) for key in state}
    num_groups = sum(1 for m in matches.values() if m and m[0] == "spatial_context" and m[1]["rest"] == "weight")
    out: dict[str, torch.Tensor] = {}
    unknown = [key for key, m in matches.items() if m is None]
    if unknown:
        raise CheckpointError(
            "ELiC-ReImplemetation checkpoint: keys without a counterpart in Elic2022Chandelier: "
            + ", ".join(unknown[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        )
    for key, (role, groups) in matches.items():
        if role == "gaussian_conditional":
            targets = [_elic_key(role, k, groups["rest"]) for k in range(num_groups)]
        else:
            k = int(groups["j"]) + 1 if groups.get("j") is not None else groups.get("k")
            targets = [_elic_key(role, k, groups["rest"])]
        for target in targets:
            out[target] = state[key]
    return out


def _elic_match(key: str) -> Optional[tuple[str, dict]]:
    for role, pattern in _ELIC_PATTERNS.items():
        m = pattern.fullmatch(key)
        if m:
            return role, m.groupdict()
    return None


def _elic_groups(state: Mapping[str, torch.Tensor]) -> list[int]:
    """The channel-group widths of a compressai ELIC state_dict (from the spatial-context convolutions)."""
    groups = []
    while (key := _elic_key("spatial_context", len(groups), "weight")) in state:
        groups.append(state[key].shape[1])
    return groups


def _elic_widths(state) -> dict:
    groups = _elic_groups(state)
    if not groups:
        raise KeyError(_elic_key("spatial_context", 0, "weight"))
    N, M = state["g_a.0.weight"].shape[0], state["g_a.13.weight"].shape[0]
    if sum(groups) != M:
        raise CheckpointError(f"ELIC checkpoint: channel groups {groups} do not add up to M = {M}")
    return {"N": N, "M": M, "groups": groups}


def _is_elic(state: Mapping[str, torch.Tensor]) -> bool:
    return _elic_key("channel_context", 1, "0.weight") in state


def _elic_variant(state: Mapping[str, torch.Tensor]) -> str:
    # Elic2022Official's channel context of group k reads all previous groups; Chandelier's reads
    # only the first and the latest one. The two agree for k <= 2, so look at the last group.
    groups = _elic_groups(state)
    k = len(groups) - 1
    key = _elic_key("channel_context", k, "0.weight")
    if k >= 3 and key in state and state[key].shape[1] == sum(groups[:k]) != groups[0] + groups[k - 1]:
        return "elic2022-official"
    return "elic2022-chandelier"


# --- whole state_dicts ----------------------------------------------------------------------------


def normalize_state_dict(state: Mapping[str, torch.Tensor], style: str = LIST_STYLE) -> dict:
    """Any accepted format -> compressai key names, entropy-bottleneck parameters spelled ``style``."""
    state = strip_wrappers(state)
    if is_elic_reimpl(state):
        state = convert_elic_reimpl(state)
    return normalize_entropy_bottleneck_keys(state, style)


def detect_codec_name(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Guess the compressai model name of a state_dict from its keys (None if unrecognised)."""
    state = strip_wrappers(state)
    if is_elic_reimpl(state):
        return "elic2022-chandelier"
    state = normalize_entropy_bottleneck_keys(state, LIST_STYLE)
    if _is_elic(state):
        return _elic_variant(state)
    if "g_a.0.conv1.weight" in state and "context_prediction.weight" in state:
        # Cheng2020Attention has an attention block at g_a[3], the anchor a residual block.
        return "cheng2020-attn" if any(k.startswith("g_a.3.conv_a.") for k in state) else "cheng2020-anchor"
    if "context_prediction.weight" in state and "g_a.6.weight" in state:
        return "mbt2018"
    if "h_s.4.weight" in state and "g_a.6.weight" in state:
        # The mean-scale h_s ends in a conv to 2M channels (means and scales), the scale-only one to M.
        M = state["g_a.6.weight"].shape[0]
        return "mbt2018-mean" if state["h_s.4.weight"].shape[0] == 2 * M else "bmshj2018-hyperprior"
    if "g_a.6.weight" in state and "entropy_bottleneck.quantiles" in state:
        return "bmshj2018-factorized"
    return None


def _nm_widths(state) -> dict:
    return {"N": state["g_a.0.weight"].shape[0], "M": state["g_a.6.weight"].shape[0]}


def _cheng_widths(state) -> dict:
    return {"N": state["g_a.0.conv1.weight"].shape[0]}


# Constructor arguments of each model, inferred from a (normalised) state_dict; one entry per
# name of idemrt.models.codec.ARCHITECTURES (tests/test_codec_loading.py checks).
_WIDTHS: dict[str, Callable[[Mapping], dict]] = {
    "bmshj2018-factorized": _nm_widths,
    "bmshj2018-hyperprior": _nm_widths,
    "mbt2018-mean": _nm_widths,
    "mbt2018": _nm_widths,
    "cheng2020-anchor": _cheng_widths,
    "cheng2020-attn": _cheng_widths,
    "elic2022-official": _elic_widths,
    "elic2022-chandelier": _elic_widths,
}


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
    """Build codec ``name`` (one of :data:`~idemrt.models.codec.KNOWN_CODECS`) with its weights.

    Exactly one weight source:

    * ``checkpoint``: a path or a state_dict mapping, read safely: a safetensors file with
      ``safetensors.torch.load_file``, a PyTorch one with ``torch.load(weights_only=True)`` (told
      apart by content, not name).
      Any compressai version's state_dict, or an ELiC-ReImplemetation ``TestModel`` checkpoint for
      ``elic2022-chandelier`` (see the module docstring). The architecture widths are inferred from
      the tensors; ``quality`` is only recorded.
    * ``pretrained=True``: compressai's MSE model-zoo weights for ``quality`` (downloads; hash checked).
      The zoo has no ELIC weights.
    * ``random_init=True``: untrained weights (tests, benchmarks) with the zoo widths of ``quality``
      (ELIC: N=192, M=320).

    ``sha256`` pins the checkpoint file's digest (full or a prefix of >= 8 hex digits); files named
    the compressai-zoo way (``...-HASH8.pth.tar``) are checked against their name's prefix anyway.

    CDF tables missing from the checkpoint are computed (``update(force=True)``). Raises
    :class:`idemrt.CheckpointError` for unknown names, missing weights and checkpoints that do not fit.
    """
    arch = architecture(name)
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
    hint = ""
    detected = detect_codec_name(state)
    if detected is not None and detected != name:
        hint = f" (the checkpoint looks like a {detected!r} model)"
    if is_elic_reimpl(state) and name != "elic2022-chandelier":
        raise CheckpointError(f"{name}: an ELiC-ReImplemetation checkpoint is an 'elic2022-chandelier' model{hint}")

    state = normalize_state_dict(state, _installed_style())
    model = _build(name, state, hint)
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


def _build(name: str, state: dict, hint: str) -> nn.Module:
    """The untrained model ``name`` with the widths of the (normalised) ``state``."""
    try:
        widths = _WIDTHS[name](state)
    except KeyError as exc:
        raise CheckpointError(f"{name}: checkpoint lacks {exc.args[0]!r}, needed to size the model{hint}") from None
    try:
        return architecture(name).cls(**widths)
    except (ValueError, RuntimeError, AssertionError, TypeError) as exc:
        raise CheckpointError(f"{name}: cannot build the model with widths {widths}{hint}: {exc}") from None


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


# --- conversion -----------------------------------------------------------------------------------


def convert_checkpoint(src, dst, name: Optional[str] = None, *, force: bool = False,
                       fmt: Optional[str] = None) -> str:
    """Read checkpoint ``src`` (any accepted format), write a current compressai state_dict to ``dst``.

    ``name`` is the compressai model name; detected from the keys when omitted. The codec is fully
    loaded first (key and shape checks, CDF tables computed when the checkpoint lacks them), so the
    written file loads strictly with ``compressai.models.<Model>.from_state_dict``.

    ``dst`` is written as safetensors (``safetensors.torch.load_file`` reads it; no pickle), unless
    ``fmt="torch"`` or its name ends in ``.pt``, ``.pth``, ``.pth.tar`` (... see
    :data:`~idemrt.models.checkpoint_io.TORCH_SUFFIXES`): then ``torch.save``'s format, readable with
    ``torch.load(weights_only=True)``. The file is written atomically; an existing ``dst`` is replaced
    only with ``force``. Returns ``name``.
    """
    inputs = [] if isinstance(src, Mapping) else [src]
    fmt = checkpoint_io.output_format(dst, fmt)
    check_output_path(dst, force=force, inputs=inputs)
    state = checkpoint_io.load_state_dict(src)
    if name is None:
        name = detect_codec_name(state)
        if name is None:
            raise CheckpointError(f"{os.fspath(src) if not isinstance(src, Mapping) else 'state_dict'}: "
                                  "cannot tell which codec this checkpoint is for; pass its name")
    codec = load_codec(name, checkpoint=state)
    checkpoint_io.save_state_dict(codec.model.state_dict(), dst, fmt=fmt, force=force, inputs=inputs,
                                  metadata={"codec": name})
    return name
