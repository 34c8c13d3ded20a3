"""benchmarks/tiled_gpu.py (issue 28 item 6, for a GPU lease) runs as a dry run on the CPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow  # about 20 s: kept out of the default suite's 15 minutes; the slow suite runs it before a stop
def test_dry_run_times_a_tiled_and_a_native_batch_step(tmp_path):
    import json

    import tiled_gpu

    out = tmp_path / "tiled_gpu.json"
    result = tiled_gpu.main(["--device", "cpu", "--preset", "tiny", "--codec", "tiny", "--size", "64x80",
                             "--warmup", "0", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    tiled, native = result["rows"]
    assert result["windows"] == 9 and (tiled["images"], native["images"]) == (1, 9) and tiled["chunk"] == 9
    assert tiled["step_ms"] > 0 and native["step_ms"] > 0
    # the same windows' UNet work, plus each window's forward again for the backward (and the operator
    # on 64x80 instead of nine 32x32 images): more FLOPs, less than twice as many
    assert 1.05 < tiled["gflop"] / native["gflop"] < 2
