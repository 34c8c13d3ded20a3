"""A tiled image's step in windows split across iterations (idemrt.diffusion.window_steps): equal to
the step with the tiled model function in one go (TiledModel's autograd function, itself checked
against a float64 reference in test_tiling.py), whatever the budget; windows of several images
share UNet calls, except in deterministic mode."""
from types import SimpleNamespace

import pytest
import torch

from idemrt.diffusion.tiling import Tiling
from idemrt.programs import DecodeProgram, build_step_group
from idemrt.speeds import SPEEDS
from tiny_models import tiny_codec, tiny_unet

TILE = Tiling(window=32, stride=24, chunk=3)


@pytest.fixture(scope="module")
def models():
    return tiny_unet().eval(), tiny_codec()


class Loop:
    """What a GuidedSampler gives a windowed step: its noise and scale, and where the result goes."""

    def __init__(self, noise, scale):
        self.noise, self.scale, self.results = noise, scale, {}  # noise: each image's (1, C, H, W)

    def step_noise(self, state):
        return self.noise[state.k]

    def step_scales(self, state):
        return self.scale

    def step_ended(self, state, result):
        self.results[state.k] = result


def _group(models, speed, deterministic=False, **options):
    unet, codec = models
    cfg = SPEEDS[speed].replace(**{"backend": "eager", "tile": TILE, "deterministic": deterministic, **options})
    return build_step_group([DecodeProgram.build(cfg, unet, "cpu")], unet, codec).sampler


def _inputs(codec, n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(n, 3, h, w, generator=g), torch.randn(n, 3, h, w, generator=g)
    with torch.no_grad():
        target = 2 * codec.synthesis(torch.round(codec.model.g_a(torch.rand(n, 3, h, w, generator=g)))) - 1
    return x, target, noise


def _states(x, target, row):
    return [SimpleNamespace(k=k, x=x[k : k + 1], target=target[k : k + 1], row=row, window_work=None)
            for k in range(x.shape[0])]


def _run(windows, states, loop, budget=None, deterministic=False):
    """Iterations of ``budget`` windows until every state's step ended; returns how many ran."""
    runs, pending = 0, list(states)
    while pending:
        done = windows.run(pending, budget, loop, deterministic)
        pending = [s for s in pending if s not in done]
        runs += 1
    return runs


@pytest.mark.parametrize("speed,options,rows", [
    ("paper", dict(steps=6), (4, 1)),  # DPS
    ("balanced", dict(steps=10), (8, 7)),  # DSG: a guided and a skipped step (its interval)
    ("fast", dict(steps=10), (5, 0)),  # PIR: the proximal step, no backward
    ("paper", dict(steps=6, guidance="none", scale=None), (3,)),  # unguided
])
def test_a_windowed_step_equals_the_step_with_the_tiled_model(models, speed, options, rows):
    sampler = _group(models, speed, **options)
    backend, windows = sampler.backend, sampler.windows
    x, target, noise = _inputs(models[1], 1, 64, 88)
    scale = torch.full((1,), 0.7)
    for row in rows:
        loop = Loop([noise], scale)
        _run(windows, _states(x, target, row), loop)
        got = loop.results[0]
        want = backend.step(x, row, target, noise, scale)  # TiledModel's autograd function, in one go
        for a, b in zip((*got, got.x0), (*want, want.x0)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_step_split_by_the_budget_is_the_same_step(models):
    """One window of budget an iteration: each iteration runs one unit (``chunk`` windows, the
    first unit always runs), forward units then backward ones, and the step is unchanged."""
    sampler = _group(models, "paper", steps=6)
    windows = sampler.windows
    x, target, noise = _inputs(models[1], 1, 64, 88, seed=1)
    k = windows.windows(64, 88)
    assert k == 3 * 4  # 64 = 32 + 24 + 8 (3 windows), 88: 4
    calls, model = [], windows.tiled.model
    windows.tiled.model = lambda w, t: calls.append(w.shape[0]) or model(w, t)
    try:
        whole, split = Loop([noise], torch.full((1,), 0.7)), Loop([noise], torch.full((1,), 0.7))
        assert _run(windows, _states(x, target, 4), whole) == 1
        calls.clear()
        assert _run(windows, _states(x, target, 4), split, budget=1) == 2 * k // TILE.chunk
    finally:
        windows.tiled.model = model
    assert calls == [TILE.chunk] * (2 * k // TILE.chunk)
    assert torch.equal(whole.results[0][0], split.results[0][0])


@pytest.mark.parametrize("deterministic", [False, True])
def test_windows_of_several_images_share_unet_calls_unless_deterministic(models, deterministic):
    """Units of 4 windows: a 64x64 image (9 windows: 4, 4, 1) and a 64x88 one (12: 4, 4, 4). The third
    round's forward windows, 1 + 4, are packed into calls of 4 ([a b b b], [b]) unless deterministic
    ([a], [b b b b]: each image's windows meet the UNet in the same groups as alone)."""
    sampler = _group(models, "paper", deterministic=deterministic, steps=6, tile=Tiling(window=32, stride=24, chunk=4))
    windows = sampler.windows
    xa, ta, na = _inputs(models[1], 1, 64, 64, seed=2)
    xb, tb, nb = _inputs(models[1], 1, 64, 88, seed=3)
    calls, model = [], windows.tiled.model

    def recording(w, t):
        calls.append(tuple(t.tolist()))
        return model(w, t)

    windows.tiled.model = recording
    try:
        alone = []
        for x, target, noise, row in ((xa, ta, na, 4), (xb, tb, nb, 2)):
            loop = Loop([noise], torch.full((1,), 0.7))
            _run(windows, _states(x, target, row), loop, deterministic=deterministic)
            alone.append(loop.results[0])
        calls.clear()
        a, b = _states(xa, ta, 4)[0], _states(xb, tb, 2)[0]
        b.k = 1
        loop = Loop([na, nb], torch.full((1,), 0.7))
        _run(windows, [a, b], loop, deterministic=deterministic)
    finally:
        windows.tiled.model = model
    t_a, t_b = (sampler.backend.sampler.model_timesteps(r, 1).item() for r in (4, 2))
    mixed = [c for c in calls if t_a in c and t_b in c]  # a call holding windows of both images
    assert bool(mixed) is not deterministic and all(len(c) <= 4 for c in calls)
    for k, want in enumerate(alone):
        got = loop.results[k]
        if deterministic:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:  # another batch composition: the CPU kernels' summation order only
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


def test_the_fast_backend_steps_windows_like_eager(models):
    """The windows run through the backend's own model function and operator: fast at fp32 on the
    CPU gives eager's windowed step."""
    eager = _group(models, "paper", steps=6)
    fast = _group(models, "paper", steps=6, backend="fast", dtype="fp32")
    x, target, noise = _inputs(models[1], 1, 64, 88, seed=4)
    results = []
    for sampler in (eager, fast):
        loop = Loop([noise], torch.full((1,), 0.7))
        _run(sampler.windows, _states(x, target, 4), loop)
        results.append(loop.results[0])
    for a, b in zip((*results[0], results[0].x0), (*results[1], results[1].x0)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
