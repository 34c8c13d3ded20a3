"""The PSC fields of the .idm container: round trip, and every forged or missing field -> BitstreamError.

No model runs here: codes are built by hand, forged files are re-encoded with a valid container
(correct CRC), so each case reaches the PSC checks proper.
"""
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from idemrt import BitstreamError
from idemrt import bitstream as bsfmt
from idemrt.psc import stream
from idemrt.psc.stream import Code, Compute, Params

PARAMS = Params(s=4, r=2, steps=3, seed=7, hash_bits=16, hash_every=2)
FAST = Compute("fast", "bf16", "cuda")


def _code(rounds=5, codes=None, params=PARAMS, height=15, width=16, compute=FAST):
    codes = bytes((37 * i + 11) % 0x7F for i in range(rounds * params.r)) if codes is None else codes
    marks = stream.checkpoints(rounds, params.hash_every)
    return Code(params=params, rounds=rounds, codes=codes,
                hashes=[bytes([k, 255 - k])[: params.hash_bytes] for k in marks], height=height, width=width,
                padded_height=16, padded_width=16, weights_hash=bytes(range(16)), compute=compute)


def _forge(data: bytes, streams=None, **extra) -> bytes:
    """Re-encode ``data`` with extra fields replaced (None removes one) and optionally new streams."""
    bs = bsfmt.unpack(data)
    for key, value in extra.items():
        if value is None:
            bs.extra.pop(key)
        else:
            bs.extra[key] = value
    if streams is not None:
        bs.streams = streams
    return bsfmt.pack(bs)


def _unpack(data: bytes, factor=2, **kw):
    return stream.unpack(bsfmt.unpack(data), factor=factor, **kw)


def test_checkpoints_are_every_kth_round_and_the_last():
    assert stream.checkpoints(5, 2) == [1, 3, 4]
    assert stream.checkpoints(4, 2) == [1, 3]
    assert stream.checkpoints(3, 1) == [0, 1, 2]
    assert stream.checkpoints(3, 7) == [2]
    # 5 rounds x 2 bytes + 3 hashes x 2 bytes
    assert stream.payload_bytes(PARAMS, 5) == 16


@pytest.mark.parametrize("entropy", ["raw", "zlib"])
def test_round_trip(entropy):
    code = _code()
    got = _unpack(stream.pack(code, entropy))
    assert got == code
    extra = bsfmt.unpack(stream.pack(code, entropy)).extra
    assert extra["entropy"] == "raw"  # 10 varied bytes do not shrink
    assert (extra["version"], extra["compute"]) == (2, "fast-bf16-cuda")


def test_version_1_streams_have_no_compute_mode_and_stay_version_1():
    old = _forge(GOOD, version=1, compute=None)  # as written before the compute mode was recorded
    code = _unpack(old)
    assert code.compute is None and code == _code(compute=None)
    assert stream.pack(code, "raw") == old  # a prefix of an old stream is an old stream
    with pytest.raises(BitstreamError, match="unknown field.*compute"):
        _unpack(_forge(GOOD, version=1))
    with pytest.raises(BitstreamError, match="missing field.*compute"):
        _unpack(_forge(old, version=2))


def test_compute_modes_print_and_parse():
    for backend, dtypes in stream.BACKENDS.items():
        for dtype in dtypes:
            for device in stream.DEVICE_TYPES:
                mode = Compute(backend, dtype, device)
                assert Compute.parse(str(mode)) == mode and str(mode) == f"{backend}-{dtype}-{device}"
    with pytest.raises(ValueError, match="fp32"):
        Compute("eager", "bf16", "cpu")


def test_zlib_is_used_only_when_it_shrinks_the_measurements():
    code = _code(rounds=40, codes=bytes(80))
    data = stream.pack(code, "zlib")
    bs = bsfmt.unpack(data)
    assert bs.extra["entropy"] == "zlib" and len(bs.streams[0]) < 80
    assert _unpack(data).codes == bytes(80)


GOOD = stream.pack(_code(), "raw")


@pytest.mark.parametrize("fields, message", [
    ({"s": 1}, "s must be"), ({"s": 0}, "s must be"), ({"s": 10**9}, "s must be"), ({"s": -3}, "s must be"),
    ({"r": 0}, "r must be"), ({"r": 4}, "r must be"), ({"r": 5}, "r must be"),
    ({"rounds": 0}, "rounds"), ({"rounds": -1}, "rounds"), ({"rounds": 2**40}, "rounds"),
    ({"steps": 1}, "steps"), ({"steps": 1001}, "steps"), ({"seed": -1}, "seed"),
    ({"hash_bits": 12}, "hash_bits"), ({"hash_bits": 72}, "hash_bits"), ({"hash_every": 0}, "hash_every"),
    ({"version": 3}, "version 3 is not supported"), ({"version": 0}, "version 0 is not supported"),
    ({"version": "2"}, "must be an int"), ({"quantizer": "e5m2"}, "quantizer"), ({"entropy": "lzma"}, "entropy"),
    ({"compute": "fast-bf16-tpu"}, "cpu or cuda"), ({"compute": "eager-bf16-cpu"}, "eager path computes in fp32"),
    ({"compute": "fast-fp8-cuda"}, "fast path computes in"), ({"compute": "trt-fp16-cuda"}, "backend must be"),
    ({"compute": "fast-bf16"}, "backend-dtype-device"), ({"compute": "fast-bf16-cuda-0"}, "backend-dtype-device"),
    ({"compute": "x" * 5000 + "-a-b"}, "backend-dtype-device"), ({"compute": ""}, "backend-dtype-device"),
    ({"compute": 2}, "must be a str"),
    ({"s": "4"}, "must be an int"), ({"rounds": b"\x05"}, "must be an int"), ({"quantizer": 1}, "must be a str"),
    ({"extra_key": 1}, "unknown field"),
    ({"rounds": 6}, "measurement bytes"),  # same 3 hashes as 5 rounds, but 2 bytes short
    ({"rounds": 4}, "hash bytes"),  # 2 hashes, not 3
])
def test_forged_fields_are_rejected(fields, message):
    with pytest.raises(BitstreamError, match=message):
        _unpack(_forge(GOOD, **fields))


@pytest.mark.parametrize("key", ["s", "r", "rounds", "steps", "seed", "hash_bits", "hash_every", "version",
                                 "quantizer", "entropy", "compute"])
def test_every_field_is_required(key):
    with pytest.raises(BitstreamError, match=f"missing field.*{key}"):
        _unpack(_forge(GOOD, **{key: None}))


def test_stream_layout_is_checked():
    bs = bsfmt.unpack(GOOD)
    meas, hashes = bs.streams
    cases = {
        "expected 2 streams": [meas],
        "measurement bytes": [meas[:-1], hashes],
        "hash bytes": [meas, hashes + b"\0\0"],
    }
    for message, streams in cases.items():
        with pytest.raises(BitstreamError, match=message):
            _unpack(_forge(GOOD, streams=streams))


def test_zlib_streams_are_bounded_and_exact():
    bomb = zlib.compress(bytes(50_000_000), 9)  # 49 KB that would inflate to 50 MB
    short = zlib.compress(bytes(9))
    cases = [(bomb, "wrong size"), (short, "wrong size"), (b"not zlib", "does not inflate"),
             (zlib.compress(bytes(10)) + b"junk", "wrong size"), (zlib.compress(bytes(10))[:-3], "wrong size")]
    hashes = bsfmt.unpack(GOOD).streams[1]
    for payload, message in cases:
        with pytest.raises(BitstreamError, match=message):
            _unpack(_forge(GOOD, streams=[payload, hashes], entropy="zlib"))


def test_sizes_and_measurement_counts_are_bounded():
    with pytest.raises(BitstreamError, match="runs at"):
        _unpack(GOOD, factor=32)  # a 15x16 image runs at 32x32 with a 32-multiple UNet
    assert _unpack(GOOD, factor=None).padded_height == 16
    with pytest.raises(BitstreamError, match="max_measurements"):
        _unpack(GOOD, max_measurements=9)
    big = Params(s=256, r=255, steps=3, seed=0, hash_bits=0)
    data = stream.pack(_code(rounds=4, params=big, codes=bytes(1020)), "raw")
    with pytest.raises(BitstreamError, match="measurements of a 768-dimensional image"):
        _unpack(data, max_measurements=10**6)


def test_other_codecs_are_rejected():
    bs = bsfmt.unpack(GOOD)
    bs.codec = "bmshj2018-hyperprior"
    with pytest.raises(BitstreamError, match="not PSC"):
        stream.unpack(bs, factor=2)
    bs = bsfmt.unpack(GOOD)
    bs.quality = 3
    with pytest.raises(BitstreamError, match="quality"):
        stream.unpack(bs, factor=2)


INT_KEYS = ["s", "r", "rounds", "steps", "seed", "hash_bits", "hash_every", "version"]


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(INT_KEYS), st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4))
def test_fuzzed_ints_parse_in_range_or_raise_bitstream_error(fields):
    try:
        code = _unpack(_forge(GOOD, **fields))
    except BitstreamError:
        return
    p = code.params
    assert 2 <= p.s <= stream.MAX_S and 1 <= p.r < p.s and 1 <= code.rounds < stream.MAX_ROUNDS
    assert len(code.codes) == code.rounds * p.r <= 3 * 16 * 16


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(st.sampled_from(["fast", "eager", "bf16", "fp32", "fp16", "cpu",
                                                                "cuda", "", "x"]), max_size=4).map("-".join)))
def test_fuzzed_compute_modes_parse_exactly_or_raise_bitstream_error(text):
    try:
        code = _unpack(_forge(GOOD, compute=text))
    except BitstreamError:
        return
    assert str(code.compute) == text  # only the canonical spelling of a known mode is accepted
    assert code.compute.dtype in stream.BACKENDS[code.compute.backend]
