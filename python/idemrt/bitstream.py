"""The ``.idm`` container: one coded image, the codec that made it, and its sizes.

The byte layout, the limits and the versioning policy are specified in
docs/bitstream.md; keep the two in step.

A decoder receives these bytes from the network, so :func:`unpack` treats them
as hostile: every length is checked against the bytes that remain before
anything is sliced, and every failure is a :class:`idemrt.BitstreamError`.
Nothing is allocated whose size comes from an unchecked field; the largest
allocation is a copy of the input itself.
"""
from __future__ import annotations

import hashlib
import math
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, TypeVar

from .errors import BitstreamError, BitstreamTooLargeError

MAGIC = b"\x89IDMRT\r\n"
VERSION = 1

# Reader policy (keyword arguments of unpack). 2**26 pixels is 8192x8192.
DEFAULT_MAX_PIXELS = 1 << 26
DEFAULT_MAX_STREAMS = 1024
DEFAULT_MAX_STREAM_BYTES = 1 << 28

# Format limits (the same for writer and reader).
WEIGHTS_HASH_BYTES = 16
MAX_NAME_BYTES = 64
MAX_LATENT_DIMS = 8
MAX_EXTRA_ITEMS = 256
# No codec pads by a whole 1024-pixel block; a larger gap means a forged size.
MAX_PAD = 1024
NO_QUALITY = 0xFFFF

_U32_MAX = 0xFFFFFFFF
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

# magic, version, total_length, height, width, padded_height, padded_width, quality, weights_hash
_FIXED = struct.Struct("<8sHIIIIIH16s")
_U8, _U16, _U32, _I64 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<q")
_CRC = _U32
# fixed header, name length + 1-byte name, latent rank, stream count, extra count, checksum
MIN_SIZE = _FIXED.size + 2 + 1 + 2 + 2 + _CRC.size

TYPE_INT, TYPE_STR, TYPE_BYTES = 1, 2, 3
# Codec names and extra keys end up in error messages and `idemrt info`: a
# plain identifier keeps terminal escapes and look-alike characters out.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

_FOREIGN_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
    b"RIFF": "a RIFF file (WebP?)",
    b"GIF8": "a GIF image",
}


@dataclass
class Bitstream:
    """Everything a decoder needs besides the weights.

    ``streams`` are the entropy-coded byte strings in codec order; ``latent_shape``
    holds the small ints the entropy decoder needs (compressai's ``shape``);
    ``extra`` holds typed codec-specific fields (int, str or bytes values) so that
    new codecs add keys rather than a format version.
    """

    codec: str
    quality: int | None
    weights_hash: bytes
    height: int
    width: int
    padded_height: int
    padded_width: int
    streams: list[bytes]
    latent_shape: tuple[int, ...]
    extra: dict[str, int | str | bytes] = field(default_factory=dict)


def pack(bs: Bitstream) -> bytes:
    """Serialize ``bs``; raises BitstreamError if it cannot be represented or read back."""
    _validate(bs, max_pixels=None, max_streams=None, max_stream_bytes=None)
    name = bs.codec.encode("ascii")
    parts = [_U8.pack(len(name)), name, _U8.pack(len(bs.latent_shape))]
    parts += [_U32.pack(d) for d in bs.latent_shape]
    parts.append(_U16.pack(len(bs.streams)))
    parts += [_U32.pack(len(s)) for s in bs.streams]
    parts += [bytes(s) for s in bs.streams]
    parts.append(_U16.pack(len(bs.extra)))
    for key in sorted(bs.extra):
        tag, value = _pack_value(bs.extra[key])
        parts += [_U8.pack(len(key)), key.encode("ascii"), _U8.pack(tag), _U32.pack(len(value)), value]
    body = b"".join(parts)
    total = _FIXED.size + len(body) + _CRC.size
    if total > _U32_MAX:
        raise BitstreamError(f"cannot encode: {total} bytes exceed the 4 GiB limit of the format")
    quality = NO_QUALITY if bs.quality is None else bs.quality
    head = _FIXED.pack(MAGIC, VERSION, total, bs.height, bs.width, bs.padded_height, bs.padded_width,
                       quality, bytes(bs.weights_hash))
    payload = head + body
    return payload + _CRC.pack(zlib.crc32(payload))


def unpack(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_streams: int = DEFAULT_MAX_STREAMS,
    max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
) -> Bitstream:
    """Parse and check an ``.idm`` file; any defect raises BitstreamError.

    ``max_pixels`` bounds the padded image (the largest tensor a decoder will
    allocate), ``max_streams`` and ``max_stream_bytes`` bound the payload.
    """
    for arg, value in (("max_pixels", max_pixels), ("max_streams", max_streams),
                       ("max_stream_bytes", max_stream_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"expected the bytes of an .idm file, got {type(data).__name__}")
    data = bytes(data)
    end = _check_envelope(data)
    bs = _parse_body(data, end)
    _validate(bs, max_pixels=max_pixels, max_streams=max_streams, max_stream_bytes=max_stream_bytes)
    return bs


def encode(bs: Bitstream) -> bytes:
    """Deprecated name of :func:`pack` (encode/decode now name what images go through)."""
    warnings.warn("idemrt.bitstream.encode is deprecated: use pack", DeprecationWarning, stacklevel=2)
    return pack(bs)


def decode(data: bytes, **limits) -> Bitstream:
    """Deprecated name of :func:`unpack`."""
    warnings.warn("idemrt.bitstream.decode is deprecated: use unpack", DeprecationWarning, stacklevel=2)
    return unpack(data, **limits)


def parse(data, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Bitstream:
    """What a decoder is handed: an already decoded :class:`Bitstream` (returned as is) or the
    bytes of an ``.idm`` file (decoded and checked); anything else is a TypeError."""
    if isinstance(data, Bitstream):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected the bytes of an .idm bitstream, got {type(data).__name__}")
    return unpack(bytes(data), max_pixels=max_pixels)


class CodecIdentity(NamedTuple):
    """What decodes a stream: a codec's name, quality and 16-byte weights digest (:func:`weights_digest`;
    None where the weights are not known, e.g. at the service's ingress or from a manifest without one)."""

    name: str
    quality: Optional[int]
    weights_hash: Optional[bytes] = None

    @classmethod
    def of(cls, codec) -> "CodecIdentity":
        """The identity of a loaded :class:`idemrt.Codec` (its weights hashed)."""
        return cls(codec.name, codec.quality, bytes(codec.weights_hash()))


K = TypeVar("K")


def route(bs: Bitstream, codecs: Mapping[K, CodecIdentity], *, where: str = "the decoder", store: bool = False) -> K:
    """Which of ``codecs`` decodes ``bs``: the key of the first whose name and quality are the
    stream's and whose weights digest is its (a digest of None matches any). The one answer to
    "is this stream ours?" (the API, the service's ingress and engine, the model store, PSC).

    None found: with ``store`` (models chosen among many: a model store, a service's store) a
    :class:`~idemrt.errors.ModelNotFoundError` naming the codec, quality and digest the stream
    needs; else (the codec is fixed) a BitstreamError saying what made it and what ``where`` has."""
    needs = CodecIdentity(bs.codec, bs.quality, bytes(bs.weights_hash))
    named = [key for key, c in codecs.items() if (c.name, c.quality) == needs[:2]]
    for key in named:
        if codecs[key].weights_hash is None or bytes(codecs[key].weights_hash) == needs.weights_hash:
            return key
    made = codec_label(bs.codec, bs.quality)
    if store:
        from .errors import ModelNotFoundError

        raise ModelNotFoundError(
            f"{where} has no available codec for this stream: it needs {made} with weights digest "
            f"{needs.weights_hash.hex()} (`idemrt info FILE` shows a file's header)",
            codec=bs.codec, quality=bs.quality, weights_digest=needs.weights_hash.hex())
    if named:
        theirs = ", ".join(bytes(codecs[key].weights_hash).hex() for key in named)
        raise BitstreamError(f"this file was made with {made} weights {needs.weights_hash.hex()}, but {where}'s "
                             f"weights hash to {theirs}; decode with the checkpoint that encoded it")
    given = ", ".join(codec_label(c.name, c.quality) for c in codecs.values()) or "no codec"
    raise BitstreamError(f"this file was made with {made}, but {where} decodes {given}; load the codec the "
                         f"file names (`idemrt info FILE` shows it)")


def describe(bs: Bitstream) -> dict:
    """Summary for ``idemrt info``: identity, sizes, byte counts and rates."""
    payload = sum(len(s) for s in bs.streams)
    total = len(pack(bs))
    pixels = bs.height * bs.width
    return {
        "format_version": VERSION,
        "codec": bs.codec,
        "quality": bs.quality,
        "weights_hash": bytes(bs.weights_hash).hex(),
        "height": bs.height,
        "width": bs.width,
        "padded_height": bs.padded_height,
        "padded_width": bs.padded_width,
        "latent_shape": list(bs.latent_shape),
        "streams": len(bs.streams),
        "payload_bytes": payload,
        "file_bytes": total,
        # bpp counts the entropy-coded streams only (the rate the papers report);
        # file_bpp adds the container overhead.
        "bpp": 8 * payload / pixels,
        "file_bpp": 8 * total / pixels,
        "extra": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in sorted(bs.extra.items())},
    }


def weights_digest(state_dict: Mapping) -> bytes:
    """The 16-byte ``weights_hash`` of a state_dict: truncated sha256 over sorted names, dtypes, shapes, bytes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights_digest: {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\0{t.dtype}\0{tuple(state_dict[name].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.digest()[:WEIGHTS_HASH_BYTES]


def codec_label(name, quality) -> str:
    """"name qN", or the name alone for a codec without a quality."""
    return f"{name}" if quality is None else f"{name} q{quality}"


def _check_envelope(data: bytes) -> int:
    """Check magic, version, total length and checksum; return where the checksum starts."""
    n = len(data)
    if n == 0:
        raise BitstreamError("empty input: an .idm file is at least %d bytes" % MIN_SIZE)
    if data[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise BitstreamError(f"truncated .idm file: only {n} bytes")
        for magic, what in _FOREIGN_MAGIC.items():
            if data.startswith(magic):
                raise BitstreamError(f"this is {what}, not an .idm bitstream (were input and output swapped?)")
        raise BitstreamError(f"not an .idm bitstream: the file starts with {data[:8].hex()}, not {MAGIC.hex()}")
    if n < len(MAGIC) + _U16.size:
        raise BitstreamError(f"truncated .idm file: only {n} bytes")
    (version,) = _U16.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise BitstreamError(
            f"unsupported .idm format version {version}; this idemrt reads version {VERSION}"
            + (" (the file is newer: upgrade idemrt)" if version > VERSION else "")
        )
    if n < MIN_SIZE:
        raise BitstreamError(f"truncated .idm file: {n} bytes, the smallest valid file has {MIN_SIZE}")
    (total,) = _U32.unpack_from(data, len(MAGIC) + _U16.size)
    if total < MIN_SIZE:
        raise BitstreamError(f"corrupt header: total length {total} is below the minimum of {MIN_SIZE}")
    if n < total:
        raise BitstreamError(f"truncated .idm file: the header says {total} bytes, but only {n} were given "
                             f"(incomplete download or copy?)")
    if n > total:
        raise BitstreamError(f"{n - total} unexpected bytes after the end of the .idm data "
                             f"(the header says {total} bytes; concatenated files?)")
    end = total - _CRC.size
    (stored,) = _CRC.unpack_from(data, end)
    computed = zlib.crc32(memoryview(data)[:end])
    if stored != computed:
        raise BitstreamError(f"checksum mismatch (stored {stored:08x}, computed {computed:08x}): "
                             f"the file is corrupted")
    return end


class _Reader:
    """Cursor over data[pos:end] that never reads (or slices) past end."""

    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        left = self.end - self.pos
        if n > left:
            raise BitstreamError(f"corrupt .idm file: {what} needs {n} bytes at offset {self.pos}, "
                                 f"but only {left} remain before the checksum")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str):
        return fmt.unpack(self.take(fmt.size, what))


def _parse_body(data: bytes, end: int) -> Bitstream:
    r = _Reader(data, 0, end)
    _, _, _, height, width, ph, pw, quality, weights_hash = r.unpack(_FIXED, "the fixed header")
    (name_len,) = r.unpack(_U8, "the codec name length")
    codec = _read_name(r.take(name_len, "the codec name"), "codec name")
    (ndim,) = r.unpack(_U8, "the latent rank")
    if ndim > MAX_LATENT_DIMS:
        raise BitstreamError(f"corrupt .idm file: latent rank {ndim} is above {MAX_LATENT_DIMS}")
    latent_shape = r.unpack(struct.Struct(f"<{ndim}I"), "the latent shape")
    (count,) = r.unpack(_U16, "the stream count")
    lengths = r.unpack(struct.Struct(f"<{count}I"), "the stream length table")
    streams = [r.take(length, f"stream {i}") for i, length in enumerate(lengths)]
    (n_extra,) = r.unpack(_U16, "the extra field count")
    if n_extra > MAX_EXTRA_ITEMS:
        raise BitstreamError(f"corrupt .idm file: {n_extra} extra fields, the limit is {MAX_EXTRA_ITEMS}")
    extra, previous = {}, None
    for i in range(n_extra):
        (key_len,) = r.unpack(_U8, f"extra field {i} key length")
        key = _read_name(r.take(key_len, f"extra field {i} key"), f"extra field {i} key")
        if previous is not None and key <= previous:
            raise BitstreamError(f"corrupt .idm file: extra key {key!r} is duplicated or out of order")
        tag, value_len = r.unpack(_U8, f"extra {key!r} type")[0], r.unpack(_U32, f"extra {key!r} length")[0]
        extra[key] = _unpack_value(tag, r.take(value_len, f"extra {key!r} value"), key)
        previous = key
    if r.pos != end:
        raise BitstreamError(f"corrupt .idm file: {end - r.pos} unexplained bytes before the checksum")
    return Bitstream(codec=codec, quality=None if quality == NO_QUALITY else quality,
                     weights_hash=weights_hash, height=height, width=width, padded_height=ph,
                     padded_width=pw, streams=streams, latent_shape=tuple(latent_shape), extra=extra)


def _read_name(raw: bytes, what: str) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BitstreamError(f"corrupt .idm file: the {what} is not valid UTF-8") from None
    _check_name(name, what)
    return name


def _check_name(name, what: str) -> None:
    if not isinstance(name, str):
        raise BitstreamError(f"the {what} must be a str, got {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME_BYTES:
        raise BitstreamError(f"the {what} must be 1 to {MAX_NAME_BYTES} characters long, got {len(name)}")
    if not _NAME_RE.fullmatch(name):
        raise BitstreamError(f"the {what} {name!r} must be ASCII letters, digits and ._+- "
                             f"(starting with a letter or digit)")


def _pack_value(value) -> tuple[int, bytes]:
    if isinstance(value, int):
        return TYPE_INT, _I64.pack(value)
    if isinstance(value, str):
        return TYPE_STR, value.encode("utf-8")
    return TYPE_BYTES, bytes(value)


def _unpack_value(tag: int, raw: bytes, key: str):
    if tag == TYPE_INT:
        if len(raw) != _I64.size:
            raise BitstreamError(f"corrupt .idm file: int field {key!r} has {len(raw)} bytes, not 8")
        return _I64.unpack(raw)[0]
    if tag == TYPE_STR:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BitstreamError(f"corrupt .idm file: str field {key!r} is not valid UTF-8") from None
    if tag == TYPE_BYTES:
        return raw
    raise BitstreamError(f"extra field {key!r} has unknown type {tag}; the file needs a newer idemrt")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate(bs: Bitstream, *, max_pixels, max_streams, max_stream_bytes) -> None:
    """Checks shared by encode (format limits) and decode (format limits and reader policy)."""
    if not isinstance(bs, Bitstream):
        raise BitstreamError(f"expected a Bitstream, got {type(bs).__name__}")
    _check_name(bs.codec, "codec name")
    if bs.quality is not None and not (_is_int(bs.quality) and 0 <= bs.quality < NO_QUALITY):
        raise BitstreamError(f"quality must be None or an int in [0, {NO_QUALITY - 1}], got {bs.quality!r}")
    if not isinstance(bs.weights_hash, (bytes, bytearray)) or len(bs.weights_hash) != WEIGHTS_HASH_BYTES:
        raise BitstreamError(f"weights_hash must be {WEIGHTS_HASH_BYTES} bytes (see weights_digest)")
    _validate_size(bs, max_pixels)
    _validate_latent(bs)
    _validate_streams(bs, max_streams, max_stream_bytes)
    _validate_extra(bs.extra)


def _validate_size(bs: Bitstream, max_pixels) -> None:
    sizes = (bs.height, bs.width, bs.padded_height, bs.padded_width)
    if not all(_is_int(v) and 0 <= v <= _U32_MAX for v in sizes):
        raise BitstreamError(f"image sizes must be ints in [0, 2**32), got {sizes}")
    h, w, ph, pw = sizes
    if h == 0 or w == 0:
        raise BitstreamError(f"invalid image size {h}x{w}: zero-sized images cannot be coded")
    if ph < h or pw < w:
        raise BitstreamError(f"invalid sizes: padded {ph}x{pw} is smaller than the image {h}x{w}")
    if ph - h >= MAX_PAD or pw - w >= MAX_PAD:
        raise BitstreamError(f"implausible sizes: padding {h}x{w} to {ph}x{pw} adds {MAX_PAD} or more "
                             f"pixels to a side (forged or corrupt header)")
    if max_pixels is not None and ph * pw > max_pixels:
        raise BitstreamTooLargeError(
            f"image {h}x{w} (padded {ph}x{pw} = {ph * pw} pixels) is larger than max_pixels={max_pixels}; "
            f"if you trust this file, decode with a larger max_pixels"
        )


def _validate_latent(bs: Bitstream) -> None:
    shape = bs.latent_shape
    if not isinstance(shape, tuple) or len(shape) > MAX_LATENT_DIMS:
        raise BitstreamError(f"latent_shape must be a tuple of at most {MAX_LATENT_DIMS} ints, got {shape!r}")
    if not all(_is_int(d) and 1 <= d <= _U32_MAX for d in shape):
        raise BitstreamError(f"latent_shape entries must be ints in [1, 2**32), got {shape}")
    # A latent is never larger than the image: this bounds whatever the entropy
    # decoder allocates from these numbers by max_pixels.
    if math.prod(shape) > bs.padded_height * bs.padded_width:
        raise BitstreamError(f"implausible latent shape {shape} for a {bs.padded_height}x{bs.padded_width} image")


def _validate_streams(bs: Bitstream, max_streams, max_stream_bytes) -> None:
    streams = bs.streams
    if not isinstance(streams, list) or not all(isinstance(s, (bytes, bytearray)) for s in streams):
        raise BitstreamError("streams must be a list of bytes")
    limit = 0xFFFF if max_streams is None else min(max_streams, 0xFFFF)
    if len(streams) > limit:
        raise BitstreamError(f"{len(streams)} streams, more than the limit of {limit} (max_streams)")
    byte_limit = _U32_MAX if max_stream_bytes is None else min(max_stream_bytes, _U32_MAX)
    for i, s in enumerate(streams):
        if len(s) > byte_limit:
            raise BitstreamError(f"stream {i} has {len(s)} bytes, more than the limit of {byte_limit} "
                                 f"(max_stream_bytes)")


def _validate_extra(extra) -> None:
    if not isinstance(extra, dict) or len(extra) > MAX_EXTRA_ITEMS:
        raise BitstreamError(f"extra must be a dict of at most {MAX_EXTRA_ITEMS} items")
    for key, value in extra.items():
        _check_name(key, "extra key")
        if isinstance(value, bool) or not isinstance(value, (int, str, bytes, bytearray)):
            raise BitstreamError(f"extra {key!r}: values must be int, str or bytes (store a bool as 0/1), "
                                 f"got {type(value).__name__}")
        if isinstance(value, int) and not _I64_MIN <= value <= _I64_MAX:
            raise BitstreamError(f"extra {key!r}: int {value} does not fit in 64 bits")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BitstreamError(f"extra {key!r}: str is not encodable as UTF-8") from None
