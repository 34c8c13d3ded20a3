"""benchmarks/engine_overhead.py (the decode loop's cost besides the networks) cannot rot: its smoke
configuration runs every kind of cell in seconds and writes the documented rows, whose counted
parts (loop iterations, UNet images, preview events) are exact; and ``--source`` really imports
idemrt from the folder it names (the before/after comparison rests on it). Times mean nothing here."""
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "engine_overhead.py"
FIELDS = ("loop", "slots", "groups", "previews", "images", "steps_lo", "steps_hi", "iterations_lo", "iterations_hi",
          "per_step_ms", "per_step_ms_min", "per_step_cpu_ms", "met_cpu", "bare_step_ms", "overhead_ms", "target_ms", "met", "overhead_met",
          "unet_images_per_image_step", "wall_lo_s", "wall_hi_s", "preview_events")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("engine_overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("engine_overhead") / "overhead.json"
    returned = module.main(["--smoke", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(returned["rows"]))
    return written


def test_smoke_has_every_cell_with_the_documented_fields(smoke):
    rows = smoke["rows"]
    cells = {(r["loop"], r["slots"], r["groups"], r["previews"]) for r in rows}
    want = {("engine", s, g, p) for s in (1, 2) for g in (1, 4) for p in (True, False)}
    want |= {("decoder", s, g, None) for s in (1, 2) for g in (1, 4)}
    assert cells == want and len(rows) == len(want)
    for r in rows:
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        assert r["images"] == r["slots"] * r["groups"] and (r["steps_lo"], r["steps_hi"]) == (2, 4)
        assert r["target_ms"] == pytest.approx(1.0 + 0.05 * r["slots"])
        assert r["met"] == (r["per_step_ms"] <= r["target_ms"])
        assert r["met_cpu"] == (r["per_step_cpu_ms"] <= r["target_ms"])
        assert r["overhead_ms"] == pytest.approx(r["per_step_ms"] - r["bare_step_ms"], abs=2e-3)
        assert r["bare_step_ms"] > 0 and len(r["wall_lo_s"]) == len(r["wall_hi_s"]) == 1
    env = smoke["environment"]
    assert env["threads"] == 1 and env["torch"] and env["idemrt"].endswith("__init__.py")


def test_counted_parts_are_exact(smoke):
    """The engine runs one iteration per group and step (read from its own counter); the UNet sees
    each image once per step with previews off, and previews arrive only when asked for."""
    for r in smoke["rows"]:
        assert r["iterations_lo"] == 2 * r["groups"] and r["iterations_hi"] == 4 * r["groups"]
        if r["previews"]:
            assert r["preview_events"] >= r["images"] and r["unet_images_per_image_step"] >= 1.0
        else:
            assert r["preview_events"] == 0 and r["unet_images_per_image_step"] == 1.0


def test_source_imports_idemrt_from_the_folder_it_names(tmp_path):
    """With the editable install's import hook in the way, ``--source`` still takes the copy."""
    shutil.copytree(ROOT / "python" / "idemrt", tmp_path / "idemrt",
                    ignore=shutil.ignore_patterns("demo_models", "__pycache__", "_engine*"))
    out = tmp_path / "o.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--loops", "decoder", "--slots", "1", "--groups", "1",
                    "--source", str(tmp_path), "--json", str(out)], check=True, capture_output=True, timeout=600)
    env = json.loads(out.read_text())["environment"]
    assert env["idemrt"] == str(tmp_path / "idemrt" / "__init__.py") and env["source"] == str(tmp_path)
