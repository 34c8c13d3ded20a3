"""GPU readiness of the fast backend's step, checked without a GPU.

1. CUDA-graph safety.

A CUDA graph cannot capture a host sync (``.item()``, ``bool(tensor)``, a data-dependent shape):
capture fails, and the backend falls back to an uncaptured step with a warning. Under PyTorch's
FakeTensorMode every such operation raises (DataDependentOutputException /
DynamicOutputShapeException), so running the exact step functions that the backend captures on fake
tensors proves, on CPU, that they contain none: for every sampler x guidance combination and both dtypes,
and for the PSC fast denoiser.

2. Device placement. FakeTensorMode also fakes CUDA tensors on a machine without CUDA, and raises
FakeTensorDeviceMismatchError when an op mixes devices (a table left on the CPU, a tensor made
without ``device=``): the first thing a first GPU run trips on. The step is run on fake CUDA models
and inputs with autograd's ``grad`` replaced by zeros (the autograd engine needs a real device), so
every forward tensor and the update are checked, not the backward graph.

The GPU tests (``-m gpu``) then check the replay itself.
"""
import contextlib
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import idemrt.backends.fast as fast
from idemrt.backends.fast import FastBackend
from test_backend_fast import SIZE, codec, inputs, make_spec, unet  # noqa: F401 (fixtures)

CUDA = torch.device("cuda", 0)


def run_fake(backend: FastBackend, guided: bool, steps=(5, 2)):
    """The function a graph captures, on fake tensors: per-sample step indices and scales are
    inputs (device tensors), as in the captured graph."""
    x, noise, target = inputs(backend.spec.codec)
    i, scale = torch.tensor(steps), torch.tensor([0.6, 0.9])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fn = backend.guided_fn if guided else backend.plain_fn
    with mode:
        fake = [mode.from_tensor(t) for t in (x, target, noise, i, scale)]
        return fn(fake[0], fake[1] if guided else None, *fake[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampler,guidance", [("ddpm", "dps"), ("ddim", "dps"), ("ddpm", "dsg"), ("ddim", None)])
def test_captured_step_has_no_host_sync(unet, codec, sampler, guidance, dtype):
    backend = FastBackend(make_spec(unet, codec, sampler, guidance), device="cpu", dtype=dtype, graphs=False)
    x_prev, dist, x0 = run_fake(backend, guided=guidance is not None)  # x0: the step's estimate, for previews
    assert x_prev.shape == x0.shape == (2, 3, 32, 32) and x_prev.dtype == torch.float32 and dist.shape == (2,)


def test_the_check_catches_a_host_sync(unet, codec, monkeypatch):
    """The check can fail: a step that reads the distance back to the host is refused."""
    backend = FastBackend(make_spec(unet, codec), device="cpu", dtype=torch.float32, graphs=False)
    cls = type(backend.spec.guidance)
    original = cls.update

    def syncing_update(self, x_prev, pred, grad, i, scale=None):
        if float(grad.abs().max()) > 0:  # a host sync: what a graph cannot capture
            return original(self, x_prev, pred, grad, i, scale)
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


# --- device placement on fake CUDA ---------------------------------------------------------------


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are fake CUDA tensors."""
    import copy

    module = copy.deepcopy(module)
    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(mode.from_tensor(p).to(CUDA), requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = mode.from_tensor(b).to(CUDA)
    return module


@pytest.fixture
def fake_cuda(unet, codec, monkeypatch):
    """(mode, fake-CUDA UNet, fake-CUDA codec), with torch.cuda.device contexts and autograd.grad stubbed."""
    from idemrt.models.codec import Codec

    import idemrt.psc.sampling as psc_sampling

    for module in (fast, psc_sampling):  # torch.cuda.device() would initialise CUDA
        monkeypatch.setattr(module, "on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.autograd, "grad", lambda outputs, inputs, **kw: tuple(
        torch.zeros_like(t) for t in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))))
    warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)  # autocast: off here, on on a GPU
    mode = FakeTensorMode()
    return mode, to_fake_cuda(unet, mode), Codec(codec.name, to_fake_cuda(codec.model, mode))


def fake_cuda_step(mode, unet, codec, sampler, guidance, dtype, step):
    with mode:
        # kernels="torch": the Triton kernels (the CUDA default) cannot run on fake tensors; their
        # launches check device placement themselves (kernels/_launch.py).
        backend = FastBackend(make_spec(unet, codec, sampler, guidance), device=CUDA, dtype=dtype, graphs=False,
                              kernels="torch")
        x = torch.randn(2, 3, SIZE, SIZE, device=CUDA)
        target = backend.apply_operator(torch.randn(2, 3, SIZE, SIZE, device=CUDA)) if guidance else None
        return backend.step_uncaptured(x, step, target, torch.randn_like(x), torch.tensor([0.6, 0.9]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sampler,guidance", [("ddpm", "dps"), ("ddim", "dps"), ("ddpm", "dsg"), ("ddim", None)])
def test_step_keeps_every_tensor_on_the_device(fake_cuda, sampler, guidance, dtype):
    # DSG on and off interval; the last step (no noise, no guidance radius); a mixed-step batch.
    for step in (5, 4, 0, [5, 0]):
        x_prev, dist = fake_cuda_step(*fake_cuda, sampler, guidance, dtype, step)
        assert x_prev.device == CUDA and dist.device == CUDA and x_prev.dtype == torch.float32


def test_the_device_check_can_fail(fake_cuda, monkeypatch):
    """A sampler whose coefficient tables stay on the CPU is caught."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    from idemrt.diffusion import DDPMSampler

    monkeypatch.setattr(DDPMSampler, "to", lambda self, device: self)
    with pytest.raises(FakeTensorDeviceMismatchError):
        fake_cuda_step(*fake_cuda, "ddpm", "dps", torch.float32, 5)


def test_psc_denoiser_keeps_every_tensor_on_the_device(fake_cuda):
    from idemrt.psc.sampling import FastDenoiser

    mode, unet, _ = fake_cuda
    with mode:
        den = FastDenoiser(unet, steps=10, device=CUDA, dtype=torch.bfloat16, graphs=False)
        x0 = den.x0(torch.randn(3, 3, SIZE, SIZE, device=CUDA), 4)
    assert x0.device == CUDA and x0.dtype == torch.float32
