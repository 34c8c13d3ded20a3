"""The compile cache (idemrt.backends.compile_cache): a second process compiles nothing, and a bad
cache file is ignored with one log line.

"Compiles nothing" is counted from torch's own counters in the second process: inductor's FX-graph
cache (``counters["inductor"]["fxgraph_cache_miss"]``: a miss is a compile) and AOTAutograd's cache.
Each process gets an empty inductor cache directory of its own, so the only way to a hit is the
file this module writes.
"""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from idemrt.backends import compile_cache as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small module compiled forward and backward (as the guided step differentiates the UNet).
SMALL = textwrap.dedent('''
    import json, sys, torch
    from torch._dynamo.utils import counters
    from idemrt.backends.compile_cache import CompileCache

    cache = CompileCache(sys.argv[1], device=torch.device("cpu"), digest="small-conv")
    loaded = cache.load()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU())
    batch = int(sys.argv[2])  # one part per batch size, as the fast backend saves one per step shape
    x = torch.randn(batch, 3, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.compile(model, dynamic=False)(x).sum(), x)
    saved = cache.save(part=batch)
    print(json.dumps({"loaded": loaded, "saved": saved, "grad": grad.sum().item(),
                      "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}))
''')


def _run(script, cache_dir, inductor_dir, *args, timeout=600):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONPATH": os.path.join(ROOT, "tests")}
    out = subprocess.run([sys.executable, "-c", script, str(cache_dir), *args], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing(tmp_path):
    first = _run(SMALL, tmp_path / "cache", tmp_path / "inductor1", "1")
    assert not first["loaded"] and first["saved"]
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1  # it compiled
    (path,) = (tmp_path / "cache").iterdir()
    assert path.suffix == ".bin" and not list((tmp_path / "cache").glob("*.tmp"))
    # A process that runs another shape compiles it and keeps it in a part of its own ...
    other = _run(SMALL, tmp_path / "cache", tmp_path / "inductor2", "2")
    assert other["loaded"] and other["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # ... and a third one, running the first shape, compiles nothing: the first part survived
    second = _run(SMALL, tmp_path / "cache", tmp_path / "inductor3", "1")
    assert second["loaded"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0  # nothing compiled ...
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"]
    assert second["aot"].get("autograd_cache_hit", 0) >= 1  # ... forward or backward
    assert second["grad"] == pytest.approx(first["grad"], rel=1e-6)


def _cache(tmp_path, digest="d"):
    return cc.CompileCache(tmp_path, device=torch.device("cpu"), digest=digest)


@pytest.mark.parametrize("content", [b"\x00\xffnot a cache", b'{"format": 1}\nartifacts',
                                     "key-then-garbage"])
def test_a_corrupt_or_mismatched_file_is_ignored_with_one_log_line(tmp_path, caplog, content):
    cache = _cache(tmp_path)
    if content == "key-then-garbage":  # the right key, artifacts torch cannot read
        content = json.dumps(cache.key, sort_keys=True).encode() + b"\n\x80\x04garbage"
    cache.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=cc.__name__):
        assert cache.load() is False
    assert len(caplog.records) == 1 and "ignored" in caplog.records[0].getMessage()


def test_a_file_made_for_another_key_is_recognised(tmp_path, caplog):
    other = _cache(tmp_path / "a", digest="another model")
    mine = _cache(tmp_path / "b", digest="this model")
    assert other.path.name != mine.path.name  # the name is the key's hash
    mine.path.parent.mkdir()
    mine.path.write_bytes(json.dumps(other.key, sort_keys=True).encode() + b"\nartifacts")  # copied, renamed
    with caplog.at_level(logging.WARNING, logger=cc.__name__):
        assert mine.load() is False
    assert len(caplog.records) == 1 and "was made for" in caplog.records[0].getMessage()


def test_a_missing_file_is_a_silent_miss(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=cc.__name__):
        assert _cache(tmp_path / "nowhere").load() is False
    assert not caplog.records


def test_save_writes_atomically_and_never_raises(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"ARTIFACTS", None))
    cache = _cache(tmp_path / "deep" / "dir")
    assert cache.save(part=("guided_fn", (1, 3, 32, 32))) is True
    path = cache.part_path(("guided_fn", (1, 3, 32, 32)))
    head, _, body = path.read_bytes().partition(b"\n")
    assert json.loads(head) == cache.key and body == b"ARTIFACTS"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    assert path.name.startswith(cache.name) and path != cache.part_path(("guided_fn", (2, 3, 32, 32)))
    blocked = tmp_path / "file"
    blocked.write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger=cc.__name__):
        assert _cache(blocked / "sub").save() is False
    assert len(caplog.records) == 1 and "not written" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)  # nothing compiled yet
    assert _cache(tmp_path / "empty").save() is False


def test_key_and_directory(tmp_path, monkeypatch):
    key = _cache(tmp_path).key
    assert key["torch"] == torch.__version__ and key["model"] == "d" and key["machine"]
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "env"))
    assert cc.default_directory() == tmp_path / "env"
    monkeypatch.delenv(cc.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.default_directory() == tmp_path / "xdg" / "idemrt" / "compile"
    a, b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 9, 3)
    assert cc.model_digest(a) == cc.model_digest(torch.nn.Conv2d(3, 8, 3))  # structure, not values
    assert cc.model_digest(a) != cc.model_digest(b) and cc.model_digest(a) != cc.model_digest(a, options=("bf16",))


# The fast backend with regional compilation of the tiny UNet, through create_backend's options
# (what Decoder, idemrt serve and latency.py pass): the second process loads the cache the first
# one saved after its warm-up step, compiles nothing and gets the same step.
BACKEND = textwrap.dedent('''
    import json, sys, torch
    from torch._dynamo.utils import counters
    import idemrt
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.diffusion import DDPMSampler, Schedule
    from tiny_models import tiny_unet

    torch.set_num_threads(1)
    sampler = DDPMSampler(Schedule.create(1000, respacing=4))
    spec = StepSpec(unet=tiny_unet(), operator=lambda x0: x0, codec=None, constraint="x", sampler=sampler,
                    guidance=idemrt.diffusion.DPS(scale=0.6))
    cpu = torch.device("cpu")
    backend = create_backend("fast", spec, device=cpu, dtype=torch.float32, compile="blocks",
                             compile_cache=sys.argv[1])
    plain = create_backend("fast", spec, device=cpu, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(1, 3, 32, 32, generator=gen), torch.randn(1, 3, 32, 32, generator=gen)
    target = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    got, _ = backend.step(x, 3, target, noise)
    want, _ = plain.step(x, 3, target, noise)
    print(json.dumps({"err": ((got - want).norm() / want.norm()).item(), "inductor": dict(counters["inductor"])}))
''')


@pytest.mark.slow
def test_fast_backend_second_start_compiles_nothing(tmp_path):
    first = _run(BACKEND, tmp_path / "cache", tmp_path / "inductor1", timeout=1500)
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1 and first["err"] <= 1e-4
    second = _run(BACKEND, tmp_path / "cache", tmp_path / "inductor2", timeout=1500)
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["err"] <= 1e-4
