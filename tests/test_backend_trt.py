"""backend="tensorrt": clear errors without TensorRT/CUDA (always tested); engines against the
eager step where TensorRT and a GPU exist (skipped otherwise, with the reason)."""
import sys
import types

import pytest
import torch
from test_export_models import SIZE, shared_cache, step_spec, tiny_codec, tiny_unet

from idemrt.backends.base import create_backend
from idemrt.diffusion import guided_step
from idemrt.errors import BackendError
from idemrt.export.tensorrt_build import engine_cache_key

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False


@pytest.fixture(scope="module")
def spec():
    return step_spec(tiny_unet(), tiny_codec(), "x")


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed")
def test_missing_tensorrt_is_a_backend_error(spec):
    with pytest.raises(BackendError, match="tensorrt not installed"):
        create_backend("tensorrt", spec, device=torch.device("cpu"))


def test_no_cuda_device_is_a_backend_error(spec, monkeypatch):
    if not HAVE_TRT:  # stand in for an installed TensorRT: the device check must come next
        monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendError, match="CUDA"):
        create_backend("tensorrt", spec, device=torch.device("cpu"))


def test_engine_key_covers_graph_version_gpu_precision_and_profile():
    base = ("a" * 64, "10.3.0", "NVIDIA H100 sm_90", "fp16", {"x_t": ((1, 3, 8, 8), (2, 3, 8, 8), (8, 3, 8, 8))})
    key = engine_cache_key(*base)
    variants = [("b" * 64,), (None, "10.4.0"), (None, None, "NVIDIA A100 sm_80"), (None, None, None, "bf16"),
                (None, None, None, None, {"x_t": ((1, 3, 8, 8), (2, 3, 8, 8), (16, 3, 8, 8))})]
    for change in variants:
        args = [c if c is not None else b for c, b in zip(change + (None,) * (5 - len(change)), base)]
        assert engine_cache_key(*args) != key
    assert engine_cache_key(*base) == key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt not installed")
def test_fp32_engine_matches_eager(tmp_path_factory):
    unet, codec = tiny_unet().cuda(), tiny_codec().cuda()
    gpu_spec = step_spec(unet, codec, "x")
    from idemrt.backends.trt import TensorRTBackend

    backend = TensorRTBackend(gpu_spec, device="cuda", cache_dir=shared_cache(tmp_path_factory))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE, device="cuda", generator=g)
    target = torch.randn(2, 3, SIZE, SIZE, device="cuda", generator=g) * 0.5
    for i in (9, 0):
        noise = torch.randn(x.shape, device="cuda", generator=g)
        want, want_d = guided_step(unet, gpu_spec.operator, gpu_spec.sampler.to("cuda"), gpu_spec.guidance,
                                   x, i, target, noise)
        got, got_d = backend.step(x, i, target, noise)
        # IEEE fp32 engines (TF32 off) against cuDNN, which may use TF32 by default.
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got_d, want_d, rtol=1e-3, atol=1e-3)
        x = want
