"""Native rANS entropy coding, byte-compatible with ``compressai.ans``.

The coder lives in the C++ extension ``idemrt._engine.rans``. It writes exactly the streams of
compressai's ``RansEncoder.encode_with_indexes`` (16-bit CDFs, 64-bit rANS state, 32-bit words,
4-bit bypass coding of values outside a CDF) and reads them back, but it

* takes int32 arrays (numpy, or CPU torch tensors) instead of Python lists,
* validates the CDF table once (:func:`cdf_table`) instead of converting it on every call,
* releases the GIL and codes independent streams on several threads (``*_batch``),
* never reads outside its buffers: a truncated, padded or corrupt stream raises
  :class:`~idemrt.errors.BitstreamError` (compressai's decoder reads past the end).

Symbols whose bypass code would need more than 7 chunks (about 2^27 away from their CDF) raise
``ValueError``; compressai's encoder does not terminate on them.

:func:`install` switches the entropy models of a compressai model to this coder (same bytes).
Without the extension, :func:`install` leaves the model alone and :class:`RansEncoder` /
:class:`RansDecoder` delegate to compressai; the table API raises :class:`BackendError`.
"""
from __future__ import annotations

import copyreg
from typing import Sequence, Union

import numpy as np
import torch
from compressai.entropy_models import EntropyModel
from compressai.entropy_models.entropy_models import _EntropyCoder

from .errors import BackendError, BitstreamError

try:
    from ._engine import rans as _rans
except ImportError:  # extension not built
    _rans = None

__all__ = [
    "available",
    "CdfTable",
    "cdf_table",
    "encode",
    "decode",
    "encode_batch",
    "decode_batch",
    "encode_with_indexes",
    "decode_with_indexes",
    "RansEncoder",
    "RansDecoder",
    "install",
    "uninstall",
]

CdfTable = _rans.CdfTable if _rans is not None else None

_INT32 = np.iinfo(np.int32)


def available() -> bool:
    """Whether the native coder was built."""
    return _rans is not None


def _native():
    if _rans is None:
        raise BackendError("the native rANS coder (idemrt._engine) is not built")
    return _rans


def _int32(x, name: str) -> np.ndarray:
    """C-contiguous int32 array from an integer tensor, array or (nested) sequence.

    No copy for contiguous int32 inputs; other integer types are range-checked, not wrapped.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        x = x.numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int32)
    if arr.dtype != np.int32:
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got {arr.dtype}")
        if arr.min() < _INT32.min or arr.max() > _INT32.max:
            raise ValueError(f"{name} has values outside int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _bytes(string, i: int) -> bytes:
    if isinstance(string, bytes):
        return string
    if isinstance(string, (bytearray, memoryview)):
        return bytes(string)
    raise BitstreamError(f"stream {i} is {type(string).__name__}, not bytes")


def cdf_table(cdfs, cdf_lengths, offsets) -> "CdfTable":
    """Validated CDF table from compressai's ``_quantized_cdf`` [n, max_len] and
    ``_cdf_length`` / ``_offset`` (n entries each; flattened like compressai does).

    Raises ValueError if a CDF does not run strictly increasing from 0 to 2^16 within its
    length, or if the sizes disagree.
    """
    return _native().CdfTable(
        _int32(cdfs, "cdfs"),
        _int32(cdf_lengths, "cdf_lengths").reshape(-1),
        _int32(offsets, "offsets").reshape(-1),
    )


def _tables(tables, n: int) -> list:
    if CdfTable is not None and isinstance(tables, CdfTable):
        return [tables] * n
    tables = list(tables)
    if len(tables) != n:
        raise ValueError(f"got {len(tables)} CDF tables for {n} streams")
    return tables


def encode_batch(
    symbols: Sequence, indexes: Sequence, tables: Union["CdfTable", Sequence["CdfTable"]], num_threads: int = 0
) -> list[bytes]:
    """Encode independent streams in parallel: stream i codes ``symbols[i]`` (any shape) with
    the CDFs ``indexes[i]`` (same number of elements) of ``tables`` (one table, or one per
    stream). ``num_threads <= 0`` uses every hardware thread."""
    syms = [_int32(s, "symbols") for s in symbols]
    idxs = [_int32(i, "indexes") for i in indexes]
    return _native().encode_batch(syms, idxs, _tables(tables, len(syms)), num_threads)


def decode_batch(
    strings: Sequence[bytes], indexes: Sequence, tables: Union["CdfTable", Sequence["CdfTable"]], num_threads: int = 0
) -> list[np.ndarray]:
    """Decode independent streams in parallel; stream i gives int32 symbols shaped like
    ``indexes[i]``. Raises BitstreamError on malformed streams or out-of-range indexes."""
    native = _native()
    strs = [_bytes(s, i) for i, s in enumerate(strings)]
    idxs = [_int32(i, "indexes") for i in indexes]
    if len(idxs) != len(strs):
        raise ValueError(f"got {len(idxs)} index arrays for {len(strs)} streams")
    tables = _tables(tables, len(strs))
    try:
        return native.decode_batch(strs, idxs, tables, num_threads)
    except ValueError as e:
        raise BitstreamError(str(e)) from e


def encode(symbols, indexes, table: "CdfTable") -> bytes:
    """Encode one stream (see :func:`encode_batch`)."""
    return _native().encode(_int32(symbols, "symbols"), _int32(indexes, "indexes"), table)


def decode(string: bytes, indexes, table: "CdfTable") -> np.ndarray:
    """Decode one stream (see :func:`decode_batch`)."""
    native = _native()
    string, indexes = _bytes(string, 0), _int32(indexes, "indexes")
    try:
        return native.decode(string, indexes, table)
    except ValueError as e:
        raise BitstreamError(str(e)) from e


def encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
    """``compressai.ans.RansEncoder().encode_with_indexes`` on arrays."""
    return encode(symbols, indexes, cdf_table(cdfs, cdf_lengths, offsets))


def decode_with_indexes(string: bytes, indexes, cdfs, cdf_lengths, offsets) -> np.ndarray:
    """``compressai.ans.RansDecoder().decode_with_indexes`` on arrays (returns int32 array)."""
    return decode(string, indexes, cdf_table(cdfs, cdf_lengths, offsets))


class RansEncoder:
    """Drop-in for ``compressai.ans.RansEncoder`` (native if built, else compressai's)."""

    def __init__(self):
        if _rans is None:
            from compressai.ans import RansEncoder as _Fallback

            self._fallback = _Fallback()
        else:
            self._fallback = None

    def encode_with_indexes(self, symbols, indexes, cdfs, cdf_lengths, offsets) -> bytes:
        if self._fallback is not None:
            return self._fallback.encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets)
        return encode_with_indexes(symbols, indexes, cdfs, cdf_lengths, offsets)


class RansDecoder:
    """Drop-in for ``compressai.ans.RansDecoder`` (native if built, else compressai's).

    Returns a list of ints like compressai. Only the native decoder is safe on malformed input.
    """

    def __init__(self):
        if _rans is None:
            from compressai.ans import RansDecoder as _Fallback

            self._fallback = _Fallback()
        else:
            self._fallback = None

    def decode_with_indexes(self, string, indexes, cdfs, cdf_lengths, offsets) -> list[int]:
        if self._fallback is not None:
            return self._fallback.decode_with_indexes(string, indexes, cdfs, cdf_lengths, offsets)
        return decode_with_indexes(string, indexes, cdfs, cdf_lengths, offsets).tolist()


class _NativeEntropyCoder:
    """Stands in for compressai's ``_EntropyCoder`` proxy (``EntropyModel.entropy_coder``).

    Serves code that calls the coder itself, e.g. ``GaussianMixtureConditional`` through
    ``entropy_coder._encoder``. ``name`` keeps ``EntropyModel.__getstate__`` working.
    """

    name = "ans"

    def __init__(self):
        self._encoder = RansEncoder()
        self._decoder = RansDecoder()

    def encode_with_indexes(self, *args, **kwargs):
        return self._encoder.encode_with_indexes(*args, **kwargs)

    def decode_with_indexes(self, *args, **kwargs):
        return self._decoder.decode_with_indexes(*args, **kwargs)


class _NativeEntropyModel(EntropyModel):
    """Mixin placed between a compressai entropy model class and ``EntropyModel`` in the MRO.

    ``install`` re-classes each instance to ``type(name, (cls, _NativeEntropyModel))``, so both
    direct calls and ``super().compress(...)`` from subclasses (``EntropyBottleneck``) land in
    the methods below. They mirror ``EntropyModel.compress`` / ``decompress`` of compressai
    1.2.x (checks, quantization, dequantization) and only swap the list-based coder calls for
    array-based native ones.
    """

    _idemrt_num_threads: int = 0

    def _idemrt_table(self):
        return cdf_table(self._quantized_cdf, self._cdf_length, self._offset)

    def compress(self, inputs, indexes, means=None):
        symbols = self.quantize(inputs, "symbols", means)

        if len(inputs.size()) < 2:
            raise ValueError("Invalid `inputs` size. Expected a tensor with at least 2 dimensions.")
        if inputs.size() != indexes.size():
            raise ValueError("`inputs` and `indexes` should have the same size.")
        self._check_cdf_size()
        self._check_cdf_length()
        self._check_offsets_size()

        return encode_batch(
            list(_int32(symbols.flatten(1), "symbols")),
            list(_int32(indexes.flatten(1), "indexes")),
            self._idemrt_table(),
            self._idemrt_num_threads,
        )

    def decompress(self, strings, indexes, dtype=torch.float, means=None):
        if not isinstance(strings, (tuple, list)):
            raise ValueError("Invalid `strings` parameter type.")
        if not len(strings) == indexes.size(0):
            raise ValueError("Invalid strings or indexes parameters")
        if len(indexes.size()) < 2:
            raise ValueError("Invalid `indexes` size. Expected a tensor with at least 2 dimensions.")
        self._check_cdf_size()
        self._check_cdf_length()
        self._check_offsets_size()
        if means is not None:
            if means.size()[:2] != indexes.size()[:2]:
                raise ValueError("Invalid means or indexes parameters")
            if means.size() != indexes.size():
                for i in range(2, len(indexes.size())):
                    if means.size(i) != 1:
                        raise ValueError("Invalid means parameters")

        values = decode_batch(
            strings,
            list(_int32(indexes.flatten(1), "indexes")),
            self._idemrt_table(),
            self._idemrt_num_threads,
        )
        outputs = torch.empty(indexes.size(), dtype=torch.int32)
        rows = outputs.flatten(1).numpy()
        for i, v in enumerate(values):
            rows[i] = v
        outputs = outputs.to(self._quantized_cdf.device)
        return self.dequantize(outputs, means, dtype)

    def __reduce_ex__(self, protocol):
        # Copy and pickle as the plain compressai class: the native coder is an in-process switch,
        # and the generated class cannot be looked up by name. EntropyModel.__getstate__ turns
        # entropy_coder into its name, which the copy's __setstate__ makes a compressai coder.
        rv = list(super().__reduce_ex__(protocol))
        func, args, state = rv[0], rv[1], rv[2]
        if not (func is copyreg.__newobj__ and args[0] is type(self) and isinstance(state, dict)):
            raise TypeError(f"cannot pickle {type(self).__name__} with protocol {protocol}")
        rv[0] = _new_instance
        rv[1] = (_original_class(type(self)), *args[1:])
        rv[2] = {k: v for k, v in state.items() if not k.startswith("_idemrt_")}
        rv[2]["entropy_coder"] = state["_idemrt_coder_name"]
        return tuple(rv)


def _new_instance(cls, *args):
    # copyreg.__newobj__ under another name: pickle insists that __newobj__ rebuilds type(obj).
    return cls.__new__(cls, *args)


_NATIVE_CLASSES: dict[type, type] = {}


def _native_class(cls: type) -> type:
    if cls not in _NATIVE_CLASSES:
        _NATIVE_CLASSES[cls] = type(cls.__name__, (cls, _NativeEntropyModel), {"__module__": cls.__module__})
    return _NATIVE_CLASSES[cls]


def _original_class(native_cls: type) -> type:
    return native_cls.__bases__[0]


def install(model: torch.nn.Module, num_threads: int = 0) -> int:
    """Make every compressai ``EntropyModel`` in ``model`` (the model itself included) code with
    the native rANS coder. ``compress`` / ``decompress`` produce and accept the same bytes as
    before; a batch of N images is coded on up to ``num_threads`` threads (<= 0: all).

    Returns the number of entropy models switched; 0 (model unchanged) when the extension is not
    built. Copies and pickles of the model get compressai's coder back.
    """
    if not available():
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, EntropyModel):
            continue
        if not isinstance(module, _NativeEntropyModel):
            module._idemrt_coder_name = module.entropy_coder.name
            module.__class__ = _native_class(type(module))
            module.entropy_coder = _NativeEntropyCoder()
        module._idemrt_num_threads = int(num_threads)
        count += 1
    return count


def uninstall(model: torch.nn.Module) -> int:
    """Undo :func:`install`; returns the number of entropy models switched back."""
    count = 0
    for module in model.modules():
        if isinstance(module, _NativeEntropyModel):
            module.__class__ = _original_class(type(module))
            module.entropy_coder = _EntropyCoder(module.__dict__.pop("_idemrt_coder_name"))
            module.__dict__.pop("_idemrt_num_threads", None)
            count += 1
    return count
