"""The PSC command-line pieces (idemrt.psc.cli) as idemrt/cli.py wires them, on a tiny UNet file."""
import argparse

import pytest
import torch
from PIL import Image

from idemrt import BackendError, IdemrtError
from idemrt import bitstream as bsfmt
from idemrt.cli import build_parser
from idemrt.models.unet import UNetConfig
from idemrt.psc.cli import compress_cli, decompress_cli
from tiny_models import TINY_UNET, tiny_unet_state


def test_options_fit_the_main_parser():
    parser = build_parser()  # idemrt/cli.py adds the PSC options to compress and decompress
    args = parser.parse_args(["compress", "in.png", "out.idm", "--codec", "psc", "--unet", "u.pt",
                              "--bpp", "0.1", "--s", "8", "--r", "6", "--sampler-steps", "10",
                              "--backend", "fast", "--dtype", "fp16"])
    assert (args.codec, args.unet, args.bpp, args.s, args.r, args.psc_steps, getattr(args, "steps", None)) == \
        ("psc", "u.pt", 0.1, 8, 6, 10, None)
    assert (args.backend, args.dtype) == ("fast", "fp16")
    args = parser.parse_args(["decompress", "in.idm", "out.png", "--unet", "u.pt", "--rounds", "3",
                              "--restoration", "guided"])
    assert (args.rounds, args.restoration, args.restoration_steps) == (3, "guided", None)


def test_compress_then_decompress(tmp_path, capsys):
    unet_file, src = tmp_path / "unet.pt", tmp_path / "in.png"
    torch.save(tiny_unet_state(), unet_file)
    Image.new("RGB", (17, 15), (200, 30, 90)).save(src)
    preset = UNetConfig(**TINY_UNET)
    common = dict(unet=str(unet_file), preset=preset, device="cpu", force=False, quiet=True)
    out = tmp_path / "out.idm"
    assert compress_cli(argparse.Namespace(input=str(src), output=str(out), bpp=None, rounds=2, s=4, r=2,
                                           psc_steps=3, psc_seed=0, hash_bits=16, hash_every=1, backend="fast",
                                           dtype="fp32", **common)) == 0
    assert "rounds=2 compute=fast-fp32-cpu" in capsys.readouterr().out
    bs = bsfmt.unpack(out.read_bytes())
    assert bs.extra["compute"] == "fast-fp32-cpu"
    dec_args = dict(input=str(out), mse=False, backend=None, dtype=None, restoration_steps=None, seed=0,
                    restoration="projected", **common)
    png = tmp_path / "out.png"
    assert decompress_cli(argparse.Namespace(output=str(png), rounds=1, **dec_args), bs) == 0
    assert "1/2 rounds" in (printed := capsys.readouterr().out) and "rows computed fast-fp32-cpu" in printed
    assert Image.open(png).size == (17, 15)
    with pytest.raises(IdemrtError, match="rounds"):
        decompress_cli(argparse.Namespace(output=str(tmp_path / "x.png"), rounds=3, **dec_args), bs)
    with pytest.raises(IdemrtError, match="--mse"):
        decompress_cli(argparse.Namespace(output=str(tmp_path / "y.png"), rounds=None, **{**dec_args, "mse": True}), bs)
    with pytest.raises(BackendError, match="eager or fast"):
        decompress_cli(argparse.Namespace(output=str(tmp_path / "z.png"), rounds=None,
                                          **{**dec_args, "backend": "tensorrt"}), bs)
    with pytest.raises(IdemrtError, match="eager path computes in fp32"):
        decompress_cli(argparse.Namespace(output=str(tmp_path / "z.png"), rounds=None,
                                          **{**dec_args, "backend": "eager", "dtype": "bf16"}), bs)
