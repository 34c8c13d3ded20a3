"""ONNX export and TensorRT engine build.

* :mod:`.joint_graph` -- tracing a guided step's forward *and* backward into forward-only ops;
* :mod:`.onnx_export` -- the graphs (codec analysis/synthesis, UNet, step gradient), validation
  against PyTorch on onnxruntime;
* :mod:`.trt_ops` -- the static TensorRT-parser compatibility check;
* :mod:`.graph_cache` -- graphs cached on disk (the guided step over them, shared by the
  ``onnxruntime`` and ``tensorrt`` backends, is :mod:`idemrt.backends.graph`);
* :mod:`.tensorrt_build` -- engines (TensorRT 10 Python API), cached per GPU;
* :mod:`.cli` -- ``idemrt export``.

Names are imported on first use, so ``import idemrt.export`` stays light.
"""
from idemrt.lazy import lazy_getattr

_LAZY = {  # module -> the names it provides
    ".onnx_export": ("ExportedGraph", "codec_operator", "default_sampler", "export_analysis", "export_graph",
                     "export_step_gradient", "export_synthesis", "export_unet", "interior_step_inputs",
                     "step_gradient_inputs", "validate_with_onnxruntime"),
    ".joint_graph": ("step_gradient_fn", "trace"),
    ".trt_ops": ("check_tensorrt_compatible", "tensorrt_problems"),
    ".graph_cache": ("StepGraphs",),
    "idemrt.backends.graph": ("GraphStepBackend",),
    ".tensorrt_build": ("build_engine",),
    ".cli": ("add_export_subparser", "main_export"),
}

__all__ = sorted(name for names in _LAZY.values() for name in names)

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
