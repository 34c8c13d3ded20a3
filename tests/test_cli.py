"""The ``idemrt`` command line, run as a user runs it (a subprocess) on tiny model files."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import TINY_UNET, tiny_codec_state, tiny_unet_state


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "idemrt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env
    )


def main(capsys, *args):
    """In-process run of the CLI (fast); returns (exit code, stdout, stderr)."""
    from idemrt import cli

    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.save(tiny_codec_state(), d / "codec.pth")
    torch.save(tiny_unet_state(), d / "unet.pt")
    rng = np.random.default_rng(0)
    img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).resize((48, 40), Image.BILINEAR).save(d / "in.png")
    return d


def test_compress_info_decompress_mse(files):
    d = files
    r = run("compress", d / "in.png", d / "a.idm", "--codec", "bmshj2018-hyperprior", "--quality", "1",
            "--checkpoint", d / "codec.pth")
    assert r.returncode == 0, r.stderr
    assert "bpp" in r.stdout and "PSNR" in r.stdout
    r = run("info", d / "a.idm")
    assert r.returncode == 0, r.stderr
    assert "bmshj2018-hyperprior" in r.stdout and "48" in r.stdout and "40" in r.stdout
    r = run("decompress", d / "a.idm", d / "mse.png", "--mse", "--codec-checkpoint", d / "codec.pth")
    assert r.returncode == 0, r.stderr
    out = Image.open(d / "mse.png")
    assert out.size == (48, 40) and out.mode == "RGB"


def test_refuses_to_overwrite_without_force(files):
    d = files
    args = ["compress", d / "in.png", d / "b.idm", "--codec", "bmshj2018-hyperprior", "--quality", "1",
            "--checkpoint", d / "codec.pth"]
    assert run(*args).returncode == 0
    before = (d / "b.idm").read_bytes()
    r = run(*args)
    assert r.returncode == 3 and "exists" in r.stderr
    assert (d / "b.idm").read_bytes() == before
    assert run(*args, "--force").returncode == 0
    # The input itself is never the output.
    r = run("compress", d / "in.png", d / "in.png", "--codec", "bmshj2018-hyperprior", "--checkpoint",
            d / "codec.pth", "--force")
    assert r.returncode == 3


@pytest.mark.parametrize("damage", ["truncate", "magic", "garbage", "empty"])
def test_malformed_bitstreams_are_reported(files, damage, capsys):
    d = files
    src = d / "a.idm"
    if not src.exists():
        test_compress_info_decompress_mse(files)
    data = src.read_bytes()
    bad = {
        "truncate": data[: len(data) // 2],
        "magic": b"XXXX" + data[4:],
        "garbage": os.urandom(200),
        "empty": b"",
    }[damage]
    path = d / f"bad-{damage}.idm"
    path.write_bytes(bad)
    for args in (("info", path), ("decompress", path, d / f"bad-{damage}.png", "--mse",
                                  "--codec-checkpoint", d / "codec.pth")):
        code, _, err = main(capsys, *args)
        assert code == 3, (args, err)
        assert err.startswith("idemrt: error:") and "Traceback" not in err
    assert not (d / f"bad-{damage}.png").exists()


def test_wrong_codec_checkpoint_and_missing_unet(files, capsys):
    d = files
    if not (d / "a.idm").exists():
        test_compress_info_decompress_mse(files)
    torch.save(tiny_codec_state(seed=1), d / "other.pth")
    code, _, err = main(capsys, "decompress", d / "a.idm", d / "x.png", "--mse", "--codec-checkpoint", d / "other.pth")
    assert code == 3 and "weights" in err
    code, _, err = main(capsys, "decompress", d / "a.idm", d / "x.png", "--codec-checkpoint", d / "codec.pth")
    assert code == 3 and "--unet" in err
    # A UNet checkpoint that is not the preset's architecture is named, not loaded silently.
    code, _, err = main(capsys, "decompress", d / "a.idm", d / "x.png", "--codec-checkpoint", d / "codec.pth",
                        "--unet", d / "unet.pt", "--preset", "ffhq256")
    assert code == 3 and "missing keys" in err
    assert not (d / "x.png").exists()


def test_perceptual_decompress_end_to_end(files, monkeypatch, capsys):
    """The perceptual path of ``decompress`` with the tiny UNet (its config passed through the API
    that the CLI calls), printing the facts a user needs."""
    from idemrt.models import unet_loading

    d = files
    if not (d / "a.idm").exists():
        test_compress_info_decompress_mse(files)
    real = unet_loading.load_unet
    monkeypatch.setattr(unet_loading, "load_unet", lambda src, preset=None: real(src, **TINY_UNET))
    code, out, _ = main(capsys, "decompress", d / "a.idm", d / "p.png", "--unet", d / "unet.pt",
                        "--codec-checkpoint", d / "codec.pth", "--steps", "3", "--quiet")
    assert code == 0
    assert Image.open(d / "p.png").size == (48, 40)
    for fact in ("bpp", "3 steps", "final constraint distance", "PSNR vs MSE decode", "backend eager on cpu (",
                 "threads)", "total"):
        assert fact in out


def test_convert_checkpoint(files, tmp_path):
    d = files
    r = run("convert-checkpoint", d / "codec.pth", tmp_path / "conv.pth")
    assert r.returncode == 0, r.stderr
    assert "bmshj2018-hyperprior" in r.stdout
    converted = torch.load(tmp_path / "conv.pth", weights_only=True)
    original = tiny_codec_state()
    assert all(torch.equal(converted[k], original[k]) for k in ("g_a.0.weight", "g_s.6.weight"))
    r = run("convert-checkpoint", tmp_path / "missing.pth", tmp_path / "conv2.pth")
    assert r.returncode == 3 and not (tmp_path / "conv2.pth").exists()


def test_convert_checkpoint_writes_safetensors(files, tmp_path, capsys):
    import safetensors.torch

    d = files
    code, out, _ = main(capsys, "convert-checkpoint", d / "codec.pth", tmp_path / "conv.safetensors")
    assert code == 0 and "bmshj2018-hyperprior" in out and "safetensors format" in out
    converted = safetensors.torch.load_file(str(tmp_path / "conv.safetensors"))
    original = tiny_codec_state()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in ("g_a.0.weight", "g_s.6.weight"))
    # The safetensors file is a codec checkpoint like any other: compress with it.
    code, _, _ = main(capsys, "compress", d / "in.png", tmp_path / "a.idm", "--codec", "bmshj2018-hyperprior",
                      "--quality", "1", "--checkpoint", tmp_path / "conv.safetensors")
    assert code == 0 and (tmp_path / "a.idm").exists()
    code, out, _ = main(capsys, "convert-checkpoint", tmp_path / "conv.safetensors", tmp_path / "conv.bin",
                        "--format", "torch")
    assert code == 0 and "torch format" in out
    assert torch.load(tmp_path / "conv.bin", weights_only=True).keys() == original.keys()


def test_usage_errors_exit_2():  # argparse exits itself: needs a real process
    r = run("compress")
    assert r.returncode == 2
    r = run("frobnicate")
    assert r.returncode == 2


def test_python_dash_m_idemrt_is_the_idemrt_script(files):
    """`python -m idemrt ...` works like the `idemrt` script (it used to fail: no __main__)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "idemrt", "info", files / "missing.idm"], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 3 and "idemrt: error" in out.stderr  # the CLI's own error handling ran
    helped = subprocess.run([sys.executable, "-m", "idemrt", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "decompress" in helped.stdout and "serve" in helped.stdout
