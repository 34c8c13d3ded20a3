"""``idemrt export`` (add_export_subparser / main_export)."""
import argparse

import onnx
import pytest

from idemrt.errors import BackendError, CheckpointError
from idemrt.export.cli import add_export_subparser


def _parse(argv):
    parser = argparse.ArgumentParser(prog="idemrt")
    add_export_subparser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["export", *argv])


def test_exports_validates_and_checks_codec_graphs(tmp_path, capsys):
    args = _parse([str(tmp_path), "--graphs", "analysis,synthesis", "--random-codec", "--quality", "1",
                   "--height", "64", "--width", "64", "--validate", "--check-tensorrt"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for name, line in zip(("analysis", "synthesis"), lines):
        assert str(tmp_path / f"{name}.onnx") in line
        assert "onnxruntime vs PyTorch max rel. error" in line and "TensorRT parser check OK" in line
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"))


def test_bad_requests(tmp_path):
    args = _parse([str(tmp_path), "--graphs", "analysis,bogus", "--random-codec", "--quality", "1"])
    with pytest.raises(BackendError, match="bogus"):
        args.func(args)
    args = _parse([str(tmp_path), "--graphs", "step_gradient", "--random-codec", "--quality", "1"])
    with pytest.raises(CheckpointError, match="--unet"):
        args.func(args)
