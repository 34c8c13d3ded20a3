"""Residual norm + backward seed kernel against float64 torch autograd of ||target - a||₂.

CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set here unless already set).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from idemrt.kernels import loss_seed as ls  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402


def _expected(target, a, per_sample=True):
    """dist and d dist / d a by float64 autograd of torch.linalg.vector_norm."""
    a64 = a.double().requires_grad_(True)
    r = target.double() - a64
    r = r.reshape(r.shape[0], -1) if per_sample else r.reshape(1, -1)
    dist = torch.linalg.vector_norm(r, dim=1)
    (seed,) = torch.autograd.grad(dist.sum(), a64)
    return dist.detach(), seed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 3, 9, 11), (2, 3, 40, 40)], ids=["odd-297", "4800-split"])
def test_dist_and_seed_match_float64(device, shape):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(shape, generator=g).to(device)
    a = torch.randn(shape, generator=g).to(device)
    a[1] = target[1]  # a sample at distance 0: seed defined as 0, no NaN
    dist, seed = ls.residual_norm_and_seed(target, a)
    dist_ref, seed_ref = _expected(target, a)
    assert dist.shape == (shape[0],) and seed.shape == a.shape and seed.dtype == torch.float32
    assert dist[1] == 0 and torch.count_nonzero(seed[1]) == 0
    assert torch.isfinite(seed).all()
    torch.testing.assert_close(dist.double(), dist_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(seed.double(), seed_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_tensor_norm_like_the_reference(device):
    target = torch.randn(2, 3, 6, 5, device=device)
    a = torch.randn(2, 3, 6, 5, device=device)
    dist, seed = ls.residual_norm_and_seed(target, a, per_sample=False)
    dist_ref, seed_ref = _expected(target, a, per_sample=False)
    assert dist.shape == (1,)
    torch.testing.assert_close(dist.double(), dist_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(seed.double(), seed_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(device, dtype):
    target = torch.randn(2, 3, 17, 13, device=device).to(dtype)
    a = torch.randn(2, 3, 17, 13, device=device).to(dtype)
    dist, seed = ls.residual_norm_and_seed(target, a)
    # Exact on the rounded inputs: the kernel upcasts before subtracting and squaring.
    dist_ref, seed_ref = _expected(target, a)
    torch.testing.assert_close(dist.double(), dist_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(seed.double(), seed_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_wiring(device):
    """residual_norm inside a graph: a is a channel slice (batch stride ≠ sample size), the outer
    gradient weights the samples, and target gets the opposite gradient."""
    a = torch.randn(2, 6, 4, 5, device=device, requires_grad=True)  # a[:, :3] is the operand
    target = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    w = torch.tensor([0.7, -1.3], device=device)
    (ga, gt) = torch.autograd.grad((ls.residual_norm(target, a[:, :3]) * w).sum(), (a, target))

    a64 = a.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    ref = (ls.residual_norm_reference(t64, a64[:, :3]) * w.double()).sum()
    ga_ref, gt_ref = torch.autograd.grad(ref, (a64, t64))
    torch.testing.assert_close(ga.double(), ga_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gt.double(), gt_ref, rtol=1e-5, atol=1e-8)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="does not match"):
        ls.residual_norm_and_seed(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))
