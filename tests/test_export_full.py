"""Slow export checks (``pytest -m slow``): the full-size presets, ELIC, and a step graph with
dynamic height/width. Random weights: the graphs do not depend on their values."""
import pytest
import torch
from compressai.models import FactorizedPrior
from compressai.models.sensetime import Elic2022Chandelier
from test_export_models import conv_unet, randomize_zero_init, tiny_codec, toy_unet
from test_export_onnx import reference_step

from idemrt.export import onnx_export as ox
from idemrt.export.trt_ops import check_tensorrt_compatible
from idemrt.models.codec import Codec
from idemrt.models.codec_loading import load_codec
from idemrt.models.unet import PRESETS, ADMUNet

pytestmark = pytest.mark.slow
RTOL = 1e-4


def test_ffhq256_step_graph_with_hyperprior_q1(tmp_path):
    torch.manual_seed(0)
    unet = randomize_zero_init(ADMUNet(PRESETS["ffhq256"]), 0)
    codec = load_codec("bmshj2018-hyperprior", quality=1, random_init=True)
    graph = ox.export_step_gradient(unet, tmp_path / "step.onnx", 256, 256, codec=codec, constraint="x")
    check_tensorrt_compatible(graph.path)
    for n in (1, 2):
        inputs = ox.interior_step_inputs(unet, n, 256, 256, (3, 256, 256))
        ox.validate_with_onnxruntime(graph, reference_step(unet, codec, "x"), inputs, rtol=RTOL)


def test_imagenet256_unet_graph_uses_external_data(tmp_path):
    """550M parameters: more than protobuf's 2 GB, so the weights go to an external-data file."""
    torch.manual_seed(0)
    unet = randomize_zero_init(ADMUNet(PRESETS["imagenet256"]), 0)
    graph = ox.export_unet(unet, tmp_path / "unet.onnx", 64, 64)
    assert graph.path.stat().st_size < 2**31 and sum(p.stat().st_size for p in tmp_path.iterdir()) > 2**31
    check_tensorrt_compatible(graph.path)
    inputs = (torch.randn(1, 3, 64, 64), torch.tensor([500.0]))
    ox.validate_with_onnxruntime(graph, lambda x, t: (unet(x, t),), inputs, rtol=RTOL)


@pytest.mark.parametrize("constraint", ["x", "y"])
def test_elic_step_graph(tmp_path, constraint):
    """ELIC: checkerboard two-pass and channel-group context in the forward, zero gradient through mu."""
    torch.manual_seed(0)
    codec = Codec("elic2022-chandelier", Elic2022Chandelier(N=16, M=32, groups=[4, 4, 8, 16]))
    unet = toy_unet()
    target = (3, 64, 64) if constraint == "x" else (32, 4, 4)
    graph = ox.export_step_gradient(unet, tmp_path / "s.onnx", 64, 64, codec=codec, constraint=constraint)
    check_tensorrt_compatible(graph.path)
    for n in (1, 2):
        ox.validate_with_onnxruntime(graph, reference_step(unet, codec, constraint),
                                     ox.step_gradient_inputs(n, 64, 64, target), rtol=RTOL)


@pytest.mark.parametrize("constraint", ["x", "y"])
def test_factorized_prior_step_graph(tmp_path, constraint):
    """Rounding around the entropy bottleneck's per-channel medians."""
    torch.manual_seed(0)
    codec = Codec("bmshj2018-factorized", FactorizedPrior(8, 12))
    with torch.no_grad():  # medians off zero, so that the offset matters
        codec.model.entropy_bottleneck.quantiles.add_(torch.rand_like(codec.model.entropy_bottleneck.quantiles))
    unet = conv_unet()
    target = (3, 64, 64) if constraint == "x" else (12, 4, 4)
    graph = ox.export_step_gradient(unet, tmp_path / "s.onnx", 64, 64, codec=codec, constraint=constraint)
    check_tensorrt_compatible(graph.path)
    for n in (1, 2):
        ox.validate_with_onnxruntime(graph, reference_step(unet, codec, constraint),
                                     ox.step_gradient_inputs(n, 64, 64, target), rtol=RTOL)


def test_step_graph_with_dynamic_height_and_width(tmp_path):
    unet, codec = toy_unet(), tiny_codec()
    graph = ox.export_step_gradient(unet, tmp_path / "s.onnx", 64, 64, codec=codec, dynamic_hw=True)
    check_tensorrt_compatible(graph.path)
    for n, h, w in ((1, 64, 64), (2, 128, 192)):
        ox.validate_with_onnxruntime(graph, reference_step(unet, codec, "x"),
                                     ox.step_gradient_inputs(n, h, w, (3, h, w)), rtol=RTOL)
