"""Checkpoint formats of the MSE codecs, and their conversion to current compressai state_dicts.

Accepted on input (all are normalised by :func:`normalize_state_dict`):

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
  copied into each of the per-group Gaussian conditionals.

:func:`convert_checkpoint` writes the normalised, fully loaded (CDF tables included) state_dict of a
codec, readable by ``compressai.models.*.from_state_dict`` and ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Optional

import torch

from ..errors import CheckpointError

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


# --- ELiC-ReImplemetation TestModel -> compressai Elic2022Chandelier -------------------------------

_ELIC_REIMPL_MARKERS = ("ParamAggregation.", "cc_transforms.")

# (source pattern, target template); {k} is the channel-group index of the target, {rest} the tail.
_ELIC_RULES = (
    (re.compile(r"^(?P<rest>(?:g_a|g_s)\..+)$"), "{rest}"),
    (re.compile(r"^(?P<rest>(?:h_a|h_s|entropy_bottleneck)\..+)$"), "latent_codec.hyper.{rest}"),
    # cc_transforms[j] predicts group j + 1 from the already decoded groups.
    (re.compile(r"^cc_transforms\.(?P<j>\d+)\.(?P<rest>.+)$"), "latent_codec.y.channel_context.y{k}.{rest}"),
    (re.compile(r"^context_prediction\.(?P<k>\d+)\.(?P<rest>.+)$"),
     "latent_codec.y.latent_codec.y{k}.context_prediction.{rest}"),
    (re.compile(r"^ParamAggregation\.(?P<k>\d+)\.(?P<rest>.+)$"),
     "latent_codec.y.latent_codec.y{k}.entropy_parameters.{rest}"),
)
_ELIC_GAUSSIAN = re.compile(r"^gaussian_conditional\.(?P<rest>.+)$")
_ELIC_GAUSSIAN_TARGET = "latent_codec.y.latent_codec.y{k}.y.gaussian_conditional.{rest}"


def is_elic_reimpl(state: Mapping[str, torch.Tensor]) -> bool:
    """True for an ELiC-ReImplemetation ``TestModel`` state_dict."""
    return any(k.startswith(_ELIC_REIMPL_MARKERS) for k in state)


def convert_elic_reimpl(state: Mapping[str, torch.Tensor]) -> dict:
    """Rename a ``TestModel`` state_dict onto ``Elic2022Chandelier`` (entropy bottleneck in list style).

    Tensors are shared, not copied; the one ``gaussian_conditional`` buffer set goes to every group.
    """
    state = normalize_entropy_bottleneck_keys(state, LIST_STYLE)
    num_groups = sum(1 for k in state if re.fullmatch(r"context_prediction\.\d+\.weight", k))
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        targets = _elic_targets(key, num_groups)
        if not targets:
            unknown.append(key)
        for target in targets:
            out[target] = value
    if unknown:
        raise CheckpointError(
            "ELiC-ReImplemetation checkpoint: keys without a counterpart in Elic2022Chandelier: "
            + ", ".join(unknown[:10]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        )
    return out


def _elic_targets(key: str, num_groups: int) -> list[str]:
    for pattern, template in _ELIC_RULES:
        m = pattern.match(key)
        if m:
            groups = m.groupdict()
            k = int(groups["j"]) + 1 if groups.get("j") is not None else groups.get("k")
            return [template.format(k=k, rest=groups["rest"])]
    m = _ELIC_GAUSSIAN.match(key)
    if m:
        return [_ELIC_GAUSSIAN_TARGET.format(k=k, rest=m["rest"]) for k in range(num_groups)]
    return []


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
    if "latent_codec.y.channel_context.y1.0.weight" in state:
        return _detect_elic_variant(state)
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


def _detect_elic_variant(state: Mapping[str, torch.Tensor]) -> str:
    # Elic2022Official's channel context of group k reads all previous groups; Chandelier's reads
    # only the first and the latest one. The two agree for k <= 2, so look at the last group.
    groups = []
    while f"latent_codec.y.latent_codec.y{len(groups)}.context_prediction.weight" in state:
        groups.append(state[f"latent_codec.y.latent_codec.y{len(groups)}.context_prediction.weight"].shape[1])
    k = len(groups) - 1
    key = f"latent_codec.y.channel_context.y{k}.0.weight"
    if k >= 3 and key in state and state[key].shape[1] == sum(groups[:k]) != groups[0] + groups[k - 1]:
        return "elic2022-official"
    return "elic2022-chandelier"


def convert_checkpoint(src, dst, name: Optional[str] = None, *, force: bool = False) -> str:
    """Read checkpoint ``src`` (any accepted format), write a current compressai state_dict to ``dst``.

    ``name`` is the compressai model name; detected from the keys when omitted. The codec is fully
    loaded first (key and shape checks, CDF tables computed when the checkpoint lacks them), so the
    written file loads strictly with ``compressai.models.<Model>.from_state_dict``. The file is written
    atomically; an existing ``dst`` is replaced only with ``force``. Returns ``name``.
    """
    from ..fileio import atomic_writer, check_output_path
    from .checkpoint_io import load_state_dict
    from .codec import load_codec

    inputs = [] if isinstance(src, Mapping) else [src]
    check_output_path(dst, force=force, inputs=inputs)
    state = load_state_dict(src)
    if name is None:
        name = detect_codec_name(state)
        if name is None:
            raise CheckpointError(f"{os.fspath(src) if not isinstance(src, Mapping) else 'state_dict'}: "
                                  "cannot tell which codec this checkpoint is for; pass its name")
    codec = load_codec(name, checkpoint=state)
    out = {k: v.detach().to("cpu").clone() for k, v in codec.model.state_dict().items()}

    with atomic_writer(dst, force=force, inputs=inputs) as f:
        torch.save(out, f)
    return name
