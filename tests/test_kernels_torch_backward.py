"""The kernels' PyTorch backward passes (``backward="torch"``: Triton forward, PyTorch's gradient)
against float64 autograd of the torch references, and against the Triton backward.

The fast backend uses them where a hand-written backward loses to PyTorch's on a GPU
(backends/fast.py, ``triton_passes``). CPU runs use the Triton interpreter for the forward.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")
pytest.importorskip("compressai", reason="compressai is not installed")

from compressai.layers import GDN  # noqa: E402

from idemrt.kernels import gdn as gdn_module  # noqa: E402
from idemrt.kernels import groupnorm_silu as gn  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(fn, dy, *tensors):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("film", [True, False], ids=["film", "plain"])
def test_groupnorm_silu_torch_backward_is_exact_in_float32(device, film):
    g = torch.Generator().manual_seed(0)
    n, c = 2, 64
    x = (torch.randn(n, c, 5, 6, generator=g, dtype=torch.float64) * 2 + 0.5).to(device)
    w = (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(device)
    b = (0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(device)
    scale = (0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(device) if film else None
    shift = (0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(device) if film else None
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    extra = (scale, shift) if film else ()

    def ours(backward):
        return _grads(lambda t, *s: gn.groupnorm_silu(t, w.float(), b.float(), *s, backward=backward), dy,
                      x.float(), *(t.float() for t in extra))

    y, grads = ours("torch")
    _, grads_triton = ours("triton")
    y_ref, grads_ref = _grads(lambda t, *s: gn.groupnorm_silu_reference(t, w, b, *s), dy, x, *extra)
    assert len(grads) == (3 if film else 1)
    assert _rel_err(y, y_ref) < 1e-5
    for got, triton_got, want in zip(grads, grads_triton, grads_ref):
        assert _rel_err(got, want) < 1e-5
        assert _rel_err(got, triton_got) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_groupnorm_silu_torch_backward_in_bfloat16(device):
    """bf16 input, channels_last (the inference copy's layout): the gradient within bf16 rounding
    of float64's on the same rounded input, in x's dtype and layout."""
    g = torch.Generator().manual_seed(1)
    n, c = 1, 32
    x = torch.randn(n, c, 6, 6, generator=g).bfloat16().to(device).contiguous(memory_format=torch.channels_last)
    w, b = (1 + 0.5 * torch.randn(c, generator=g)).to(device), (0.5 * torch.randn(c, generator=g)).to(device)
    scale = (0.3 * torch.randn(n, c, generator=g)).bfloat16().to(device)
    shift = (0.3 * torch.randn(n, c, generator=g)).bfloat16().to(device)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    _, (dx,) = _grads(lambda t: gn.groupnorm_silu(t, w, b, scale, shift, backward="torch"), dy, x)
    _, (dx_ref,) = _grads(lambda t: gn.groupnorm_silu_reference(t, w.double(), b.double(), scale.double(),
                                                                shift.double()), dy, x.double())
    assert dx.dtype == torch.bfloat16 and dx.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(dx, dx_ref) < 2e-2


def _gdn_params(c, inverse, seed):
    m = GDN(c, inverse=inverse)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gamma.add_(0.3 * torch.rand(m.gamma.shape, generator=gen))
        m.beta.mul_(0.5 + torch.rand(m.beta.shape, generator=gen))
    gamma, beta, _ = gdn_module.gdn_parameters(m)
    return gamma, beta


@pytest.mark.parametrize("inverse", [False, True], ids=["gdn", "igdn"])
def test_gdn_backward_torch_is_the_closed_form(inverse):
    """The PyTorch closed form against float64 autograd of compressai's formula (no Triton)."""
    gamma, beta = _gdn_params(24, inverse, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 5, 7, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    got = gdn_module.gdn_backward_torch(x.float(), dy.float(), gamma, beta, inverse)
    _, (want,) = _grads(lambda t: gdn_module.gdn_reference(t, gamma.double(), beta.double(), inverse), dy, x)
    assert got.dtype == torch.float32
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inverse", [False, True], ids=["gdn", "igdn"])
def test_gdn_torch_backward_through_autograd(device, inverse):
    gamma, beta = (t.to(device) for t in _gdn_params(40, inverse, seed=4))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 40, 5, 7, generator=g, dtype=torch.float64).to(device)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    _, (dx,) = _grads(lambda t: gdn_module.gdn(t, gamma, beta, inverse, precision="ieee", backward="torch"), dy,
                      x.float())
    _, (dx_triton,) = _grads(lambda t: gdn_module.gdn(t, gamma, beta, inverse, precision="ieee"), dy, x.float())
    _, (want,) = _grads(lambda t: gdn_module.gdn_reference(t, gamma.double(), beta.double(), inverse), dy, x)
    assert _rel_err(dx, want) < 1e-5 and _rel_err(dx, dx_triton) < 1e-5


def test_bad_backward_names():
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="backward must be one of"):
        gn.groupnorm_silu(x, torch.ones(32), torch.zeros(32), backward="cuda")
    gamma, beta = _gdn_params(32, False, seed=0)
    with pytest.raises(ValueError, match="backward must be one of"):
        gdn_module.gdn(x, gamma, beta, backward="fwd")
