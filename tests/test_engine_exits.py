"""Every way a served request leaves releases it exactly once: its future resolves (a result or a
typed error) and the engine's slots, pixels and queue return to 0. Failures are injected at each
point of a request's life: prepare, start, step, update, finish, a callback; cancellation while
queued, running or parked; deadlines; the engine's shutdown. And reconfigure does no torch work off
the core thread."""
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

import idemrt
from idemrt.errors import DeadlineExceeded
from idemrt.batching import Job, RequestStatus
from idemrt.errors import EngineClosedError
from idemrt.serve.config import ServeConfig
from idemrt.serve.core import DecodeEngine
from tiny_models import tiny_codec, tiny_unet


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def data(models):
    torch.manual_seed(4)
    return idemrt.Encoder(models[1]).encode(torch.rand(1, 3, 40, 48))


def _engine(models, **kw):
    unet, codec = models
    # whole images by default: the failures are injected in backend.step (tiled steps: test_tiled_service.py)
    return DecodeEngine(ServeConfig(**{"steps_allowed": ["3"], "unet": "in-memory", "tile": False, **kw}), codec, unet,
                        device="cpu")


def _wait(engine, futures, timeout=120):
    """Every future resolves; then the engine holds nothing: no slot, no pixel, no queued image;
    and each request was counted once by the batcher."""
    deadline = time.monotonic() + timeout
    for f in futures:
        try:
            f.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - the outcome is checked by the caller
            pass
        assert f.done()
    while time.monotonic() < deadline and engine.stats()["slots_used"]:
        time.sleep(0.01)  # the core's bookkeeping after the last future resolved
    stats = engine.stats()
    assert (stats["slots_used"], stats["pixels_used"], stats["held"], stats["running"], stats["waiting"]) == (
        0, 0, 0, 0, 0), stats


def _program(engine):
    return next(iter(engine.programs.values()))


def _hold_core(engine):
    """Make the core's next step wait for the returned event (requests pile up meanwhile)."""
    go, execute = threading.Event(), engine.batcher.execute

    def held(out):
        go.wait(60)
        execute(out)

    engine.batcher.execute = held
    return go


class Boom(RuntimeError):
    pass


def _raise(*_, **__):
    raise Boom("injected")


@pytest.mark.parametrize("where", ["prepare", "start", "step", "update", "finish", "callback"])
def test_a_failure_anywhere_resolves_the_request_and_frees_everything(models, data, where, monkeypatch):
    import idemrt.serve.core as engine_module

    engine = _engine(models)
    _, _, sampler = _program(engine)
    prepare, finish = engine_module.prepare_image, engine_module.finish_image

    def on_event(event):
        if where == "callback" and event["event"] == "progress":
            raise Boom("injected")

    if where == "prepare":
        monkeypatch.setattr(engine_module, "prepare_image", _raise)
    elif where == "start":
        sampler.start = _raise
    elif where == "step":
        sampler.backend.step = _raise
    elif where == "update":
        sampler.finish = _raise
    elif where == "finish":
        monkeypatch.setattr(engine_module, "finish_image", _raise)
    try:
        bad = engine.submit(data, seed=1, on_event=on_event)
        with pytest.raises(Boom):
            bad.result(timeout=120)
        _wait(engine, [bad])
        assert sum(engine.batcher.finished.values()) == 1 and engine.batcher.finished["failed"] == 1
        monkeypatch.setattr(engine_module, "prepare_image", prepare)
        monkeypatch.setattr(engine_module, "finish_image", finish)
        for name in ("start", "finish"):
            sampler.__dict__.pop(name, None)
        sampler.backend.__dict__.pop("step", None)
        good = engine.submit(data, seed=2).result(timeout=120)  # still serving
        assert good.evaluations == 3
    finally:
        engine.close()


def test_cancelled_while_queued_running_or_parked_and_deadlines(models, data):
    engine = _engine(models, steps_allowed=["5"], max_slots=1)
    go = _hold_core(engine)
    try:
        running = engine.submit(data, seed=1)  # takes the only slot at the held step
        while engine.stats()["running"] == 0:
            time.sleep(0.005)
        parked = running
        queued = engine.submit(data, seed=2)
        queued.cancel()  # cancelled before the core started it
        late = engine.submit(data, seed=3, timeout=1e-6)  # past its deadline while queued
        high = engine.submit(data, seed=4, priority=5)  # parks the running one
        go.set()
        while parked.job.status.value != "preempted" and not parked.done():
            time.sleep(0.005)
        parked.cancel()  # preempted, then cancelled
        doomed = engine.submit(data, seed=5, timeout=0.5)  # its deadline passes while it runs or waits
        result = high.result(timeout=120)
        _wait(engine, [running, queued, late, high, doomed])
    finally:
        engine.close()
    assert result.evaluations == 5
    assert queued.cancelled() and parked.cancelled()
    with pytest.raises(DeadlineExceeded):
        late.result()
    assert isinstance(doomed.exception(), DeadlineExceeded) or doomed.result().evaluations == 5
    assert sum(engine.batcher.finished.values()) == 5


def test_close_resolves_every_outstanding_request_with_a_typed_error(models, data):
    engine = _engine(models, steps_allowed=["5"], max_slots=1)
    go = _hold_core(engine)
    futures = [engine.submit(data, seed=s) for s in range(3)]
    while engine.stats()["running"] == 0:
        time.sleep(0.005)
    encode = engine.encode(torch.rand(1, 3, 32, 32))  # queued behind the held step
    closer = threading.Thread(target=engine.close)
    closer.start()
    while not engine._closed:
        time.sleep(0.005)
    go.set()
    closer.join(60)
    for f in futures + [encode]:
        assert f.done()
        assert f.exception(timeout=0) is None or isinstance(f.exception(timeout=0), EngineClosedError)
    assert any(isinstance(f.exception(timeout=0), EngineClosedError) for f in futures)
    assert engine.batcher.pending() == 0 and engine.stats()["slots_used"] == 0
    with pytest.raises(EngineClosedError):
        engine.submit(data, seed=9)


def test_reconfigure_does_no_torch_work_off_the_core(models, data):
    """reconfigure records and queues; the core applies it (the pixel budget, which on CUDA runs
    warm-up steps, is computed on the core) before the requests submitted after it."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    engine = _engine(models)
    budget_threads, budget = [], engine._pixel_budget
    engine._pixel_budget = lambda: (budget_threads.append(threading.get_ident()), budget())[1]
    try:
        with Record():  # this (the caller's) thread only: torch modes are per thread
            engine.reconfigure(max_slots=2, pixel_budget=2 * 64 * 64)  # returns once the core applied it
        with pytest.raises(ValueError):
            engine.reconfigure(max_slots=0)
        assert Record.calls == []
        assert budget_threads == [engine.core_thread_id]
        assert (engine.batcher.max_slots, engine.batcher.pixel_budget) == (2, 2 * 64 * 64)
    finally:
        engine.close()


# --- the batcher alone --------------------------------------------------------------------------------

def _targets(codec, n):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return [2 * codec.operator(torch.rand(1, 3, 64, 64, generator=g), "x") - 1 for _ in range(n)]


def test_a_failing_step_resolves_the_leaving_and_the_running_jobs(models):
    """A step that raises: the images of its batch fail with its error, an image cancelled in the
    same iteration is cancelled (it used to hang, listed in the plan but never resolved)."""
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=3, device="cpu")
    targets = _targets(codec, 2)
    sched = dec.batcher(max_slots=1)
    stepping, leaving = (sched.submit(t, k, (1, 3, 64, 64)) for k, t in enumerate(targets))
    leaving.cancel()
    sched.sampler.backend.step = _raise
    with pytest.raises(Boom):
        sched.step()
    assert isinstance(stepping.future.exception(), Boom) and leaving.future.cancelled()
    assert sched.pending() == 0 and sched.stats()["slots_used"] == 0
    assert dict(sched.finished) == {"failed": 1, "cancelled": 1}


def test_a_failing_start_releases_once(models):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=3, device="cpu")
    sched = dec.batcher(max_slots=2, max_queue=4)
    other = sched.admit(Job())  # held by someone else: a double release would give its room away
    sched.sampler.start = _raise
    with pytest.raises(Boom):
        sched.submit(_targets(codec, 1)[0], 0, (1, 3, 64, 64))
    assert sched.pending() == 1 and dict(sched.finished) == {"failed": 1}
    assert sched.end(other, RequestStatus.CANCELLED) and not sched.end(other, RequestStatus.FAILED)
    assert sched.pending() == 0 and other.future.cancelled()
    with pytest.raises(CancelledError):
        other.future.result()
