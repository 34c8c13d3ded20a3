"""Smoke test of benchmarks/latency.py on the CPU (tiny UNet, tiny codec): it runs, writes the JSON
it documents, and what it counts is right. Its times mean nothing here and are not checked."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latency.py"
BUDGET = 5.0  # --max-decode-seconds of the smoke run


def _load_script():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def latency():
    return _load_script()


def _attention_flops(tokens: int, channels: int) -> tuple[int, int]:
    """(forward, weight-gradient) FLOPs of one ADM attention block at batch 1, by hand:
    qkv projection 2·T·C·3C, q·kᵀ and a·v 2·T²·C each, output projection 2·T·C²; the weight
    gradients of the two projections cost as much as their forward matmuls."""
    qkv, proj = 2 * tokens * channels * 3 * channels, 2 * tokens * channels * channels
    return qkv + 2 * 2 * tokens * tokens * channels + proj, qkv + proj


def latency_flags():
    return _load_script().CPU_FLAGS


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency") / "latency.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--codec", "tiny", "--batch", "1",
           "--modes", "reference,eager,fast,tensorrt", "--decode-steps", "1,1000", "--max-decode-seconds", str(BUDGET),
           "--speeds", "fast", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_writes_the_documented_json(smoke):
    stdout, data = smoke
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and "--preset tiny" in env["command"]
    assert data["peak_bf16_tflops"] > 0
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == ["reference", "eager", "fast", "tensorrt"]
    for name in ("reference", "eager", "fast"):
        row = rows[name]
        assert row["status"] == "ok" and (row["preset"], row["codec"], row["batch"]) == ("tiny", "tiny", 1)
        assert set(row["ms"]) == {"unet_fwd", "unet_fwd_vjp", "operator_fwd_vjp", "step"}
        assert all(v > 0 for v in row["ms"].values())
        assert row["tflops"] > 0 and row["pct_peak"] > 0
        # A decode runs unless step time x N exceeds the budget; then it is the step time x N, marked.
        # (Which case happens depends on this machine's speed: the rule is checked either way.)
        assert set(row["decode_s"]) == {"1", "1000"}
        for n, decode in row["decode_s"].items():
            estimate = row["ms"]["step"] * int(n) / 1e3
            assert decode["extrapolated"] is (estimate > BUDGET)
            if decode["extrapolated"]:
                assert decode["seconds"] == pytest.approx(estimate)
            else:
                assert decode["seconds"] > 0
        assert f"{name:<12}" in stdout
    # --speeds: one whole Decoder decode of the preset per mode that is a Decoder backend (warm start
    # at 0.4 of 50 steps: 20 steps run), none for the reference, which is not one.
    for name in ("eager", "fast"):
        assert set(rows[name]["speed_decode_s"]) == {"fast"}
        assert rows[name]["speed_decode_s"]["fast"]["steps"] == 20 and rows[name]["speed_decode_s"]["fast"]["seconds"] > 0
    assert rows["reference"]["speed_decode_s"] == {}
    assert f"fast: {rows['eager']['speed_decode_s']['fast']['seconds']:.2f}s (20 steps)" in stdout
    assert env["cpu_physical_cores"] >= 1 and set(env["cpu_flags"]) <= latency_flags()
    assert f"{env['cpu_threads']} threads" in stdout
    assert rows["tensorrt"]["status"].startswith("unavailable: ")
    assert "unavailable: " in stdout


def test_flop_counts(smoke, latency):
    """Every mode does the eager step's FLOPs; the reference's checkpointed attention adds, per
    attention block, one more forward and the two projections' weight gradients."""
    _, data = smoke
    rows = {r["mode"]: r for r in data["rows"]}
    useful = rows["eager"]["gflop_useful"]
    assert useful > 0 and all(r["gflop_useful"] == useful for r in rows.values() if r["status"] == "ok")
    assert rows["eager"]["gflop_executed"] == useful
    assert rows["fast"]["gflop_executed"] == useful

    cfg = latency.UNETS["tiny"]
    (attention_ds,) = cfg.attention_ds  # one attention resolution in the tiny config
    channels = int(cfg.num_channels * cfg.channel_mults[1])
    assert attention_ds == 2 and cfg.channel_mults == (1, 2)
    blocks = sum(isinstance(m, latency.AttentionBlock) for m in latency.build_unet("tiny", torch.device("cpu")).modules())
    fwd, wgrad = _attention_flops((cfg.image_size // attention_ds) ** 2, channels)
    extra = rows["reference"]["gflop_executed"] - useful
    assert blocks == 4
    assert extra * 1e9 == pytest.approx(blocks * (fwd + wgrad), rel=1e-9)


def test_reference_emulation_changes_cost_not_results(latency):
    """The checkpointed view gives the same output and input gradient as the UNet it wraps."""
    unet = latency.build_unet("tiny", torch.device("cpu"))
    view = latency.reference_unet(unet)
    assert all(a is b for a, b in zip(view.parameters(), unet.parameters()))
    assert sum(isinstance(m, latency._CheckpointedAttention) for m in view.modules()) == 4
    unet.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    t = torch.tensor([321])
    v = torch.randn(1, 6, 32, 32, generator=gen)
    grads = []
    for model in (unet, view):
        xg = x.clone().requires_grad_(True)
        out = model(xg, t)
        grads.append((out.detach(), torch.autograd.grad(out, xg, v)[0]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)


def test_components_choose_what_is_timed_besides_the_step(tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--codec", "tiny", "--batch", "1",
           "--modes", "eager", "--components", "unet_fwd", "--decode-steps", "1", "--max-decode-seconds", "0",
           "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert set(row["ms"]) == {"unet_fwd", "step"}
    bad = subprocess.run(cmd[:-2] + ["--components", "unet_bwd"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "unknown component ['unet_bwd']" in bad.stderr
