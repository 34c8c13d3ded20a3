"""backend="onnxruntime" against the eager composition (idemrt.diffusion.guided_step / plain_step),
step by step on the same inputs: x_prev and distance within 1e-4 relative."""
import pytest
import torch
from compressai.models import JointAutoregressiveHierarchicalPriors
from test_export_models import SIZE, shared_cache, step_spec, tiny_codec, tiny_unet

from idemrt.backends.base import create_backend
from idemrt.backends.ort import OnnxRuntimeBackend
from idemrt.diffusion import DDIMSampler, DSG, Schedule, guided_step, plain_step
from idemrt.errors import BackendError
from idemrt.export.graph_cache import CACHE_ENV, state_fingerprint
from idemrt.models.codec import Codec

RTOL = 1e-4


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


def _compare(spec, backend, steps, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    target = torch.randn(n, 3, SIZE, SIZE, generator=g) * 0.5
    for i in steps:
        noise = torch.randn(x.shape, generator=g)
        if spec.guidance is None:
            want, want_d = plain_step(spec.unet, spec.sampler, x, i, noise), torch.zeros(n)
        else:
            want, want_d = guided_step(spec.unet, spec.operator, spec.sampler, spec.guidance, x, i, target, noise)
        got, got_d = backend.step(x, i, target, noise)
        assert got.shape == want.shape and got_d.shape == (n,)
        assert _rel(got, want) <= RTOL, i
        if want_d.abs().max() > 0:
            assert _rel(got_d, want_d) <= RTOL, i
        else:
            assert not got_d.any()
        x = want  # both continue from the eager state


def test_ddpm_dps_matches_eager(models, tmp_path_factory, monkeypatch):
    spec = step_spec(*models, "x")
    monkeypatch.setenv(CACHE_ENV, str(shared_cache(tmp_path_factory)))
    backend = create_backend("onnxruntime", spec, device=torch.device("cpu"))
    _compare(spec, backend, steps=[9, 4, 0])


def test_ddim_dsg_on_and_off_interval(models, tmp_path_factory):
    """DSG with interval 2: guided steps run the step graph, the others the UNet graph."""
    spec = step_spec(*models, "x", sampler=DDIMSampler(Schedule.create(steps=1000, respacing=10)),
                     guidance=DSG(interval=2))
    backend = OnnxRuntimeBackend(spec, device="cpu", cache_dir=shared_cache(tmp_path_factory))
    _compare(spec, backend, steps=[9, 8, 1, 0], n=1, seed=1)


def test_unguided(models, tmp_path_factory):
    spec = step_spec(*models, "x", guidance=None)
    backend = OnnxRuntimeBackend(spec, device="cpu", cache_dir=shared_cache(tmp_path_factory))
    _compare(spec, backend, steps=[9, 0], n=3)


def test_graphs_are_cached_by_weights(models, tmp_path_factory):
    unet, codec = models
    cache = shared_cache(tmp_path_factory)
    OnnxRuntimeBackend(step_spec(unet, codec, "x"), device="cpu", cache_dir=cache).prepare(
        (1, 3, SIZE, SIZE), (3, SIZE, SIZE))
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*.onnx")}
    # Equal weights in other module objects: the graph is found again, not exported again.
    backend = OnnxRuntimeBackend(step_spec(tiny_unet(), tiny_codec(), "x"), device="cpu", cache_dir=cache)
    backend.prepare((2, 3, SIZE, SIZE), (3, SIZE, SIZE))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.onnx")} == files
    # Other weights: another key.
    changed = tiny_unet()
    with torch.no_grad():
        changed.out[2].bias[0] += 1e-3
    key = backend.graphs._key("step", (SIZE, SIZE, (3, SIZE, SIZE)))
    other = OnnxRuntimeBackend(step_spec(changed, codec, "x"), device="cpu", cache_dir=cache)
    assert other.graphs._key("step", (SIZE, SIZE, (3, SIZE, SIZE))) != key
    assert state_fingerprint(changed) != state_fingerprint(unet)


def test_bad_configurations_raise_backend_error(models):
    spec = step_spec(*models, "x")
    autoregressive = Codec("mbt2018", JointAutoregressiveHierarchicalPriors(8, 12))
    with pytest.raises(BackendError, match="autoregressive"):
        OnnxRuntimeBackend(step_spec(models[0], autoregressive, "x"), device="cpu")
    with pytest.raises(BackendError, match="float32"):
        OnnxRuntimeBackend(spec, device="cpu", dtype=torch.bfloat16)
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            OnnxRuntimeBackend(spec, device="cuda")
