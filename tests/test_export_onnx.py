"""ONNX graphs vs PyTorch on onnxruntime (CPU, fp32): max relative error <= 1e-4.

References are computed here with eager PyTorch autograd (the Codec's own operator, the UNet,
idemrt.diffusion.distance), not with the traced functions under test.
"""
import onnx
import pytest
import torch
from compressai.models import JointAutoregressiveHierarchicalPriors
from test_export_models import SIZE, conv_unet, shared_cache, step_spec, tiny_codec, tiny_unet

from idemrt.diffusion import distance
from idemrt.errors import BackendError
from idemrt.export import onnx_export as ox
from idemrt.export.graph_cache import StepGraphs
from idemrt.models.codec import Codec

RTOL = 1e-4


def reference_step(unet, codec, constraint):
    """Eager model_out, per-sample distance and d dist/d x_t (the quantities of guided_step),
    written out by hand: x0 from the rows' first two columns, sqrt(1/abar) and sqrt(1/abar - 1)."""

    def A(x0):
        out = codec.operator((x0 + 1) / 2, constraint)
        return 2 * out - 1 if constraint == "x" else out

    def fn(x_t, t, target, rows):
        c_a, c_b = rows[:, 0], rows[:, 1]
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = unet(x, t)
            x0 = (c_a.view(-1, 1, 1, 1) * x - c_b.view(-1, 1, 1, 1) * out[:, :3]).clamp(-1, 1)
            dist = distance(target, A(x0))
            (grad,) = torch.autograd.grad(dist.sum(), x)
        return out, dist, grad

    return fn


@pytest.fixture(scope="module")
def hyperprior():
    return tiny_codec("bmshj2018-hyperprior")


@pytest.fixture(scope="module")
def step_x(tmp_path_factory, hyperprior):
    """The tiny ADM UNet's x-domain step graph (the ORT backend tests reuse it from the cache)."""
    unet = tiny_unet()
    graphs = StepGraphs(step_spec(unet, hyperprior, "x"), shared_cache(tmp_path_factory))
    return unet, graphs.step_gradient(SIZE, SIZE, (3, SIZE, SIZE))


def test_step_gradient_x_domain_tiny_adm_unet(step_x, hyperprior):
    unet, graph = step_x
    model = onnx.load(str(graph.path))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", 3, SIZE, SIZE], ["batch"], ["batch", 3, SIZE, SIZE], ["batch", 7]]  # rows: DDPM table
    reference = reference_step(unet, hyperprior, "x")
    for n in (1, 3):  # dynamic batch (traced at 2)
        inputs = ox.step_gradient_inputs(n, SIZE, SIZE, (3, SIZE, SIZE))
        out, dist, grad = reference(*inputs)
        rows = inputs[3]
        x0 = rows[:, 0].view(-1, 1, 1, 1) * inputs[0] - rows[:, 1].view(-1, 1, 1, 1) * out[:, :3]
        assert 0.1 < (x0.abs() > 1).float().mean() < 0.9  # the clamp's gradient mask is exercised
        assert grad.abs().max() > 0 and dist.min() > 0
        errors = ox.validate_with_onnxruntime(graph, reference, inputs, rtol=RTOL)
        assert set(errors) == {"model_out", "dist", "grad"}


@pytest.mark.parametrize("codec_name", ["bmshj2018-hyperprior", "mbt2018-mean"])
def test_step_gradient_y_domain(tmp_path_factory, codec_name):
    """y-domain A = round_ste(g_a); for the mean-scale codec the rounding is around mu from h_s
    (forward only)."""
    unet, codec = conv_unet(), tiny_codec(codec_name)
    graph = StepGraphs(step_spec(unet, codec, "y"), shared_cache(tmp_path_factory)).step_gradient(64, 64, (12, 4, 4))
    for n in (1, 2):
        inputs = ox.step_gradient_inputs(n, 64, 64, (12, 4, 4))
        ox.validate_with_onnxruntime(graph, reference_step(unet, codec, "y"), inputs, rtol=RTOL)


def test_unet_graph(tmp_path_factory, hyperprior):
    unet = tiny_unet()
    graph = StepGraphs(step_spec(unet, hyperprior, "x"), shared_cache(tmp_path_factory)).unet(SIZE, SIZE)
    for n in (1, 3):
        inputs = (torch.randn(n, 3, SIZE, SIZE), torch.tensor([999.0, 500.0, 3.0])[:n])
        ox.validate_with_onnxruntime(graph, lambda x, t: (unet(x, t.long()),), inputs, rtol=RTOL)


@pytest.mark.parametrize("dynamic_hw", [False, True])
def test_codec_analysis_and_synthesis(tmp_path, hyperprior, dynamic_hw):
    analysis = ox.export_analysis(hyperprior, tmp_path / "a.onnx", 64, 64, dynamic_hw=dynamic_hw)
    synthesis = ox.export_synthesis(hyperprior, tmp_path / "s.onnx", (12, 4, 4), dynamic_hw=dynamic_hw)
    sizes = [(1, 64, 64), (3, 64, 64)] + ([(2, 128, 192)] if dynamic_hw else [])
    for n, h, w in sizes:
        x = torch.rand(n, 3, h, w)
        ox.validate_with_onnxruntime(analysis, lambda x: (hyperprior.model.g_a(x),), (x,), rtol=RTOL)
        y = torch.round(hyperprior.model.g_a(x).detach() * 8)
        ox.validate_with_onnxruntime(synthesis, lambda y: (hyperprior.model.g_s(y),), (y,), rtol=RTOL)


def test_validation_catches_a_wrong_graph(tmp_path, hyperprior):
    graph = ox.export_analysis(hyperprior, tmp_path / "a.onnx", 64, 64)
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(BackendError, match="differs from PyTorch"):
        ox.validate_with_onnxruntime(graph, lambda x: (hyperprior.model.g_a(x) * (1 + 1e-3),), (x,), rtol=RTOL)


def test_autoregressive_codec_is_refused(tmp_path):
    codec = Codec("mbt2018", JointAutoregressiveHierarchicalPriors(8, 12))
    with pytest.raises(BackendError, match="autoregressive"):
        ox.export_step_gradient(conv_unet(), tmp_path / "s.onnx", 64, 64, codec=codec, constraint="x")


def test_unexportable_function_raises_backend_error(tmp_path):
    def masked_attention(q):
        return (torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),)

    with pytest.raises(BackendError, match="cannot export"):
        ox.export_graph(masked_attention, (torch.randn(2, 4, 8),), tmp_path / "m.onnx", input_names=["q"],
                        output_names=["a"], dynamic={"q": {0: "batch"}})


def test_bad_sizes_are_refused(tmp_path, hyperprior):
    with pytest.raises(ValueError, match="multiples of 64"):
        ox.export_analysis(hyperprior, tmp_path / "a.onnx", 96, 64, dynamic_hw=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        ox.export_analysis(hyperprior, tmp_path / "a.onnx", 40, 64)
