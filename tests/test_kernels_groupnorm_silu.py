"""Fused GroupNorm32 + FiLM + SiLU kernel against torch (float64 autograd as the reference).

CPU runs use the Triton interpreter (TRITON_INTERPRET=1, set here unless already set); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")

from idemrt.errors import BackendError  # noqa: E402
from idemrt.kernels import groupnorm_silu as gn  # noqa: E402
from idemrt.kernels._launch import check_launchable  # noqa: E402

from kernel_devices import DEVICES  # noqa: E402


def _inputs(shape, device, mean=0.5, std=2.0, seed=0):
    n, c = shape[:2]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    w = 1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(c, generator=g, dtype=torch.float64)
    scale = 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    shift = 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, w, b, scale, shift, dy)]


def _grads(fn, dy, *tensors):
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    return y, torch.autograd.grad(y, leaves, dy.to(y.dtype))


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, channels_last",
    [((2, 64, 4, 4), False), ((1, 96, 5, 7), False), ((1, 96, 5, 7), True)],
    ids=["2x64x4x4", "odd-1x96x5x7", "odd-1x96x5x7-channels_last"],
)
def test_fp32_forward_and_all_grads_match_float64(device, shape, channels_last):
    x, w, b, scale, shift, dy = _inputs(shape, device)
    x32 = x.float()
    if channels_last:
        x32 = x32.to(memory_format=torch.channels_last)
    y, grads = _grads(gn.groupnorm_silu, dy, x32, w.float(), b.float(), scale.float(), shift.float())
    y_ref, grads_ref = _grads(gn.groupnorm_silu_reference, dy, x, w, b, scale, shift)
    assert y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _rel_err(y, y_ref) < 1e-5
    for name, g, g_ref in zip(("x", "weight", "bias", "scale", "shift"), grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert _rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES)
def test_without_film(device):
    x, w, b, _, _, dy = _inputs((1, 32, 6, 6), device, seed=1)
    y, (dx,) = _grads(lambda t: gn.groupnorm_silu(t, w.float(), b.float()), dy, x.float())
    y_ref, (dx_ref,) = _grads(lambda t: gn.groupnorm_silu_reference(t, w, b), dy, x)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
# Masked-out lanes hold xhat ~ -1e4, where the interpreter's numpy exp() overflows harmlessly (sigmoid -> 0).
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_statistics_survive_a_large_mean_and_split_chunks(device, monkeypatch):
    # |mean| / std = 1e4: E[x²] - E[x]² in float32 would lose every digit of the variance.
    # Small tiles make the 25 pixels of a group span two chunks, whose partials must be merged.
    monkeypatch.setattr(gn, "_TILE", 32)
    x, w, b, scale, shift, dy = _inputs((1, 32, 5, 5), device, mean=300.0, std=0.03, seed=2)
    assert gn._launch_config(1, 32, 25)["SPLIT"] == 2
    y, (dx,) = _grads(lambda t: gn.groupnorm_silu(t, w.float(), b.float(), scale.float(), shift.float()), dy, x.float())
    # The reference sees the same float32-rounded input.
    y_ref, (dx_ref,) = _grads(lambda t: gn.groupnorm_silu_reference(t, w, b, scale, shift), dy, x.float().double())
    assert _rel_err(y, y_ref) < 1e-3
    assert _rel_err(dx, dx_ref) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_torch(device, dtype):
    """In bf16/fp16 the kernel may round differently from torch: it must be about as close to the
    exact result on the same rounded inputs as torch's own op sequence in that dtype.
    (Triton 3.9's interpreter truncates float32 -> bfloat16 casts where GPUs round to nearest even,
    which about doubles the kernel's bf16 error on CPU: hence the factor 3 for bf16.)"""
    x, w, b, scale, shift, dy = _inputs((1, 32, 5, 6), device, seed=3)
    low = [t.to(dtype) for t in (x, scale, shift)]
    w32, b32 = w.float(), b.float()
    y, (dx, ds, dsh) = _grads(lambda *t: gn.groupnorm_silu(t[0], w32, b32, *t[1:]), dy, *low)
    y_t, (dx_t, ds_t, dsh_t) = _grads(lambda *t: gn.groupnorm_silu_reference(t[0], w32, b32, *t[1:]), dy, *low)
    y_ref, (dx_ref, ds_ref, dsh_ref) = _grads(lambda *t: gn.groupnorm_silu_reference(t[0], w, b, *t[1:]), dy,
                                              *(t.double() for t in low))
    assert y.dtype == dtype and dx.dtype == dtype and ds.dtype == dtype
    factor = 3 if dtype == torch.bfloat16 else 2
    for ours, torchs, exact in ((y, y_t, y_ref), (dx, dx_t, dx_ref), (ds, ds_t, ds_ref), (dsh, dsh_t, dsh_ref)):
        assert _rel_err(ours, exact) <= factor * _rel_err(torchs, exact) + 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_film_shaped_like_the_embedding_projection(device):
    """scale/shift come from emb_layers as [N, C, 1, 1] views of one [N, 2C, 1, 1] tensor."""
    x, w, b, scale, shift, _ = _inputs((1, 32, 4, 4), device, seed=4)
    emb = torch.cat([scale, shift], 1)[..., None, None].float()
    y = gn.groupnorm_silu(x.float(), w.float(), b.float(), emb[:, :32], emb[:, 32:])
    assert _rel_err(y, gn.groupnorm_silu_reference(x, w, b, scale, shift)) < 1e-5


def test_bad_inputs_raise():
    x = torch.randn(1, 48, 4, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        gn.groupnorm_silu(x, torch.ones(48), torch.zeros(48))
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(ValueError, match="both or neither"):
        gn.groupnorm_silu(x, torch.ones(32), torch.zeros(32), scale=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="weight"):
        gn.groupnorm_silu(x, torch.ones(16), torch.zeros(32))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        gn.groupnorm_silu(x.double(), torch.ones(32), torch.zeros(32))


def test_compiled_kernels_refuse_cpu_tensors():
    # A compiled (non-interpreted) kernel object cannot take CPU tensors: a typed error, not a crash.
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        check_launchable(object(), torch.zeros(1))
