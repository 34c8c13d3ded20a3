"""benchmarks/nonfinite_probe.py's verdict: which part the variants' outcomes point to (the GPU run
of gpu_session.sh lease4 reads its cause from it), and its run on the CPU writes the outcomes."""
import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the probe imports serve_load beside it
    spec = importlib.util.spec_from_file_location("nonfinite_probe_benchmark", ROOT / "benchmarks" / "nonfinite_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outcomes(bad=(), ok=()):
    return {**{n: True for n in ok}, **{n: False for n in bad}}


def test_verdict_names_the_part(probe):
    decoders = ["eager-fp32", "fast-bf16-torch", "fast-bf16-triton", "fast-bf16-triton-nographs", "fast-fp32-triton"]
    assert probe.verdict(outcomes(ok=decoders)) == ["finite in every variant run: not reproduced"]
    assert "the decode itself" in probe.verdict(outcomes(bad=decoders))[0]
    # Triton kernels in bf16 only, graphs innocent
    got = probe.verdict(outcomes(bad=["fast-bf16-triton", "fast-bf16-triton-nographs"],
                                 ok=["eager-fp32", "fast-bf16-torch", "fast-fp32-triton"]))
    assert got == ["the Triton kernels in bf16 (fast-fp32-triton finite)"]
    # graphs: the same kernels without graphs are finite
    got = probe.verdict(outcomes(bad=["fast-bf16-triton"], ok=["eager-fp32", "fast-bf16-torch",
                                                                "fast-bf16-triton-nographs"]))
    assert "CUDA graphs (the same kernels without graphs are finite)" in got
    # bf16 without Triton
    assert probe.verdict(outcomes(bad=["fast-bf16-torch"], ok=["eager-fp32"])) == [
        "bf16 without the Triton kernels (fast-bf16-torch)"]
    # only the engine, and only with the stacked table of several speeds
    got = probe.verdict(outcomes(bad=["engine-load-study"], ok=decoders + ["engine-paper-only"]))
    assert got == ["the engine's path only (every Decoder variant finite): the stacked step table of several "
                   "speeds (paper alone finite)"]
    # a mix no rule explains is said so, and a variant that failed otherwise (None) is neither
    got = probe.verdict({"eager-fp32": True, "fast-fp32-triton": False, "fast-bf16-torch": None})
    assert got == ["non-finite in ['fast-fp32-triton']: no single part"]


def test_cpu_run_writes_every_outcome(probe, tmp_path):
    out = tmp_path / "probe.json"
    assert probe.main(["--device", "cpu", "--variants", "eager-fp32,engine-paper-only", "--paper-steps", "2",
                       "--json", str(out)]) == 0
    (request,) = json.loads(out.read_text())["requests"]
    assert request["k"] == 29 and request["size"] == 128 and request["speed"] == "paper"
    assert [o["variant"] for o in request["outcomes"]] == ["eager-fp32", "engine-paper-only"]
    assert all(o["finite"] is True and o["outcome"].startswith("finite") for o in request["outcomes"])
    assert request["verdict"] == ["finite in every variant run: not reproduced"]
