"""Smoke test of benchmarks/psc.py on the CPU: it runs on both compute paths, writes its JSON, and
the rates it reports are the hand formula. Its times mean nothing here and are only checked to be
positive."""
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("options, compute", [([], "eager-fp32-cpu"), (["--backend", "fast"], "fast-bf16-cpu")])
def test_smoke_run_writes_consistent_json(tmp_path, options, compute):
    spec = importlib.util.spec_from_file_location("psc_benchmark", ROOT / "benchmarks" / "psc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "psc.json"
    module.main(["--smoke", "--json", str(out), *options])
    result = json.loads(out.read_text())
    assert (result["size"], result["s"], result["r"], result["compute"]) == (16, 4, 2, compute)
    assert result["unet_evals_per_s"] > 0
    # --bpp 0.125 0.25 at 16x16, r = 2 with a 2-byte hash per round: 1 and 2 rounds of 4 bytes each.
    assert [(rate["rounds"], rate["bpp"], rate["extrapolated"]) for rate in result["rates"]] == \
        [(1, 8 * 4 / 16**2, False), (2, 8 * 8 / 16**2, False)]
    for rate in result["rates"]:
        for key in ("encode_s_per_image", "decode_s_per_image", "guided_restoration_s"):
            assert rate[key] > 0
