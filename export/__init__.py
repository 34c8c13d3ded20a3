"""ONNX export and TensorRT engine build.

* :mod:`.joint_graph` -- tracing a guided step's forward *and* backward into forward-only ops;
* :mod:`.onnx_export` -- the graphs (codec analysis/synthesis, UNet, step gradient), validation
  against PyTorch on onnxruntime;
* :mod:`.trt_ops` -- the static TensorRT-parser compatibility check;
* :mod:`.graph_cache` / :mod:`.graph_backend` -- graphs cached on disk, and the guided step over
  them shared by the ``onnxruntime`` and ``tensorrt`` backends;
* :mod:`.tensorrt_build` -- engines (TensorRT 10 Python API), cached per GPU;
* :mod:`.cli` -- ``idemrt export``.

Names are imported on first use, so ``import idemrt.export`` stays light.
"""
from importlib import import_module

_LAZY = {
    "ExportedGraph": "onnx_export",
    "codec_operator": "onnx_export",
    "export_analysis": "onnx_export",
    "export_graph": "onnx_export",
    "export_step_gradient": "onnx_export",
    "export_synthesis": "onnx_export",
    "export_unet": "onnx_export",
    "interior_step_inputs": "onnx_export",
    "step_gradient_inputs": "onnx_export",
    "validate_with_onnxruntime": "onnx_export",
    "step_gradient_fn": "joint_graph",
    "trace": "joint_graph",
    "check_tensorrt_compatible": "trt_ops",
    "tensorrt_problems": "trt_ops",
    "StepGraphs": "graph_cache",
    "GraphStepBackend": "graph_backend",
    "build_engine": "tensorrt_build",
    "add_export_subparser": "cli",
    "main_export": "cli",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
