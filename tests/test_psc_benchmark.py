"""Smoke test of benchmarks/psc.py on the CPU: it runs, writes its JSON, and the rate it reports
is the hand formula. Its times mean nothing here and are only checked to be positive."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_writes_consistent_json(tmp_path):
    spec = importlib.util.spec_from_file_location("psc_benchmark", ROOT / "benchmarks" / "psc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "psc.json"
    module.main(["--smoke", "--json", str(out)])
    result = json.loads(out.read_text())
    assert (result["size"], result["s"], result["r"], result["rounds"], result["extrapolated"]) == (16, 4, 2, 2, False)
    assert result["bpp"] == 8 * (2 * 2 + 2 * 2) / 16**2  # 2 rounds x (r=2 measurement + 2 hash) bytes
    for key in ("unet_evals_per_s", "encode_s_per_image", "decode_s_per_image", "guided_restoration_s"):
        assert result[key] > 0
