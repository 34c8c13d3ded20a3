"""PSC in the ``.idm`` container: which fields go where, and their checks.

* header: codec ``"psc"``, quality none, ``weights_hash`` = the UNet's
  :func:`idemrt.bitstream.weights_digest`, the image size and the size the UNet ran at
  (padded up to a multiple of its downsampling factor), no latent shape;
* ``streams[0]``: the measurements, one e4m3fn byte each, rounds·r of them in round order,
  raw or zlib-compressed (``extra["entropy"]``);
* ``streams[1]``: the row hashes, ``hash_bits / 8`` bytes per checkpoint round (see
  :func:`checkpoints`);
* ``extra``: the ints s, r, rounds, steps, seed, hash_bits, hash_every, version and the strs
  quantizer, entropy, compute (:class:`Compute`, how the acquisition sampler ran). Every key is
  required and no other is accepted. Version 1, written before ``compute`` existed, has no such
  key; its rows came from the eager fp32 UNet on a device it does not record.

Everything parsed here is hostile input: each field is type- and range-checked before it sizes
anything, and any defect is a :class:`idemrt.BitstreamError`.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

from .. import bitstream as bsfmt
from ..errors import BitstreamError
from .quantize import QUANTIZER

CODEC = "psc"
VERSION = 2
MAX_S = 256  # samples per round: one UNet batch
MAX_ROUNDS = 1 << 16
MAX_STEPS = 1000
HASH_BITS = (0, 8, 16, 24, 32, 40, 48, 56, 64)
ENTROPY = ("raw", "zlib")
# Reader policy: the decoder holds H, rounds·r rows of 3·h·w, as float32 on the device and float64
# on the CPU (8192 rows at 256²: 6.4 + 12.9 GB).
DEFAULT_MAX_MEASUREMENTS = 8192
# Compute modes: the backends, each with its dtypes, and the device types.
BACKENDS = {"eager": ("fp32",), "fast": ("bf16", "fp16", "fp32")}
DEVICE_TYPES = ("cpu", "cuda")
_INT_KEYS = ("hash_bits", "hash_every", "r", "rounds", "s", "seed", "steps", "version")
_STR_KEYS = {1: ("entropy", "quantizer"), 2: ("compute", "entropy", "quantizer")}  # per version


@dataclass(frozen=True)
class Params:
    """Everything encoder and decoder must share, besides the weights and the image size."""

    s: int
    r: int
    steps: int
    seed: int
    hash_bits: int = 16
    hash_every: int = 1

    def __post_init__(self):
        for name in ("s", "r", "steps", "seed", "hash_bits", "hash_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not 2 <= self.s <= MAX_S:
            raise ValueError(f"s must be in [2, {MAX_S}], got {self.s}")
        if not 1 <= self.r <= self.s - 1:
            raise ValueError(f"r must be in [1, s - 1] = [1, {self.s - 1}] (s centred samples have rank "
                             f"<= s - 1), got {self.r}")
        if not 2 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in [2, {MAX_STEPS}], got {self.steps}")
        if not 0 <= self.seed < 1 << 63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.hash_bits not in HASH_BITS:
            raise ValueError(f"hash_bits must be one of {HASH_BITS}, got {self.hash_bits}")
        if not 1 <= self.hash_every < MAX_ROUNDS:
            raise ValueError(f"hash_every must be in [1, {MAX_ROUNDS}), got {self.hash_every}")

    @property
    def hash_bytes(self) -> int:
        return self.hash_bits // 8


@dataclass(frozen=True)
class Compute:
    """How the acquisition sampler's UNet runs: ``backend`` ("eager" or "fast"), its ``dtype``
    ("fp32", "bf16", "fp16") and the torch device type. Different modes give different last
    bits, so encoder and decoder must use the same one; it travels in the stream as its
    :meth:`str`, e.g. ``"fast-bf16-cuda"``."""

    backend: str
    dtype: str
    device: str

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in BACKENDS[self.backend]:
            raise ValueError(f"the {self.backend} path computes in {', '.join(BACKENDS[self.backend])}, "
                             f"not {self.dtype!r}")
        if self.device not in DEVICE_TYPES:
            raise ValueError(f"PSC runs on {' or '.join(DEVICE_TYPES)} devices, not {self.device!r}")

    def __str__(self) -> str:
        return f"{self.backend}-{self.dtype}-{self.device}"

    @classmethod
    def parse(cls, text: str) -> "Compute":
        parts = text.split("-")
        if len(text) > 32 or len(parts) != 3:
            raise ValueError(f"compute mode {text[:32]!r} is not backend-dtype-device")
        return cls(*parts)


def checkpoints(rounds: int, hash_every: int) -> list[int]:
    """Rounds (0-based) after which a hash of all rows so far is stored: every ``hash_every``-th
    round, and the last one."""
    marks = [k for k in range(rounds) if (k + 1) % hash_every == 0]
    if rounds and (not marks or marks[-1] != rounds - 1):
        marks.append(rounds - 1)
    return marks


def payload_bytes(params: Params, rounds: int) -> int:
    """Stream bytes of an uncompressed code of ``rounds`` rounds (measurements + hashes)."""
    return rounds * params.r + len(checkpoints(rounds, params.hash_every)) * params.hash_bytes


@dataclass
class Code:
    """A parsed PSC bitstream."""

    params: Params
    rounds: int
    codes: bytes  # rounds·r e4m3fn bytes
    hashes: list[bytes]  # one per checkpoint round
    height: int
    width: int
    padded_height: int
    padded_width: int
    weights_hash: bytes
    compute: Compute | None  # None: a version-1 stream (eager fp32, device not recorded)


def pack(code: Code, entropy: str = "zlib") -> bytes:
    """Serialize; ``entropy="zlib"`` keeps the raw bytes when zlib would not make them smaller."""
    p = code.params
    if entropy not in ENTROPY:
        raise ValueError(f"entropy must be one of {ENTROPY}, got {entropy!r}")
    measurements = bytes(code.codes)
    if entropy == "zlib":
        packed = zlib.compress(measurements, 9)
        if len(packed) < len(measurements):
            measurements = packed
        else:
            entropy = "raw"
    extra = {"version": VERSION, "s": p.s, "r": p.r, "rounds": code.rounds, "steps": p.steps, "seed": p.seed,
             "hash_bits": p.hash_bits, "hash_every": p.hash_every, "quantizer": QUANTIZER, "entropy": entropy}
    if code.compute is None:  # a prefix of a version-1 stream stays version 1
        extra["version"] = 1
    else:
        extra["compute"] = str(code.compute)
    bs = bsfmt.Bitstream(
        codec=CODEC, quality=None, weights_hash=bytes(code.weights_hash),
        height=code.height, width=code.width,
        padded_height=code.padded_height, padded_width=code.padded_width,
        streams=[measurements, b"".join(code.hashes)], latent_shape=(), extra=extra,
    )
    return bsfmt.pack(bs)


def unpack(bs: bsfmt.Bitstream, *, factor: int | None, max_measurements: int = DEFAULT_MAX_MEASUREMENTS) -> Code:
    """Check a decoded container against the PSC rules.

    ``factor``: the UNet's size multiple, which the padded size must match exactly (None: not
    checked, for tools that run no model).
    """
    if bs.codec != CODEC:
        raise BitstreamError(f"this file was made by codec {bs.codec!r}, not PSC; decode it with "
                             f"`idemrt decompress` for that codec")
    if bs.quality is not None or bs.latent_shape != ():
        raise BitstreamError("corrupt PSC file: quality and latent shape must be empty")
    extra = bs.extra
    version = extra.get("version", VERSION)  # a missing version is reported with the other missing keys
    if isinstance(version, int) and version not in _STR_KEYS:
        raise BitstreamError(f"PSC stream version {version} is not supported (this idemrt reads "
                             f"{', '.join(map(str, _STR_KEYS))})")
    str_keys = _STR_KEYS.get(version, _STR_KEYS[VERSION])
    missing = sorted(set(_INT_KEYS + str_keys) - set(extra))
    unknown = sorted(set(extra) - set(_INT_KEYS + str_keys))
    if missing:
        raise BitstreamError(f"corrupt PSC file: missing field(s) {', '.join(missing)}")
    if unknown:
        raise BitstreamError(f"PSC file with unknown field(s) {', '.join(unknown)}; it needs a newer idemrt")
    for key in _INT_KEYS:
        if not isinstance(extra[key], int):
            raise BitstreamError(f"corrupt PSC file: field {key!r} must be an int")
    for key in str_keys:
        if not isinstance(extra[key], str):
            raise BitstreamError(f"corrupt PSC file: field {key!r} must be a str")
    if extra["quantizer"] != QUANTIZER:
        raise BitstreamError(f"unknown PSC quantizer {extra['quantizer']!r} (this idemrt knows {QUANTIZER!r})")
    if extra["entropy"] not in ENTROPY:
        raise BitstreamError(f"unknown PSC entropy coding {extra['entropy']!r} (known: {', '.join(ENTROPY)})")
    try:
        params = Params(s=extra["s"], r=extra["r"], steps=extra["steps"], seed=extra["seed"],
                        hash_bits=extra["hash_bits"], hash_every=extra["hash_every"])
        compute = Compute.parse(extra["compute"]) if "compute" in str_keys else None
    except ValueError as exc:
        raise BitstreamError(f"corrupt PSC file: {exc}") from None
    rounds = extra["rounds"]
    if not 1 <= rounds < MAX_ROUNDS:
        raise BitstreamError(f"corrupt PSC file: rounds must be in [1, {MAX_ROUNDS}), got {rounds}")
    ph, pw = bs.padded_height, bs.padded_width
    if factor is not None and (ph, pw) != (_round_up(bs.height, factor), _round_up(bs.width, factor)):
        raise BitstreamError(f"corrupt PSC file: a {bs.height}x{bs.width} image runs at "
                             f"{_round_up(bs.height, factor)}x{_round_up(bs.width, factor)} with this UNet, "
                             f"the file says {ph}x{pw}")
    m = rounds * params.r
    if m > 3 * ph * pw:
        raise BitstreamError(f"corrupt PSC file: {m} measurements of a {3 * ph * pw}-dimensional image")
    if m > max_measurements:
        raise BitstreamError(f"the file has {m} measurements, more than max_measurements={max_measurements} "
                             f"(the decoder would hold {m} x {3 * ph * pw} float32 rows); if you trust it, "
                             f"raise max_measurements")
    if len(bs.streams) != 2:
        raise BitstreamError(f"corrupt PSC file: expected 2 streams (measurements, hashes), got {len(bs.streams)}")
    marks = checkpoints(rounds, params.hash_every)
    raw_hashes = bs.streams[1]
    if len(raw_hashes) != len(marks) * params.hash_bytes:
        raise BitstreamError(f"corrupt PSC file: {len(raw_hashes)} hash bytes, expected "
                             f"{len(marks) * params.hash_bytes}")
    codes = _measurements(bs.streams[0], extra["entropy"], m)
    hb = params.hash_bytes
    hashes = [raw_hashes[i * hb:(i + 1) * hb] for i in range(len(marks))] if hb else []
    return Code(params=params, rounds=rounds, codes=codes, hashes=hashes, height=bs.height, width=bs.width,
                padded_height=ph, padded_width=pw, weights_hash=bs.weights_hash, compute=compute)


def _measurements(stream: bytes, entropy: str, m: int) -> bytes:
    if entropy == "raw":
        if len(stream) != m:
            raise BitstreamError(f"corrupt PSC file: {len(stream)} measurement bytes, expected {m}")
        return bytes(stream)
    inflater = zlib.decompressobj()
    try:
        # max_length bounds the output: a zlib bomb cannot allocate more than m + 1 bytes.
        out = inflater.decompress(stream, m + 1)
    except zlib.error as exc:
        raise BitstreamError(f"corrupt PSC file: the measurement stream does not inflate ({exc})") from None
    if len(out) != m or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise BitstreamError(f"corrupt PSC file: the measurement stream inflates to the wrong size "
                             f"(expected {m} bytes)")
    return out


def _round_up(v: int, factor: int) -> int:
    return -(-v // factor) * factor
