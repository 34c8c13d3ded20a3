"""TensorRT engines from the exported ONNX graphs, cached on disk, run on torch CUDA tensors.

Build (TensorRT 10 Python API): ``trt.Builder`` -> ``create_network(0)`` (explicit batch is
the only mode in TensorRT 10) -> ``trt.OnnxParser.parse_from_file`` -> a builder config with
the precision flags, one optimisation profile covering the dynamic dims, and a timing cache
(``config.create_timing_cache`` / ``set_timing_cache``, saved back after the build) ->
``build_serialized_network``.

Engines are cached as ``<cache>/tensorrt/<key>.engine`` with the key over the ONNX graph's
SHA-256 (weights included), the TensorRT version, the GPU name and compute capability, the
precision and the profile -- an engine is only valid for exactly those.

Run: :class:`TensorRTRunner` binds every I/O tensor by address (``set_tensor_address``) and
enqueues on torch's current CUDA stream (``execute_async_v3``). Outputs go to buffers the
runner owns, one set per input shape, so that with inputs at fixed addresses a call can be
captured in a CUDA graph and replayed (TensorRT asks for one ordinary call with the same
shapes before the capture).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from idemrt.errors import BackendError

from .onnx_export import ExportedGraph

__all__ = ["PRECISIONS", "TensorRTRunner", "build_engine", "engine_cache_key", "import_tensorrt",
           "load_or_build_engine", "require_cuda"]

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_WORKSPACE_BYTES = 8 << 30  # builder scratch memory limit; tactics needing more are skipped

Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]  # input -> (min, opt, max)


def import_tensorrt():
    """The ``tensorrt`` module, or BackendError saying why it cannot be used."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError("tensorrt not installed: backend 'tensorrt' needs TensorRT 10 "
                           "(pip install tensorrt) and a CUDA GPU") from None
    return tensorrt


def require_cuda(device: torch.device) -> None:
    """BackendError unless ``device`` is a usable CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendError(f"TensorRT runs on a CUDA GPU; got device {str(device)!r}"
                           f"{'' if torch.cuda.is_available() else ' and CUDA is not available'}")


def _gpu_id(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str, profile: Profile) -> str:
    fields = [onnx_sha256, trt_version, gpu, precision, sorted((k, tuple(map(tuple, v))) for k, v in profile.items())]
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:32]


def build_engine(onnx_path: str | os.PathLike, *, precision: str, profile: Profile,
                 timing_cache: Optional[str | os.PathLike] = None, workspace_bytes: int = _WORKSPACE_BYTES) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (needs TensorRT and a CUDA GPU)."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): it finds the external-data file next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default; fp32 means IEEE fp32
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(opt_profile)

    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).exists():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: the file is per TensorRT version and GPU

    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    if timing_cache is not None:
        _atomic_write(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_or_build_engine(graph: ExportedGraph, cache_dir: str | os.PathLike, *, precision: str,
                         profile: Profile, device: torch.device) -> bytes:
    """The serialized engine of ``graph`` for this GPU, from the cache or freshly built."""
    trt = import_tensorrt()
    require_cuda(device)
    gpu = _gpu_id(device)
    root = Path(cache_dir) / "tensorrt"
    key = engine_cache_key(graph.sha256, trt.__version__, gpu, precision, profile)
    path = root / f"{key}.engine"
    if path.exists():
        return path.read_bytes()
    timing = root / ("timing-" + hashlib.sha256(f"{trt.__version__}|{gpu}".encode()).hexdigest()[:16] + ".cache")
    with torch.cuda.device(device):
        engine = build_engine(graph.path, precision=precision, profile=profile, timing_cache=timing)
    _atomic_write(path, engine)
    return engine


class TensorRTRunner:
    """A deserialized engine called with torch CUDA tensors on the current stream."""

    def __init__(self, engine_bytes: bytes, device: torch.device, input_names: Sequence[str],
                 output_names: Sequence[str]):
        trt = import_tensorrt()
        require_cuda(device)
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError("TensorRT could not deserialize the engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        io = {self.engine.get_tensor_name(k) for k in range(self.engine.num_io_tensors)}
        missing = (set(input_names) | set(output_names)) - io
        if missing:
            raise BackendError(f"the engine lacks the tensors {sorted(missing)}")
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._outputs: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [x.to(self.device, torch.float32).contiguous() for x in inputs]
        shapes = tuple(tuple(x.shape) for x in inputs)
        for name, x in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = self._outputs.get(shapes)
        if outputs is None:
            outputs = self._outputs[shapes] = [
                torch.empty(tuple(self.context.get_tensor_shape(name)), device=self.device)
                for name in self.output_names
            ]
        for name, out in zip(self.output_names, outputs):
            self.context.set_tensor_address(name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendError("TensorRT execution failed (see its log above)")
        return tuple(outputs)
