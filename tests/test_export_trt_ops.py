"""The static TensorRT-parser check, on synthetic graphs and on the exported ones."""
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from test_export_models import SIZE, shared_cache, step_spec, tiny_codec, tiny_unet

from idemrt.errors import BackendError
from idemrt.export import onnx_export as ox
from idemrt.export.graph_cache import StepGraphs
from idemrt.export.trt_ops import TENSORRT_ONNX_OPS, check_tensorrt_compatible, tensorrt_problems

DATA = Path(__file__).parent / "data"


def test_operator_list_is_the_reference_list():
    listed = {line.strip() for line in (DATA / "tensorrt_onnx_ops.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert len(listed) == 174
    assert TENSORRT_ONNX_OPS == listed


def _model(nodes, inputs=None, outputs=None, opset=18, initializers=(), domains=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def test_a_plain_graph_passes():
    check_tensorrt_compatible(_model([helper.make_node("Relu", ["x"], ["y"])]))


@pytest.mark.parametrize("model, expected", [
    (_model([helper.make_node("Relu", ["x"], ["y"])], opset=16), "opset is 16"),
    (_model([helper.make_node("Gradient", ["x"], ["y"], xs=["x"], y="x")]), "operator Gradient"),
    (_model([helper.make_node("Attention", ["x"], ["y"])]), "operator Attention"),
    (_model([helper.make_node("Fused", ["x"], ["y"], domain="com.microsoft")], domains=["com.microsoft"]),
     "com.microsoft::Fused"),
    (_model([helper.make_node("Relu", ["x"], ["y"])],
            inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])]), "no optimisation profile"),
    (_model([helper.make_node("Relu", ["x"], ["y"])],
            inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]), "no static rank"),
    (_model([helper.make_node("Relu", ["x"], ["y"])],
            inputs=[helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 3])]), "float64"),
    (_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)]), "Cast(to=float64)"),
    (_model([helper.make_node("If", ["c"], ["y"], then_branch=helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["s"])], "t", [], [helper.make_tensor_value_info(
            "s", TensorProto.FLOAT, [3])]), else_branch=helper.make_graph([], "e", [], []))]),
     "operator SplitToSequence"),  # inside a subgraph
])
def test_problems_are_reported(model, expected):
    assert any(expected in p for p in tensorrt_problems(model)), tensorrt_problems(model)
    with pytest.raises(BackendError, match="not buildable by TensorRT"):
        check_tensorrt_compatible(model)


def test_exported_graphs_pass(tmp_path_factory, tmp_path):
    codec = tiny_codec()
    graphs = StepGraphs(step_spec(tiny_unet(), codec, "x"), shared_cache(tmp_path_factory))
    paths = [graphs.step_gradient(SIZE, SIZE, (3, SIZE, SIZE)).path, graphs.unet(SIZE, SIZE).path,
             ox.export_analysis(codec, tmp_path / "a.onnx", 64, 64, dynamic_hw=True).path,
             ox.export_synthesis(codec, tmp_path / "s.onnx", (12, 4, 4)).path]
    for path in paths:
        check_tensorrt_compatible(path)
        assert onnx.load(str(path), load_external_data=False).opset_import[0].version >= 17
