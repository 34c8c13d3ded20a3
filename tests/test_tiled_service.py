"""Tiles as the service's unit of batching (issue 28, item 4): a large image's windows are slots of
the step batch, counted against the pixel budget, so a large and a small image share iterations —
the large one's step split into units of windows — and each equals its solo decode (byte for byte
in deterministic mode); priorities, preemption, deadlines and failures still apply; more windows or
pixels than the limits are refused with 413. The tiny 32-pixel prior runs in 64-pixel windows
here, so a 64x64 image is one window (the whole image's path) and a 128x192 one twelve."""
import threading
import time

import pytest
import torch

import idemrt
from idemrt.errors import DeadlineExceeded
from idemrt.serve.config import ServeConfig
from idemrt.serve.core import DecodeEngine
from idemrt.serve.problems import problem_from
from tiny_models import tiny_codec, tiny_unet

TILE = {"window": 64, "stride": 48, "chunk": 2}
WINDOW_PIXELS = 64 * 64
BUDGET = 4 * WINDOW_PIXELS  # four windows an iteration
LARGE_WINDOWS = 3 * 4  # 128x192 padded: offsets 0, 32, 64 by 0, 43, 85, 128


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def data(models):
    torch.manual_seed(5)
    enc = idemrt.Encoder(models[1])
    return {"small": enc.encode(torch.rand(1, 3, 40, 48)), "large": enc.encode(torch.rand(1, 3, 120, 180)),
            "wide": enc.encode(torch.rand(1, 3, 64, 150))}


def _engine(models, **kw):
    unet, codec = models
    config = ServeConfig(**{"tile": TILE, "steps_allowed": ["5"], "pixel_budget": BUDGET, "unet": "in-memory", **kw})
    return DecodeEngine(config, codec, unet, device="cpu")


@pytest.fixture(scope="module")
def solo(models, data):
    """Each image decoded alone, deterministic and default (they are the same alone: one unit a call)."""
    engine = _engine(models, deterministic=True)
    try:
        return {name: engine.submit(d, seed=3).result(timeout=300).image for name, d in data.items()}
    finally:
        engine.close()


class Recorder:
    """Per iteration: the requests that ran and the UNet's work in window-sized images (a whole
    64x64 image's batched step counts as its images, a tiled image's calls as their windows).
    The first iteration waits for ``go`` (so that requests submitted together start together)."""

    def __init__(self, engine):
        self.engine, self.iterations, self.go = engine, [], threading.Event()
        sampler = next(iter(engine.programs.values()))[2]
        self.windows = sampler.windows
        execute, model, step = engine.batcher.execute, self.windows.tiled.model, sampler.backend.step
        self.work = 0

        def recording_execute(out):
            self.go.wait(60)
            self.work = 0
            execute(out)
            self.iterations.append(([j.seq for j in out.run], self.work, list(out.preempted)))

        def recording_model(w, t):
            self.work += w.shape[0]
            return model(w, t)

        def recording_step(x, *args):
            self.work += x.shape[0] * x.shape[-2] * x.shape[-1] // WINDOW_PIXELS
            return step(x, *args)

        engine.batcher.execute, self.windows.tiled.model, sampler.backend.step = (
            recording_execute, recording_model, recording_step)


def test_a_large_and_a_small_image_share_iterations_within_the_budget(models, data, solo):
    engine = _engine(models, deterministic=True)
    rec = Recorder(engine)
    try:
        assert engine.windows(_request(engine, data["large"])) == LARGE_WINDOWS
        large = engine.submit(data["large"], seed=3)
        small = engine.submit(data["small"], seed=3)
        rec.go.set()
        small_result = small.result(timeout=300)
        large_done_then = large.done()
        large_result = large.result(timeout=300)
    finally:
        engine.close()
    assert not large_done_then  # the small image did not wait for the large one
    assert engine.metrics.step_images == 5 + 5  # each image's step counted once, though the large one's span iterations
    assert all(work <= BUDGET // WINDOW_PIXELS for _, work, _ in rec.iterations)  # the budget, in windows
    with_small = [k for k, (run, _, _) in enumerate(rec.iterations) if small.job.seq in run]
    assert len(with_small) == 5 and with_small == list(range(with_small[0], with_small[0] + 5))  # a step an iteration
    assert all(large.job.seq in rec.iterations[k][0] for k in with_small)  # ... beside the large image's windows
    large_runs = sum(large.job.seq in run for run, _, _ in rec.iterations)
    assert large_runs >= 5 * 2 * LARGE_WINDOWS // 4  # its steps span iterations: 24 window evaluations, 4 at most
    assert torch.equal(small_result.image, solo["small"]) and torch.equal(large_result.image, solo["large"])


@pytest.mark.slow  # the default suite checks the sharing itself (test_window_steps.py); this, its effect
def test_by_default_images_of_two_sizes_share_unet_calls_and_equal_their_solo_decodes(models, data, solo):
    """Default (batched) mode, two tiled images of different sizes and a whole one: their windows
    share UNet calls; each image equals its solo decode within the batch-composition tolerance of
    docs/serving.md (numbers the CPU kernels sum in another order, amplified by DPS)."""
    engine = _engine(models)
    rec = Recorder(engine)
    try:
        futures = {name: engine.submit(d, seed=3) for name, d in data.items()}
        rec.go.set()
        got = {name: f.result(timeout=300).image for name, f in futures.items()}
    finally:
        engine.close()
    for name, image in got.items():
        torch.testing.assert_close(image, solo[name], rtol=0, atol=10 / 255)


def test_a_higher_priority_image_preempts_a_large_one_mid_step_which_resumes_exactly(models, data, solo):
    """One slot: a large image is parked in the middle of a step — its window sums kept — for a
    higher-priority small one, then resumes, to the same bytes as alone (deterministic)."""
    engine = _engine(models, deterministic=True, max_slots=1)
    rec = Recorder(engine)
    mid_step, plan = [], engine.batcher.plan

    def watching():
        out = plan()
        mid_step.extend(j.state.window_work is not None for j in out.preempted)
        return out

    engine.batcher.plan = watching
    try:
        large = engine.submit(data["large"], seed=3)
        rec.go.set()
        while len(rec.iterations) < 3:
            time.sleep(0.005)
        small = engine.submit(data["small"], seed=3, priority=5)
        small_result = small.result(timeout=300)
        large_result = large.result(timeout=300)
    finally:
        engine.close()
    parked = [k for k, (_, _, preempted) in enumerate(rec.iterations) if preempted]
    assert len(parked) == 1 and large.job.preemptions == 1 and mid_step == [True]
    k = parked[0]  # the small one alone, five iterations, then the large one resumes
    assert [run for run, _, _ in rec.iterations[k:k + 5]] == [[small.job.seq]] * 5
    assert rec.iterations[k + 5][0] == [large.job.seq]
    assert torch.equal(small_result.image, solo["small"]) and torch.equal(large_result.image, solo["large"])


def test_a_deadline_or_a_failing_window_step_frees_everything(models, data):
    engine = _engine(models)
    rec = Recorder(engine)
    rec.go.set()
    try:
        late = engine.submit(data["large"], seed=3, timeout=0.3)
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=60)
        _settled(engine)
        model = rec.windows.tiled.model
        calls = []

        def broken(w, t):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("window step broke")
            return model(w, t)

        rec.windows.tiled.model = broken
        failing = engine.submit(data["large"], seed=3)
        with pytest.raises(RuntimeError, match="window step broke"):
            failing.result(timeout=60)
        _settled(engine)
        rec.windows.tiled.model = model
        assert engine.submit(data["large"], seed=3).result(timeout=300).image.shape == (1, 3, 120, 180)
        _settled(engine)
    finally:
        engine.close()


def test_more_windows_or_pixels_than_the_limits_are_413(models, data):
    engine = _engine(models, max_windows=LARGE_WINDOWS - 1, max_pixels=128 * 192)
    try:
        with pytest.raises(idemrt.TooLargeError, match="12 windows") as many:
            engine.submit(data["large"], seed=3)
        assert problem_from(many.value).status == 413
        engine.submit(data["wide"], seed=3).result(timeout=300)  # 64x192: 4 windows
    finally:
        engine.close()
    small = _engine(models, max_pixels=128 * 192 - 1)
    try:
        with pytest.raises(idemrt.TooLargeError) as large:
            small.submit(data["large"], seed=3)
        assert problem_from(large.value).status == 413
    finally:
        small.close()


def _request(engine, data):
    from idemrt.serve.core import DecodeRequest

    bs, codec = engine._route(data)
    return DecodeRequest(bitstream=bs, codec=codec, speed=engine.config.speed, respacing="5")


def _settled(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and engine.stats()["held"]:
        time.sleep(0.01)
    stats = engine.stats()
    assert (stats["slots_used"], stats["held"], stats["running"], stats["waiting"]) == (0, 0, 0, 0), stats


@pytest.mark.slow
def test_at_the_demo_s_100_steps_tiled_images_together_stay_within_the_batch_tolerance():
    """The demo models at their 100 DPS steps, default (batched) mode: two 128x96 photographs (9
    windows of 64 each; their units share UNet calls) and a 64x64 one decoded together, against
    each decoded alone: within the batch tolerance of docs/serving.md ("Reproducibility": DPS
    amplifies the other summation orders of a shared call; measured there for whole images)."""
    import numpy as np
    from PIL import Image

    from idemrt.demo_assets import DEMO_IMAGES, demo_image

    engine = DecodeEngine(ServeConfig.demo(speeds_allowed=["paper"]), device="cpu")
    try:
        def photo(name, w, h):
            pixels = (demo_image(name)[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            return torch.from_numpy(np.array(Image.fromarray(pixels).resize((w, h), Image.BICUBIC))).permute(
                2, 0, 1)[None].float() / 255

        images = [photo(DEMO_IMAGES[0], 128, 96), photo(DEMO_IMAGES[1], 128, 96), photo(DEMO_IMAGES[1], 64, 64)]
        datas = [idemrt.Encoder(engine.codec).encode(x) for x in images]
        solo = [engine.submit(d, seed=2).result(timeout=900) for d in datas]
        together = [f.result(timeout=1800) for f in [engine.submit(d, seed=2) for d in datas]]
    finally:
        engine.close()
    assert [r.windows for r in solo] == [9, 9, 1]
    for a, b in zip(solo, together):
        diff = np.abs(a.pixels.astype(int) - b.pixels.astype(int))
        print(f"{a.windows} windows: max {diff.max()} levels, mean {diff.mean():.3f}, "
              f"{(diff > 1).mean():.1%} of pixels more than one level apart")
        assert diff.max() <= 10 and diff.mean() <= 1.0
