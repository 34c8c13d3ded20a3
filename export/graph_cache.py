"""The ONNX graphs a guided step needs, exported on first use and cached on disk.

A cached graph is found again by a key over everything that defines it: the weights (a SHA-256
over every tensor of the UNet and the codec), the architecture, the graph kind and shapes, the
constraint and the sampler's table layout, the export recipe (:data:`RECIPE_VERSION`, opset) and the torch version.
Each graph lives in its own directory (``<cache>/onnx/<kind>-<key>/model.onnx``, with its
external-data file when the weights exceed protobuf's 2 GB), written to a temporary directory
first and renamed into place, so a crash never leaves a half-written graph behind.

The cache root is ``cache_dir``, else ``$IDEMRT_CACHE_DIR``, else ``~/.cache/idemrt``.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .onnx_export import (
    OPSET,
    PROXIMAL_OUTPUTS,
    STEP_INPUTS,
    STEP_OUTPUTS,
    ExportedGraph,
    check_exportable_codec,
    export_step_gradient,
    export_unet,
)

__all__ = ["CACHE_ENV", "RECIPE_VERSION", "StepGraphs", "default_cache_dir", "state_fingerprint"]

CACHE_ENV = "IDEMRT_CACHE_DIR"
RECIPE_VERSION = 2  # bump whenever the exported graphs change for the same weights and shapes
_MODEL_FILE = "model.onnx"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "idemrt")


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module``'s state_dict, sorted."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\0{name}\0{t.dtype}\0{tuple(state[name].shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _cpu(module: nn.Module) -> nn.Module:
    """``module`` itself if it lives on the CPU, else a CPU copy (exports trace on the CPU)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()


class StepGraphs:
    """Exported graphs of one :class:`~idemrt.backends.base.StepSpec`, by kind and shape.

    The operator A is rebuilt from ``spec.codec`` and ``spec.constraint``
    (:func:`~idemrt.export.onnx_export.codec_operator`, the formula of ``idemrt.Decoder``),
    as the StepSpec contract says exporting backends do.
    """

    def __init__(self, spec, cache_dir: Optional[str | os.PathLike] = None, *, dynamic_hw: bool = False):
        if spec.guidance is not None:
            check_exportable_codec(spec.codec)
        self.spec = spec
        self.root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dynamic_hw = dynamic_hw
        self._weights: Optional[str] = None

    def _weights_key(self) -> str:
        if self._weights is None:
            parts = [state_fingerprint(self.spec.unet), repr(getattr(self.spec.unet, "config", None))]
            if isinstance(self.spec.codec, nn.Module):
                parts.append(state_fingerprint(self.spec.codec))
            self._weights = hashlib.sha256("\0".join(parts).encode()).hexdigest()
        return self._weights

    def _key(self, kind: str, shapes: tuple) -> str:
        # The step graph takes the sampler's table rows: its layout (columns) is part of the graph.
        fields = [RECIPE_VERSION, OPSET, torch.__version__, kind, "dynamic" if self.dynamic_hw else shapes,
                  self.spec.constraint, tuple(self.spec.sampler.columns) if kind in ("step", "pir") else None,
                  self._weights_key()]
        if kind == "pir":  # the proximal step bakes the guidance's constants into the graph
            fields.append(repr(self.spec.guidance))
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:32]

    def _get(self, kind: str, key: str, export, input_names, output_names) -> ExportedGraph:
        final = self.root / "onnx" / f"{kind}-{key}"
        dims = ("batch", "height", "width") if self.dynamic_hw else ("batch",)
        if not (final / _MODEL_FILE).exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
            try:
                export(tmp / _MODEL_FILE)
                try:
                    os.replace(tmp, final)
                except OSError:  # another process finished the same graph first: keep theirs
                    if not (final / _MODEL_FILE).exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return ExportedGraph(final / _MODEL_FILE, tuple(input_names), tuple(output_names), dims)

    def step_gradient(self, height: int, width: int, target_shape: Sequence[int]) -> ExportedGraph:
        """The step-gradient graph for images of ``height x width`` and targets (C, h, w)."""
        target_shape = tuple(int(s) for s in target_shape)
        proximal = self.spec.guidance is not None and self.spec.guidance.step_kind == "proximal"  # PIR: its own graph
        kind = "pir" if proximal else "step"
        key = self._key(kind, (height, width, target_shape))

        def export(path):
            export_step_gradient(_cpu(self.spec.unet), path, height, width, codec=_cpu(self.spec.codec),
                                 constraint=self.spec.constraint, sampler=self.spec.sampler.to("cpu"),
                                 target_shape=target_shape, dynamic_hw=self.dynamic_hw,
                                 guidance=self.spec.guidance if proximal else None)

        return self._get(kind, key, export, STEP_INPUTS, PROXIMAL_OUTPUTS if proximal else STEP_OUTPUTS)

    def unet(self, height: int, width: int) -> ExportedGraph:
        """The UNet forward graph (unguided steps)."""
        key = self._key("unet", (height, width))

        def export(path):
            export_unet(_cpu(self.spec.unet), path, height, width, dynamic_hw=self.dynamic_hw)

        return self._get("unet", key, export, ("x_t", "t"), ("model_out",))
