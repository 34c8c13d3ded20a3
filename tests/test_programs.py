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
