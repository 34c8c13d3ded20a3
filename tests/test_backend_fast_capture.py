"""CUDA-graph safety of the fast backend's step, checked without a GPU.

A CUDA graph cannot capture a host sync (``.item()``, ``bool(tensor)``, a data-dependent shape):
capture fails, and the backend falls back to an uncaptured step with a warning. Under PyTorch's
FakeTensorMode every such operation raises (DataDependentOutputException /
DynamicOutputShapeException), so running the exact step functions that the backend captures on fake
tensors proves, on CPU, that they contain none: for every sampler x guidance combination and both dtypes,
and for the PSC fast denoiser. The GPU tests (``-m gpu``) then check the replay itself.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from idemrt.backends.fast import FastBackend
from test_backend_fast import codec, inputs, make_spec, unet  # noqa: F401 (fixtures)


def run_fake(backend: FastBackend, guided: bool, step: int = 5):
    x, noise, target = inputs(backend.spec.codec)
    backend._i.fill_(step)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fn = backend._guided_step if guided else backend._plain_step
    with mode:
        fake = [mode.from_tensor(t) for t in (x, backend._i, target, noise)]
        return fn(fake[0], fake[1], fake[2] if guided else None, fake[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampler,guidance", [("ddpm", "dps"), ("ddim", "dps"), ("ddpm", "dsg"), ("ddim", None)])
def test_captured_step_has_no_host_sync(unet, codec, sampler, guidance, dtype):
    backend = FastBackend(make_spec(unet, codec, sampler, guidance), device="cpu", dtype=dtype, graphs=False)
    x_prev, dist = run_fake(backend, guided=guidance is not None)
    assert x_prev.shape == (2, 3, 32, 32) and x_prev.dtype == torch.float32 and dist.shape == (2,)


def test_the_check_catches_a_host_sync(unet, codec, monkeypatch):
    """The check can fail: a step that reads the distance back to the host is refused."""
    backend = FastBackend(make_spec(unet, codec), device="cpu", dtype=torch.float32, graphs=False)
    cls = type(backend.spec.guidance)
    original = cls.update

    def syncing_update(self, x_prev, pred, grad, i):
        if float(grad.abs().max()) > 0:  # a host sync: what a graph cannot capture
            return original(self, x_prev, pred, grad, i)
        return x_prev

    monkeypatch.setattr(cls, "update", syncing_update)
    with pytest.raises(DataDependentOutputException, match="_local_scalar_dense"):  # the .item() behind float()
        run_fake(backend, guided=True)


def test_psc_denoiser_capture_has_no_host_sync(unet):
    """The PSC fast denoiser's captured function (x̂0 from the step-index tensor) is capturable too."""
    from idemrt.psc.sampling import FastDenoiser

    den = FastDenoiser(unet, steps=10, device="cpu", dtype=torch.bfloat16, graphs=False)
    den._i.fill_(4)
    x = torch.randn(3, 3, 32, 32)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        (x0,) = den._x0(mode.from_tensor(x))
    assert x0.shape == x.shape and x0.dtype == torch.float32
