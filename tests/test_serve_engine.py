"""The service's decode engine without Ray: results equal Decoder.decode, events, limits, errors."""
import time

import pytest
import torch

import idemrt
from idemrt.diffusion import QueueFullError
from idemrt.serve.config import ServeConfig
from idemrt.serve.engine import DecodeEngine
from idemrt.serve.metrics import Metrics
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
    engine = DecodeEngine(ServeConfig(steps_allowed=["3", "5"], unet="in-memory"), codec, unet, device="cpu")
    futures = {(k, s): engine.submit(d, seed=7, steps=s) for k, d in enumerate(data) for s in ("3", "5")}
    for (k, s), future in futures.items():
        got = future.result(timeout=120)
        want = idemrt.Decoder(codec, unet, steps=int(s), device="cpu").decode(data[k], seed=7, output="tensor")
        assert got.image.shape == want.shape and got.steps == int(s)
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
    assert previews[0]["image"].shape == (1, 3, 40, 48) and 0 <= previews[0]["image"].min() <= 1


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
    assert future.cancelled() and engine.stats()["running"] == 0 and future.job.steps_done < 5


def test_metrics_text_is_prometheus_exposition():
    m = Metrics()
    m.observe_request("perceptual", 200, 0.3)
    m.observe_request("perceptual", 503, 0.0)
    m.observe_error("overloaded")
    m.observe_step(0.05, 3, 4)
    text = m.render({"queue_depth": ("help", 2)})
    assert 'idemrt_requests_total{mode="perceptual",code="200"} 1' in text
    assert 'idemrt_errors_total{kind="overloaded"} 1' in text
    assert 'idemrt_decode_seconds_bucket{le="0.25"} 0' in text and 'idemrt_decode_seconds_bucket{le="0.5"} 1' in text
    assert "idemrt_decode_seconds_count 1" in text and "idemrt_slot_occupancy 0.75" in text
    assert "idemrt_queue_depth 2" in text and "# TYPE idemrt_decode_seconds histogram" in text


def test_speed_preset_with_warm_start_and_exact_refinement_equals_the_decoder(models, data):
    """A server with --speed fast decodes as Decoder(speed="fast"): warm start, codec-gradient
    guidance and the exact-idempotence refinement included."""
    unet, codec = models
    engine = DecodeEngine(ServeConfig(speed="fast", unet="in-memory"), codec, unet, device="cpu")
    try:
        assert engine.config.steps_allowed == ["50"]
        got = engine.submit(data[0], seed=3).result(timeout=120)
        decoder = idemrt.Decoder(codec, unet, speed="fast", device="cpu")
        want = decoder.decode(data[0], seed=3, output="tensor")
        assert got.steps == decoder.steps_run < 50  # the warm start skips the steps above t0
        torch.testing.assert_close(got.image, want, rtol=0, atol=2e-5)
    finally:
        engine.close()
