"""Static check that an ONNX graph is one TensorRT 10's ONNX parser can build, without TensorRT.

What is checked (:func:`tensorrt_problems`):

* the default ONNX domain is imported at opset >= 17 and every node -- in subgraphs too -- is a
  default-domain operator from the parser's list (:data:`TENSORRT_ONNX_OPS`). Custom domains
  and model-local functions would need plugins; there is no ``Gradient`` op (TensorRT has no
  autograd);
* every graph input and output is a tensor of static rank whose dimensions are fixed, or --
  inputs only -- named by one of the dynamic dims that the optimisation profiles cover
  (``batch`` and, for dynamic-size graphs, ``height``/``width`` or the latent ones);
* no float64 anywhere (inputs, outputs, initializers, Cast targets): TensorRT has no double.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from idemrt.errors import BackendError

__all__ = ["DYNAMIC_DIMS", "MIN_OPSET", "TENSORRT_ONNX_OPS", "check_tensorrt_compatible", "tensorrt_problems"]

MIN_OPSET = 17
# Dim names the exporter gives symbolic input axes (idemrt.export.onnx_export), i.e. the axes that
# the engine builder's optimisation profiles set min/opt/max for.
DYNAMIC_DIMS = frozenset({"batch", "height", "width", "latent_height", "latent_width"})

# The onnx-tensorrt operator list (docs/operators.md, TensorRT 10.x branches).
TENSORRT_ONNX_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "AffineGrid", "And", "ArgMax", "ArgMin", "Asin", "Asinh",
    "Atan", "Atanh", "AveragePool", "BatchNormalization", "Bernoulli", "BitShift", "BitwiseAnd",
    "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu",
    "Clip", "Compress", "Concat", "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv",
    "ConvInteger", "ConvTranspose", "Cos", "Cosh", "CumSum", "DFT", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Det", "Div", "Dropout", "DynamicQuantizeLinear", "Einsum", "Elu", "Equal",
    "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements",
    "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HammingWindow", "HannWindow",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler",
    "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul",
    "MatMulInteger", "Max", "MaxPool", "MaxRoiPool", "MaxUnpool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Multinomial", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus",
    "Pow", "QLinearConv", "QLinearMatMul", "QuantizeLinear", "RNN", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1",
    "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RoiAlign", "Round", "STFT", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu",
    "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax",
    "SoftmaxCrossEntropyLoss", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze",
    "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unique",
    "Unsqueeze", "Upsample", "Where", "Xor",
})

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _load(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        # The structure is enough; the weights may be gigabytes of external data.
        return onnx.load(str(model), load_external_data=False)
    return model


def _nodes(graph) -> Iterator:
    """Every node of graph and of the subgraphs in its nodes' attributes (If, Loop, Scan)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def _value_problems(value, kind: str, allowed: frozenset) -> list[str]:
    import onnx

    if not value.type.HasField("tensor_type"):
        return [f"{kind} {value.name!r} is not a tensor"]
    tensor = value.type.tensor_type
    problems = []
    if tensor.elem_type == onnx.TensorProto.DOUBLE:
        problems.append(f"{kind} {value.name!r} is float64")
    if not tensor.HasField("shape"):
        return problems + [f"{kind} {value.name!r} has no static rank"]
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            continue
        if not dim.HasField("dim_param"):
            problems.append(f"{kind} {value.name!r} axis {axis} has an unknown size")
        elif kind == "input" and dim.dim_param not in allowed:
            problems.append(f"input {value.name!r} axis {axis} is dynamic ({dim.dim_param!r}) "
                            f"but no optimisation profile covers it (profiles: {sorted(allowed)})")
    return problems


def tensorrt_problems(model, dynamic_dims: Iterable[str] = DYNAMIC_DIMS, min_opset: int = MIN_OPSET) -> list[str]:
    """Why TensorRT's parser would reject model (a path or an ``onnx.ModelProto``); empty if none."""
    import onnx

    model = _load(model)
    allowed = frozenset(dynamic_dims)
    problems = []
    opsets = {o.domain: o.version for o in model.opset_import}
    default = max((opsets[d] for d in _DEFAULT_DOMAINS if d in opsets), default=None)
    if default is None or default < min_opset:
        problems.append(f"default-domain opset is {default}, TensorRT export needs >= {min_opset}")
    if len(model.functions):
        problems.append(f"{len(model.functions)} model-local functions "
                        f"({', '.join(sorted({f.name for f in model.functions}))}) would need inlining")
    bad_ops: dict[str, int] = {}
    for node in _nodes(model.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            name = f"{node.domain}::{node.op_type}"
        elif node.op_type not in TENSORRT_ONNX_OPS:
            name = node.op_type
        elif node.op_type == "Cast" and any(
                a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in node.attribute):
            name = "Cast(to=float64)"
        else:
            continue
        bad_ops[name] = bad_ops.get(name, 0) + 1
    problems += [f"operator {op} ({n}x) is not supported by TensorRT's ONNX parser"
                 for op, n in sorted(bad_ops.items())]
    for value in model.graph.input:
        problems += _value_problems(value, "input", allowed)
    for value in model.graph.output:
        problems += _value_problems(value, "output", allowed)
    problems += [f"initializer {t.name!r} is float64" for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.DOUBLE]
    return problems


def check_tensorrt_compatible(model, dynamic_dims: Iterable[str] = DYNAMIC_DIMS, min_opset: int = MIN_OPSET) -> None:
    """Raise :class:`idemrt.BackendError` listing every :func:`tensorrt_problems` of model."""
    problems = tensorrt_problems(model, dynamic_dims, min_opset)
    if problems:
        raise BackendError("the ONNX graph is not buildable by TensorRT:\n  " + "\n  ".join(problems))
