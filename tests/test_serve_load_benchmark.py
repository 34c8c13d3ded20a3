"""Smoke test of benchmarks/serve_load.py (the open-loop load study of the decode engine), so the
script cannot rot: its --smoke configuration runs every policy on the demo models in seconds, and
the rows it prints and writes have the documented fields with sane values. Times mean nothing here."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "serve_load.py"
FIELDS = ("policy", "rate", "max_slots", "batch_wait_s", "requests", "finished", "failed", "timeouts", "rejected",
          "unresolved", "throughput", "throughput_makespan", "latency_p50_s", "latency_p95_s", "latency_p99_s",
          "ttfp_p50_s", "ttfp_p95_s", "preemptions", "steps", "backlog_max", "sustained", "wall_s", "mix")


def _load_script():
    spec = importlib.util.spec_from_file_location("serve_load_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serve_load():
    return _load_script()


@pytest.fixture(scope="module")
def smoke(serve_load, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_load") / "load.json"
    assert serve_load.main(["--smoke", "--seed", "3", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_smoke_rows_have_the_fields_and_sane_values(smoke):
    rows = smoke["rows"]
    assert [r["policy"] for r in rows] == ["continuous", "static", "none"]
    for r in rows:
        assert all(f in r for f in FIELDS), [f for f in FIELDS if f not in r]
        # every request is accounted for, and in the smoke configuration every one finishes
        assert r["requests"] == 6 == sum(r[k] for k in ("finished", "failed", "timeouts", "rejected", "unresolved"))
        assert r["finished"] == 6 and sum(r["mix"].values()) == 6
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"] <= r["latency_max_s"]
        assert r["latency_max_s"] < r["wall_s"] + 1
        # previews every step: every finished request saw one, before its result
        assert r["previewed"] == 6 and 0 < r["ttfp_p50_s"] <= r["ttfp_p95_s"] <= r["latency_max_s"]
        assert r["throughput"] > 0 and r["throughput_makespan"] > 0 and r["steps"] > 0 and r["preemptions"] >= 0
        assert isinstance(r["sustained"], bool) and r["backlog_max"] >= 0
        # per-request records (in the JSON file only): all finished, latencies after first previews
        recs = r["records"]
        assert len(recs) == 6 and all(x["status"] == "ok" and 0 < x["ttfp_s"] <= x["latency_s"] for x in recs)
    by = {r["policy"]: r for r in rows}
    assert by["none"]["max_slots"] == 1 and by["continuous"]["max_slots"] == by["static"]["max_slots"] > 1
    assert by["static"]["batch_wait_s"] > 0 and by["continuous"]["batch_wait_s"] is None
    # the same workload for every policy
    assert len({json.dumps(r["mix"], sort_keys=True) for r in rows}) == 1
    assert len({json.dumps([(x["arrival"], x["size"], x["speed"], x["priority"]) for x in r["records"]])
                for r in rows}) == 1
    assert smoke["environment"]["torch"] and smoke["check"] is not None and "line" in smoke["check"]
    assert smoke["failures"] == {"continuous": 0, "static": 0, "none": 0}
    assert set(smoke["check_none"]["ratios"]) == {"1.0"} and smoke["check_none"]["met"] in (True, False)


def test_smoke_prints_one_json_line_per_cell_and_the_check(serve_load, capsys, tmp_path):
    serve_load.main(["--smoke", "--requests", "2", "--policies", "continuous,static", "--json",
                     str(tmp_path / "x.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["policy"] for r in rows] == ["continuous", "static"] and all(r["requests"] == 2 for r in rows)
    assert all(len(r["loadavg_1m"]) == 2 for r in rows)
    assert lines[len(rows)] == "requests not finished, per policy over its cells: {'continuous': 0, 'static': 0} (target 0)"
    assert len(lines) == len(rows) + 2 and ("p95" in lines[-1] or "sustained none" in lines[-1])


def test_workload_is_seeded_poisson_with_the_documented_mix(serve_load):
    a = serve_load.workload(4000, 2.0, seed=1)
    assert a == serve_load.workload(4000, 2.0, seed=1) and a != serve_load.workload(4000, 2.0, seed=2)
    arrivals = np.array([r["arrival"] for r in a])
    assert np.all(np.diff(arrivals) > 0) and 0 < arrivals[0] and arrivals[-1] < 4000 / 2.0  # n arrivals in n/rate s
    assert abs(np.mean(np.diff(arrivals)) - 0.5) < 0.01  # mean gap 1/rate
    assert 0.8 < np.std(np.diff(arrivals)) / 0.5 < 1.2  # exponential gaps: std = mean
    count = lambda pred: sum(pred(r) for r in a)  # noqa: E731
    assert count(lambda r: r["size"] == 64) == 3000 and count(lambda r: r["size"] == 128) == 1000
    assert [count(lambda r: r["speed"] == s) for s in ("paper", "balanced", "fast")] == [2000, 1000, 1000]
    assert count(lambda r: r["priority"] == 5) == 400 and count(lambda r: r["priority"] == 0) == 3600
    # small cells carry the mix too (largest-remainder rounding), in a seeded random order
    small = serve_load.workload(12, 0.1, seed=0)
    assert sorted(r["size"] for r in small) == [64] * 9 + [128] * 3
    assert sum(r["priority"] == 5 for r in small) == 1 and sum(r["speed"] == "paper" for r in small) == 6
    assert [r["size"] for r in small] != [r["size"] for r in serve_load.workload(12, 0.1, seed=1)]


def test_check_uses_the_highest_rate_the_static_baseline_sustained(serve_load):
    def row(policy, rate, p95, sustained=True):
        return {"policy": policy, "rate": rate, "latency_p95_s": p95, "sustained": sustained}

    rows = [row("static", 0.1, 10.0), row("static", 0.2, 20.0), row("static", 0.3, 90.0, False),
            row("continuous", 0.1, 8.0), row("continuous", 0.2, 10.0), row("continuous", 0.3, 12.0)]
    got = serve_load.check(rows)
    assert got["rate"] == 0.2 and got["ratio"] == 0.5 and got["met"] is True and "0.50" in got["line"]
    got = serve_load.check([row("static", 0.1, 10.0, False), row("continuous", 0.1, 5.0)])
    assert got["ratio"] is None and got["met"] is None


def test_check_none_needs_continuous_at_or_below_none_at_every_rate(serve_load):
    def row(policy, rate, p95, requests=10, finished=10):
        return {"policy": policy, "rate": rate, "latency_p95_s": p95, "requests": requests, "finished": finished}

    rows = [row("none", 1.0, 10.0), row("none", 2.0, 20.0), row("continuous", 1.0, 5.0), row("continuous", 2.0, 19.0)]
    got = serve_load.check_none(rows)
    assert got["ratios"] == {1.0: 0.5, 2.0: 0.95} and got["met"] is True and "met" in got["line"]
    rows[-1] = row("continuous", 2.0, 21.0, finished=9)
    got = serve_load.check_none(rows)
    assert got["ratios"][2.0] == 1.05 and got["met"] is False and "NOT met" in got["line"]
    assert serve_load.failures(rows) == {"none": 0, "continuous": 1}
    # a rate where one policy finished nothing has no ratio, and the target is not met
    rows[-1] = row("continuous", 2.0, None, finished=0)
    got = serve_load.check_none(rows)
    assert got["ratios"][2.0] is None and got["met"] is False
    assert serve_load.check_none([row("static", 1.0, 3.0)])["met"] is None
