"""The onnxruntime backend: the whole guided step on ONNX Runtime sessions.

The UNet forward, the operator A and the input gradient through both run as one exported
graph (:mod:`idemrt.export`); the sampler update is the diffusion objects' own
(:class:`~idemrt.backends.graph.GraphStepBackend`). fp32 only.

Providers: ``CPUExecutionProvider`` for a CPU device; ``CUDAExecutionProvider`` (onnxruntime-gpu)
for a CUDA device, bound to torch's tensors with an IOBinding and run on torch's current
stream (``user_compute_stream``), so no host copies are made.

Graphs are exported on the first step of each shape (slow: minutes for the full-size UNets)
and cached on disk (see :mod:`idemrt.export.graph_cache`); ``prepare(shape, target_shape)``
does it ahead of time.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import BackendError
from .graph import GraphStepBackend
from .base import StepSpec, register

__all__ = ["OnnxRuntimeBackend"]


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(f"backend 'onnxruntime' needs the onnxruntime package ({exc}); "
                           "pip install 'idemrt[onnx]'") from None
    return onnxruntime


class _Session:
    """One InferenceSession called with torch tensors; returns torch tensors on ``device``."""

    def __init__(self, ort, graph, device: torch.device):
        self.device = device
        self.input_names = list(graph.input_names)
        self.output_names = list(graph.output_names)
        options = ort.SessionOptions()
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)})]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(graph.path), options, providers=providers)
        self._output_dims = {o.name: o.shape for o in self.session.get_outputs()}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.device.type != "cuda":
            feeds = {name: x.detach().to("cpu", torch.float32).contiguous().numpy()
                     for name, x in zip(self.input_names, inputs)}
            outs = self.session.run(self.output_names, feeds)
            return tuple(torch.from_numpy(o).to(self.device) for o in outs)
        return self._run_cuda(inputs)

    def _run_cuda(self, inputs) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        index = self.device.index
        inputs = [x.detach().to(self.device, torch.float32).contiguous() for x in inputs]
        for name, x in zip(self.input_names, inputs):
            binding.bind_input(name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        # Symbolic output dims are those of the inputs (batch, height, width) with the same name.
        sizes = {}
        for x, inp in zip(inputs, self.session.get_inputs()):
            sizes.update({d: s for d, s in zip(inp.shape, x.shape) if isinstance(d, str)})
        outputs = []
        for name in self.output_names:
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in self._output_dims[name])
            out = torch.empty(shape, device=self.device)
            binding.bind_output(name, "cuda", index, np.float32, shape, out.data_ptr())
            outputs.append(out)
        self.session.run_with_iobinding(binding)
        return tuple(outputs)


@register("onnxruntime")
class OnnxRuntimeBackend(GraphStepBackend):
    """``step(x_t, i, target, noise) -> (x_prev, distance)`` on onnxruntime.

    ``cache_dir``: where exported graphs are kept (default ``$IDEMRT_CACHE_DIR`` or
    ``~/.cache/idemrt``). ``dynamic_hw``: one graph for all image sizes (multiples of 64;
    x constraint only) instead of one per size.
    """

    def __init__(self, spec: StepSpec, *, device, dtype=None, cache_dir=None, dynamic_hw: bool = False):
        self._ort = _import_onnxruntime()
        device = torch.device(device)
        if dtype not in (None, torch.float32):
            raise BackendError(f"the onnxruntime backend computes in float32, not {dtype}")
        if device.type not in ("cpu", "cuda"):
            raise BackendError(f"the onnxruntime backend runs on 'cpu' or 'cuda', not {device.type!r}")
        if device.type == "cuda" and "CUDAExecutionProvider" not in self._ort.get_available_providers():
            raise BackendError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu), "
                               "or run the onnxruntime backend with device='cpu'")
        super().__init__(spec, device=device, cache_dir=cache_dir, dynamic_hw=dynamic_hw)

    def _runner(self, graph, batch):
        return _Session(self._ort, graph, self.device)
