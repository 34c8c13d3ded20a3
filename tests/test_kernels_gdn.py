"""GDN/IGDN kernels and the fused g_s backward chain against compressai and float64 autograd.

CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set here unless already set).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")
compressai = pytest.importorskip("compressai", reason="compressai is not installed")

from compressai.layers import GDN, GDN1  # noqa: E402
from compressai.models import ScaleHyperprior  # noqa: E402

from idemrt.kernels.gdn import PRECISIONS, gdn, gdn_backward, gdn_parameters, gdn_reference  # noqa: E402
from idemrt.kernels.gdn_chain import GDNChain  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402


def _perturb(module, seed):
    """Trained-like GDN parameters: a dense non-negative Gamma and varied beta (init is 0.1·I, beta 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, GDN):
                m.gamma.add_(0.3 * torch.rand(m.gamma.shape, generator=g))
                m.beta.mul_(0.5 + torch.rand(m.beta.shape, generator=g))
    return module


def _gdn_module(c, inverse, seed=0):
    return _perturb(GDN(c, inverse=inverse), seed)


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_reference_is_compressai_gdn():
    """gdn_reference on gdn_parameters reproduces compressai's module (float64)."""
    for inverse in (False, True):
        m = _gdn_module(24, inverse).double()
        gamma, beta, inv = gdn_parameters(m)
        assert inv == inverse and gamma.dtype == torch.float32
        x = torch.randn(2, 24, 3, 5, dtype=torch.float64)
        # gdn_parameters rounds to float32, hence the tolerance.
        torch.testing.assert_close(gdn_reference(x, gamma, beta, inverse), m(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True], ids=["gdn", "igdn"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((2, 40, 5, 7), False), ((1, 72, 9, 9), False), ((1, 40, 5, 7), True)],
    ids=["C40-odd-hw", "C72-two-channel-blocks-two-pixel-blocks", "channels_last"],
)
def test_fp32_forward_and_input_grad_match_float64(device, inverse, shape, channels_last):
    m = _gdn_module(shape[1], inverse, seed=shape[1])
    gamma, beta, _ = gdn_parameters(m)
    gamma, beta = gamma.to(device), beta.to(device)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    dy = torch.randn(shape, dtype=torch.float64, device=device)
    x32 = x.float()
    if channels_last:
        x32 = x32.to(memory_format=torch.channels_last)
    x32.requires_grad_(True)
    y = gdn(x32, gamma, beta, inverse)
    (dx,) = torch.autograd.grad(y, x32, dy.float())
    x64 = x.clone().requires_grad_(True)
    y_ref = gdn_reference(x64, gamma.double(), beta.double(), inverse)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision, tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-3)])
def test_dot_precisions(device, precision, tol):
    """On GPU the channel mix runs at the chosen precision (the interpreter is always exact)."""
    assert precision in PRECISIONS
    m = _gdn_module(64, True, seed=9)
    gamma, beta, _ = gdn_parameters(m)
    gamma, beta = gamma.to(device), beta.to(device)
    x = torch.randn(1, 64, 6, 6, dtype=torch.float64, device=device)
    dy = torch.randn_like(x)
    y = gdn(x.float(), gamma, beta, True, precision=precision)
    dx = gdn_backward(x.float(), dy.float(), gamma, beta, True, precision=precision)
    x64 = x.clone().requires_grad_(True)
    y_ref = gdn_reference(x64, gamma.double(), beta.double(), True)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy)
    assert _rel_err(y, y_ref) < tol
    assert _rel_err(dx, dx_ref) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_torch(device, dtype):
    """Same rounded inputs: the kernel (float32 inside) must be about as close to exact as torch
    computing in that dtype (factor 3 for bf16: the interpreter truncates bf16 casts)."""
    m = _gdn_module(40, True, seed=5)
    gamma, beta, _ = gdn_parameters(m)
    gamma, beta = gamma.to(device), beta.to(device)
    x = torch.randn(1, 40, 4, 6, device=device).to(dtype)
    dy = torch.randn(1, 40, 4, 6, device=device).to(dtype)
    ours = gdn(x, gamma, beta, True)
    dx = gdn_backward(x, dy, gamma, beta, True)
    xt = x.clone().requires_grad_(True)
    theirs = gdn_reference(xt, gamma, beta, True)
    (dx_t,) = torch.autograd.grad(theirs, xt, dy)
    x64 = x.double().requires_grad_(True)
    exact = gdn_reference(x64, gamma.double(), beta.double(), True)
    (dx_exact,) = torch.autograd.grad(exact, x64, dy.double())
    assert ours.dtype == dtype and dx.dtype == dtype
    factor = 3 if dtype == torch.bfloat16 else 2
    assert _rel_err(ours, exact) <= factor * _rel_err(theirs, exact) + 1e-3
    assert _rel_err(dx, dx_exact) <= factor * _rel_err(dx_t, dx_exact) + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_synthesis_chain_matches_autograd_through_compressai(device):
    """g_s of a (small) ScaleHyperprior: fused forward + explicit VJPs == autograd through the module."""
    net = _perturb(ScaleHyperprior(16, 24), seed=7).to(device)
    chain = GDNChain(net.g_s)
    y_hat = torch.randn(1, 24, 2, 2, device=device)
    out, saved = chain.forward(y_hat)
    grad_out = torch.randn_like(out)
    grad_in = chain.input_grad(saved, grad_out)

    net64 = net.double()
    y64 = y_hat.double().requires_grad_(True)
    ref = net64.g_s(y64)
    (grad_ref,) = torch.autograd.grad(ref, y64, grad_out.double())
    assert out.shape == ref.shape == (1, 3, 32, 32)
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(grad_in, grad_ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_analysis_chain_matches_autograd_through_compressai(device):
    """g_a (Conv2d + GDN): exercises the Conv2d VJP and the forward-GDN backward."""
    net = _perturb(ScaleHyperprior(16, 24), seed=8).to(device)
    chain = GDNChain(net.g_a)
    x = torch.rand(1, 3, 16, 16, device=device)
    out, saved = chain.forward(x)
    grad_out = torch.randn_like(out)
    grad_in = chain.input_grad(saved, grad_out)

    x64 = x.double().requires_grad_(True)
    ref = net.double().g_a(x64)
    (grad_ref,) = torch.autograd.grad(ref, x64, grad_out.double())
    assert _rel_err(out, ref) < 1e-5
    assert _rel_err(grad_in, grad_ref) < 1e-5


def test_bad_inputs_raise():
    m = _gdn_module(8, False)
    gamma, beta, _ = gdn_parameters(m)
    with pytest.raises(TypeError, match="GDN"):
        gdn_parameters(GDN1(8))
    with pytest.raises(ValueError, match="gamma must be"):
        gdn(torch.randn(1, 9, 2, 2), gamma, beta)
    with pytest.raises(ValueError, match="precision"):
        gdn(torch.randn(1, 8, 2, 2), gamma, beta, precision="fp16")
    with pytest.raises(ValueError, match="frozen"):
        gdn(torch.randn(1, 8, 2, 2), gamma.requires_grad_(True), beta)
    with pytest.raises(TypeError, match="ReLU"):
        GDNChain([torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()])
