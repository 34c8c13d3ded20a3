"""idemrt.psc.Encoder / Decoder end to end on a tiny random ADM UNet (CPU, 15x17 images).

Independent checks: the decoder's measurements are recomputed from the image and its rows in
float64; the rate from the hand formula 8·(rounds·r + hashes·bytes)/(H·W); prefix decodes
against the geometry of orthonormal rows (||x - Hᵀy_q|| shrinks as rows are added, since the
e4m3 error of a measurement is below the measurement itself).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idemrt import BitstreamError, DecodeError, psc
from idemrt import bitstream as bsfmt
from idemrt.psc.acquisition import Acquisition
from idemrt.psc.quantize import round_trip
from tiny_models import tiny_unet

H, W = 15, 17  # padded to 16x18 for the tiny UNet (factor 2)
KW = dict(s=4, r=2, steps=3, seed=3, device="cpu")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return F.interpolate(torch.rand(1, 3, 4, 4), size=(H, W), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def data(unet, image):
    return psc.Encoder(unet, cache=False, **KW).encode(image, rounds=3)


@pytest.fixture(scope="module")
def decoder(unet):
    return psc.Decoder(unet, device="cpu", cache=False)


def _padded(image):
    return F.pad(2 * image - 1, (0, 1, 0, 1), mode="replicate")


def _record_rows(monkeypatch):
    seen = []
    original = Acquisition.append

    def append(self, rows, y_q):
        seen.append(rows.clone())
        return original(self, rows, y_q)

    monkeypatch.setattr(Acquisition, "append", append)
    return seen


def test_encoder_and_decoder_build_identical_rows_and_measurements(unet, image, decoder, monkeypatch):
    seen = _record_rows(monkeypatch)
    data = psc.Encoder(unet, cache=False, **KW).encode(image, rounds=3)
    enc_rows = list(seen)
    seen.clear()
    h, y, code = decoder.measurements(data)
    assert len(enc_rows) == len(seen) == 3
    assert all(torch.equal(a, b) for a, b in zip(enc_rows, seen))
    assert torch.equal(h, torch.cat(enc_rows))
    assert decoder.last.hashes_checked == 3
    x = _padded(image).reshape(-1).double()
    assert torch.equal(y, round_trip((h.double() @ x).float()))  # the encoder measured x along these rows
    assert float((h.double() @ h.double().T - torch.eye(6, dtype=torch.float64)).abs().max()) < 1e-6


def test_a_diverged_decoder_is_stopped_by_the_row_hash(unet, image):
    twin = copy.deepcopy(unet)
    dec = psc.Decoder(twin, device="cpu", cache=False)  # weights hash taken before the change
    with torch.no_grad():
        twin.input_blocks[0][0].weight[0, 0, 0, 0] *= 1 + 1e-6  # a last-bits difference, as another GPU makes
    hashed = psc.Encoder(unet, cache=False, **KW).encode(image, rounds=2)
    with pytest.raises(DecodeError, match="round 0 differ"):
        dec.decode(hashed)
    # Without hashes the same decoder returns an image, silently wrong: the hash is what stops it.
    unhashed = psc.Encoder(unet, cache=False, hash_bits=0, **KW).encode(image, rounds=2)
    assert dec.decode(unhashed, output="tensor").shape == (1, 3, H, W)


def test_prefixes_decode_meet_their_measurements_and_approach_the_image(image, data, decoder):
    x = _padded(image).reshape(-1)
    errors = []
    for k in (1, 2, 3):
        h, y, _ = decoder.measurements(data, rounds=k)
        assert h.shape == (2 * k, 3 * 16 * 18)
        errors.append(float(torch.linalg.vector_norm(x - y @ h)))
        out = decoder.decode(data, rounds=k, output="tensor")
        assert out.shape == (1, 3, H, W) and decoder.last.rounds == k
        assert decoder.last.residual < 1e-4  # the projected restoration meets H x = y_q
    assert errors[0] > errors[1] > errors[2]
    assert torch.equal(decoder.decode(psc.truncate(data, 2), output="tensor"),
                       decoder.decode(data, rounds=2, output="tensor"))
    with pytest.raises(ValueError, match="rounds"):
        decoder.decode(data, rounds=4)


def test_encoding_is_deterministic_and_the_round0_cache_changes_nothing(unet, image, data, tmp_path):
    assert psc.Encoder(unet, cache=False, **KW).encode(image, rounds=3) == data
    first = psc.Encoder(unet, cache_dir=tmp_path, **KW)
    assert first.encode(image, rounds=3) == data and not first.last.cache_hit
    (entry,) = tmp_path.iterdir()
    again = psc.Encoder(unet, cache_dir=tmp_path, **KW)  # fresh memory: reads the file
    assert again.encode(image, rounds=3) == data and again.last.cache_hit
    raw = bytearray(entry.read_bytes())
    raw[100] ^= 1
    entry.write_bytes(bytes(raw))
    damaged = psc.Encoder(unet, cache_dir=tmp_path, **KW)
    assert damaged.encode(image, rounds=3) == data and not damaged.last.cache_hit
    shared = psc.Decoder(unet, device="cpu")  # the in-process cache, filled by the next encode
    psc.Encoder(unet, **KW).encode(image, rounds=1)
    shared.decode(data, output="tensor")
    assert shared.last.cache_hit and shared.last.hashes_checked == 3


def test_rate_follows_the_hand_formula(unet, image, data):
    info = bsfmt.describe(bsfmt.unpack(data))
    assert info["payload_bytes"] == 3 * 2 + 3 * 2  # 3 rounds x r=2 bytes + 3 hashes x 2 bytes
    p = psc.Params(s=4, r=2, steps=3, seed=0)
    per_round = 8 * 4 / (H * W)
    assert psc.rounds_for_bpp(p, 3.5 * per_round, H, W) == 3
    assert psc.rounds_for_bpp(p, 3 * per_round, H, W) == 3
    enc = psc.Encoder(unet, cache=False, **KW)
    out = enc.encode(image, bpp=2.9 * per_round)
    assert enc.last.rounds == 2 and bsfmt.describe(bsfmt.unpack(out))["bpp"] <= 2.9 * per_round
    with pytest.raises(ValueError, match="below one round"):
        enc.encode(image, bpp=0.5 * per_round)
    for kw in ({}, {"bpp": 1.0, "rounds": 2}):
        with pytest.raises(ValueError, match="exactly one"):
            enc.encode(image, **kw)


def test_guided_restoration(image, data, decoder):
    projected = decoder.decode(data, output="tensor")
    guided = decoder.decode(data, restoration="guided", output="tensor")
    assert guided.shape == (1, 3, H, W) and torch.isfinite(guided).all()
    assert not torch.equal(guided, projected)
    img = decoder.decode(data, restoration="guided")
    assert isinstance(img, Image.Image) and img.size == (W, H)
    with pytest.raises(ValueError, match="restoration"):
        decoder.decode(data, restoration="ddpm")


def test_files_for_other_weights_or_with_nan_codes_are_rejected(data):
    with pytest.raises(BitstreamError, match="weights"):
        psc.Decoder(tiny_unet(seed=1), device="cpu").decode(data)
    bs = bsfmt.unpack(data)
    bs.streams = [b"\x7f" + bs.streams[0][1:], bs.streams[1]]
    with pytest.raises(BitstreamError, match="NaN code"):
        psc.Decoder(tiny_unet(), device="cpu").decode(bsfmt.pack(bs))


def test_bad_encoder_arguments(unet):
    with pytest.raises(ValueError, match="r must be"):
        psc.Encoder(unet, s=4, r=4, device="cpu")
    with pytest.raises(ValueError, match="steps"):
        psc.Encoder(unet, s=4, r=2, steps=1, device="cpu")
    with pytest.raises(ValueError, match="entropy"):
        psc.Encoder(unet, s=4, r=2, entropy="lzma", device="cpu")
