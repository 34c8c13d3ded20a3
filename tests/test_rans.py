"""Native rANS coder (idemrt.entropy) against compressai.ans and a Python transcription of it.

compressai's own encoder writes out of bounds for fewer than ~4 symbols (a heap overflow: it
aborts or segfaults), so it is only called here on streams of at least 16 symbols; shorter ones
are checked against ``_reference_encode``.
"""
import copy
import pickle
import struct

import numpy as np
import pytest
import torch
from compressai.ans import RansDecoder as CaiDecoder
from compressai.ans import RansEncoder as CaiEncoder
from compressai.entropy_models import EntropyModel
from compressai.models import ScaleHyperprior
from compressai.models.sensetime import Elic2022Chandelier

import idemrt.entropy as E
from idemrt.errors import BackendError, BitstreamError

pytestmark = pytest.mark.skipif(not E.available(), reason="native extension not built")


# ----------------------------------------------------------------------------- references
def _reference_encode(symbols, indexes, cdfs, lengths, offsets) -> bytes:
    """compressai 1.2.x BufferedRansEncoder + flush, transcribed with Python integers."""
    pending = []  # (start, freq) for CDF symbols, (chunk, None) for 4-bit bypass chunks
    for s, i in zip(symbols, indexes):
        cdf, max_value, value = cdfs[i], lengths[i] - 2, s - offsets[i]
        raw = 0
        if value < 0:
            raw, value = -2 * value - 1, max_value
        elif value >= max_value:
            raw, value = 2 * (value - max_value), max_value
        pending.append((cdf[value], cdf[value + 1] - cdf[value]))
        if value == max_value:
            n_chunks = 0
            while raw >> (4 * n_chunks):
                n_chunks += 1
            count = n_chunks
            while count >= 15:
                pending.append((15, None))
                count -= 15
            pending.append((count, None))
            pending += [((raw >> (4 * j)) & 15, None) for j in range(n_chunks)]
    x, words = 1 << 31, []
    for start, freq in reversed(pending):
        x_max = (1 << 59) if freq is None else (1 << 47) * freq
        if x >= x_max:
            words.append(x & 0xFFFFFFFF)
            x >>= 32
        x = (x << 4) | start if freq is None else ((x // freq) << 16) + x % freq + start
    words += [x >> 32, x & 0xFFFFFFFF]
    return struct.pack(f"<{len(words)}I", *reversed(words))


def _random_table(rng, n_cdfs=6, max_pmf_len=40, min_pmf_len=1):
    """CDFs the way compressai builds them (EntropyModel._pmf_to_cdf: pmf + tail mass)."""
    pmf_length = torch.from_numpy(rng.integers(min_pmf_len, max_pmf_len + 1, n_cdfs)).int()
    max_length = int(pmf_length.max())
    pmf = torch.from_numpy(rng.dirichlet(np.full(max_length, 0.3), n_cdfs)).float()
    tail = torch.from_numpy(rng.uniform(1e-9, 1e-2, (n_cdfs, 1))).float()
    cdfs = EntropyModel()._pmf_to_cdf(pmf, tail, pmf_length, max_length)
    offsets = torch.from_numpy(rng.integers(-20, 5, n_cdfs)).int()
    return cdfs.numpy(), (pmf_length + 2).numpy(), offsets.numpy()


def _random_symbols(rng, table, n, spread=4):
    """Symbols in, near and (bypass) far outside each CDF's range, negative ones included."""
    cdfs, lengths, offsets = table
    indexes = rng.integers(0, len(lengths), n).astype(np.int32)
    lo = offsets[indexes] - spread
    hi = offsets[indexes] + lengths[indexes] - 2 + spread
    symbols = rng.integers(lo, hi + 1).astype(np.int32)
    far = rng.random(n) < 0.05
    symbols[far] += rng.choice([-1, 1], far.sum()) * rng.integers(1, 5000, far.sum())
    return symbols, indexes


def _cai_encode(symbols, indexes, table):
    cdfs, lengths, offsets = table
    return CaiEncoder().encode_with_indexes(
        symbols.tolist(), indexes.tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist()
    )


def _cai_decode(string, indexes, table):
    cdfs, lengths, offsets = table
    return CaiDecoder().decode_with_indexes(
        string, indexes.tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist()
    )


# ----------------------------------------------------------------------------- compatibility
@pytest.mark.parametrize("seed", range(12))
def test_streams_match_compressai(seed):
    rng = np.random.default_rng(seed)
    table = _random_table(rng)
    symbols, indexes = _random_symbols(rng, table, int(rng.integers(16, 3000)))
    ours = E.encode_with_indexes(symbols, indexes, *table)

    cdfs, lengths, offsets = table
    assert ours == _cai_encode(symbols, indexes, table)
    assert ours == _reference_encode(symbols.tolist(), indexes.tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist())
    np.testing.assert_array_equal(E.decode_with_indexes(ours, indexes, *table), symbols)
    assert _cai_decode(ours, indexes, table) == symbols.tolist()


def test_bypass_extremes_match_compressai():
    rng = np.random.default_rng(1)
    table = _random_table(rng, n_cdfs=2)
    _, lengths, offsets = table
    max_value = int(lengths[0]) - 2
    # raw = 2^28 - 2 and 2^28 - 1 are the largest bypass values (7 chunks), 0 the smallest.
    values = [max_value + 2**27 - 1, -(2**27), max_value, -1, max_value + 7, -8, 0]
    symbols = np.array(values * 3, np.int32) + offsets[0]
    indexes = np.zeros(len(symbols), np.int32)
    ours = E.encode_with_indexes(symbols, indexes, *table)
    assert ours == _cai_encode(symbols, indexes, table)
    np.testing.assert_array_equal(E.decode_with_indexes(ours, indexes, *table), symbols)


def test_beyond_bypass_range_is_rejected():
    table = _random_table(np.random.default_rng(2), n_cdfs=1)
    max_value = int(table[1][0]) - 2
    for value in (max_value + 2**27, -(2**27) - 1):
        symbols = np.array([value + table[2][0]], np.int32)
        with pytest.raises(ValueError, match="bypass"):
            E.encode_with_indexes(symbols, np.zeros(1, np.int32), *table)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_short_streams_match_reference(n):
    rng = np.random.default_rng(n)
    table = _random_table(rng)
    for _ in range(20):
        symbols, indexes = _random_symbols(rng, table, n)
        ours = E.encode_with_indexes(symbols, indexes, *table)
        ref = _reference_encode(symbols.tolist(), indexes.tolist(), *(t.tolist() for t in table))
        assert ours == ref
        np.testing.assert_array_equal(E.decode_with_indexes(ours, indexes, *table), symbols)


def test_empty_stream_is_the_flushed_initial_state():
    table = E.cdf_table(*_random_table(np.random.default_rng(0)))
    empty = np.zeros(0, np.int32)
    string = E.encode(empty, empty, table)
    # State L = 2^31 flushed as two little-endian words, low word first.
    assert string == struct.pack("<II", 2**31, 0)
    assert E.decode(string, empty, table).shape == (0,)


def test_compressai_stream_decodes_natively():
    rng = np.random.default_rng(7)
    table = _random_table(rng, n_cdfs=20, max_pmf_len=200)
    symbols, indexes = _random_symbols(rng, table, 5000)
    string = _cai_encode(symbols, indexes, table)
    np.testing.assert_array_equal(E.decode(string, indexes, E.cdf_table(*table)), symbols)


def test_decode_keeps_index_shape_and_accepts_tensors():
    rng = np.random.default_rng(3)
    table = _random_table(rng)
    symbols, indexes = _random_symbols(rng, table, 60)
    t = E.cdf_table(*(torch.from_numpy(a) for a in table))
    string = E.encode(torch.from_numpy(symbols).long().view(6, 10), torch.from_numpy(indexes).view(6, 10), t)
    out = E.decode(string, indexes.reshape(3, 20), t)
    assert out.shape == (3, 20) and out.dtype == np.int32
    np.testing.assert_array_equal(out.ravel(), symbols)


def test_dropin_classes_take_lists():
    rng = np.random.default_rng(4)
    table = _random_table(rng)
    symbols, indexes = _random_symbols(rng, table, 100)
    lists = [symbols.tolist(), indexes.tolist(), *(t.tolist() for t in table)]
    string = E.RansEncoder().encode_with_indexes(*lists)
    assert string == _cai_encode(symbols, indexes, table)
    assert E.RansDecoder().decode_with_indexes(string, *lists[1:]) == symbols.tolist()


# ----------------------------------------------------------------------------- batches, threads
def test_batch_matches_single_calls():
    rng = np.random.default_rng(5)
    tables = [_random_table(rng) for _ in range(3)]
    native_tables = [E.cdf_table(*t) for t in tables]
    streams = [_random_symbols(rng, tables[k % 3], int(rng.integers(0, 2000))) for k in range(7)]
    symbols, indexes = [s for s, _ in streams], [i for _, i in streams]
    per_stream = [native_tables[k % 3] for k in range(7)]

    singles = [E.encode(s, i, t) for s, i, t in zip(symbols, indexes, per_stream)]
    for threads in (1, 2, 5, 0):
        strings = E.encode_batch(symbols, indexes, per_stream, num_threads=threads)
        assert strings == singles
        decoded = E.decode_batch(strings, indexes, per_stream, num_threads=threads)
        for got, want in zip(decoded, symbols):
            np.testing.assert_array_equal(got, want)
    # One table for every stream.
    same = E.encode_batch(symbols[:2], indexes[:2], native_tables[0], num_threads=2)
    assert same == [E.encode(s, i, native_tables[0]) for s, i in zip(symbols[:2], indexes[:2])]


def test_batch_error_names_the_stream():
    rng = np.random.default_rng(6)
    table = _random_table(rng)
    t = E.cdf_table(*table)
    streams = [_random_symbols(rng, table, 50) for _ in range(4)]
    strings = E.encode_batch([s for s, _ in streams], [i for _, i in streams], t)
    strings[2] = strings[2][:-4]
    with pytest.raises(BitstreamError, match="stream 2"):
        E.decode_batch(strings, [i for _, i in streams], t, num_threads=2)
    with pytest.raises(ValueError, match="stream 1: 49 symbols but 50 indexes"):
        E.encode_batch([streams[0][0], streams[1][0][:-1]], [streams[0][1], streams[1][1]], t)
    with pytest.raises(ValueError, match="2 CDF tables for 4 streams"):
        E.decode_batch(strings, [i for _, i in streams], [t, t])


# ----------------------------------------------------------------------------- malformed input
@pytest.fixture(scope="module")
def coded():
    rng = np.random.default_rng(8)
    table = _random_table(rng)
    symbols, indexes = _random_symbols(rng, table, 300)
    t = E.cdf_table(*table)
    return E.encode(symbols, indexes, t), symbols, indexes, t


def test_truncation_at_every_length_raises(coded):
    string, _, indexes, t = coded
    for cut in range(len(string)):
        with pytest.raises(BitstreamError):
            E.decode(string[:cut], indexes, t)


def test_trailing_bytes_raise(coded):
    string, _, indexes, t = coded
    for extra in (b"\0", b"\0" * 4, string[:8]):
        with pytest.raises(BitstreamError):
            E.decode(string + extra, indexes, t)


def test_bit_flips_and_garbage_never_crash(coded):
    string, symbols, indexes, t = coded
    rng = np.random.default_rng(9)

    def decode_or_reject(s):
        try:
            out = E.decode(s, indexes, t)
        except BitstreamError:
            return None
        assert out.shape == indexes.shape
        return out

    # An entropy coded stream has almost no redundancy, so some flips decode to other symbols;
    # but no bit is ignored: a flipped stream never decodes to the original symbols.
    for bit in range(len(string) * 8):
        flipped = bytearray(string)
        flipped[bit // 8] ^= 1 << (bit % 8)
        out = decode_or_reject(bytes(flipped))
        assert out is None or not np.array_equal(out, symbols)
    for n in [0, 4, 8, 12, 100, len(string), 4096]:
        for _ in range(20):
            decode_or_reject(rng.bytes(n))


def test_bad_indexes_raise(coded):
    string, symbols, indexes, t = coded
    for bad in (-1, len(t)):
        idx = indexes.copy()
        idx[17] = bad
        with pytest.raises(BitstreamError, match="position 17"):
            E.decode(string, idx, t)
        with pytest.raises(ValueError, match="position 17"):
            E.encode(symbols, idx, t)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, l, o: l.__setitem__(1, c.shape[1] + 1), "length"),
        (lambda c, l, o: l.__setitem__(1, 1), "length"),
        (lambda c, l, o: c.__setitem__((2, 0), 1), "from 0 to 2"),
        (lambda c, l, o: c.__setitem__((2, l[2] - 1), 65535), "from 0 to 2"),
        (lambda c, l, o: c.__setitem__((3, 2), c[3, 1]), "strictly increasing"),
    ],
)
def test_invalid_cdf_tables_raise(mutate, message):
    cdfs, lengths, offsets = _random_table(np.random.default_rng(10), max_pmf_len=10, min_pmf_len=3)
    E.cdf_table(cdfs, lengths, offsets)  # valid before the mutation
    mutate(cdfs, lengths, offsets)
    with pytest.raises(ValueError, match=message):
        E.cdf_table(cdfs, lengths, offsets)


def test_inconsistent_sizes_and_types_raise():
    cdfs, lengths, offsets = _random_table(np.random.default_rng(11))
    with pytest.raises(ValueError, match="rows"):
        E.cdf_table(cdfs, lengths[:-1], offsets)
    with pytest.raises(ValueError, match="2-D"):
        E.cdf_table(cdfs[0], lengths[:1], offsets[:1])
    with pytest.raises(TypeError):
        E.cdf_table(cdfs.astype(np.float32), lengths, offsets)
    with pytest.raises(ValueError, match="int32"):
        E.cdf_table(cdfs.astype(np.int64) + 2**40, lengths, offsets)
    t = E.cdf_table(cdfs, lengths, offsets)
    with pytest.raises(ValueError, match="symbols but"):
        E.encode(np.zeros(5, np.int32), np.zeros(4, np.int32), t)
    with pytest.raises(BitstreamError, match="not bytes"):
        E.decode("abcd" * 4, np.zeros(1, np.int32), t)


# ----------------------------------------------------------------------------- compressai models
def _tiny_hyperprior():
    torch.manual_seed(0)
    model = ScaleHyperprior(N=8, M=12).eval()
    model.update(force=True)
    return model


def _bypassed(em, symbols, indexes):
    """Whether some symbol lies outside its CDF, i.e. is bypass coded."""
    value = symbols - em._offset[indexes]
    return bool(((value < 0) | (value >= em._cdf_length[indexes] - 2)).any())


@pytest.mark.parametrize("gain", [1.0, 100.0])  # 100: latents far outside the CDFs (bypass)
def test_installed_model_gives_identical_bytes(gain):
    model = _tiny_hyperprior()
    model.g_a[-1].weight.data.mul_(gain)
    model.h_a[-1].weight.data.mul_(gain)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.compress(x)
        x_ref = model.decompress(reference["strings"], reference["shape"])["x_hat"]

        eb, gc = model.entropy_bottleneck, model.gaussian_conditional
        y = model.g_a(x)
        z = model.h_a(torch.abs(y))
        z_hat = eb.decompress(reference["strings"][1], z.shape[-2:])
        eb_symbols = torch.round(z - eb._get_medians().reshape(1, -1, 1, 1)).int()
        eb_indexes = eb._build_indexes(z.size()).long()
        gc_indexes = gc.build_indexes(model.h_s(z_hat)).long()
        bypassed = _bypassed(eb, eb_symbols, eb_indexes) and _bypassed(gc, torch.round(y).int(), gc_indexes)
        assert bypassed == (gain > 1)

        assert E.install(model, num_threads=2) == 2
        ours = model.compress(x)
        assert ours["strings"] == reference["strings"]
        x_ours = model.decompress(reference["strings"], reference["shape"])["x_hat"]
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0)


def test_installed_model_rejects_corrupt_streams():
    model = _tiny_hyperprior()
    E.install(model)
    with torch.no_grad():
        out = model.compress(torch.rand(1, 3, 64, 64))
        y_string = out["strings"][0][0]
        with pytest.raises(BitstreamError):
            model.decompress([[y_string[:-4]], out["strings"][1]], out["shape"])


def test_install_covers_latent_codec_models():
    torch.manual_seed(0)
    model = Elic2022Chandelier(N=8, M=24, groups=[4, 4, 8, 8]).eval()
    model.update(force=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.compress(x)
        assert E.install(model) == 5
        ours = model.compress(x)
        assert ours["strings"] == reference["strings"]
        x_ours = model.decompress(ours["strings"], ours["shape"])["x_hat"]
        E.uninstall(model)
        x_ref = model.decompress(reference["strings"], reference["shape"])["x_hat"]
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0)


def test_uninstall_copy_and_pickle_restore_compressai():
    model = _tiny_hyperprior()
    E.install(model)
    x = torch.rand(1, 3, 64, 64)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for m in (other.entropy_bottleneck, other.gaussian_conditional):
            assert type(m).__module__.startswith("compressai") and type(m).__mro__[1] is not E._NativeEntropyModel
            assert not any(k.startswith("_idemrt") for k in vars(m))
        with torch.no_grad():
            assert other.compress(x)["strings"] == model.compress(x)["strings"]
    assert E.uninstall(model) == 2
    assert type(model.gaussian_conditional).compress is EntropyModel.compress


def test_without_extension_install_is_a_no_op(monkeypatch):
    monkeypatch.setattr(E, "_rans", None)
    model = _tiny_hyperprior()
    assert E.install(model) == 0
    assert type(model.entropy_bottleneck).compress is not E._NativeEntropyModel.compress
    with pytest.raises(BackendError):
        E.cdf_table(*_random_table(np.random.default_rng(0)))
    rng = np.random.default_rng(12)
    table = _random_table(rng)
    symbols, indexes = _random_symbols(rng, table, 64)
    lists = [symbols.tolist(), indexes.tolist(), *(t.tolist() for t in table)]
    assert E.RansEncoder().encode_with_indexes(*lists) == _cai_encode(symbols, indexes, table)
