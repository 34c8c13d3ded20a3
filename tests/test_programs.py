"""Stacked step tables and guidance: several programs (respacings, DPS and DSG) in one step function
compute, row by row, exactly what each program's own sampler and guidance compute."""
import pytest
import torch

from idemrt.diffusion import DDIMSampler, DDPMSampler, DPS, DSG, PIR, Schedule, StackedSampler
from idemrt.diffusion.guidance import StackedGuidance, stack_alignment, stack_guidance
from idemrt.diffusion.samplers import Prediction


def _samplers():
    return [DDPMSampler(Schedule.create(1000, r)) for r in (10, 4, "2,3")]


def test_stacked_rows_are_each_samplers_own_rows():
    members = _samplers()
    stacked = StackedSampler(members, align=4)
    assert stacked.offsets == [0, 12, 16] and stacked.num_steps == 16 + 5  # 10 rows padded to 12
    for s, off in zip(members, stacked.offsets):
        for i in range(s.num_steps):
            assert torch.equal(stacked.rows(off + i), s.rows(i))
            assert torch.equal(stacked.model_timesteps(off + i, 1), s.model_timesteps(i, 1))
            assert torch.equal(stacked.sqrt_abar_prev(off + i), s.sqrt_abar_prev(i))
    rows = torch.tensor([12, 0, 16, 3])  # per sample, gathered on the device
    assert torch.equal(stacked.sqrt_abar_prev(rows)[[0, 1, 2]], torch.ones(3))  # each respacing's first step
    x = torch.randn(4, 3, 8, 8)
    out = torch.randn(4, 6, 8, 8)
    want = torch.cat([members[k].predict(out[j : j + 1], x[j : j + 1], i).mean
                      for j, (k, i) in enumerate([(1, 0), (0, 0), (2, 0), (0, 3)])])
    torch.testing.assert_close(stacked.predict(out, x, rows).mean, want, rtol=0, atol=0)


def test_only_one_family_stacks():
    with pytest.raises(ValueError, match="one family"):
        StackedSampler([DDPMSampler(Schedule.create(1000, 10)), DDIMSampler(Schedule.create(1000, 10))])
    with pytest.raises(ValueError, match="one family"):
        StackedSampler([DDIMSampler(Schedule.create(1000, 10), eta=1.0), DDIMSampler(Schedule.create(1000, 10), eta=0.0)])


def test_stacked_guidance_applies_each_rows_own_update():
    dps, dsg = DPS(0.7), DSG(interval=2)
    g = stack_guidance([dps, dsg], [0, 10], [10, 6])
    assert isinstance(g, StackedGuidance) and g.step_kind == "gradient"
    n = 4
    sample, mean, grad = torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)
    pred = Prediction(torch.randn(n, 3, 8, 8), mean, torch.rand(n, 3, 8, 8) + 0.1)
    rows = torch.tensor([3, 12, 13, 10])  # DPS step 3, DSG steps 2 (guided), 3 (off), 0 (guided)
    got = g.update(sample, pred, grad, rows)
    k = slice(0, 1)
    torch.testing.assert_close(got[k], dps.update(sample[k], Prediction(*(p[k] for p in pred)), grad[k], 3))
    for j, i in ((1, 2), (2, 3), (3, 0)):
        k = slice(j, j + 1)
        want = dsg.update(sample[k], Prediction(*(p[k] for p in pred)), grad[k], torch.tensor([i]))
        torch.testing.assert_close(got[k], want)
    assert torch.equal(got[2], sample[2])  # DSG off its interval: unguided
    assert g.active(13) is False and g.active(3) is True and g.active(rows).tolist() == [True, True, False, True]
    scale = torch.tensor([2.0, 1.0, 1.0, 1.0])  # a per-sample scale overrides DPS rows' default
    torch.testing.assert_close(g.update(sample, pred, grad, rows, scale)[0], sample[0] - 2.0 * grad[0])


def test_equal_guidance_is_shared_and_dsg_offsets_align_to_its_interval():
    assert stack_guidance([DPS(0.6), DPS(0.6)], [0, 10], [10, 4]) == DPS(0.6)
    assert stack_alignment([DSG(interval=3), DSG(interval=3)]) == 3 and stack_alignment([DPS()]) == 1
    with pytest.raises(ValueError, match=r"declare their stack rows \(DPS, DSG\) stack, got \['dps', 'pir'\]"):
        StackedGuidance([DPS(), PIR()], [0, 10], [10, 4])


# --- the one factory: a DecodeConfig becomes its program, step key and backend (idemrt.programs) -------

def test_the_factory_groups_programs_by_step_key_and_the_engine_builds_no_decoder(monkeypatch):
    """DPS and DSG programs of any respacing share a step key, PIR, another constraint or other backend
    options do not; the engine builds its groups from the factory — no Decoder per program — and each
    program's rows are its own table's (checked against its sampler alone)."""
    import idemrt
    from idemrt.decode_config import DecodeConfig
    from idemrt.programs import DecodeProgram, build_step_group
    from idemrt.serve.config import ServeConfig
    from idemrt.serve.core import DecodeEngine
    from idemrt.speeds import SPEEDS
    from tiny_models import tiny_codec, tiny_unet

    unet, codec = tiny_unet(), tiny_codec()
    build = lambda **kw: DecodeProgram.build(DecodeConfig(**kw), unet, "cpu")  # noqa: E731
    paper5, paper3 = build(steps=5), build(steps=3)
    dsg = DecodeProgram.build(SPEEDS["balanced"], unet, "cpu")
    assert paper5.step_key() == paper3.step_key() == dsg.step_key()
    for other in (DecodeProgram.build(SPEEDS["fast"], unet, "cpu"), build(steps=5, constraint="y"),
                  build(steps=5, backend="fast", backend_options={"graphs": False}), build(steps=5, max_retries=2)):
        assert other.step_key() != paper5.step_key()
    group = build_step_group([paper5, dsg], unet, codec, names=["a", "b"])
    assert [p.offset for p in group.programs] == [0, 5] and group.programs[1].warm_start == dsg.warm_start
    table = group.sampler.backend.spec.sampler
    for k in range(dsg.schedule.num_steps):
        assert torch.equal(table.rows(5 + k), dsg.sampler.rows(k))

    built = []
    init = idemrt.Decoder.__init__
    monkeypatch.setattr(idemrt.Decoder, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    engine = DecodeEngine(ServeConfig(tile=False, steps_allowed=["5", "3"], unet="in-memory"), codec, unet, device="cpu")
    try:
        keys = {key[2:]: v for key, v in engine.programs.items()}
        assert built == [] and keys["paper", "5"][2] is keys["paper", "3"][2] is keys["balanced", "50"][2]
        assert keys["paper", "5"][0].step_key() == paper5.step_key() and len(engine.groups) == 2
    finally:
        engine.close()
    decoder = idemrt.Decoder(codec, unet, steps=5, device="cpu")
    assert decoder.program.step_key() == paper5.step_key() and decoder.steps_run == paper5.evaluations == 5


@pytest.mark.parametrize("changes", [
    {"constraint": "y"}, {"dtype": torch.float64}, {"backend": "fast"}, {"max_retries": 2}, {"nan_retries": 0},
    {"retry_threshold": 0.5}, {"check_every": 3}, {"deterministic": True}, {"tile": True},
    {"backend_options": {"graphs": False}}, {"device": "meta"}])
def test_a_group_takes_no_setting_from_its_first_member(changes):
    """Every setting a step group takes from its first member (the operator's constraint, dtype,
    backend and its options, tiling, the retry policy, the check interval, determinism, the device)
    is in the step key: programs that differ in one never stack — build_step_group and its halves
    refuse them, in either order."""
    from idemrt.decode_config import DecodeConfig
    from idemrt.programs import DecodeProgram, build_step_function, build_step_group, group_sampler
    from tiny_models import tiny_codec, tiny_unet

    unet, codec = tiny_unet(), tiny_codec()
    device = changes.pop("device", "cpu")
    base = DecodeProgram.build(DecodeConfig(steps=5), unet, "cpu")
    other = DecodeProgram.build(DecodeConfig(steps=3, **changes), unet, device)
    assert other.step_key() != base.step_key()
    for members in ([base, other], [other, base]):
        with pytest.raises(ValueError, match="one step key"):
            build_step_group(members, unet, codec)
        with pytest.raises(ValueError, match="one step key"):
            build_step_function(members, unet, codec)
        fn = build_step_function([base], unet, codec)
        with pytest.raises(ValueError, match="one step key"):
            group_sampler(fn, members)
