"""The service's decode engine without Ray: results equal Decoder.decode, events, limits, errors."""
import threading
import time

import numpy as np
import pytest
import torch

import idemrt
from idemrt.errors import QueueFullError
from idemrt.serve.config import ServeConfig
from idemrt.serve.core import DecodeEngine
from idemrt.serve.metrics import EngineMetrics, Metrics, merge
from idemrt.serve.problems import problem_from
from tiny_models import tiny_codec, tiny_unet


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def data(models):
    torch.manual_seed(4)
    return [idemrt.Encoder(models[1]).encode(torch.rand(1, 3, 40 + 24 * k, 48)) for k in range(2)]


@pytest.fixture
def engine(models):
    unet, codec = models
    eng = DecodeEngine(ServeConfig(steps_allowed=["3", "5"], queue=3, preview_every=2, unet="in-memory"),
                       codec, unet, device="cpu")
    yield eng
    eng.close()


def test_decodes_equal_the_decoder_for_every_allowed_step_count(models, data):
    unet, codec = models
    config = ServeConfig(steps_allowed=["3", "5"], unet="in-memory")
    engine = DecodeEngine(config, codec, unet, device="cpu")
    futures = {(k, s): engine.submit(d, seed=7, steps=s) for k, d in enumerate(data) for s in ("3", "5")}
    for (k, s), future in futures.items():
        got = future.result(timeout=120)
        # the service's config (its images, 64x64 and 64x88 padded, in the 32-pixel prior's windows)
        want = idemrt.Decoder(codec, unet, config=config.decode_config(steps=s), device="cpu").decode(
            data[k], seed=7, output="tensor")
        assert got.image.shape == want.shape and got.evaluations == int(s)
        torch.testing.assert_close(got.image, want, rtol=0, atol=2e-5)
    mse = engine.submit(data[0], mode="mse").result(timeout=10)
    torch.testing.assert_close(mse.image, idemrt.Decoder(codec, None, device="cpu").decode(data[0], mode="mse",
                                                                                          output="tensor"))
    engine.close()


def test_progress_and_preview_events(data, engine):
    events = []
    engine.submit(data[0], seed=1, steps="5", on_event=events.append).result(timeout=60)
    progress = [e["step"] for e in events if e["event"] == "progress"]
    previews = [e for e in events if e["event"] == "preview"]
    assert progress == [1, 2, 3, 4, 5] and all(e["steps"] == 5 for e in events if e["event"] == "progress")
    assert [p["step"] for p in previews] == [2, 4]
    assert previews[0]["image"].shape == (40, 48, 3) and previews[0]["image"].dtype == np.uint8


def test_bounded_queue_and_typed_errors(models, data, engine):
    futures = [engine.submit(data[0], seed=s, steps="5") for s in range(3)]
    with pytest.raises(QueueFullError) as full:
        engine.submit(data[0], seed=9, steps="5")
    assert problem_from(full.value).status == 503 and problem_from(full.value).retry_after
    for f in futures:
        f.result(timeout=120)
    with pytest.raises(idemrt.BitstreamError) as bad:
        engine.submit(data[0][:-4])
    assert problem_from(bad.value).status == 400
    other = idemrt.Encoder(tiny_codec(seed=1)).encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(idemrt.BitstreamError, match="weights"):
        engine.submit(other)
    small = DecodeEngine(ServeConfig(max_pixels=64 * 63), models[1], None, device="cpu")
    try:
        with pytest.raises(idemrt.TooLargeError) as large:
            small.submit(data[1], mode="mse")  # 64x64 padded
        assert problem_from(large.value).status == 413
    finally:
        small.close()


def test_cancelling_frees_the_slot(data, engine):
    future = engine.submit(data[0], seed=2, steps="5")
    future.job.cancel()
    deadline = time.monotonic() + 30
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert future.cancelled() and engine.stats()["running"] == 0 and future.job.evaluations < 5


def test_metrics_text_is_prometheus_exposition_summed_over_replicas():
    m = Metrics()
    m.observe_request("perceptual", 200, 0.3)
    m.observe_request("perceptual", 503, 0.0)
    m.observe_error("overloaded")
    replicas = [EngineMetrics(), EngineMetrics()]
    for k, r in enumerate(replicas):
        r.observe_step(0.02, 64 * 64 * (k + 1), k + 1, k)
        r.observe_decode("paper", 3.0)
        r.set_gauges({"waiting": 1, "running": 1, "preempted": 1, "pixel_budget": 1000}, inbox=1)
    dead = EngineMetrics()
    dead.observe_step(0.3, 10, 1, 0)
    text = m.render(merge([r.snapshot() for r in replicas] + [dead.snapshot()], [r.snapshot() for r in replicas]))
    assert 'idemrt_requests_total{mode="perceptual",code="200"} 1' in text
    assert 'idemrt_errors_total{kind="overloaded"} 1' in text
    assert 'idemrt_decode_seconds_bucket{le="0.25"} 0' in text and 'idemrt_decode_seconds_bucket{le="0.5"} 1' in text
    # counters over every replica that reported (the dead one too), gauges over the live ones
    assert "idemrt_steps_total 3" in text and f"idemrt_step_pixels_total {64 * 64 * 3 + 10}" in text
    assert 'idemrt_step_seconds_bucket{le="0.025"} 2' in text and 'idemrt_step_seconds_count 3' in text
    assert "idemrt_preemptions_total 1" in text and "idemrt_queue_depth 6" in text
    assert 'idemrt_images{status="running"} 2' in text and 'idemrt_images{status="waiting"} 4' in text
    assert 'idemrt_replica_decode_seconds_count{speed="paper"} 2' in text
    assert "idemrt_replicas_reporting 2" in text and "# TYPE idemrt_step_seconds histogram" in text


def test_speed_preset_with_warm_start_and_exact_refinement_equals_the_decoder(models, data):
    """A server with --speed fast decodes as Decoder(speed="fast"): warm start, codec-gradient
    guidance and the exact-idempotence refinement included."""
    unet, codec = models
    config = ServeConfig(speed="fast", unet="in-memory")
    engine = DecodeEngine(config, codec, unet, device="cpu")
    try:
        assert engine.config.steps_allowed == ["50"]
        got = engine.submit(data[0], seed=3).result(timeout=120)
        decoder = idemrt.Decoder(codec, unet, config=config.decode_config(), device="cpu")  # fast, in windows
        want = decoder.decode(data[0], seed=3, output="tensor")
        assert got.evaluations == decoder.steps_run < 50  # the warm start skips the steps above t0
        torch.testing.assert_close(got.image, want, rtol=0, atol=2e-5)
    finally:
        engine.close()


# --- the engine core: one device thread, every program in one batch, deterministic mode --------------

def test_no_torch_work_off_the_core_thread(models, data):
    """Served decodes (perceptual with previews, MSE, an encode) driven from an asyncio loop as a
    replica drives them: every UNet and codec module call, every backend step and every preview runs
    on the engine's core thread; the loop only parses, awaits and encodes the 8-bit result."""
    import asyncio

    from idemrt.serve.app import encode_image

    unet, codec = models
    engine = DecodeEngine(ServeConfig(steps_allowed=["3", "5"], preview_every=1, unet="in-memory"), codec, unet,
                          device="cpu")
    threads = set()
    record = lambda *_: threads.add(threading.get_ident())  # noqa: E731
    hooks = [m.register_forward_pre_hook(record) for top in (*engine.priors.values(), *(c.model for c in engine.codecs.values()))
             for m in top.modules()]
    for sampler in engine.groups:
        step = sampler.backend.step
        sampler.backend.step = lambda *a, _step=step, **k: (record(), _step(*a, **k))[1]

    async def serve():
        loop_thread = threading.get_ident()
        events = []
        futures = [engine.submit(data[0], seed=1, steps="3", on_event=events.append),
                   engine.submit(data[1], seed=2, steps="5", speed="paper"),
                   engine.submit(data[0], mode="mse"), engine.encode(_png(32))]
        results = [await asyncio.wrap_future(f) for f in futures]
        pngs = [await asyncio.to_thread(encode_image, r.pixels, "png") for r in results[:3]]
        return loop_thread, results, pngs, events

    try:
        loop_thread, results, pngs, events = asyncio.run(serve())
    finally:
        for h in hooks:
            h.remove()
        engine.close()
    assert threads == {engine.core_thread_id} and loop_thread != engine.core_thread_id
    assert all(p.startswith(b"\x89PNG") for p in pngs) and isinstance(results[3], bytes)
    assert any(e["event"] == "preview" for e in events)


def _png(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_one_batch_holds_every_respacing_and_speed(models, data):
    """A 5-step and a 3-step paper (DPS) image and a warm-started balanced (DSG) image of one shape
    share batched steps — one backend for the three programs — and each equals its Decoder alone,
    bit for bit in deterministic mode (the exact refinement's stopping rule could turn a last-bit
    difference of a batched call into a visible one on another CPU; the batched backend call with
    mixed rows is checked against the Decoder in the first test of this file)."""
    unet, codec = models
    engine = DecodeEngine(ServeConfig(steps_allowed=["5", "3"], deterministic=True, unet="in-memory"), codec, unet,
                          device="cpu")
    runs, execute, all_in = [], engine.batcher.execute, threading.Event()

    def recording(out):  # the first step waits until all three are submitted: from the next one, all run
        all_in.wait(60)
        runs.append({j.state.program.name for j in out.run})
        execute(out)

    engine.batcher.execute = recording
    try:
        programs = {key[2:]: v for key, v in engine.programs.items()}  # (codec, prior, speed, steps) keys
        assert programs["paper", "5"][2] is programs["balanced", "50"][2]  # one step function
        assert programs["fast", "50"][2] is not programs["paper", "5"][2]  # PIR: its own
        engine.reconfigure(max_slots=8, pixel_budget=8 * 64 * 64)  # room for all three 64x64 (padded) images
        futures = {(speed, steps): engine.submit(data[0], seed=4, speed=speed, steps=steps)
                   for speed, steps in (("paper", "5"), ("paper", "3"), ("balanced", "50"))}
        all_in.set()
        got = {k: f.result(timeout=300) for k, f in futures.items()}
    finally:
        engine.close()
    assert {"paper/5", "paper/3", "balanced/50"} in runs  # all three in one step
    for (speed, steps), result in got.items():  # 64x64 in the 32-pixel prior's windows, as the server's config
        want = idemrt.Decoder(codec, unet, config=engine.config.decode_config(speed, steps), device="cpu").decode(
            data[0], seed=4, output="tensor")
        assert torch.equal(result.image, want), (speed, steps)


@pytest.mark.slow
def test_deterministic_mode_staggered_concurrent_decodes_equal_solo_byte_for_byte():
    """The demo models at the demo's 100 DPS steps: four decodes submitted at staggered times (each
    joining a running batch) give exactly the bytes of the same decodes run one at a time."""
    from idemrt.demo_assets import DEMO_IMAGES, demo_image

    config = ServeConfig.demo(deterministic=True, speeds_allowed=["paper"], max_slots=4)
    engine = DecodeEngine(config, device="cpu")
    try:
        datas = [idemrt.Encoder(engine.codec).encode(demo_image(name)) for name in DEMO_IMAGES]
        jobs = [(datas[k % 2], 100 + k) for k in range(4)]
        solo = [engine.submit(d, seed=s).result(timeout=600).pixels for d, s in jobs]
        futures = []
        for d, s in jobs:
            futures.append(engine.submit(d, seed=s))
            while engine.stats()["iterations"] == 0 or futures[-1].job.evaluations < 7:  # the next joins mid-run
                time.sleep(0.01)
        together = [f.result(timeout=900).pixels for f in futures]
    finally:
        engine.close()
    for a, b in zip(solo, together):
        assert a.tobytes() == b.tobytes()


def test_engine_metrics_count_steps_preemptions_and_deadline_misses(models, data):
    """One slot: a priority-5 decode parks a running priority-0 one (a preemption), a decode with
    a deadline already passed is dropped (a deadline miss); the counters say exactly that."""
    unet, codec = models
    engine = DecodeEngine(ServeConfig(tile=False, steps_allowed=["5"], max_slots=1, unet="in-memory"), codec, unet, device="cpu")
    try:
        low = engine.submit(data[0], seed=1)
        while low.job.evaluations < 2:
            time.sleep(0.005)
        high = engine.submit(data[0], seed=2, priority=5)
        late = engine.submit(data[0], seed=3, timeout=1e-6)
        results = [low.result(timeout=120), high.result(timeout=120)]
        with pytest.raises(Exception, match="deadline"):
            late.result(timeout=120)
        snap = engine.metrics.snapshot()
    finally:
        engine.close()
    assert snap["counters"]["preemptions"] >= 1 and snap["counters"]["deadline_misses"] == 1
    assert snap["counters"]["step_images"] == 10 and snap["counters"]["steps"] == 10  # one image per step
    assert snap["counters"]["step_pixels"] == 10 * 64 * 64
    assert sum(snap["decode_seconds"]["paper"]["counts"]) == 2 and all(r.evaluations == 5 for r in results)


def test_the_recompression_check_counts_the_symbols_of_the_8bit_image(models, data):
    """Decoded.symbols_equal: re-encoding what the client receives reproduces this share of the
    received latent symbols — checked against an Encoder run on the 8-bit image here; the MSE decode
    of an 8-bit-rounded image is near 1 but need not be exactly 1."""
    from idemrt.exact import symbols_equal

    unet, codec = models
    engine = DecodeEngine(ServeConfig(steps_allowed=["3"], unet="in-memory"), codec, unet, device="cpu")
    try:
        results = [engine.submit(data[0], seed=1).result(timeout=120), engine.submit(data[0], mode="mse").result(10)]
    finally:
        engine.close()
    y_hat = idemrt.Decoder(codec, None, device="cpu").prepare(data[0], mode="mse").y_hat
    for r in results:
        x = torch.from_numpy(r.pixels).permute(2, 0, 1)[None].float() / 255
        padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % 64, 0, -x.shape[-2] % 64), mode="replicate")
        assert r.symbols_equal == pytest.approx(symbols_equal(codec, padded, y_hat), abs=0)
        assert 0 < r.symbols_equal <= 1


def _held_until(engine, *, fail_when=None):
    """Replace the engine's execute: its first step waits for ``go`` (so that every image submitted
    before is in the batch); ``fail_when(out)`` True makes that step raise instead."""
    go, runs, execute = threading.Event(), [], engine.batcher.execute

    def held(out):
        go.wait(60)
        runs.append([j.state.program.name for j in out.run])
        if fail_when is not None and fail_when(out):
            raise RuntimeError("step broke")
        execute(out)

    engine.batcher.execute = held
    return go, runs


def test_a_non_finite_image_fails_alone_and_never_as_a_preview(models, data):
    """A DPS scale of 1e38 drives one image to inf/NaN (its retry at half the scale too): that
    image fails with the sampler's DecodeError, its previews skip the non-finite estimates (a
    preview used to raise ImageError, and the engine then failed every image in flight), and the
    image stepped in the same batch ends exactly as its Decoder alone."""
    unet, codec = models
    engine = DecodeEngine(ServeConfig(tile=False, steps_allowed=["5"], scale=1e38, preview_every=1, deterministic=True,
                                      unet="in-memory"), codec, unet, device="cpu")
    events = {"paper": [], "balanced": []}
    go, runs = _held_until(engine)
    try:
        futures = {speed: engine.submit(data[0], seed=4, speed=speed, on_event=events[speed].append)
                   for speed in ("paper", "balanced")}
        go.set()
        with pytest.raises(idemrt.DecodeError, match="non-finite"):
            futures["paper"].result(timeout=300)
        got = futures["balanced"].result(timeout=300)
        again = engine.submit(data[0], seed=4, speed="balanced").result(timeout=300)  # still serving
    finally:
        engine.close()
    assert ["paper/5", "balanced/50"] in runs or ["balanced/50", "paper/5"] in runs
    want = idemrt.Decoder(codec, unet, speed="balanced", device="cpu").decode(data[0], seed=4, output="tensor")
    assert torch.equal(got.image, want) and torch.equal(again.image, want)
    previews = [e["image"] for e in events["paper"] if e["event"] == "preview"]
    assert len(previews) < 5 and all(p.dtype == np.uint8 for p in previews)  # not every step had one
    assert len([e for e in events["balanced"] if e["event"] == "preview"]) == 19  # each of its 20 steps but the last


def test_a_failing_callback_or_step_fails_only_its_own_images(models, data):
    """An exception in one request's event callback fails that request only; an exception in a
    batched step fails the images of that step, not those of another shape waiting their turn."""
    unet, codec = models
    # whole images (tile=False), so that the two sizes are two groups taking turns
    engine = DecodeEngine(ServeConfig(tile=False, steps_allowed=["3"], unet="in-memory"), codec, unet, device="cpu")
    small, large = data[0], idemrt.Encoder(codec).encode(torch.rand(1, 3, 100, 48))  # 64x64 and 128x64 padded

    def broken(event):
        if event["event"] == "progress" and event["step"] == 2:
            raise ValueError("client callback broke")

    go, runs = _held_until(engine, fail_when=lambda out: out.run[0].state.x.shape[-2] > 64 and len(runs) < 3)
    try:
        bad = engine.submit(small, seed=1, on_event=broken)
        good = engine.submit(small, seed=2)
        doomed = engine.submit(large, seed=3)
        go.set()
        with pytest.raises(ValueError, match="client callback"):
            bad.result(timeout=120)
        with pytest.raises(RuntimeError, match="step broke"):
            doomed.result(timeout=120)
        got = good.result(timeout=120)
        later = engine.submit(large, seed=3).result(timeout=120)
    finally:
        engine.close()
    assert len(runs[0]) == 2 or len(runs[1]) == 2  # the two small images shared a step
    decoder = idemrt.Decoder(codec, unet, steps=3, device="cpu")
    torch.testing.assert_close(got.image, decoder.decode(small, seed=2, output="tensor"), rtol=0, atol=2e-5)
    torch.testing.assert_close(later.image, decoder.decode(large, seed=3, output="tensor"), rtol=0, atol=2e-5)


def test_previews_cost_no_network_call(models, data):
    """A served decode with a preview at every step calls the UNet and the codec operator exactly
    once per network evaluation of its program: a preview is the step's own x0 estimate (it used to
    run one more UNet forward per preview)."""
    unet, codec = models
    engine = DecodeEngine(ServeConfig(tile=False, steps_allowed=["5"], preview_every=1, unet="in-memory"), codec, unet,
                          device="cpu")
    calls = {"unet": 0, "operator": 0}
    hook = unet.register_forward_pre_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1))
    operator = codec.operator
    codec.operator = lambda *a, **k: (calls.__setitem__("operator", calls["operator"] + 1), operator(*a, **k))[1]
    events = []
    try:
        result = engine.submit(data[0], seed=1, on_event=events.append).result(timeout=120)
    finally:
        hook.remove()
        del codec.operator
        engine.close()
    previews = [e for e in events if e["event"] == "preview"]
    assert calls == {"unet": result.evaluations, "operator": result.evaluations} and result.evaluations == 5
    assert [p["step"] for p in previews] == [1, 2, 3, 4] and previews[0]["image"].shape == (40, 48, 3)
    # the preview after step k is the x0 the step predicted: close to the result at the last steps
    last = previews[-1]["image"].astype(np.float32)
    assert np.abs(last - result.pixels.astype(np.float32)).mean() < 40


def test_a_preview_is_the_8bit_image_of_the_downscaled_estimate():
    """PreviewCopies reduces on the device exactly as an area downscale followed by the service's
    8-bit conversion (idemrt.images.to_uint8, computed here apart), each image as if alone although
    an iteration's previews are reduced together, and drops a non-finite estimate only."""
    from idemrt.images import to_uint8
    from idemrt.serve.previews import PreviewCopies

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(1, 3, 100, 80, generator=gen) * 2.4 - 1.2 for _ in range(2))  # beyond [-1, 1] too
    c = torch.rand(1, 3, 40, 48, generator=gen) * 2 - 1  # another size, no downscale
    got, copies = {}, PreviewCopies(64)
    for name, x0 in (("a", a), ("b", b), ("c", c)):
        copies.add(x0, lambda image, name=name: got.setdefault(name, image))
    assert not got  # reduced with the iteration's others, at deliver()
    assert copies.deliver() == 0 and sorted(got) == ["a", "b", "c"]
    for name, x0 in (("a", a), ("b", b)):
        small = torch.nn.functional.interpolate(x0, scale_factor=64 / 100, mode="area")
        assert got[name].shape == (64, 51, 3)
        assert np.array_equal(got[name], to_uint8(((small + 1) / 2).clamp(0, 1)))
    assert np.array_equal(got["c"], to_uint8(((c + 1) / 2).clamp(0, 1)))
    a[0, 1, 5, 5] = float("nan")
    got.clear()
    for name, x0 in (("a", a), ("b", b)):
        copies.add(x0, lambda image, name=name: got.setdefault(name, image))
    copies.deliver()
    assert sorted(got) == ["b"]
