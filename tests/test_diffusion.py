"""Schedules, respacing and the DDPM/DDIM steps against hand formulas and a float64 reference."""
import copy

import numpy as np
import pytest
import torch

import diffusion_reference as ref
from idemrt.diffusion import DDIMSampler, DDPMSampler, Schedule, linear_betas, space_timesteps


# --- schedule ------------------------------------------------------------------------

def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, rel=1e-15) and b[-1] == pytest.approx(0.02, rel=1e-15)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    # Other lengths keep the total noise of 1000 steps: scaled by 1000/N.
    np.testing.assert_allclose(linear_betas(500), ref.betas(500), rtol=1e-14)
    assert linear_betas(500)[-1] == pytest.approx(0.04)


@pytest.mark.parametrize("count", [100, 200, 250, 1000])
def test_respacing_single_section_matches_closed_form(count):
    assert space_timesteps(1000, count) == {round(i * 999 / (count - 1)) for i in range(count)}
    assert space_timesteps(1000, str(count)) == space_timesteps(1000, count)


def test_respacing_100_known_values():
    kept = sorted(space_timesteps(1000, 100))
    assert kept[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert kept[-4:] == [969, 979, 989, 999]
    assert sorted(space_timesteps(1000, 200))[-3:] == [989, 994, 999]


def test_respacing_accepts_a_list_of_section_counts():
    """guided-diffusion's space_timesteps takes a list of counts as well as the string form."""
    assert space_timesteps(1000, [10, 15, 20]) == space_timesteps(1000, "10,15,20")
    assert len(space_timesteps(1000, [10, 15, 20])) == 45
    assert Schedule.create(1000, [10, 20]).num_steps == 30
    for bad in ([], [10, 0], [10, "x"], [True]):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


def test_respacing_ddim_stride():
    assert space_timesteps(1000, "ddim100") == set(range(0, 1000, 10))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == {0, 334, 668}  # smallest stride with 3 steps


def test_respacing_two_sections():
    kept = sorted(space_timesteps(1000, "10,20"))
    assert len(kept) == 30
    first, second = kept[:10], kept[10:]
    assert first[:3] == [0, 55, 111] and first[-1] == 499  # 500 steps, stride 499/9
    assert second[0] == 500 and second[-1] == 999 and all(500 <= t < 1000 for t in second)
    assert kept == ref.kept_steps(1000, [10, 20])
    # Uneven split: 1000 = 334 + 333 + 333, the first part gets the extra step.
    assert sorted(space_timesteps(1000, "2,2,2")) == [0, 333, 334, 666, 667, 999]


@pytest.mark.parametrize("bad", ["ddim1", "ddim0", "ddimx", "10,x", "", "1001", 1001, "600,600", 0, -5, "10,0", True, 2.5])
def test_respacing_errors(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


@pytest.mark.parametrize("steps, respacing", [(1000, 1), (1, None), (1000, "ddim1")])
def test_schedule_create_errors(steps, respacing):
    with pytest.raises(ValueError):
        Schedule.create(steps, respacing)


@pytest.mark.parametrize("respacing", [None, 1000, 100, 200, "ddim100", "10,20"])
def test_schedule_arrays_match_reference(respacing):
    s = Schedule.create(1000, respacing)
    kept = list(range(1000)) if respacing is None else sorted(space_timesteps(1000, respacing))
    P = ref.process(1000, kept)
    assert s.num_steps == len(kept) and s.original_num_steps == 1000
    np.testing.assert_array_equal(s.timestep_map, kept)
    pairs = {
        "betas": "betas", "alphas_cumprod": "abar", "alphas_cumprod_prev": "abar_prev",
        "sqrt_recip_alphas_cumprod": "sqrt_recip", "sqrt_recipm1_alphas_cumprod": "sqrt_recipm1",
        "posterior_variance": "pv", "posterior_log_variance_clipped": "plv",
        "posterior_mean_coef1": "c1", "posterior_mean_coef2": "c2",
    }
    for mine, theirs in pairs.items():
        np.testing.assert_allclose(getattr(s, mine), P[theirs].numpy(), rtol=1e-12, atol=0, err_msg=mine)


def test_rebuilt_betas_keep_the_original_cumulative_alphas():
    base_abar = np.cumprod(1 - linear_betas(1000))
    for respacing in (100, "ddim100", "10,20"):
        s = Schedule.create(1000, respacing)
        np.testing.assert_allclose(s.alphas_cumprod, base_abar[s.timestep_map], rtol=1e-12)
        # beta'_k = 1 - abar[t_k]/abar[t_{k-1}]: the hand formula for the first two steps.
        t0, t1 = s.timestep_map[:2]
        assert s.betas[0] == pytest.approx(1 - base_abar[t0], rel=1e-12)
        assert s.betas[1] == pytest.approx(1 - base_abar[t1] / base_abar[t0], rel=1e-12)
    full = Schedule.create(1000)
    np.testing.assert_allclose(full.betas, linear_betas(1000), rtol=0, atol=1e-15)
    assert full.posterior_variance[0] == 0 and full.posterior_log_variance_clipped[0] == np.log(full.posterior_variance[1])
    assert full.posterior_mean_coef1[0] == 1 and full.posterior_mean_coef2[0] == 0


# --- DDPM / DDIM steps ---------------------------------------------------------------

@pytest.fixture(scope="module")
def nets():
    net = ref.TinyEpsNet(seed=1)
    return net, copy.deepcopy(net).double()


def _inputs(shape=(2, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _check_prediction(sampler, ref_step, nets, respacing, i):
    net, net64 = nets
    x, noise = _inputs(seed=i)
    t = sampler.model_timesteps(i, x.shape[0])
    assert t.dtype == torch.long and t.tolist() == [int(sampler.schedule.timestep_map[i])] * 2
    pred = sampler.predict(net(x, t), x, i)
    sample = sampler.step(pred, noise, i)
    P = ref.process(1000, sorted(space_timesteps(1000, respacing)))
    x0, mean, sigma, sample64 = ref_step(P, net64, x.double(), i, noise.double())
    for got, want in zip((pred.x0, pred.mean, pred.sigma, sample), (x0, mean, sigma, sample64)):
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    return pred


@pytest.mark.parametrize("i", [99, 57, 1, 0])
def test_ddpm_step_matches_float64_reference(nets, i):
    pred = _check_prediction(DDPMSampler(Schedule.create(1000, 100)), ref.ddpm, nets, 100, i)
    if i == 57:  # the fixture exercises both sides of the clamp
        assert 0.05 < (pred.x0.abs() == 1).float().mean() < 0.95


@pytest.mark.parametrize("i", [199, 120, 1, 0])
def test_ddim_step_matches_float64_reference(nets, i):
    pred = _check_prediction(DDIMSampler(Schedule.create(1000, 200)), ref.ddim, nets, 200, i)
    if i == 0:
        assert (pred.sigma == 0).all()


def test_step_adds_no_noise_at_i0():
    s = Schedule.create(1000, 10)
    sampler = DDPMSampler(s)
    x, noise = _inputs()
    out = torch.randn(2, 6, 8, 8)
    pred = sampler.predict(out, x, 0)
    assert (pred.sigma > 0).all()  # the learned std itself is not 0 at i == 0 ...
    torch.testing.assert_close(sampler.step(pred, noise, 0), pred.mean, rtol=0, atol=0)  # ... but no noise is added
    torch.testing.assert_close(pred.mean, pred.x0)  # c1_0 = 1, c2_0 = 0
    assert not torch.equal(sampler.step(sampler.predict(out, x, 1), noise, 1), sampler.predict(out, x, 1).mean)


def test_tensor_index_matches_int_index():
    for sampler in (DDPMSampler(Schedule.create(1000, 50)), DDIMSampler(Schedule.create(1000, 50))):
        x, noise = _inputs()
        out = torch.randn(2, 6, 8, 8)
        for i in (49, 0):
            ti = torch.tensor(i)
            a, b = sampler.predict(out, x, i), sampler.predict(out, x, ti)
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, rtol=0, atol=0)
            torch.testing.assert_close(sampler.step(a, noise, i), sampler.step(b, noise, ti), rtol=0, atol=0)
            assert torch.equal(sampler.model_timesteps(ti, 2), sampler.model_timesteps(i, 2))


@pytest.mark.parametrize("make", [DDPMSampler, DDIMSampler])
def test_per_sample_steps_equal_each_sample_alone(make):
    """A batch whose images sit at different steps (an (N,) index tensor) equals each image
    stepped alone with an int index, bit for bit (the same float32 ops, gathered per sample)."""
    sampler = make(Schedule.create(1000, 50))
    steps = [49, 0, 17, 1]
    x = torch.randn(4, 3, 8, 8)
    out = torch.randn(4, 6, 8, 8)
    noise = torch.randn(4, 3, 8, 8)
    i = torch.tensor(steps)
    batch = sampler.predict(out, x, i)
    stepped = sampler.step(batch, noise, i)
    assert torch.equal(sampler.model_timesteps(i, 4), sampler.timesteps[i])
    for k, ik in enumerate(steps):
        alone = sampler.predict(out[k : k + 1], x[k : k + 1], ik)
        for u, v in zip(batch, alone):
            torch.testing.assert_close(u[k : k + 1], v.expand_as(u[k : k + 1]), rtol=0, atol=0)
        torch.testing.assert_close(stepped[k : k + 1], sampler.step(alone, noise[k : k + 1], ik), rtol=0, atol=0)
    assert torch.equal(stepped[1], batch.mean[1])  # the sample at i == 0 gets no noise


def test_coefficient_table_is_the_schedule():
    """The one table backends, kernels and export read: columns named, float32 casts of the
    float64 schedule, nonzero = (i > 0)."""
    s = Schedule.create(1000, 30)
    table = DDPMSampler(s).coefficients()
    cols = dict(zip(DDPMSampler.columns, table.unbind(1)))
    np.testing.assert_array_equal(cols["sqrt_recip_abar"].numpy(), s.sqrt_recip_alphas_cumprod.astype(np.float32))
    np.testing.assert_array_equal(cols["plv"].numpy(), s.posterior_log_variance_clipped.astype(np.float32))
    np.testing.assert_array_equal(cols["nonzero"].numpy(), (np.arange(30) > 0).astype(np.float32))
    assert DDIMSampler.columns[:2] == DDPMSampler.columns[:2] and DDIMSampler.columns[-1] == "nonzero"


def test_clamp_gradient_is_one_inside_zero_outside():
    """x0 = c_a·x - c_b·eps, then torch.clamp: with eps independent of x,
    d x0 / d x = c_a strictly inside (-1, 1) and 0 where clamped."""
    s = Schedule.create(1000, 100)
    i = 30
    c_a = np.float32(s.sqrt_recip_alphas_cumprod[i])
    x = (torch.randn(1, 3, 8, 8) * 2).requires_grad_(True)
    eps = torch.randn(1, 6, 8, 8)
    for sampler in (DDPMSampler(s), DDIMSampler(s)):
        pred = sampler.predict(eps, x, i)
        (g,) = torch.autograd.grad(pred.x0.sum(), x)
        inside = pred.x0.detach().abs() < 1
        assert inside.any() and (~inside).any()
        torch.testing.assert_close(g[inside], torch.full_like(g[inside], float(c_a)), rtol=0, atol=0)
        assert (g[~inside] == 0).all()


def test_sampler_to_device_copies_tables():
    sampler = DDIMSampler(Schedule.create(1000, 20))
    moved = sampler.to("cpu")
    assert moved is not sampler and moved.schedule is sampler.schedule and moved.eta == 1.0
    assert moved.coefficients().dtype == torch.float32 and moved.coefficients().shape == (20, len(moved.columns)) == (20, 6)
    assert moved.device == torch.device("cpu")


def test_ddim_eta_zero_is_deterministic():
    sampler = DDIMSampler(Schedule.create(1000, 20), eta=0.0)
    x, noise = _inputs()
    pred = sampler.predict(torch.randn(2, 3, 8, 8), x, 10)
    assert (pred.sigma == 0).all()
    torch.testing.assert_close(sampler.step(pred, noise, 10), pred.mean, rtol=0, atol=0)


def test_bad_inputs():
    s = Schedule.create(1000, 10)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        DDPMSampler(s).predict(torch.randn(1, 3, 8, 8), x, 5)  # DDPM needs the learned variance
    with pytest.raises(ValueError, match="channels"):
        DDIMSampler(s).predict(torch.randn(1, 4, 8, 8), x, 5)
    with pytest.raises(ValueError, match="shape"):
        DDIMSampler(s).predict(torch.randn(1, 6, 4, 4), x, 5)
    for i in (10, -1, 2.0, True, torch.tensor([[1]]), torch.tensor(1.0), torch.tensor([True])):
        with pytest.raises(ValueError):
            DDPMSampler(s).predict(torch.randn(1, 6, 8, 8), x, i)
    for eta in (-0.1, float("nan"), 3.0):
        with pytest.raises(ValueError):
            DDIMSampler(s, eta=eta)
