"""The model store (idemrt.store): manifests, verification, containment, routing by the .idm header,
and its command line (``idemrt models ...``, ``idemrt decompress --models``)."""
import hashlib
import json
import os

import pytest
import torch
from PIL import Image

from idemrt import ModelNotFoundError, bitstream
from idemrt.api import Encoder
from idemrt.models.checkpoint_io import save_state_dict
from idemrt.store import AVAILABLE, UNAVAILABLE, ModelStore
from tiny_models import TINY_UNET, tiny_codec_state, tiny_unet_state

HYPERPRIOR = "bmshj2018-hyperprior"


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def add_model(root, folder, manifest, state=None, *, file="weights.safetensors", fmt=None):
    """A model folder: the weights (as idemrt writes checkpoints: safetensors) and its model.json."""
    d = root / folder
    d.mkdir()
    if state is not None:
        save_state_dict(state, d / file, fmt=fmt)
        manifest = {"file": file, "sha256": sha256(d / file), **manifest}
    (d / "model.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """Two qualities of the tiny hyperprior (different weights; one a PyTorch-format file), a prior."""
    root = tmp_path_factory.mktemp("store")
    add_model(root, "hp-q1", {"id": "hp-q1", "kind": "codec", "codec": HYPERPRIOR, "quality": 1,
                              "source": "tests/tiny_models.py", "licence": "MIT"}, tiny_codec_state(0))
    add_model(root, "hp-q2", {"id": "hp-q2", "kind": "codec", "codec": HYPERPRIOR, "quality": 2},
              tiny_codec_state(1), file="weights.pth", fmt="torch")
    add_model(root, "tiny-prior", {"id": "tiny-prior", "kind": "prior", "config": TINY_UNET}, tiny_unet_state(0))
    return root


@pytest.fixture(scope="module")
def streams(tmp_path_factory, store_dir):
    """An image and its .idm files made with each codec of the store (and with a codec it lacks)."""
    from idemrt import load_codec

    d = tmp_path_factory.mktemp("streams")
    img = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(d / "in.png")
    out = {}
    for name, quality, state in (("q1", 1, tiny_codec_state(0)), ("q2", 2, tiny_codec_state(1)),
                                 ("q3", 3, tiny_codec_state(2)), ("q1-other", 1, tiny_codec_state(3))):
        codec = load_codec(HYPERPRIOR, quality=quality, checkpoint=state)
        out[name] = d / f"{name}.idm"
        out[name].write_bytes(Encoder(codec).encode(img))
    out["dir"] = d
    return out


def copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- the store ------------------------------------------------------------------------------------


def test_list_and_verify(store_dir):
    store = ModelStore(store_dir).check()
    assert {r["id"]: r["status"] for r in store.rows()} == {"hp-q1": AVAILABLE, "hp-q2": AVAILABLE,
                                                           "tiny-prior": AVAILABLE}
    assert store.verify()
    q1 = store.entry("hp-q1").describe()
    assert q1["architecture"] == f"{HYPERPRIOR} q1" and q1["licence"] == "MIT"
    from idemrt import load_codec

    assert q1["weights_digest"] == load_codec(HYPERPRIOR, 1, checkpoint=tiny_codec_state(0)).weights_hash().hex()


def test_corrupt_file_is_unavailable_others_work(store_dir, tmp_path, streams):
    root = copy_store(store_dir, tmp_path / "s")
    path = root / "hp-q1" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the tensor data: still a readable safetensors file
    path.write_bytes(bytes(data))
    store = ModelStore(root)
    assert not store.verify()
    status = {r["id"]: (r["status"], r["reason"]) for r in store.rows()}
    assert status["hp-q1"][0] == UNAVAILABLE and "sha256 mismatch" in status["hp-q1"][1]
    assert status["hp-q2"][0] == AVAILABLE and status["tiny-prior"][0] == AVAILABLE
    with pytest.raises(ModelNotFoundError, match="q1"):
        store.codec_for(streams["q1"].read_bytes())
    assert store.codec_for(streams["q2"].read_bytes()).quality == 2


def test_file_that_does_not_load_is_unavailable(store_dir, tmp_path):
    """The right sha256 but the wrong architecture: unavailable after loading, with the loader's reason."""
    root = copy_store(store_dir, tmp_path / "s")
    add_model(root, "wrong", {"id": "wrong", "kind": "prior", "preset": "ffhq256"}, tiny_unet_state(0))
    add_model(root, "digest", {"id": "digest", "kind": "codec", "codec": HYPERPRIOR, "quality": 5,
                               "weights_digest": "0" * 32}, tiny_codec_state(0))
    store = ModelStore(root).check()
    assert store.entry("wrong").status == AVAILABLE  # the hash alone is fine
    assert not store.verify()
    assert store.entry("wrong").status == UNAVAILABLE and "missing keys" in store.entry("wrong").reason
    assert store.entry("digest").status == UNAVAILABLE and "weights digest" in store.entry("digest").reason
    assert store.entry("hp-q1").available


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-file", "symlink-folder", "symlink-manifest"])
def test_nothing_outside_the_store_is_loaded(store_dir, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_state_dict(tiny_codec_state(0), outside / "w.safetensors")
    (outside / "model.json").write_text(json.dumps(
        {"id": "evil", "kind": "codec", "codec": HYPERPRIOR, "quality": 1, "file": "w.safetensors",
         "sha256": sha256(outside / "w.safetensors")}))
    root = copy_store(store_dir, tmp_path / "s")
    manifest = {"id": "evil", "kind": "codec", "codec": HYPERPRIOR, "quality": 1,
                "sha256": sha256(outside / "w.safetensors")}
    if case == "dotdot":
        add_model(root, "evil", {**manifest, "file": "../../outside/w.safetensors"})
    elif case == "absolute":
        add_model(root, "evil", {**manifest, "file": str(outside / "w.safetensors")})
    elif case == "symlink-file":
        d = add_model(root, "evil", {**manifest, "file": "w.safetensors"})
        os.symlink(outside / "w.safetensors", d / "w.safetensors")
    elif case == "symlink-folder":
        os.symlink(outside, root / "evil")
    else:
        (root / "evil").mkdir()
        os.symlink(outside / "model.json", root / "evil" / "model.json")
    store = ModelStore(root)
    assert "evil" not in store.entries
    assert store.invalid["evil"]
    assert not store.verify()
    assert store.entry("hp-q1").available


def test_invalid_manifests_are_named(store_dir, tmp_path):
    root = copy_store(store_dir, tmp_path / "s")
    sha = "0" * 64
    add_model(root, "nojson", {})
    (root / "nojson" / "model.json").write_text("{not json")
    add_model(root, "kind", {"id": "k", "kind": "vocoder", "file": "w", "sha256": sha})
    add_model(root, "typo", {"id": "t", "kind": "codec", "codec": HYPERPRIOR, "qualty": 1, "file": "w",
                             "sha256": sha})
    add_model(root, "codec", {"id": "c", "kind": "codec", "codec": "jpeg", "file": "w", "sha256": sha})
    add_model(root, "short", {"id": "s", "kind": "codec", "codec": HYPERPRIOR, "file": "w", "sha256": "abcd1234"})
    add_model(root, "dup", {"id": "hp-q1", "kind": "codec", "codec": HYPERPRIOR, "file": "w", "sha256": sha})
    add_model(root, "missing", {"id": "m", "kind": "codec", "codec": HYPERPRIOR, "file": "w", "sha256": sha})
    store = ModelStore(root).check()
    assert "not valid JSON" in store.invalid["nojson"]
    assert "vocoder" in store.invalid["kind"]
    assert "qualty" in store.invalid["typo"]
    assert "jpeg" in store.invalid["codec"]
    assert "64 hex" in store.invalid["short"]
    # An ambiguous id names no model: neither folder is used.
    assert "duplicate id 'hp-q1'" in store.invalid["dup"] and "duplicate id" in store.invalid["hp-q1"]
    assert "hp-q1" not in store.entries
    assert store.entry("m").status == UNAVAILABLE and "No such file" in store.entry("m").reason
    assert store.entry("hp-q2").available and store.entry("tiny-prior").available
    assert not store.verify()


# --- routing --------------------------------------------------------------------------------------


def test_routing_by_header(store_dir, streams):
    store = ModelStore(store_dir)
    for name, quality in (("q1", 1), ("q2", 2)):
        data = streams[name].read_bytes()
        codec = store.codec_for(data)
        assert codec.quality == quality
        assert codec.weights_hash() == bitstream.unpack(data).weights_hash
    # A codec the store lacks: a quality it has not, or the same quality with other weights.
    for name, needs in (("q3", "q3"), ("q1-other", "q1")):
        bs = bitstream.unpack(streams[name].read_bytes())
        with pytest.raises(ModelNotFoundError) as err:
            store.codec_for(bs)
        assert err.value.codec == HYPERPRIOR and err.value.weights_digest == bs.weights_hash.hex()
        assert err.value.quality == bs.quality
        assert f"{HYPERPRIOR} {needs}" in str(err.value) and bs.weights_hash.hex() in str(err.value)


def test_prior_only_by_id(store_dir):
    store = ModelStore(store_dir)
    unet = store.prior("tiny-prior")
    assert unet.config.image_size == TINY_UNET["image_size"]
    assert store.prior("tiny-prior") is unet  # loaded once
    for bad in ("hp-q1", "ffhq256", "../tiny-prior"):
        with pytest.raises(ModelNotFoundError, match="tiny-prior"):
            store.prior(bad)


# --- the command line -----------------------------------------------------------------------------


def main(capsys, *args):
    from idemrt import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_models_list_info_verify(store_dir, tmp_path, capsys):
    code, out, _ = main(capsys, "models", "list", store_dir)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "ARCHITECTURE", "STATUS"]
    assert any(line.startswith("hp-q2") and f"{HYPERPRIOR} q2" in line and "available" in line for line in lines)
    code, out, _ = main(capsys, "models", "info", store_dir, "hp-q1")
    assert code == 0 and "licence: MIT" in out and "status: available" in out and "weights_digest: " in out
    code, _, err = main(capsys, "models", "info", store_dir, "nope")
    assert code == 3 and "nope" in err
    code, out, err = main(capsys, "models", "verify", store_dir)
    assert code == 0 and "unavailable" not in out

    root = copy_store(store_dir, tmp_path / "s")
    (root / "hp-q2" / "weights.pth").write_bytes(b"garbage")
    code, out, err = main(capsys, "models", "verify", root)
    assert code == 3
    assert "'hp-q2' is unavailable: sha256 mismatch" in err and "hp-q1" not in err
    code, out, _ = main(capsys, "models", "list", root)
    assert code == 0 and "unavailable: sha256 mismatch" in out
    code, _, err = main(capsys, "models", "verify", tmp_path / "nowhere")
    assert code == 3 and "not a directory" in err


def test_cli_decompress_through_the_store(store_dir, streams, tmp_path, capsys, monkeypatch):
    """Routing by header gives the same images as the explicit checkpoint paths."""
    d = tmp_path
    for name, state in (("q1", tiny_codec_state(0)), ("q2", tiny_codec_state(1))):
        save_state_dict(state, d / f"{name}.safetensors")
        code, _, err = main(capsys, "decompress", streams[name], d / f"{name}-store.png", "--mse",
                            "--models", store_dir)
        assert code == 0, err
        code, _, err = main(capsys, "decompress", streams[name], d / f"{name}-path.png", "--mse",
                            "--codec-checkpoint", d / f"{name}.safetensors")
        assert code == 0, err
        assert (d / f"{name}-store.png").read_bytes() == (d / f"{name}-path.png").read_bytes()
    # Perceptual: the prior by its id (its architecture from the manifest) ...
    common = ["--steps", "2", "--quiet", "--seed", "3"]
    code, _, err = main(capsys, "decompress", streams["q1"], d / "p-store.png", "--models", store_dir,
                        "--prior", "tiny-prior", *common)
    assert code == 0, err
    # ... equals --unet FILE with the tiny config (passed through the API the CLI calls).
    from idemrt.models import unet_loading

    real = unet_loading.load_unet
    monkeypatch.setattr(unet_loading, "load_unet", lambda src, preset=None: real(src, **TINY_UNET))
    torch.save(tiny_unet_state(0), d / "unet.pt")
    code, _, err = main(capsys, "decompress", streams["q1"], d / "p-path.png", "--unet", d / "unet.pt",
                        "--codec-checkpoint", d / "q1.safetensors", *common)
    assert code == 0, err
    assert (d / "p-store.png").read_bytes() == (d / "p-path.png").read_bytes()


def test_cli_decompress_store_errors(store_dir, streams, tmp_path, capsys):
    code, _, err = main(capsys, "decompress", streams["q3"], tmp_path / "x.png", "--mse", "--models", store_dir)
    assert code == 3 and f"{HYPERPRIOR} q3" in err
    assert bitstream.unpack(streams["q3"].read_bytes()).weights_hash.hex() in err
    code, _, err = main(capsys, "decompress", streams["q1"], tmp_path / "x.png", "--models", store_dir)
    assert code == 3 and "--prior" in err and "tiny-prior" in err
    code, _, err = main(capsys, "decompress", streams["q1"], tmp_path / "x.png", "--models", store_dir,
                        "--prior", "hp-q1")
    assert code == 3 and "no prior 'hp-q1'" in err
    code, _, err = main(capsys, "decompress", streams["q1"], tmp_path / "x.png", "--mse", "--models", store_dir,
                        "--codec-checkpoint", "x.pth")
    assert code == 3 and "--codec-checkpoint" in err
    code, _, err = main(capsys, "decompress", streams["q1"], tmp_path / "x.png", "--prior", "tiny-prior")
    assert code == 3 and "--models" in err
    assert not (tmp_path / "x.png").exists()
