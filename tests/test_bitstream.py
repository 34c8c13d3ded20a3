"""The .idm container: layout (against docs/bitstream.md), round trips, and each kind of defect."""
import hashlib
import zlib

import pytest
import torch

from idemrt import BitstreamError, ModelNotFoundError
from idemrt.bitstream import (
    DEFAULT_MAX_PIXELS,
    MAGIC,
    MIN_SIZE,
    Bitstream,
    CodecIdentity,
    describe,
    pack,
    route,
    unpack,
    weights_digest,
)

HASH = bytes(range(16))


def le(value: int, width: int, signed: bool = False) -> bytes:
    return value.to_bytes(width, "little", signed=signed)


def sample(**changes) -> Bitstream:
    fields = dict(codec="elic", quality=2, weights_hash=HASH, height=30, width=40, padded_height=64,
                  padded_width=64, streams=[b"\x01\x02\x03", b""], latent_shape=(1, 1),
                  extra={"w": b"\xff", "seed": 7, "tag": "ab"})
    fields.update(changes)
    return Bitstream(**fields)


def reseal(data: bytes) -> bytes:
    """Recompute the total length and checksum after editing the fields of ``data``."""
    body = bytearray(data[:-4])
    body[10:14] = le(len(body) + 4, 4)
    return bytes(body) + le(zlib.crc32(body), 4)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return reseal(data[:offset] + new + data[offset + len(new):])


def test_layout_matches_the_documented_table():
    # Written field by field from docs/bitstream.md, without the module's structs.
    body = b"".join([
        b"\x89IDMRT\r\n", le(1, 2), b"TOTL", le(30, 4), le(40, 4), le(64, 4), le(64, 4), le(2, 2), HASH,
        le(4, 1), b"elic", le(2, 1), le(1, 4), le(1, 4),
        le(2, 2), le(3, 4), le(0, 4), b"\x01\x02\x03",
        le(3, 2),
        le(4, 1), b"seed", le(1, 1), le(8, 4), le(7, 8, signed=True),
        le(3, 1), b"tag", le(2, 1), le(2, 4), b"ab",
        le(1, 1), b"w", le(3, 1), le(1, 4), b"\xff",
    ])
    body = body.replace(b"TOTL", le(len(body) + 4, 4))
    expected = body + le(zlib.crc32(body), 4)
    assert pack(sample()) == expected
    assert MAGIC == b"\x89IDMRT\r\n"


@pytest.mark.parametrize("bs", [
    sample(),
    sample(quality=None, extra={}, streams=[], latent_shape=()),
    sample(codec="a" * 64, quality=65534, height=1, width=1, padded_height=1, padded_width=1,
           latent_shape=(1,) * 8),
    sample(extra={"neg": -(1 << 63), "pos": (1 << 63) - 1, "uni": "héllo ✓", "empty": b"", "s": ""}),
    sample(streams=[bytes([i]) * i for i in range(40)], height=8192, width=8192, padded_height=8192,
           padded_width=8192, latent_shape=(128, 128)),
])
def test_round_trip(bs):
    data = pack(bs)
    assert unpack(data) == bs
    assert unpack(bytearray(data)) == bs
    assert unpack(memoryview(data)) == bs


def test_extra_keys_are_written_sorted_so_the_encoding_is_canonical():
    a = pack(sample(extra={"b": 1, "a": 2}))
    b = pack(sample(extra={"a": 2, "b": 1}))
    assert a == b


def test_every_truncation_is_reported_as_truncated():
    data = pack(sample())
    for n in range(len(data)):
        with pytest.raises(BitstreamError, match="truncated|empty"):
            unpack(data[:n])


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"\x89IDM", "truncated"),
    (b"\x89PNG\r\n\x1a\n" + bytes(80), "PNG image"),
    (b"\xff\xd8\xff\xe0" + bytes(80), "JPEG image"),
    (b"PK\x03\x04" + bytes(80), "zip"),
    (b"hello world, this is text" * 4, "not an .idm bitstream"),
])
def test_foreign_or_empty_input(data, match):
    with pytest.raises(BitstreamError, match=match):
        unpack(data)


def test_envelope_defects():
    data = pack(sample())
    with pytest.raises(BitstreamError, match="version 2.*upgrade"):
        unpack(data[:8] + le(2, 2) + data[10:])
    with pytest.raises(BitstreamError, match="version 0"):
        unpack(patch(data, 8, le(0, 2)))
    with pytest.raises(BitstreamError, match="3 unexpected bytes after"):
        unpack(data + b"abc")
    with pytest.raises(BitstreamError, match="below the minimum"):
        unpack(data[:10] + le(MIN_SIZE - 1, 4) + data[14:])
    flipped = bytearray(data)
    flipped[60] ^= 0x10
    with pytest.raises(BitstreamError, match="checksum mismatch"):
        unpack(bytes(flipped))
    with pytest.raises(BitstreamError, match="checksum mismatch"):
        unpack(data[:-1] + bytes([data[-1] ^ 1]))


NAME_AT = 48


@pytest.mark.parametrize("name_field, match", [
    (b"\x04\xff\xfe\xfd\xfc", "not valid UTF-8"),
    (b"\x04el c", "must be ASCII letters"),
    (b"\x04\x1b[2J", "must be ASCII letters"),
    (b"\x04-lic", "must be ASCII letters"),
    (b"\x00", "1 to 64"),
])
def test_bad_codec_names(name_field, match):
    data = pack(sample())
    forged = data[:NAME_AT] + name_field + data[NAME_AT + 5:]
    with pytest.raises(BitstreamError, match=match):
        unpack(reseal(forged))


def test_overlong_name():
    forged = pack(sample(codec="a" * 64)).replace(b"\x40" + b"a" * 64, b"\x41" + b"a" * 65)
    with pytest.raises(BitstreamError, match="1 to 64"):
        unpack(reseal(forged))


@pytest.mark.parametrize("h, w, ph, pw, match", [
    (0, 40, 64, 64, "zero-sized"),
    (30, 0, 64, 64, "zero-sized"),
    (30, 40, 16, 64, "smaller than the image"),
    (30, 40, 64, 32, "smaller than the image"),
    (30, 40, 30 + 1024, 64, "implausible"),
    (2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, "max_pixels"),
    (8193, 8192, 8193, 8192, "max_pixels"),
])
def test_bad_sizes(h, w, ph, pw, match):
    forged = patch(pack(sample()), 14, le(h, 4) + le(w, 4) + le(ph, 4) + le(pw, 4))
    with pytest.raises(BitstreamError, match=match):
        unpack(forged)


def test_max_pixels_is_configurable_and_bounds_the_padded_size():
    data = pack(sample(height=64, width=64))
    assert unpack(data, max_pixels=64 * 64).height == 64
    with pytest.raises(BitstreamError, match="max_pixels=4095"):
        unpack(data, max_pixels=64 * 64 - 1)
    big = pack(sample(height=8192, width=8192, padded_height=8192, padded_width=8192))
    assert unpack(big).width == 8192 and 8192 * 8192 == DEFAULT_MAX_PIXELS
    assert unpack(pack(sample(height=9000, width=9000, padded_height=9024, padded_width=9024)),
                  max_pixels=9024**2).height == 9000


def test_stream_limits():
    data = pack(sample(streams=[b"a", b"bb", b"ccc"]))
    assert len(unpack(data, max_streams=3).streams) == 3
    with pytest.raises(BitstreamError, match="3 streams, more than the limit of 2"):
        unpack(data, max_streams=2)
    with pytest.raises(BitstreamError, match="stream 2 has 3 bytes"):
        unpack(data, max_stream_bytes=2)


def test_stream_length_beyond_the_file():
    data = pack(sample(extra={}))
    count_at = NAME_AT + 5 + 1 + 8
    forged = patch(data, count_at + 2, le(2**32 - 1, 4))
    with pytest.raises(BitstreamError, match="stream 0 needs 4294967295 bytes"):
        unpack(forged)
    forged = patch(data, count_at, le(60000, 2))
    with pytest.raises(BitstreamError, match="stream length table needs 240000 bytes"):
        unpack(forged)


@pytest.mark.parametrize("latent, match", [
    (b"\x09" + le(1, 4) * 9, "latent rank 9"),
    (b"\x02" + le(0, 4) + le(1, 4), r"\[1, 2\*\*32\)"),
    (b"\x02" + le(65, 4) + le(64, 4), "implausible latent shape"),
])
def test_bad_latent_shapes(latent, match):
    data = pack(sample())
    at = NAME_AT + 5
    forged = data[:at] + latent + data[at + 9:]
    with pytest.raises(BitstreamError, match=match):
        unpack(reseal(forged))


def extra_section(*entries: bytes, count: int | None = None) -> bytes:
    return le(len(entries) if count is None else count, 2) + b"".join(entries)


def entry(key: bytes, tag: int, value: bytes, length: int | None = None) -> bytes:
    return le(len(key), 1) + key + le(tag, 1) + le(len(value) if length is None else length, 4) + value


@pytest.mark.parametrize("section, match", [
    (extra_section(entry(b"k", 9, b"x")), "unknown type 9"),
    (extra_section(entry(b"k", 1, b"1234")), "has 4 bytes, not 8"),
    (extra_section(entry(b"k", 2, b"\xc3(")), "not valid UTF-8"),
    (extra_section(entry(b"b", 1, bytes(8)), entry(b"a", 1, bytes(8))), "out of order"),
    (extra_section(entry(b"a", 1, bytes(8)), entry(b"a", 1, bytes(8))), "duplicated"),
    (extra_section(entry(b"k y", 3, b"")), "must be ASCII letters"),
    (extra_section(count=257), "257 extra fields"),
    (extra_section(entry(b"k", 3, b"", length=100)), "extra 'k' value needs 100 bytes"),
    (extra_section(entry(b"k", 3, b"")) + b"junk", "4 unexplained bytes before the checksum"),
])
def test_bad_extra_sections(section, match):
    data = pack(sample(extra={}))
    forged = data[:-6] + section + data[-4:]
    with pytest.raises(BitstreamError, match=match):
        unpack(reseal(forged))


def test_non_bytes_input_and_bad_limits():
    with pytest.raises(BitstreamError, match="expected the bytes"):
        unpack("not bytes")
    with pytest.raises(ValueError):
        unpack(pack(sample()), max_pixels=0)


@pytest.mark.parametrize("changes, match", [
    (dict(weights_hash=b"short"), "16 bytes"),
    (dict(quality=True), "quality"),
    (dict(quality=65535), "quality"),
    (dict(quality=-1), "quality"),
    (dict(codec="bmshj 2018"), "ASCII letters"),
    (dict(codec="é"), "ASCII letters"),
    (dict(codec="a" * 65), "1 to 64"),
    (dict(streams=["text"]), "list of bytes"),
    (dict(streams=[b""] * 65536), "65536 streams"),
    (dict(latent_shape=[1, 1]), "tuple"),
    (dict(extra={"flag": True}), "bool"),
    (dict(extra={"big": 1 << 63}), "64 bits"),
    (dict(extra={"x" * 65: 1}), "1 to 64"),
    (dict(extra={"f": 1.5}), "int, str or bytes"),
    (dict(extra={"s": "\ud800"}), "UTF-8"),
    (dict(height=0), "zero-sized"),
])
def test_encode_refuses_what_it_could_not_read_back(changes, match):
    with pytest.raises(BitstreamError, match=match):
        pack(sample(**changes))


def test_route_answers_which_codec_decodes_a_stream():
    bs = sample(codec="bmshj2018-hyperprior", quality=3)
    hp = lambda q, digest=HASH: CodecIdentity("bmshj2018-hyperprior", q, digest)  # noqa: E731
    assert route(bs, {None: hp(3)}) is None
    # The first codec of the stream's name, quality and weights; a digest of None matches any weights.
    assert route(bs, {"q4": hp(4), "other-weights": hp(3, bytes(16)), "q3": hp(3), "q3b": hp(3)}) == "q3"
    assert route(bs, {"elic": CodecIdentity("elic", 3), "any": hp(3, None)}) == "any"
    # A fixed codec that did not make it: a BitstreamError saying what made it and what is there.
    with pytest.raises(BitstreamError, match="made with bmshj2018-hyperprior q3, but the decoder decodes elic q3"):
        route(bs, {None: CodecIdentity("elic", 3, HASH)})
    with pytest.raises(BitstreamError, match="but this server decodes bmshj2018-hyperprior q4"):
        route(bs, {None: hp(4)}, where="this server")
    with pytest.raises(BitstreamError, match=f"weights {HASH.hex()}.*hash to {bytes(16).hex()}"):
        route(bs, {None: hp(3, bytes(16))})
    with pytest.raises(BitstreamError, match="made with psc, but"):
        route(sample(codec="psc", quality=None), {None: CodecIdentity("psc", 1, HASH)})
    # Models chosen among many (a store): a ModelNotFoundError naming what the stream needs.
    with pytest.raises(ModelNotFoundError, match=f"the store S has no available codec .* bmshj2018-hyperprior q3 "
                                                 f"with weights digest {HASH.hex()}") as missing:
        route(bs, {"a": hp(3, bytes(16)), "b": hp(2)}, where="the store S", store=True)
    assert (missing.value.codec, missing.value.quality, missing.value.weights_digest) == (
        "bmshj2018-hyperprior", 3, HASH.hex())
    with pytest.raises(ModelNotFoundError):
        route(bs, {}, store=True)


def test_describe_reports_rates_by_hand():
    bs = sample(height=30, width=40, streams=[b"a" * 100, b"b" * 50])
    info = describe(bs)
    assert info["payload_bytes"] == 150
    assert info["file_bytes"] == len(pack(bs))
    assert info["bpp"] == pytest.approx(8 * 150 / (30 * 40))
    assert info["file_bpp"] == pytest.approx(8 * len(pack(bs)) / 1200)
    assert info["weights_hash"] == HASH.hex()
    assert info["extra"] == {"seed": 7, "tag": "ab", "w": "ff"}
    assert (info["codec"], info["quality"], info["streams"], info["latent_shape"]) == ("elic", 2, 2, [1, 1])


def test_weights_digest_matches_its_definition():
    sd = {"b": torch.tensor([1.0, 2.0]), "a": torch.arange(6, dtype=torch.int16).reshape(2, 3)}
    h = hashlib.sha256()
    h.update(b"a\0torch.int16\0(2, 3)\0" + bytes([0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0]))
    h.update(b"b\0torch.float32\0(2,)\0" + bytes.fromhex("0000803f00000040"))
    assert weights_digest(sd) == h.digest()[:16]
    assert weights_digest(dict(reversed(sd.items()))) == weights_digest(sd)


def test_weights_digest_sees_values_dtypes_and_shapes():
    base = {"w": torch.zeros(4)}
    digests = {
        weights_digest(base),
        weights_digest({"w": torch.tensor([0.0, 0.0, 0.0, 1e-30])}),
        weights_digest({"w": torch.zeros(2, 2)}),
        weights_digest({"w": torch.zeros(4, dtype=torch.int32)}),
        weights_digest({"v": torch.zeros(4)}),
        weights_digest({"w": torch.zeros(8)[::2]}),  # non-contiguous view of the same values
    }
    assert len(digests) == 5  # the strided view hashes like the contiguous one
    with pytest.raises(TypeError):
        weights_digest({"w": 1.0})


def test_old_container_names_still_work_with_a_warning():
    """encode/decode were the container's names before pack/unpack (encode/decode now name what
    images go through); they keep working, with a DeprecationWarning."""
    import idemrt.bitstream as bsfmt

    bs = Bitstream(codec="bmshj2018-hyperprior", quality=1, weights_hash=HASH, height=64, width=64,
                   padded_height=64, padded_width=64, streams=[b"ab", b"c"], latent_shape=(2, 2))
    with pytest.warns(DeprecationWarning, match="pack"):
        data = bsfmt.encode(bs)
    with pytest.warns(DeprecationWarning, match="unpack"):
        assert bsfmt.decode(data) == unpack(data)
    assert data == pack(bs)
