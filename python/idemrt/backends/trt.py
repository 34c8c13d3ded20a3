"""The TensorRT backend: the exported step graphs as TensorRT engines on a CUDA GPU.

Same step as the onnxruntime backend (:class:`~idemrt.backends.graph.GraphStepBackend`:
the engine computes ``model_out``, ``dist`` and ``grad``; ``sampler.predict``/``step`` and
``guidance.update`` run in torch), with engines built from the cached ONNX graphs by
:mod:`idemrt.export.tensorrt_build` and cached per GPU. ``dtype``: None/float32 (IEEE fp32
engines), torch.float16 or torch.bfloat16 (TensorRT's FP16 / BF16 builder flags; the graphs'
inputs and outputs stay fp32).

Raises :class:`idemrt.BackendError` when TensorRT is not installed or the device is not CUDA.
"""
from __future__ import annotations

import torch

from ..errors import BackendError
from .graph import GraphStepBackend
from ..export.tensorrt_build import TensorRTRunner, import_tensorrt, load_or_build_engine
from .base import StepSpec, register

__all__ = ["TensorRTBackend"]

_PRECISION = {None: "fp32", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEFAULT_MAX_BATCH = 8  # engines' batch profile: 1 .. max(this, the batch that built them)


@register("tensorrt")
class TensorRTBackend(GraphStepBackend):
    """``step(x_t, i, target, noise) -> (x_prev, distance)`` on TensorRT engines.

    ``cache_dir``: graphs and engines (default ``$IDEMRT_CACHE_DIR`` or ``~/.cache/idemrt``).
    ``max_batch``: upper end of the engines' batch profile; a larger batch builds another engine.
    """

    def __init__(self, spec: StepSpec, *, device, dtype=None, cache_dir=None, max_batch: int = DEFAULT_MAX_BATCH):
        import_tensorrt()
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise BackendError(f"backend 'tensorrt' needs a CUDA device, got {str(device)!r}"
                               f"{'' if torch.cuda.is_available() else ' (CUDA is not available)'}")
        if dtype not in _PRECISION:
            raise BackendError(f"backend 'tensorrt' computes in float32, float16 or bfloat16, not {dtype}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(spec, device=device, cache_dir=cache_dir)
        self.precision = _PRECISION[dtype]
        self.max_batch = max_batch

    def _batch_bucket(self, batch: int):
        return None if batch <= self.max_batch else batch

    def _runner(self, graph, batch):
        import onnx

        # Every input's dims after the batch are fixed (TensorRT graphs have a fixed image size).
        model = onnx.load(str(graph.path), load_external_data=False)
        rest = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:]) for i in model.graph.input}
        top = max(batch, self.max_batch)
        profile = {name: ((1, *r), (batch, *r), (top, *r)) for name, r in rest.items()}
        engine = load_or_build_engine(graph, self.graphs.root, precision=self.precision, profile=profile,
                                      device=self.device)
        return TensorRTRunner(engine, self.device, graph.input_names, graph.output_names)
