"""Fused DDPM + DPS step and the differentiable clamped x0, against float64 torch.

The expected values are written out here from docs/reference_code.md §2.2, §2.4, §2.5, §2.8 (schedule
from linear betas), independently of the kernels' module; the kernels read the sampler's table
(``DDPMSampler(...).coefficients()``), which is checked against that schedule too. Steps and DPS
scales are per sample. CPU runs use the Triton interpreter.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from idemrt.diffusion import DDPMSampler, DPS, Schedule  # noqa: E402
from idemrt.kernels import sampler_update as su  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402
STEPS = 10
ZETA = 0.6  # the shipped DPS scale


def _schedule():
    """Float64 arrays of the 1000-step linear-beta process respaced to 10 steps (docs/reference_code.md §2.2-3)."""
    abar_full = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    kept = abar_full[[round(i * 999 / (STEPS - 1)) for i in range(STEPS)]]
    betas = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return dict(
        sqrt_recip_abar=torch.sqrt(1 / abar),
        sqrt_recipm1_abar=torch.sqrt(1 / abar - 1),
        c1=betas * torch.sqrt(abar_prev) / (1 - abar),
        c2=(1 - abar_prev) * torch.sqrt(alphas) / (1 - abar),
        log_beta=torch.log(betas),
        plv=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
    )


def _sampler():
    return DDPMSampler(Schedule.create(1000, respacing=STEPS))


def _table(device):
    return _sampler().coefficients().to(device)


def _f32(value):
    """A float64 value rounded to float32 once, as the reference does at each use."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _coefs(steps, like):
    """Float64 (B, 1, 1, 1) coefficients of each sample's step (an int: every sample)."""
    steps = [steps] * like.shape[0] if isinstance(steps, int) else list(steps)
    return {k: torch.tensor([_f32(a[i]) for i in steps], dtype=torch.float64, device=like.device).view(-1, 1, 1, 1)
            for k, a in _schedule().items()}


def _expected_step(x, eps, v, grad, noise, steps, zeta=ZETA):
    """x_{t-1} in float64 from docs/reference_code.md §2.2–§2.8; ``steps``/``zeta``: one value or one per sample."""
    c = _coefs(steps, x)
    steps = [steps] * x.shape[0] if isinstance(steps, int) else list(steps)
    zeta = [zeta] * x.shape[0] if isinstance(zeta, (int, float)) else list(zeta)
    x0 = torch.clamp(c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps, -1, 1)
    mean = c["c1"] * x0 + c["c2"] * x
    frac = (v + 1) / 2
    log_var = frac * c["log_beta"] + (1 - frac) * c["plv"]
    nonzero = torch.tensor([float(i > 0) for i in steps], dtype=torch.float64, device=x.device).view(-1, 1, 1, 1)
    sample = mean + nonzero * torch.exp(0.5 * log_var) * noise  # no noise at the last step
    z = torch.tensor([_f32(s) for s in zeta], dtype=torch.float64, device=x.device).view(-1, 1, 1, 1)
    return sample - z * grad


def _state(device, shape=(2, 3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    model_out = torch.cat([0.5 * torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 2 - 1], 1)
    grad = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return [t.to(device) for t in (x, model_out, grad, noise)]


def test_the_kernels_read_the_samplers_table():
    """COEFFICIENTS is the sampler's column order, and its table is the schedule of docs/reference_code.md §2.2 in float32."""
    sampler = _sampler()
    assert su.COEFFICIENTS == DDPMSampler.columns == sampler.columns
    table = sampler.coefficients()
    assert table.dtype == torch.float32 and table.shape == (STEPS, len(su.COEFFICIENTS))
    for j, (name, col) in enumerate(_schedule().items()):
        assert su.COEFFICIENTS[j] == name
        # Built in float64 and rounded once: at most one float32 ulp from this test's float64 values.
        torch.testing.assert_close(table[:, j].double(), col, rtol=1.2e-7, atol=0)
    assert table[0, 6] == 0 and (table[1:, 6] == 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [0, 1, STEPS - 1])
def test_update_matches_float64(device, step):
    x, model_out, grad, noise = _state(device, seed=step)
    eps, v = model_out[:, :3], model_out[:, 3:]  # views with batch stride 6HW: no copies
    table = _table(device)
    step_t = torch.tensor([step], device=device)
    got = su.sampler_update(x, eps, v, grad, noise, table, step_t, ZETA)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), step)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    # The module's own torch reference agrees too (it is what the benchmark times).
    ref = su.sampler_update_reference(x, eps, v, grad, noise, table, step, ZETA)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_update_reads_step_and_scale_from_device_memory_and_works_in_place(device):
    x, model_out, grad, noise = _state(device, shape=(1, 3, 33, 31), seed=3)  # 3069 elements: 3 blocks
    eps, v = model_out[:, :3], model_out[:, 3:]
    table = _table(device)
    step = torch.tensor([4], device=device)
    scale = torch.tensor([ZETA], device=device)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 4)
    buf = x.clone()
    out = su.sampler_update(buf, eps, v, grad, noise, table, step, scale, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.double(), want, rtol=2e-6, atol=2e-6)
    # Same buffers, new step and scale values written on the device (a graph replay, a retry at a
    # larger scale): the result follows.
    step.fill_(7)
    scale.fill_(ZETA * 1.5)
    out = su.sampler_update(x, eps, v, grad, noise, table, step, scale)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 7, ZETA * 1.5)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_at_different_steps_and_scales_equals_each_sample_alone(device):
    x, model_out, grad, noise = _state(device, shape=(4, 3, 9, 7), seed=6)
    eps, v = model_out[:, :3], model_out[:, 3:]
    table = _table(device)
    steps, scales = [9, 0, 5, 1], [0.6, 1.5, 0.0, 3.0]
    # A strided int32 view: the kernels honour the element stride and any integer type.
    step = torch.tensor([[s, -1] for s in steps], device=device, dtype=torch.int32)[:, 0]
    scale = torch.tensor(scales, device=device)
    got = su.sampler_update(x, eps, v, grad, noise, table, step, scale)
    x0, mask = su.x0_and_mask(x, eps, table, step)
    for k, (s, z) in enumerate(zip(steps, scales)):
        one = [t[k:k + 1] for t in (x, eps, v, grad, noise)]
        alone = su.sampler_update(*one, table, s, z)
        # Same kernel, same per-element arithmetic: no sample sees another's step or scale.
        torch.testing.assert_close(got[k:k + 1], alone, rtol=1e-6, atol=1e-6)
        x0_k, mask_k = su.x0_and_mask(one[0], one[1], table, torch.tensor(s, device=device))
        torch.testing.assert_close(x0[k:k + 1], x0_k, rtol=1e-6, atol=1e-6)
        assert torch.equal(mask[k:k + 1], mask_k)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), steps, scales)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    ref = su.sampler_update_reference(x, eps, v, grad, noise, table, step, scale)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x0, su.predict_x0_reference(x, eps, table, step), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_update_equals_the_diffusion_composition(device):
    """The kernel is idemrt.diffusion's DDPM step followed by DPS, with per-sample steps and scales."""
    x, model_out, grad, noise = _state(device, shape=(3, 3, 6, 5), seed=7)
    sampler = _sampler().to(device)
    i = torch.tensor([STEPS - 1, 3, 0], device=device)
    z = torch.tensor([0.6, 0.9, 1.35], device=device)
    pred = sampler.predict(model_out, x, i)
    want = DPS().update(sampler.step(pred, noise, i), pred, grad, i, scale=z)
    got = su.sampler_update(x, model_out[:, :3], model_out[:, 3:], grad, noise, sampler.coefficients(), i, z)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    x0, _ = su.x0_and_mask(x, model_out[:, :3], sampler.coefficients(), i)
    torch.testing.assert_close(x0, pred.x0, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_with_half_precision_model_output(device, dtype):
    x, model_out, grad, noise = _state(device, seed=4)
    model_out = model_out.to(dtype)
    eps, v = model_out[:, :3], model_out[:, 3:]
    got = su.sampler_update(x, eps, v, grad, noise, _table(device), 5, ZETA)
    # The kernel upcasts eps and v on load: exact float32 arithmetic on the rounded values.
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [2, (2, 6)], ids=["one-step", "per-sample"])
def test_predict_x0_value_mask_and_gradients(device, steps):
    x, model_out, _, _ = _state(device, seed=5)
    eps = model_out[:, :3]
    table = _table(device)
    step = steps if isinstance(steps, int) else torch.tensor(steps, device=device)
    xs, es = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    x0, mask = su.predict_x0(xs, es, table, step)
    g = torch.randn_like(x0)
    dx, deps = torch.autograd.grad(x0, (xs, es), g)

    c = _coefs(steps, x.double())
    x64, e64 = x.double().requires_grad_(True), eps.double().requires_grad_(True)
    raw = c["sqrt_recip_abar"] * x64 - c["sqrt_recipm1_abar"] * e64
    x0_ref = torch.clamp(raw, -1, 1)
    dx_ref, deps_ref = torch.autograd.grad(x0_ref, (x64, e64), g.double())
    assert 0.1 < mask.float().mean() < 0.9, "the test must clamp some elements and keep others"
    assert mask.dtype == torch.bool
    # The float32 kernel's threshold against a float64 one: equal except within float32 error of ±1.
    clear = ((raw.abs() - 1).abs() > 1e-6).detach()
    assert torch.equal(mask[clear], ((raw > -1) & (raw < 1))[clear]) and clear.float().mean() > 0.99
    torch.testing.assert_close(x0.double(), x0_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(deps.double(), deps_ref, rtol=1e-6, atol=1e-7)
    # The float64 torch reference has the same gradients (it is what the benchmark times).
    x64r, e64r = x.double().requires_grad_(True), eps.double().requires_grad_(True)
    grads_ref = torch.autograd.grad(su.predict_x0_reference(x64r, e64r, table, step), (x64r, e64r), g.double())
    torch.testing.assert_close(grads_ref, (dx_ref, deps_ref), rtol=1e-6, atol=1e-7)
    step_t = torch.tensor(steps, device=device)  # 0-dim or (B,)
    x0_b, mask_b = su.x0_and_mask(x, eps, table, step_t)
    assert torch.equal(x0_b, x0.detach()) and torch.equal(mask_b, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_survives_the_clamp(device):
    """A diverged state must stay visible (torch.clamp keeps NaN), not become ±1."""
    x = torch.zeros(1, 3, 2, 2, device=device)
    x[0, 0, 0, 0] = math.nan
    x0, mask = su.x0_and_mask(x, torch.zeros_like(x), _table(device), 3)
    assert torch.isnan(x0[0, 0, 0, 0]) and not mask[0, 0, 0, 0]
    assert torch.isnan(su.sampler_update(x, x, x, x, x, _table(device), 3, ZETA)[0, 0, 0, 0])


def test_bad_inputs_raise():
    x = torch.zeros(2, 3, 2, 2)
    table = _table("cpu")
    with pytest.raises(ValueError, match="table"):
        su.sampler_update(x, x, x, x, x, table[:, :6], 1, ZETA)
    with pytest.raises(ValueError, match="table"):
        su.sampler_update(x, x, x, x, x, table.double(), 1, ZETA)
    with pytest.raises(ValueError, match="integer"):
        su.sampler_update(x, x, x, x, x, table, torch.tensor([1.0]), ZETA)
    with pytest.raises(ValueError, match="integer"):
        su.x0_and_mask(x, x, table, torch.ones(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch of 2"):
        su.sampler_update(x, x, x, x, x, table, torch.tensor([1, 2, 3]), ZETA)
    with pytest.raises(ValueError, match="outside"):
        su.sampler_update(x, x, x, x, x, table, STEPS, ZETA)
    with pytest.raises(ValueError, match="float"):
        su.sampler_update(x, x, x, x, x, table, 1, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="batch of 2"):
        su.sampler_update(x, x, x, x, x, table, 1, torch.tensor([0.6, 0.6, 0.6]))
    with pytest.raises(ValueError, match="shape"):
        su.sampler_update(x, x, x, x, x[:, :2], table, 1, ZETA)
    with pytest.raises(ValueError, match="out must be"):
        su.sampler_update(x, x, x, x, x, table, 1, ZETA, out=torch.zeros(2, 3, 2, 2, dtype=torch.float64))
