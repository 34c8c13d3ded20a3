"""Dry run of benchmarks/gpu_variants.py on the CPU with the tiny models (what the GPU lease runs,
so that the lease spends no time on mistakes): it writes the JSON rows it documents, checks
precision against eager fp32, slices its time (a compile variant that cannot fit is recorded as
skipped) and times a whole decode. Its times mean nothing here and are not checked."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_variants.py"
ROW_KEYS = {"preset", "codec", "batch", "variant", "step_ms", "step_ms_per_image", "accuracy_ok", "status"}


def _run(tmp_path, *args):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--codec", "tiny",
           "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((tmp_path / "gpu_variants.json").read_text())


def test_dry_run_on_the_cpu(tmp_path):
    # A generous budget and caps: the shared 2-core machine's speed varies several-fold with its load.
    stdout, data = _run(tmp_path, "--batch", "1", "--variants", "eager,bf16,fp16", "--speeds", "fast",
                        "--decode-variants", "bf16", "--budget-s", "800", "--min-cap-s", "400")
    assert data["environment"]["device"] == "cpu" and data["peak_bf16_tflops"] > 0 and data["bandwidth_gbs"] > 0

    (fl,) = data["floors"]
    assert fl["gflop"] > 1 and fl["weight_mb_bf16"] > 0 and fl["traffic_mb_unfused"] > fl["weight_mb_bf16"]
    assert fl["floor_ms"] > 0

    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["eager", "bf16", "fp16"]
    assert all(ROW_KEYS <= set(r) and (r["preset"], r["codec"], r["batch"]) == ("tiny", "tiny", 1)
               for r in rows.values())
    eager = rows["eager"]
    assert eager["status"] == "ok" and eager["accuracy_ok"] is True
    assert max(eager["eps_rel_err"]) == 0 and max(eager["grad_rel_err"]) <= 1e-6  # itself, TF32 aside
    for name in ("bf16", "fp16"):
        r = rows[name]
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["step_ms_per_image"] == r["step_ms"]
        assert len(r["eps_rel_err"]) == len(r["grad_rel_err"]) == len(data["check_steps"]) == 3
        # low precision is not fp32: the check sees it (eps measured 1e-3 (fp16) to 1e-2 (bf16))
        assert 0 < max(r["eps_rel_err"]) < 0.1 and min(r["grad_rel_err"]) > 0
        assert r["accuracy_ok"] == (max(r["eps_rel_err"]) <= data["eps_tol"]
                                    and max(r["grad_rel_err"]) <= data["grad_tol"])
    assert max(rows["fp16"]["eps_rel_err"]) < max(rows["bf16"]["eps_rel_err"])

    (decode,) = data["decodes"]
    assert decode["speed"] == "fast" and decode["variant"] == "bf16"
    assert decode["status"] == "ok" and decode["seconds"] > 0 and decode["steps"] > 0
    table = stdout[stdout.index("preset      codec"):]  # the table comes last
    assert "fastest accurate: tiny tiny b1" in table and "decode fast bf16" in table


def test_what_does_not_fit_is_recorded_as_skipped(tmp_path):
    """A budget spent before the first case: every row is there, skipped, compile variants last."""
    stdout, data = _run(tmp_path, "--batch", "1,2", "--variants", "bf16-blocks,eager", "--speeds", "",
                        "--budget-s", "0")
    assert [(r["batch"], r["variant"]) for r in data["rows"]] == [(1, "eager"), (2, "eager"), (1, "bf16-blocks"),
                                                                  (2, "bf16-blocks")]
    assert all(r["status"] == "skipped: no time left" and r["step_ms"] is None and r["accuracy_ok"] is None
               and ROW_KEYS <= set(r) for r in data["rows"])
    assert data["floors"] == [] and data["decodes"] == []
    assert "skipped: no time left" in stdout
