"""benchmarks/cpu_table.py: the RESULTS tables come out of latency.py's JSON as they should
(speed-ups are eager / fast of the same run, missing rows are dashes, not zeros)."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("cpu_table", ROOT / "benchmarks" / "cpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(preset, batch, mode, step_ms, fwd_ms=None, status="ok", speeds=None):
    ms = {"step": step_ms, **({} if fwd_ms is None else {"unet_fwd": fwd_ms})}
    return {"preset": preset, "batch": batch, "mode": mode, "status": status, "ms": ms, "pct_peak": 71.6,
            "speed_decode_s": speeds or {}}


def test_tables_from_a_run(tmp_path, capsys):
    dps = [_row("ffhq256", 1, "eager", 6000, 2400), _row("ffhq256", 1, "fast", 2500, 1000),
           _row("ffhq256", 1, "onnxruntime", 5500), _row("imagenet256", 4, "eager", 120000, 50000),
           _row("imagenet256", 4, "fast", 60000, 25000), _row("imagenet256", 4, "onnxruntime", 0, status="error: x")]
    pir = [_row("ffhq256", 1, "eager", 3000, 2400), _row("ffhq256", 1, "fast", 1500, 1000)]
    speeds = [_row("ffhq256", 1, "eager", 6000, speeds={"fast": {"seconds": 60.0, "steps": 20}}),
              _row("ffhq256", 1, "fast", 2500, speeds={"fast": {"seconds": 40.0, "steps": 20}}),
              _row("ffhq256", 1, "onnxruntime", 5500,
                   speeds={"fast": {"seconds": 58.0, "steps": 20, "setup_seconds": 12.4}})]
    for name, rows in (("dps", dps), ("pir", pir), ("speeds_ffhq256", speeds)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows}))
    assert _module().main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ffhq = next(line for line in lines if line.startswith("| FFHQ-256 | 1 |"))
    assert ffhq == ("| FFHQ-256 | 1 | 2.40 / 1.00 | **2.40x** | 6.00 / 2.50 / 5.50 | **2.40x** "
                    "| 3.00 / 1.50 / – | **2.00x** | 72 |")
    imagenet = next(line for line in lines if line.startswith("| ImageNet-256 | 4 |"))
    assert "120.00 / 60.00 / – | **2.00x** | – / – / – | – |" in imagenet  # the failed ORT row is a dash
    decode = next(line for line in lines if "`fast`" in line)
    assert decode == "| FFHQ-256 | `fast` (20 steps) | 60.0 | 40.0 | 58.0 (+ 12) | **1.50x** |"
