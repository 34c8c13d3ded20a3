"""Loading and converting codec checkpoints: weight sources, old compressai names,
ELiC-ReImplemetation -> Elic2022Chandelier, convert_checkpoint, and the errors of each.

The ELIC references are the verified key map of the official code (tests/data/elic_reimpl_to_compressai.json)
and the TestModel key/shape list (tests/data/elic_reimpl_keys.json), both from the reference code
(docs/reference_code.md §3).
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from compressai.models import ScaleHyperprior
from compressai.models.base import get_scale_table
from compressai.models.sensetime import Elic2022Chandelier

import idemrt
from idemrt.models.codec import KNOWN_CODECS
from idemrt.models.codec_loading import (
    _WIDTHS,
    FLAT_STYLE,
    LIST_STYLE,
    convert_checkpoint,
    convert_elic_reimpl,
    detect_codec_name,
    is_elic_reimpl,
    load_codec,
    normalize_entropy_bottleneck_keys,
)
from test_codec import SMALL, reference_model, small_state_dict

DATA = Path(__file__).parent / "data"
ELIC_KEYS = json.loads((DATA / "elic_reimpl_keys.json").read_text())
ELIC_MAP = json.loads((DATA / "elic_reimpl_to_compressai.json").read_text())
MAPPING = ELIC_MAP["mapping"]
# 1.1-style spelling (released checkpoints) -> the spelling used as source keys of MAPPING.
ALIASES = ELIC_MAP["checkpoint_key_aliases"]["aliases"]


def _spell(state, old):
    """Rename list-style entropy-bottleneck keys to compressai 1.0 (``old``) or else 1.1 spelling."""
    out = {}
    for k, v in state.items():
        for plural, singular in (("matrices", "matrix"), ("biases", "bias"), ("factors", "factor")):
            prefix = f"entropy_bottleneck.{plural}."
            if prefix in k:
                head, index = k.split(prefix)
                k = f"{head}entropy_bottleneck." + (f"_{plural}.{index}" if old else f"_{singular}{index}")
        out[k] = v
    assert out.keys() != state.keys()
    return out


def _released_spelling(state):
    """ELiC-ReImplemetation key names as released (compressai 1.1: entropy_bottleneck._matrix{i} ...)."""
    return {next((a for a, s in ALIASES.items() if s == k), k): v for k, v in state.items()}


# --- entropy-bottleneck names -------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["1.0", "1.1", "1.2.7"])
def test_all_entropy_bottleneck_spellings_load(spelling):
    state = small_state_dict("bmshj2018-hyperprior")
    ckpt = {"1.0": lambda s: _spell(s, old=True), "1.1": lambda s: _spell(s, old=False), "1.2.7": dict}[spelling](state)
    codec = load_codec("bmshj2018-hyperprior", checkpoint=ckpt)
    loaded = codec.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_spelling_round_trip_and_duplicates():
    state = small_state_dict("bmshj2018-factorized")
    flat = normalize_entropy_bottleneck_keys(state, FLAT_STYLE)
    assert "entropy_bottleneck._matrix0" in flat and "entropy_bottleneck._factor3" in flat
    assert "entropy_bottleneck.matrices.0" not in flat
    assert normalize_entropy_bottleneck_keys(flat, LIST_STYLE).keys() == state.keys()
    both = {**state, "entropy_bottleneck._bias1": state["entropy_bottleneck.biases.1"]}
    with pytest.raises(idemrt.CheckpointError, match="twice"):
        normalize_entropy_bottleneck_keys(both, LIST_STYLE)


def test_dataparallel_prefix_is_stripped():
    state = small_state_dict("mbt2018-mean")
    codec = load_codec("mbt2018-mean", checkpoint={f"module.{k}": v for k, v in state.items()})
    assert torch.equal(codec.model.state_dict()["h_s.4.weight"], state["h_s.4.weight"])


def test_every_codec_has_its_width_inference():
    assert set(_WIDTHS) == set(KNOWN_CODECS)


@pytest.mark.parametrize("name", list(SMALL))
def test_detect_codec_name(name):
    assert detect_codec_name(small_state_dict(name, update=False)) == name


def test_detect_codec_name_unknown():
    assert detect_codec_name({"fc.weight": torch.zeros(2, 2)}) is None


# --- ELiC-ReImplemetation key map ---------------------------------------------------------------------


def test_elic_rules_reproduce_the_verified_key_map():
    placeholders = {k: torch.tensor(float(i)) for i, k in enumerate(ELIC_KEYS)}
    assert is_elic_reimpl(placeholders)
    expected = {}
    for src, dst in MAPPING.items():
        for target in dst if isinstance(dst, list) else [dst]:
            expected[target] = placeholders[src]
    for ckpt in (placeholders, _released_spelling(placeholders)):
        out = convert_elic_reimpl(ckpt)
        assert out.keys() == expected.keys()
        assert all(out[k] is expected[k] for k in expected)
    assert set(expected) == set(Elic2022Chandelier(N=8, M=16, groups=[2, 2, 4, 4, 4]).state_dict())


def test_elic_unknown_key_is_named():
    placeholders = {k: torch.zeros(1) for k in ELIC_KEYS}
    placeholders["attention.weight"] = torch.zeros(1)
    with pytest.raises(idemrt.CheckpointError, match=r"attention\.weight"):
        convert_elic_reimpl(placeholders)


def _checkerboard_mask(shape):
    # The TestModel mask: 1 on taps (r, c) with r + c odd, 0 elsewhere (centre included).
    r = torch.arange(shape[2])[:, None]
    c = torch.arange(shape[3])[None, :]
    return ((r + c) % 2 == 1).float().expand(shape).clone()


def _random_elic_reimpl_state(seed=0):
    """A TestModel state_dict with random weights of the listed shapes and realistic buffers."""
    g = torch.Generator().manual_seed(seed)
    tail = math.log(2 / 1e-9 - 1)
    state = {}
    for key, shape in ELIC_KEYS.items():
        if key.endswith(".mask"):
            t = _checkerboard_mask(shape)
        elif key == "entropy_bottleneck.target":
            t = torch.tensor([-tail, 0.0, tail])
        elif key.endswith("likelihood_lower_bound.bound"):
            t = torch.tensor([1e-9])
        elif key.endswith(("lower_bound_scale.bound", "scale_bound")):
            t = torch.tensor([0.11])
        elif key == "entropy_bottleneck.quantiles":
            t = torch.tensor([-10.0, 0.0, 10.0]).repeat(shape[0], 1, 1) + 0.3 * torch.randn(shape, generator=g)
        elif shape == [0]:  # CDF tables: empty until update()
            t = torch.zeros(0) if key.endswith("scale_table") else torch.zeros(0, dtype=torch.int32)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 10
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state[key] = t
    # As in the reference's "scaled" variant: large latents so that rounding and context matter.
    state["g_a.13.weight"] *= 20
    state["h_a.4.weight"] *= 5
    return state


def _load_by_hand(state):
    """Elic2022Chandelier() with ``state`` copied in key by key following the verified map."""
    model = Elic2022Chandelier()
    assigned = set()
    for src, dst in MAPPING.items():
        for target in dst if isinstance(dst, list) else [dst]:
            module_name, attr = target.rsplit(".", 1)
            module = model.get_submodule(module_name)
            if attr in module._parameters:
                assert module._parameters[attr].shape == state[src].shape
                module._parameters[attr].data = state[src].clone()
            else:
                module._buffers[attr] = state[src].clone().to(module._buffers[attr].dtype)
            assigned.add(target)
    assert assigned == set(model.state_dict())
    return model


@pytest.fixture(scope="module")
def elic_full():
    """A full-size random TestModel checkpoint as released (1.1 names, filled CDF tables) + its hand-loaded twin."""
    state = _random_elic_reimpl_state()
    ref = _load_by_hand(state)
    # A non-default scale table: the loaded tables must be the checkpoint's, resized, not recomputed.
    ref.update(scale_table=get_scale_table(0.12, 200, 50), force=True)
    ref.eval()
    gc = ref.latent_codec["y"].latent_codec["y0"].latent_codec["y"].gaussian_conditional
    eb = ref.latent_codec["hyper"].entropy_bottleneck
    for buf in ("_offset", "_quantized_cdf", "_cdf_length", "scale_table"):
        state[f"gaussian_conditional.{buf}"] = getattr(gc, buf).clone()
    for buf in ("_offset", "_quantized_cdf", "_cdf_length"):
        state[f"entropy_bottleneck.{buf}"] = getattr(eb, buf).clone()
    released = _released_spelling(state)
    assert "entropy_bottleneck._matrix0" in released
    return released, ref


def test_elic_reimpl_checkpoint_equals_hand_loaded_compressai_model(elic_full):
    released, ref = elic_full
    codec = load_codec("elic2022-chandelier", checkpoint=released)
    model = codec.model
    assert (model.g_a[0].out_channels, model.g_a[13].out_channels) == (192, 320)
    assert model.latent_codec["y"].groups == [16, 16, 32, 64, 192]

    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)  # masks the reference's context weights, as every compressai forward does
        y = codec.analysis(x)
        assert torch.equal(y, ref.g_a(x))
        assert y.abs().max() > 3
        hyper, ref_hyper = model.latent_codec["hyper"], ref.latent_codec["hyper"]
        assert torch.equal(hyper.h_a(y), ref_hyper.h_a(y))
        assert torch.equal(hyper(y)["params"], ref_hyper(y)["params"])
        assert torch.equal(codec.quantize(y), ref.latent_codec(y)["y_hat"])
        assert torch.equal(codec.operator(x), expected["x_hat"])
        ours = model(x)
        for k in ("y", "z"):
            assert torch.equal(ours["likelihoods"][k], expected["likelihoods"][k])

    ref_state = ref.state_dict()
    ours = model.state_dict()
    assert ours.keys() == ref_state.keys()
    assert [k for k in ref_state if not torch.equal(ours[k], ref_state[k])] == []
    gc = model.latent_codec["y"].latent_codec["y4"].latent_codec["y"].gaussian_conditional
    assert gc.scale_table.shape == (50,) and torch.equal(gc.scale_table, released["gaussian_conditional.scale_table"])

    c = codec.compress(x)
    assert len(c.strings) == 11 and c.shape == (1, 1)
    with torch.no_grad():
        assert torch.equal(codec.decompress(c.strings, c.shape), ref.decompress([[s] for s in c.strings], {
            "y": [(g, 4, 4) for g in ref.groups], "hyper": (1, 1)})["x_hat"])


def test_elic_reimpl_without_cdf_tables_gets_them_computed():
    """A TestModel saved before update(): CDF tables computed at load, as compressai's update does."""
    state = _random_elic_reimpl_state(seed=1)
    codec = load_codec("elic2022-chandelier", checkpoint=state)
    ref = _load_by_hand(state)
    ref.update(force=True)
    ref_state = ref.state_dict()
    for key, value in codec.model.state_dict().items():
        if key.endswith(("_quantized_cdf", "_offset", "_cdf_length", "scale_table")):
            assert value.numel() > 0 and torch.equal(value, ref_state[key]), key


def test_elic_reimpl_for_another_model_is_refused():
    state = {k: torch.zeros(v) for k, v in ELIC_KEYS.items()}
    with pytest.raises(idemrt.CheckpointError, match="looks like a 'elic2022-chandelier'"):
        load_codec("elic2022-official", checkpoint=state)


# --- convert_checkpoint -------------------------------------------------------------------------------


def test_convert_checkpoint_round_trip_old_zoo_format(tmp_path):
    state = small_state_dict("bmshj2018-hyperprior", update=False)
    src, dst = tmp_path / "zoo.pth.tar", tmp_path / "out" / "converted.pth"
    dst.parent.mkdir()
    torch.save(_spell(state, old=True), src)
    assert convert_checkpoint(src, dst) == "bmshj2018-hyperprior"
    assert sorted(os.listdir(dst.parent)) == ["converted.pth"]  # no temporary file left

    written = torch.load(dst, weights_only=True)
    model = ScaleHyperprior.from_state_dict(written)  # compressai's own strict loader
    assert model.gaussian_conditional._quantized_cdf.numel() > 0
    ref = reference_model("bmshj2018-hyperprior", state)
    torch.manual_seed(6)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["x_hat"], ref(x)["x_hat"])
        assert model.compress(x)["strings"] == ref.compress(x)["strings"]


def test_convert_checkpoint_elic_reimpl(tmp_path):
    """A (small) TestModel checkpoint with 1.1 names -> a file compressai's Elic2022Chandelier loads strictly."""
    name = "elic2022-chandelier"
    state = small_state_dict(name)
    reimpl = {src: state[dst[0] if isinstance(dst, list) else dst] for src, dst in MAPPING.items()}
    reimpl = _released_spelling(reimpl)
    src, dst = tmp_path / "ELIC_0008_ft_3980_Plateau.pth.tar", tmp_path / "elic.pth"
    torch.save(reimpl, src)
    assert convert_checkpoint(src, dst) == name

    cls, kwargs = SMALL[name]
    model = cls(**kwargs)
    model.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    ref = reference_model(name, state)
    torch.manual_seed(7)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["x_hat"], ref(x)["x_hat"])


def test_convert_checkpoint_failures_leave_nothing(tmp_path):
    state = small_state_dict("mbt2018-mean", update=False)
    del state["g_s.0.weight"]
    src, dst = tmp_path / "broken.pth", tmp_path / "out.pth"
    torch.save(state, src)
    with pytest.raises(idemrt.CheckpointError, match=r"g_s\.0\.weight"):
        convert_checkpoint(src, dst)
    torch.save({"fc.weight": torch.zeros(2, 2)}, src)
    with pytest.raises(idemrt.CheckpointError, match="pass its name"):
        convert_checkpoint(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["broken.pth"]


# --- loading errors -----------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(idemrt.CheckpointError) as err:
        load_codec("bpg", checkpoint=small_state_dict("bmshj2018-hyperprior"))
    assert all(name in str(err.value) for name in KNOWN_CODECS)


def test_weight_source_must_be_explicit():
    with pytest.raises(idemrt.CheckpointError, match="weight source"):
        load_codec("bmshj2018-hyperprior", 1)
    with pytest.raises(idemrt.CheckpointError, match="weight source"):
        load_codec("bmshj2018-hyperprior", 1, checkpoint=small_state_dict("bmshj2018-hyperprior"), pretrained=True)
    with pytest.raises(idemrt.CheckpointError, match="no pretrained"):
        load_codec("elic2022-chandelier", 1, pretrained=True)
    with pytest.raises(idemrt.CheckpointError, match="quality"):
        load_codec("cheng2020-anchor", 7, pretrained=True)
    with pytest.raises(idemrt.CheckpointError, match="quality"):
        load_codec("bmshj2018-hyperprior", 0, random_init=True)


def test_random_init_uses_zoo_widths():
    codec = load_codec("bmshj2018-factorized", 1, random_init=True)
    assert (codec.model.N, codec.model.M) == (128, 192)  # compressai zoo, quality 1
    c = codec.compress(torch.rand(1, 3, 16, 16))
    assert codec.decompress(c.strings, c.shape).shape == (1, 3, 16, 16)


def test_pretrained_downloads_the_zoo_file_safely(monkeypatch):
    """pretrained=True fetches compressai's zoo URL with hash check and weights_only, old names accepted."""
    state = small_state_dict("bmshj2018-hyperprior")
    # The zoo files were written by compressai 1.0.x: ParameterList names with an underscore.
    old = {k.replace("entropy_bottleneck.matrices.", "entropy_bottleneck._matrices.")
           .replace("entropy_bottleneck.biases.", "entropy_bottleneck._biases.")
           .replace("entropy_bottleneck.factors.", "entropy_bottleneck._factors."): v for k, v in state.items()}
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return old

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    codec = load_codec("bmshj2018-hyperprior", 1, pretrained=True)
    [(url, kwargs)] = calls
    assert url == "https://compressai.s3.amazonaws.com/models/v1/bmshj2018-hyperprior-1-7eb97409.pth.tar"
    assert kwargs["weights_only"] is True and kwargs["check_hash"] is True
    assert codec.quality == 1
    key = "entropy_bottleneck.matrices.2"
    assert torch.equal(codec.model.state_dict()[key], state[key])


def test_missing_unexpected_and_misshaped_keys_are_named():
    state = small_state_dict("mbt2018-mean")
    missing = {k: v for k, v in state.items() if k != "g_s.2.weight"}
    with pytest.raises(idemrt.CheckpointError, match=r"missing keys: g_s\.2\.weight"):
        load_codec("mbt2018-mean", checkpoint=missing)
    with pytest.raises(idemrt.CheckpointError, match=r"unexpected keys: extra\.weight"):
        load_codec("mbt2018-mean", checkpoint={**state, "extra.weight": torch.zeros(1)})
    bad = dict(state)
    bad["h_s.0.bias"] = torch.zeros(5)
    with pytest.raises(idemrt.CheckpointError, match=r"h_s\.0\.bias: checkpoint \(5,\) vs model \(12,\)"):
        load_codec("mbt2018-mean", checkpoint=bad)
    # A width-defining key missing: named too.
    with pytest.raises(idemrt.CheckpointError, match=r"g_a\.6\.weight"):
        load_codec("mbt2018-mean", checkpoint={k: v for k, v in state.items() if k != "g_a.6.weight"})


def test_wrong_model_name_gets_a_hint():
    with pytest.raises(idemrt.CheckpointError, match="looks like a 'mbt2018-mean'"):
        load_codec("bmshj2018-hyperprior", checkpoint=small_state_dict("mbt2018-mean"))


def test_non_tensor_and_unsafe_content(tmp_path):
    state = small_state_dict("bmshj2018-hyperprior")
    with pytest.raises(idemrt.CheckpointError, match="non-tensor"):
        load_codec("bmshj2018-hyperprior", checkpoint={**state, "epoch": 3})
    path = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module, refused by weights_only
    with pytest.raises(idemrt.CheckpointError):
        load_codec("bmshj2018-hyperprior", checkpoint=path)
    with pytest.raises(idemrt.CheckpointError, match="not found"):
        load_codec("bmshj2018-hyperprior", checkpoint=tmp_path / "absent.pth")


def test_inconsistent_cdf_tables_and_masks_are_refused():
    state = small_state_dict("mbt2018")
    bad_cdf = dict(state)
    bad_cdf["gaussian_conditional._cdf_length"] = state["gaussian_conditional._cdf_length"][:-1]
    with pytest.raises(idemrt.CheckpointError, match="CDF"):
        load_codec("mbt2018", checkpoint=bad_cdf)
    bad_mask = dict(state)
    bad_mask["context_prediction.mask"] = torch.ones_like(state["context_prediction.mask"])
    with pytest.raises(idemrt.CheckpointError, match="mask"):
        load_codec("mbt2018", checkpoint=bad_mask)


# --- safetensors files --------------------------------------------------------------------------------


def _save_st(state, path):
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("name, update", [("bmshj2018-hyperprior", True), ("mbt2018-mean", False),
                                          ("elic2022-chandelier", True)])
def test_safetensors_checkpoint_equals_the_pickle_path(tmp_path, name, update):
    state = small_state_dict(name, update=update)
    torch.save(state, tmp_path / "codec.pth.tar")
    _save_st(state, tmp_path / "codec.safetensors")
    from_pickle = load_codec(name, checkpoint=tmp_path / "codec.pth.tar")
    from_st = load_codec(name, checkpoint=tmp_path / "codec.safetensors")
    a, b = from_pickle.model.state_dict(), from_st.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert from_st.weights_hash() == from_pickle.weights_hash()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert from_st.model.compress(x)["strings"] == from_pickle.model.compress(x)["strings"]


def test_old_spelling_in_a_safetensors_file_is_normalised(tmp_path):
    state = small_state_dict("bmshj2018-hyperprior", update=False)
    path = _save_st(_spell(state, old=True), tmp_path / "old.safetensors")
    loaded = load_codec("bmshj2018-hyperprior", checkpoint=path).model.state_dict()
    static = [k for k in state if not k.endswith(("_quantized_cdf", "_offset", "_cdf_length", "scale_table"))]
    assert len(static) > 10 and all(torch.equal(loaded[k], state[k]) for k in static)


def test_bad_safetensors_codec_checkpoints_are_refused(tmp_path):
    state = small_state_dict("mbt2018-mean")
    good = _save_st(state, tmp_path / "good.safetensors").read_bytes()
    n = int.from_bytes(good[:8], "little")
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) - 10])
    (tmp_path / "header.safetensors").write_bytes(good[:8] + b"{" + b"x" * (n - 1) + good[8 + n:])
    (tmp_path / "length.safetensors").write_bytes((n + 10**9).to_bytes(8, "little") + good[8:])
    for name, match in (("truncated", "truncated"), ("header", "not valid JSON"), ("length", "header length")):
        with pytest.raises(idemrt.CheckpointError, match=match):
            load_codec("mbt2018-mean", checkpoint=tmp_path / f"{name}.safetensors")
    missing = {k: v for k, v in state.items() if k != "g_s.0.weight"}
    with pytest.raises(idemrt.CheckpointError, match=r"missing keys: g_s\.0\.weight"):
        load_codec("mbt2018-mean", checkpoint=_save_st(missing, tmp_path / "missing.safetensors"))
    misshaped = dict(state, **{"h_s.4.weight": torch.zeros(3, 3, 3, 3)})
    with pytest.raises(idemrt.CheckpointError, match=r"h_s\.4\.weight: checkpoint \(3, 3, 3, 3\)"):
        load_codec("mbt2018-mean", checkpoint=_save_st(misshaped, tmp_path / "misshaped.safetensors"))
    with pytest.raises(idemrt.CheckpointError, match="looks like a 'mbt2018-mean'"):
        load_codec("mbt2018", checkpoint=tmp_path / "good.safetensors")


def test_sha256_pin_of_a_safetensors_codec_checkpoint(tmp_path):
    import hashlib

    path = _save_st(small_state_dict("bmshj2018-hyperprior"), tmp_path / "codec.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    load_codec("bmshj2018-hyperprior", checkpoint=path, sha256=digest[:8])
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(idemrt.CheckpointError, match="sha256"):
        load_codec("bmshj2018-hyperprior", checkpoint=path, sha256=wrong)


@pytest.mark.parametrize("dst_name", ["converted.safetensors", "converted"])
def test_convert_checkpoint_writes_safetensors_by_default(tmp_path, dst_name):
    import safetensors.torch

    from idemrt.models.checkpoint_io import checkpoint_format

    state = small_state_dict("bmshj2018-hyperprior", update=False)
    src, dst = tmp_path / "zoo.pth.tar", tmp_path / "out" / dst_name
    dst.parent.mkdir()
    torch.save(_spell(state, old=True), src)
    assert convert_checkpoint(src, dst) == "bmshj2018-hyperprior"
    assert os.listdir(dst.parent) == [dst_name]  # written atomically: no temporary file left
    assert checkpoint_format(dst) == "safetensors"
    with open(dst, "rb") as f:
        assert f.read(9)[8:] == b"{"

    written = safetensors.torch.load_file(str(dst))  # no pickle
    model = ScaleHyperprior.from_state_dict(written)  # compressai's own strict loader
    ref = reference_model("bmshj2018-hyperprior", state)
    torch.manual_seed(6)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model.compress(x)["strings"] == ref.compress(x)["strings"]
    # ... and idemrt's loader reads it back to the same codec as the source.
    again = load_codec("bmshj2018-hyperprior", checkpoint=dst)
    assert again.weights_hash() == load_codec("bmshj2018-hyperprior", checkpoint=src).weights_hash()
    with pytest.raises(idemrt.fileio.OutputExistsError):
        convert_checkpoint(src, dst)
    convert_checkpoint(dst, tmp_path / "back.pth")  # safetensors in, PyTorch out (the name asks for it)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == written.keys() and all(torch.equal(back[k], written[k]) for k in back)


def test_convert_checkpoint_format_override(tmp_path):
    from idemrt.models.checkpoint_io import checkpoint_format

    src = tmp_path / "src.pth"
    torch.save(small_state_dict("mbt2018"), src)
    convert_checkpoint(src, tmp_path / "a.pt", fmt="safetensors")
    convert_checkpoint(src, tmp_path / "b.safetensors", fmt="torch")
    assert checkpoint_format(tmp_path / "a.pt") == "safetensors"
    assert checkpoint_format(tmp_path / "b.safetensors") == "torch"
    for name in ("a.pt", "b.safetensors"):  # both load, each by its content
        load_codec("mbt2018", checkpoint=tmp_path / name)
    with pytest.raises(ValueError, match="format"):
        convert_checkpoint(src, tmp_path / "c", fmt="pickle")
    assert not (tmp_path / "c").exists()
