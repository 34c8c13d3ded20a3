"""load_unet: sources, wrappers, dtypes, and every way a checkpoint can be refused."""
import os
import pickle

import pytest
import torch

import adm_reference as ref
import idemrt
from idemrt import CheckpointError
from idemrt.models.unet import ADMUNet, UNetConfig
from idemrt.models.unet_loading import load_unet

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
            attention_resolutions="16", num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)
# The same architecture expressed as overrides of the FFHQ preset.
TINY_FROM_FFHQ = dict(image_size=32, num_channels=32, channel_mult="1,2", num_head_channels=16)


@pytest.fixture(scope="module")
def state():
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ADMUNet(UNetConfig(**TINY)).state_dict().items()}
    return ref.random_state(shapes, seed=5)


def inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, torch.tensor([999, 3])


def assert_matches_reference(model, state64):
    x, t = inputs()
    with torch.no_grad():
        got = model(x, t).double()
    want = ref.unet(state64, TINY, x.double(), t)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def assert_inference_ready(model):
    assert isinstance(model, ADMUNet) and not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 and not p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------ accepted sources


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "ema"])
def test_path_source_with_wrappers(tmp_path, state, wrapper):
    path = tmp_path / "unet.pt"
    torch.save(state if wrapper is None else {wrapper: state, "step": torch.tensor(7)}, path)
    model = load_unet(path, **TINY)
    assert_inference_ready(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert_matches_reference(model, ref.to64(state))


def test_str_path_and_preset_with_overrides(tmp_path, state):
    path = tmp_path / "unet.pt"
    torch.save(state, path)
    model = load_unet(str(path), "ffhq256", **TINY_FROM_FFHQ)
    assert model.config == UNetConfig(**dict(TINY, num_heads=4))
    assert_matches_reference(model, ref.to64(state))


def test_dict_source_is_copied_not_shared(state):
    model = load_unet({"model": state}, UNetConfig(**TINY))
    assert_inference_ready(model)
    assert_matches_reference(model, ref.to64(state))
    params = dict(model.named_parameters())
    assert all(params[k].data_ptr() != v.data_ptr() for k, v in state.items())


def test_fp16_checkpoint_loads_into_fp32(tmp_path, state):
    half = {k: v.half() for k, v in state.items()}
    torch.save(half, tmp_path / "unet16.pt")
    model = load_unet(tmp_path / "unet16.pt", device="cpu", **TINY)
    assert_inference_ready(model)
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in half.items())
    assert_matches_reference(model, ref.to64(half))


def test_lazy_top_level_export():
    assert idemrt.load_unet is load_unet


def test_no_parameter_gradients_after_input_gradient(state):
    model = load_unet(state, **TINY)
    x, t = inputs()
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(model(x, t).square().sum(), x)
    assert g.shape == x.shape and g.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------ refused checkpoints


def test_missing_unexpected_and_misshaped_keys_are_named(state):
    broken = dict(state)
    del broken["middle_block.1.qkv.weight"]
    broken["label_emb.weight"] = torch.zeros(1000, 128)
    broken["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_unet(broken, **TINY)
    msg = str(info.value)
    assert "missing keys: middle_block.1.qkv.weight" in msg
    assert "unexpected keys: label_emb.weight" in msg
    assert "out.2.weight: checkpoint (3, 32, 3, 3) vs model (6, 32, 3, 3)" in msg


def test_checkpoint_for_another_preset_is_refused(state):
    with pytest.raises(CheckpointError, match="ffhq256"):
        load_unet(state, "ffhq256")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update({"step": 3}), "non-tensor"),
        (lambda s: s.update({"out.2.bias": torch.zeros(6, dtype=torch.int64)}), "non floating-point.*out.2.bias"),
        (lambda s: s["time_embed.0.bias"].__setitem__(0, float("nan")), "non-finite.*time_embed.0.bias"),
    ],
)
def test_bad_tensor_content(state, change, match):
    broken = {k: v.clone() for k, v in state.items()}
    change(broken)
    with pytest.raises(CheckpointError, match=match):
        load_unet(broken, **TINY)


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, state, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = dict(state, extra=_Exploit(marker))
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_unet(path, **TINY)
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path, state):
    full = tmp_path / "full.pt"
    torch.save(state, full)
    for name, content in [("truncated.pt", full.read_bytes()[:5000]), ("garbage.pt", b"\x00junk" * 10)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_unet(tmp_path / name, **TINY)
    with pytest.raises(CheckpointError, match="not found"):
        load_unet(tmp_path / "absent.pt", **TINY)


def test_architecture_is_never_guessed(state):
    with pytest.raises(ValueError, match="preset"):
        load_unet(state)
    with pytest.raises(ValueError, match="unknown UNet preset"):
        load_unet(state, "ffhq128")


def test_sha256_pinning(tmp_path):
    """Optional digest pinning; compressai-zoo-named files are checked against their name."""
    import hashlib

    from idemrt.models.checkpoint_io import read_checkpoint

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(read_checkpoint(path, sha256=digest)["w"], torch.ones(3))
    assert torch.equal(read_checkpoint(path, sha256=digest[:8].upper())["w"], torch.ones(3))
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(path, sha256=wrong)
    with pytest.raises(ValueError):
        read_checkpoint(path, sha256="abc")
    zoo_ok = tmp_path / f"bmshj2018-hyperprior-1-{digest[:8]}.pth.tar"
    zoo_bad = tmp_path / f"bmshj2018-hyperprior-1-{wrong[:8]}.pth.tar"
    zoo_ok.write_bytes(path.read_bytes())
    zoo_bad.write_bytes(path.read_bytes())
    assert "w" in read_checkpoint(zoo_ok)
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(zoo_bad)


# ------------------------------------------------------------------------------ safetensors files


def _save_st(state, path):
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _st_parts(path):
    """(header length bytes, header JSON bytes, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[:8], raw[8:8 + n], raw[8 + n:]


@pytest.mark.parametrize("half", [False, True])
def test_safetensors_round_trip_equals_the_pickle_path(tmp_path, state, half):
    weights = {k: v.half() for k, v in state.items()} if half else state
    torch.save(weights, tmp_path / "unet.pt")
    _save_st(weights, tmp_path / "unet.safetensors")
    from_pickle = load_unet(tmp_path / "unet.pt", **TINY)
    from_st = load_unet(tmp_path / "unet.safetensors", **TINY)
    assert_inference_ready(from_st)
    a, b = from_pickle.state_dict(), from_st.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(from_st(x, t), from_pickle(x, t))
    assert_matches_reference(from_st, ref.to64(weights))


def test_format_is_detected_by_content_not_name(tmp_path, state):
    from idemrt.models.checkpoint_io import checkpoint_format

    st = _save_st(state, tmp_path / "unet.safetensors")
    renamed = tmp_path / "really_safetensors.pt"
    renamed.write_bytes(st.read_bytes())
    pickled = tmp_path / "really_pickle.safetensors"
    torch.save(state, pickled)
    assert checkpoint_format(renamed) == "safetensors" and checkpoint_format(pickled) == "torch"
    for path in (renamed, pickled):
        model = load_unet(path, **TINY)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_safetensors_file_is_read_without_pickle(tmp_path, state, monkeypatch):
    _save_st(state, tmp_path / "unet.safetensors")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load used on a safetensors file")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    load_unet(tmp_path / "unet.safetensors", **TINY)


def test_loaded_weights_do_not_follow_later_changes_of_the_file(tmp_path, state):
    path = _save_st(state, tmp_path / "unet.safetensors")
    model = load_unet(path, **TINY)
    head, header, data = _st_parts(path)
    with open(path, "r+b") as f:  # overwrite the tensor bytes in place
        f.seek(len(head) + len(header))
        f.write(bytes(len(data)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_corrupt_safetensors_files_are_refused(tmp_path, state):
    path = _save_st(state, tmp_path / "unet.safetensors")
    head, header, data = _st_parts(path)
    n = len(header)
    cases = {
        "truncated.safetensors": (head + header + data[: len(data) // 2], "truncated"),
        "short.safetensors": (head[:5], "truncated"),
        "cut_header.safetensors": (head + header[: n // 2], "header length"),
        "bad_length.safetensors": ((2**40).to_bytes(8, "little") + header + data, "header length"),
        "garbage_json.safetensors": (head + b"{" + b"\xff!" * ((n - 1) // 2) + b" " * ((n - 1) % 2) + data,
                                     "not valid JSON"),
        "not_object.safetensors": ((4).to_bytes(8, "little") + b"[1 ]" + data, "not a JSON object"),
        "bad_dtype.safetensors": (head + header.replace(b'"F32"', b'"X32"', 1) + data, "corrupt safetensors"),
        "bad_offsets.safetensors": (head + header.replace(b'"data_offsets":[0,', b'"data_offsets":[4,', 1) + data,
                                    "corrupt safetensors"),
        # The same bytes under a PyTorch name: still diagnosed as (damaged) safetensors by content.
        "truncated.pt": (head + header + data[:100], "truncated safetensors"),
    }
    assert header.count(b'"data_offsets":[0,') == 1 and b'"F32"' in header
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=match) as info:
            load_unet(tmp_path / name, **TINY)
        assert name in str(info.value)


def test_file_that_is_neither_format_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(CheckpointError, match="neither a safetensors file nor a weights-only PyTorch"):
        load_unet(path, **TINY)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.pop("middle_block.1.qkv.weight"), "missing keys: middle_block.1.qkv.weight"),
        (lambda s: s.update({"label_emb.weight": torch.zeros(1000, 128)}), "unexpected keys: label_emb.weight"),
        (lambda s: s.update({"out.2.weight": torch.zeros(3, 32, 3, 3)}),
         r"out.2.weight: checkpoint \(3, 32, 3, 3\) vs model \(6, 32, 3, 3\)"),
        (lambda s: s.update({"out.2.bias": torch.zeros(6, dtype=torch.int64)}), "non floating-point.*out.2.bias"),
        (lambda s: s.update({"out.2.bias": torch.zeros(6, dtype=torch.bool)}), "non floating-point.*out.2.bias"),
        (lambda s: s["time_embed.0.bias"].__setitem__(0, float("nan")), "non-finite.*time_embed.0.bias"),
        (lambda s: s["time_embed.0.bias"].__setitem__(1, float("-inf")), "non-finite.*time_embed.0.bias"),
    ],
)
def test_safetensors_with_wrong_content_is_refused(tmp_path, state, change, match):
    broken = {k: v.clone() for k, v in state.items()}
    change(broken)
    path = _save_st(broken, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=match):
        load_unet(path, **TINY)


def test_safetensors_for_another_preset_is_refused(tmp_path, state):
    with pytest.raises(CheckpointError, match="ffhq256"):
        load_unet(_save_st(state, tmp_path / "unet.safetensors"), "ffhq256")


def test_sha256_pinning_of_a_safetensors_file(tmp_path, state):
    import hashlib

    path = _save_st(state, tmp_path / "unet.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_unet(path, sha256=digest, **TINY)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    load_unet(path, sha256=digest[:12].upper(), **TINY)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(CheckpointError, match="sha256"):
        load_unet(path, sha256=wrong, **TINY)
    # A zoo-style name (NAME-HASH8.pth.tar) is checked against its hash whatever the content.
    zoo_bad = tmp_path / f"unet-{wrong[:8]}.pth.tar"
    zoo_bad.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        load_unet(zoo_bad, **TINY)
    zoo_ok = tmp_path / f"unet-{digest[:8]}.pth.tar"
    zoo_ok.write_bytes(path.read_bytes())
    load_unet(zoo_ok, **TINY)


def test_save_state_dict_formats_and_atomicity(tmp_path, state):
    from idemrt.fileio import OutputExistsError
    from idemrt.models.checkpoint_io import checkpoint_format, output_format, save_state_dict

    assert output_format("m.safetensors") == output_format("m") == "safetensors"
    assert {output_format(f"m{s}") for s in (".pt", ".pth", ".pth.tar", ".PTH")} == {"torch"}
    assert output_format("m.pt", "safetensors") == "safetensors"
    with pytest.raises(ValueError, match="format"):
        output_format("m", "onnx")
    for name, fmt in (("a.safetensors", None), ("b.pt", None), ("c.pt", "safetensors")):
        written = save_state_dict(state, tmp_path / name, fmt=fmt)
        assert checkpoint_format(tmp_path / name) == written
        model = load_unet(tmp_path / name, **TINY)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(OutputExistsError):
        save_state_dict(state, tmp_path / "a.safetensors")
    save_state_dict({"w": torch.ones(2)}, tmp_path / "a.safetensors", force=True)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.pt", "c.pt"]  # no temporary files
