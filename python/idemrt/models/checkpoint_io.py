"""Safe checkpoint reading (and writing) shared by the UNet and codec loaders.

Two file formats are read, told apart by their content, not their name:

* safetensors (``.safetensors``; an 8-byte little-endian header length, a JSON header, raw tensor
  bytes), read with ``safetensors.torch.load_file``: no pickle is involved at all. This is the
  format idemrt writes (:func:`save_state_dict`).
* PyTorch checkpoints (``.pt``, ``.pth``, ``.pth.tar``: zip or legacy pickles), read only with
  ``torch.load(weights_only=True)``: a pickle that would execute code is refused with
  :class:`idemrt.CheckpointError` instead of being run.

A file that is neither, or a damaged one, is refused with :class:`idemrt.CheckpointError`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import torch

from ..errors import CheckpointError

SAFETENSORS = "safetensors"
TORCH = "torch"
# Output names that keep the PyTorch (pickle) format in save_state_dict; anything else is safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".tar", ".bin", ".ckpt")
# The safetensors library refuses headers above 100 MB; so does this reader, before parsing them.
_MAX_SAFETENSORS_HEADER = 100_000_000

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


def checkpoint_format(path) -> str:
    """``"safetensors"`` or ``"torch"``: what the file at ``path`` is, judged by its first bytes.

    A PyTorch zip (``PK\\x03\\x04``) is torch; a JSON object after the 8-byte length is safetensors;
    a pickle (``\\x80`` and a protocol number) is torch. Files that are none of these are judged by
    their name (``.safetensors``), so that a damaged safetensors file gets a safetensors diagnosis,
    and otherwise go to the weights-only PyTorch reader, which refuses them.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return TORCH
    if len(head) == 9 and head[8:9] == b"{":
        return SAFETENSORS
    if len(head) == 9 and head[0] == 0x80 and 1 <= head[1] <= 5:  # PROTO opcode and a known protocol
        return TORCH
    return SAFETENSORS if os.fspath(path).endswith(".safetensors") else TORCH


def _check_safetensors_layout(path: str) -> None:
    """Refuse a safetensors file whose header length, header JSON or data extent is wrong, with a
    message that says which (the library's own errors are terse)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, less than its header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _MAX_SAFETENSORS_HEADER:
            raise CheckpointError(
                f"{path}: bad safetensors header length {n} (the file has {size - 8} bytes after it); "
                "the file is truncated or corrupt"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file: its header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {key!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its tensors need {8 + n + end} bytes, the file has {size}"
        )


def _read_safetensors(path: str) -> dict:
    import safetensors.torch
    from safetensors import SafetensorError

    _check_safetensors_layout(path)
    try:
        # pread: tensors in private memory, like torch.load's, not views of a memory map that
        # would change with the file after its sha256 was checked.
        try:
            return dict(safetensors.torch.load_file(path, device="cpu", backend="pread"))
        except TypeError:  # a safetensors without the backend argument: copy out of the map
            return {k: v.clone() for k, v in safetensors.torch.load_file(path, device="cpu").items()}
    except (SafetensorError, ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load; corrupt safetensors file: {detail}") from None


def read_checkpoint(source, sha256: str | None = None, *, name_pin: bool = True) -> dict:
    """Return the raw object stored in a checkpoint file (or ``source`` if it is a mapping).

    safetensors files are read with ``safetensors.torch.load_file``, others with
    ``torch.load(weights_only=True)`` (see :func:`checkpoint_format`).
    ``sha256``, ``name_pin``: optional pin of the file's digest (see :func:`verify_sha256`).
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    verify_sha256(path, sha256, name_pin=name_pin)
    if checkpoint_format(path) == SAFETENSORS:
        return _read_safetensors(path)
    try:
        # A file object, not the path: recent torch.load hands paths named .safetensors to the
        # safetensors reader, and this file was judged by its content to be a PyTorch one.
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only reports both a forbidden global (a pickle that would run code) and plain
        # garbage as UnpicklingError; tell the user which one it is.
        if "GLOBAL" in str(exc) or "global" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load; the file contains Python objects other than tensors "
                f"(only weights_only checkpoints are accepted): {exc}"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load; neither a safetensors file nor a weights-only PyTorch checkpoint "
            f"(the file is corrupt, or holds pickled data other than tensors): {str(exc).strip().splitlines()[-1]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: refused to load; neither a safetensors file nor a weights-only PyTorch checkpoint "
            f"(the file is corrupt, or holds pickled data other than tensors): {str(exc).strip().splitlines()[-1]}"
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


def output_format(path, fmt: str | None = None) -> str:
    """The format :func:`save_state_dict` writes to ``path``: ``fmt`` if given, else ``"torch"`` for
    the PyTorch names (:data:`TORCH_SUFFIXES`) and ``"safetensors"`` for any other."""
    if fmt is None:
        return TORCH if os.fspath(path).lower().endswith(TORCH_SUFFIXES) else SAFETENSORS
    if fmt not in (SAFETENSORS, TORCH):
        raise ValueError(f"checkpoint format must be {SAFETENSORS!r} or {TORCH!r}, got {fmt!r}")
    return fmt


def state_dict_bytes(state: Mapping[str, torch.Tensor], fmt: str = SAFETENSORS,
                     metadata: Mapping[str, str] | None = None) -> bytes:
    """A state_dict serialised as safetensors (default) or a ``torch.save`` file (``fmt="torch"``).

    Tensors are copied to contiguous CPU tensors that share no storage (safetensors refuses
    shared or strided ones). ``metadata`` (str -> str) goes into the safetensors header.
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if output_format("", fmt) == TORCH:
        import io

        buf = io.BytesIO()
        torch.save(tensors, buf)
        return buf.getvalue()
    import safetensors.torch

    return safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)


def save_state_dict(state: Mapping[str, torch.Tensor], path, *, fmt: str | None = None, force: bool = False,
                    inputs=(), metadata: Mapping[str, str] | None = None) -> str:
    """Write ``state`` to ``path`` atomically (:func:`idemrt.fileio.atomic_writer`); returns the format.

    safetensors unless ``fmt="torch"`` or the name ends in a PyTorch suffix (see :func:`output_format`).
    """
    from ..fileio import atomic_writer, check_output_path

    fmt = output_format(path, fmt)
    check_output_path(path, force=force, inputs=inputs)  # before serialising
    data = state_dict_bytes(state, fmt, metadata)
    with atomic_writer(path, force=force, inputs=inputs) as f:
        f.write(data)
    return fmt


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
