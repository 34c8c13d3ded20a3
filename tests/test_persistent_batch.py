"""The persistent batch (GuidedSampler's SlotBatch): a step reads slot-indexed buffers as they are —
no concatenation, no split, no per-image values sent per step, one small read-back every
``check_every`` steps — and an image's numbers do not depend on its slot, whoever joins or leaves.
The step's x0 estimate is kept per image (what a preview shows)."""
import torch
from torch.overrides import TorchFunctionMode

from idemrt.backends.base import StepRows, StepSpec
from idemrt.diffusion import GuidedSampler, Program
from idemrt.diffusion.step import StepResult

SHAPE = (1, 3, 8, 8)


class RowBackend:
    """A zero-cost step whose result depends on every per-image input (x, row, target, noise,
    scale), elementwise, so that any mix-up of slots changes the numbers; x0 = 2·x_t."""

    slot_counts = None
    spec = StepSpec(unet=None, operator=None, codec=None, constraint="x", sampler=None, guidance=None)

    def __init__(self):
        self.calls = []

    def step(self, x, i, target, noise, scale):
        self.calls.append(x.shape[0])
        rows = i.tensor.float().reshape(-1, 1, 1, 1) if isinstance(i, StepRows) else float(i)
        # rows / 64: exact whether the rows come as a host int or a device tensor
        x_prev = x * 0.9 + 0.1 * noise + rows / 64 + 0.001 * scale.reshape(-1, 1, 1, 1) + 0.1 * target
        return StepResult(x_prev, (x - target).flatten(1).norm(dim=1), 2 * x)


def _sampler(**kw):
    return GuidedSampler(RowBackend(), 30, device="cpu", scale=1.0, **kw)


def _target(k):
    return torch.full(SHAPE, 0.1 * (k + 1))


class Count(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_step_concatenates_nothing_and_reads_back_only_at_checks():
    sampler = _sampler(check_every=10)
    states = [sampler.start(_target(k), k, SHAPE) for k in range(3)]
    sampler.advance(states)  # the joins: slots written once
    per_step = []
    for _ in range(20):  # positions 28 .. 9: checks at 20 and 10
        with Count() as count:
            sampler.advance(states)
        per_step.append(count.names)
    checks = [k for k, names in enumerate(per_step) if "tolist" in names]
    assert checks == [8, 18]  # the steps at positions 20 and 10
    for k, names in enumerate(per_step):
        assert not {"cat", "split", "chunk", "tensor", "to", "item"} & set(names), names
        assert names.count("stack") == names.count("tolist") == (k in checks)
        assert names.count("copy_") == 2  # the step's x_prev and distances into the buffers, nothing else


def test_an_image_does_not_depend_on_its_slot():
    """A alone, and A while others join and leave around it (it moves from slot 2 to slot 0, a
    masked pad included): the same bits, and each step's x0 kept per image."""
    alone = _sampler()
    a = alone.start(_target(0), 7, SHAPE)
    while a.running:
        alone.advance([a])
    assert alone.finish(a)

    mixed = _sampler()
    b, c = (mixed.start(_target(k), 10 + k, SHAPE, program=Program(35 + 5 * k, 2.0 + k)) for k in (1, 2))
    a2 = mixed.start(_target(0), 7, SHAPE)
    mixed.advance([b, c])
    mixed.advance([b, c, a2], pad_to=4)  # A joins in slot 2
    assert a2.slot == 2
    mixed.advance([c, a2])  # B parked: A moves
    before = a2.x.clone()
    mixed.advance([a2], pad_to=2)  # C parked too
    assert a2.slot == 0 and torch.equal(a2.x0, 2 * before)
    while a2.running:
        mixed.advance([a2, b])
    assert mixed.finish(a2) and a2.slot is None and mixed.slots_used() == 1
    assert torch.equal(a2.x, a.x) and a2.distance == a.distance and a2.evaluations == a.evaluations == 30
    mixed.release(b)
    assert mixed.slots_used() == 0 and b.x.shape == SHAPE  # a parked or released image keeps its x_t


def test_a_retry_rewrites_its_slot_in_place():
    """A non-finite image restarts at a smaller scale in its slot; its neighbour is untouched."""
    class Breaks(RowBackend):
        def step(self, x, i, target, noise, scale):
            out = super().step(x, i, target, noise, scale)
            bad = (scale > 50).reshape(-1, 1, 1, 1)  # the first attempt of the big-scale image
            return StepResult(torch.where(bad, torch.nan, out[0]), out[1], out.x0)

    sampler = GuidedSampler(Breaks(), 30, device="cpu", scale=1.0, check_every=5)
    ok = sampler.start(_target(0), 1, SHAPE)
    big = sampler.start(_target(1), 2, SHAPE, program=Program(30, 80.0))
    while ok.running or big.running:
        sampler.advance([s for s in (ok, big) if s.running])
        for s in (ok, big):
            if s.done and s.slot is not None:
                sampler.finish(s)
    assert big.nan_tries == 1 and big.error is None and torch.isfinite(big.x).all()
    alone = GuidedSampler(RowBackend(), 30, device="cpu", scale=1.0)
    want = alone.start(_target(0), 1, SHAPE)
    while want.running:
        alone.advance([want])
    assert torch.equal(ok.x, want.x)


def test_the_step_x0_is_the_samplers_prediction():
    """backend.step(...).x0 of the eager and fast backends is the x0 the sampler predicts from the
    UNet output at x_t (computed here apart)."""
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.diffusion import DDPMSampler, DPS, Schedule
    from tiny_models import tiny_unet

    unet = tiny_unet()
    sampler = DDPMSampler(Schedule.create(1000, 10))
    spec = StepSpec(unet=unet, operator=lambda x0: x0, codec=None, constraint="x", sampler=sampler, guidance=DPS(0.5))
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    target = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        want = sampler.predict(unet(x, sampler.model_timesteps(6, 2)), x, 6).x0
    for name, kw in (("eager", {}), ("fast", {"dtype": torch.float32, "graphs": False})):
        got = create_backend(name, spec, device=torch.device("cpu"), **kw).step(x, 6, target, noise)
        x_prev, dist = got  # still the pair it always was
        torch.testing.assert_close(got.x0, want, rtol=0, atol=1e-5)
