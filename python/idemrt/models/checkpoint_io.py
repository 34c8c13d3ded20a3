"""Safe checkpoint reading shared by the UNet and codec loaders.

Only ``torch.load(weights_only=True)`` is used: a pickle that would execute code
is refused with :class:`idemrt.CheckpointError` instead of being run.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

# Common wrappers around a bare state_dict (training scripts, EMA exports, lightning).
_WRAPPER_KEYS = ("state_dict", "model", "ema", "model_state_dict", "net")


# compressai's zoo names its files NAME-HASH8.pth.tar, HASH8 the first 8 hex digits of the sha256.
_ZOO_NAME = re.compile(r"-([0-9a-f]{8})\.pth(\.tar)?$")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path, sha256: str | None = None, *, name_pin: bool = True) -> None:
    """Pin a checkpoint file to its sha256 (a full digest or a prefix of at least 8 hex digits).

    Without ``sha256``, files named the compressai-zoo way (``...-HASH8.pth.tar``) are checked
    against the digest prefix in their name, as compressai's own downloader does, unless
    ``name_pin`` is False (files whose names carry some other hash).
    """
    if sha256 is None:
        if not name_pin:
            return
        match = _ZOO_NAME.search(os.path.basename(os.fspath(path)))
        if match is None:
            return
        sha256 = match.group(1)
    sha256 = sha256.lower()
    if len(sha256) < 8 or not re.fullmatch(r"[0-9a-f]+", sha256):
        raise ValueError(f"sha256 pin must be at least 8 hex digits, got {sha256!r}")
    actual = file_sha256(path)
    if not actual.startswith(sha256):
        raise CheckpointError(
            f"{path}: sha256 {actual[:16]}... does not match the expected {sha256[:16]}...; "
            "the file is corrupt or not the one you meant"
        )


def read_checkpoint(source, sha256: str | None = None, *, name_pin: bool = True) -> dict:
    """Return the raw object stored in a checkpoint file (or ``source`` if it is a mapping).

    ``sha256``, ``name_pin``: optional pin of the file's digest (see :func:`verify_sha256`).
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_sha256(path, sha256, name_pin=name_pin)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only reports both a forbidden global (a pickle that would run code) and plain
        # garbage as UnpicklingError; tell the user which one it is.
        if "GLOBAL" in str(exc) or "global" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load; the file contains Python objects other than tensors "
                f"(only weights_only checkpoints are accepted): {exc}"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load; not a weights-only PyTorch checkpoint (the file is corrupt, or "
            f"holds pickled data other than tensors): {str(exc).strip().splitlines()[-1]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: refused to load; not a weights-only PyTorch checkpoint (the file is corrupt, or "
            f"holds pickled data other than tensors): {str(exc).strip().splitlines()[-1]}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping), found {type(obj).__name__}")
    return dict(obj)


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Strip one level of ``{"state_dict": ...}``-style wrapping and check every value is a tensor."""
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a state_dict: non-tensor entries {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    if not obj:
        raise CheckpointError("empty state_dict")
    return dict(obj)


def load_state_dict(source, sha256: str | None = None, *, name_pin: bool = True) -> dict[str, torch.Tensor]:
    """Read ``source`` (path or mapping) and return a bare ``{name: tensor}`` state_dict."""
    return unwrap_state_dict(read_checkpoint(source, sha256, name_pin=name_pin))


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], what: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{what}: checkpoint does not match the architecture; " + "; ".join(parts))
