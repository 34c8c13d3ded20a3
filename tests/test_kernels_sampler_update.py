"""Fused DDPM + DPS step and the differentiable clamped x0, against float64 torch.

The expected values are written out here from DIFFUSION_AND_DPS.md §2, §4, §5, §8 (schedule from
linear betas), independently of the kernels' module. CPU runs use the Triton interpreter.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from idemrt.kernels import sampler_update as su  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402
STEPS = 10


def _schedule():
    """Float64 arrays of the 1000-step linear-beta process respaced to 10 steps (DIFFUSION_AND_DPS.md §2-3)."""
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


def _table(device, zeta=0.6):
    return su.coefficient_table(**_schedule(), zeta=zeta, device=device)


def _expected_step(x, eps, v, grad, noise, i, zeta=0.6):
    """x_{t-1} in float64 from the fact sheet, with the coefficients rounded to float32 as the reference does."""
    c = {k: float(torch.tensor(float(a[i]), dtype=torch.float32)) for k, a in _schedule().items()}
    x0 = torch.clamp(c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps, -1, 1)
    mean = c["c1"] * x0 + c["c2"] * x
    frac = (v + 1) / 2
    log_var = frac * c["log_beta"] + (1 - frac) * c["plv"]
    sample = mean + torch.exp(0.5 * log_var) * noise if i > 0 else mean  # no noise at the last step
    return sample - float(torch.tensor(zeta, dtype=torch.float32)) * grad


def _state(device, shape=(2, 3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    model_out = torch.cat([0.5 * torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 2 - 1], 1)
    grad = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return [t.to(device) for t in (x, model_out, grad, noise)]


def test_coefficient_table_columns():
    cols = {k: torch.full((4,), float(j + 1), dtype=torch.float64) for j, k in enumerate(su.COEFFICIENTS[:6])}
    table = su.coefficient_table(**cols, zeta=[0.5, 0.6, 0.7, 0.8])
    assert table.dtype == torch.float32 and table.shape == (4, 8)
    assert table[2].tolist() == pytest.approx([1, 2, 3, 4, 5, 6, 1, 0.7])
    assert table[0, 6] == 0 and (table[1:, 6] == 1).all()
    with pytest.raises(ValueError, match="length"):
        su.coefficient_table(**{**cols, "plv": torch.zeros(3)}, zeta=0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [0, 1, STEPS - 1])
def test_update_matches_float64(device, step):
    x, model_out, grad, noise = _state(device, seed=step)
    eps, v = model_out[:, :3], model_out[:, 3:]  # views with batch stride 6HW: no copies
    table = _table(device)
    step_t = torch.tensor([step], device=device)
    got = su.sampler_update(x, eps, v, grad, noise, table, step_t)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), step)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    # The module's own torch reference agrees too (it is what the benchmark times).
    ref = su.sampler_update_reference(x, eps, v, grad, noise, table, step)
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_update_reads_the_step_from_device_memory_and_works_in_place(device):
    x, model_out, grad, noise = _state(device, shape=(1, 3, 33, 31), seed=3)  # 3069 elements: 3 blocks
    eps, v = model_out[:, :3], model_out[:, 3:]
    table = _table(device)
    step = torch.tensor([4], device=device)
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 4)
    buf = x.clone()
    out = su.sampler_update(buf, eps, v, grad, noise, table, step, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.double(), want, rtol=2e-6, atol=2e-6)
    # Same buffers, new step value written on the device: the result follows.
    step.fill_(7)
    out = su.sampler_update(x, eps, v, grad, noise, table, step)
    torch.testing.assert_close(out.double(), _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 7),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_update_with_half_precision_model_output(device, dtype):
    x, model_out, grad, noise = _state(device, seed=4)
    model_out = model_out.to(dtype)
    eps, v = model_out[:, :3], model_out[:, 3:]
    got = su.sampler_update(x, eps, v, grad, noise, _table(device), 5)
    # The kernel upcasts eps and v on load: exact float32 arithmetic on the rounded values.
    want = _expected_step(*(t.double() for t in (x, eps, v, grad, noise)), 5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_predict_x0_value_mask_and_gradients(device):
    x, model_out, _, _ = _state(device, seed=5)
    eps = model_out[:, :3]
    table = _table(device)
    step = 2
    xs, es = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    x0, mask = su.predict_x0(xs, es, table, step)
    g = torch.randn_like(x0)
    dx, deps = torch.autograd.grad(x0, (xs, es), g)

    c = {k: float(torch.tensor(float(a[step]), dtype=torch.float32)) for k, a in _schedule().items()}
    x64, e64 = x.double().requires_grad_(True), eps.double().requires_grad_(True)
    raw = c["sqrt_recip_abar"] * x64 - c["sqrt_recipm1_abar"] * e64
    x0_ref = torch.clamp(raw, -1, 1)
    dx_ref, deps_ref = torch.autograd.grad(x0_ref, (x64, e64), g.double())
    assert 0.1 < mask.float().mean() < 0.9, "the test must clamp some elements and keep others"
    assert mask.dtype == torch.bool
    assert torch.equal(mask, (raw > -1) & (raw < 1))
    torch.testing.assert_close(x0.double(), x0_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(deps.double(), deps_ref, rtol=1e-6, atol=1e-7)
    x0_b, mask_b = su.x0_and_mask(x, eps, table, torch.tensor(step, device=device))
    assert torch.equal(x0_b, x0.detach()) and torch.equal(mask_b, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_survives_the_clamp(device):
    """A diverged state must stay visible (torch.clamp keeps NaN), not become ±1."""
    x = torch.zeros(1, 3, 2, 2, device=device)
    x[0, 0, 0, 0] = math.nan
    x0, mask = su.x0_and_mask(x, torch.zeros_like(x), _table(device), 3)
    assert torch.isnan(x0[0, 0, 0, 0]) and not mask[0, 0, 0, 0]
    assert torch.isnan(su.sampler_update(x, x, x, x, x, _table(device), 3)[0, 0, 0, 0])


def test_bad_inputs_raise():
    x = torch.zeros(1, 3, 2, 2)
    table = _table("cpu")
    with pytest.raises(ValueError, match="table"):
        su.sampler_update(x, x, x, x, x, table[:, :7], 1)
    with pytest.raises(ValueError, match="integer"):
        su.sampler_update(x, x, x, x, x, table, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        su.sampler_update(x, x, x, x, x[:, :2], table, 1)
    with pytest.raises(ValueError, match="out must be"):
        su.sampler_update(x, x, x, x, x, table, 1, out=torch.zeros(1, 3, 2, 2, dtype=torch.float64))
