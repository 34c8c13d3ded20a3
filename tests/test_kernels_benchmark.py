"""The kernel micro-benchmark's CPU smoke mode runs every case and agrees with the references."""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")
pytest.importorskip("compressai", reason="compressai is not installed")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke mode needs the Triton interpreter")
def test_cpu_smoke_mode(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("groupnorm_silu fwd", "igdn fwd+bwd(x)", "g_s fwd + input grad", "sampler_update",
                 "x0_and_mask", "residual_norm_and_seed"):
        assert name in out
    assert "MISMATCH" not in out and " ms" not in out  # no timing claims off the GPU
