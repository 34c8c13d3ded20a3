"""The CUDA-graph runtime shared by the fast backend and PSC's fast denoiser.

* :func:`capture` — warm a function up on a side stream, then capture it (the order PyTorch's
  CUDA-graph notes require: lazy init, cuDNN autotuning, Triton JIT and autograd's stream
  bookkeeping must all happen outside the capture).
* :class:`GraphSet` — one graph per key (a batch shape), captured on first use, with static
  input buffers; a key whose capture fails runs uncaptured from then on, after a warning.
* :func:`cudnn_autotune` — cuDNN benchmark mode (on or off) for static shapes, unless determinism was asked.
* :func:`on_device` — the CUDA device context (a no-op on the CPU).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

__all__ = ["GraphSet", "capture", "cudnn_autotune", "on_device"]

_WARMUP = 3  # warm-up runs before a capture


class GraphSet:
    """CUDA graphs of functions of static-shaped tensors, one per key, captured on first use.

    ``run(key, fn, *inputs)`` replays the graph of ``key`` (capturing ``fn(*inputs)`` the first
    time) and returns fresh copies of ``fn``'s outputs, a tuple of tensors. ``fn`` must take
    every changing value (step indices, scales) as one of ``inputs`` or read it from device
    tensors it closes over. ``settings()`` is the context (cuDNN flags) that warm-up, capture
    and uncaptured runs happen in. Callers serialise ``run``: every graph owns one set of static
    buffers.
    """

    def __init__(self, owner: str, settings: Callable = contextlib.nullcontext):
        self.owner = owner
        self.settings = settings
        self._graphs: dict = {}

    def run(self, key, fn: Callable, *inputs):
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(key, fn, inputs)
        if graph is False:
            with self.settings():
                return fn(*inputs)
        return graph.replay(*inputs)

    def __len__(self) -> int:
        return sum(1 for g in self._graphs.values() if g)

    def _capture(self, key, fn, inputs):
        try:
            with self.settings():
                return _Graph(fn, *inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
            warnings.warn(
                f"{self.owner}: CUDA graph capture failed for {key} ({type(exc).__name__}: {exc}); "
                f"this shape runs without graphs",
                RuntimeWarning,
                stacklevel=4,
            )
            return False


def capture(fn: Callable, device: torch.device):
    """``(graph, outputs)``: ``fn()`` warmed up on a side stream, then captured; replaying
    ``graph`` rewrites ``outputs`` in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class _Graph:
    """One captured call ``fn(*inputs)``: static input buffers (None stays None), the graph and
    its static outputs."""

    def __init__(self, fn: Callable, *inputs):
        self.inputs = [None if t is None else t.clone() for t in inputs]
        device = next(t for t in inputs if t is not None).device
        self.graph, self.outputs = capture(lambda: fn(*self.inputs), device)

    def replay(self, *inputs):
        for static, t in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(t)
        self.graph.replay()
        # Copies, so that results survive the next replay (a few hundred KB: negligible).
        return tuple(t.clone() for t in self.outputs)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, enabled: bool = True):
    """cuDNN benchmark mode ``enabled`` (on: autotuned algorithms for static shapes) on a CUDA
    device, except that determinism, when asked for, keeps it as it is; restored after."""
    if device.type != "cuda" or torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def on_device(device: torch.device):
    """The CUDA device context of ``device`` (a no-op for other devices)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
