"""The guided step for backends that run exported graphs (onnxruntime, TensorRT).

The graph computes what needs the networks -- ``model_out``, ``dist`` and ``grad =
d dist / d x_t`` (:func:`~idemrt.export.joint_graph.step_gradient_fn`) -- and the rest of
the step is the very objects the eager backend uses, so the math is shared::

    pred   = sampler.predict(model_out, x_t, i)       # no autograd needed any more
    x_prev = guidance.update(sampler.step(pred, noise, i), pred, grad, i)

Unguided steps (no guidance, or DSG off-interval) run the UNet graph alone and report
distance 0, as :func:`idemrt.diffusion.guided_step` does.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from idemrt.errors import BackendError

from .graph_cache import StepGraphs
from .onnx_export import ExportedGraph

__all__ = ["GraphStepBackend"]


class GraphStepBackend:
    """``step(x_t, i, target, noise) -> (x_prev, distance)`` over exported graphs.

    Subclasses implement :meth:`_runner` (an exported graph and the batch size it is first
    needed for -> a callable from torch tensors to torch tensors on ``self.device``), and
    :meth:`_batch_bucket` if a runner serves only some batch sizes.
    """

    def __init__(self, spec, *, device, cache_dir=None, dynamic_hw: bool = False):
        if spec.guidance is not None and spec.codec is None:
            raise BackendError("guided sampling on an exporting backend needs StepSpec.codec")
        self.spec = spec
        self.device = torch.device(device)
        self.sampler = spec.sampler.to(self.device)
        self.graphs = StepGraphs(spec, cache_dir, dynamic_hw=dynamic_hw)
        self._runners: dict = {}

    def _runner(self, graph: ExportedGraph, batch: int):
        raise NotImplementedError

    def _batch_bucket(self, batch: int):
        """Batch sizes mapping to the same bucket share a runner (default: all of them)."""
        return None

    def _run(self, kind: str, shapes: tuple, *inputs: Tensor) -> tuple[Tensor, ...]:
        batch = inputs[0].shape[0]
        key = (kind, None if self.graphs.dynamic_hw else shapes, self._batch_bucket(batch))
        runner = self._runners.get(key)
        if runner is None:
            height, width = shapes[:2]
            graph = (self.graphs.step_gradient(height, width, shapes[2]) if kind == "step"
                     else self.graphs.unet(height, width))
            runner = self._runners[key] = self._runner(graph, batch)
        return runner(*inputs)

    def _coefficients(self, i: int, n: int) -> tuple[Tensor, Tensor]:
        """x0 = c_a·x_t - c_b·eps: the float32 casts of the schedule's float64 values, i.e. the
        numbers ``sampler.predict`` multiplies with."""
        schedule = self.sampler.schedule
        c_a = float(np.float32(schedule.sqrt_recip_alphas_cumprod[i]))
        c_b = float(np.float32(schedule.sqrt_recipm1_alphas_cumprod[i]))
        return (torch.full((n,), c_a, device=self.device), torch.full((n,), c_b, device=self.device))

    def prepare(self, shape, target_shape: Optional[tuple] = None) -> None:
        """Export (or load), set up and run once the graphs for x_t of ``shape`` (and targets of
        ``target_shape`` (C, h, w), needed with guidance), ahead of the first step."""
        n, _, height, width = shape
        if self.spec.guidance is not None and target_shape is None:
            raise ValueError("prepare() of a guided backend needs the target_shape (C, h, w)")
        x = torch.zeros(shape, device=self.device)
        t = torch.zeros(n, device=self.device)
        if self.spec.guidance is not None:
            target = torch.zeros((n, *target_shape), device=self.device)
            self._run("step", (height, width, tuple(target_shape)), x, t, target, t, t)
        # The UNet graph serves unguided steps: no guidance, or DSG off its interval.
        if self.spec.guidance is None or getattr(self.spec.guidance, "interval", 1) != 1:
            self._run("unet", (height, width), x, t)

    def step(self, x_t: Tensor, i, target: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(i, Tensor):
            i = int(i)
        if x_t.ndim != 4 or noise.shape != x_t.shape:
            raise ValueError(f"expected x_t and noise of one shape (N, C, H, W), got {tuple(x_t.shape)} "
                             f"and {tuple(noise.shape)}")
        spec, sampler = self.spec, self.sampler
        n, _, height, width = x_t.shape
        x_t = x_t.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        # The graphs take the original timesteps as float32 (exact for integers < 2^24).
        t = sampler.model_timesteps(i, n).to(torch.float32)
        with torch.no_grad():
            if spec.guidance is not None and bool(spec.guidance.active(i)):
                target = target.to(self.device, torch.float32)
                out, dist, grad = self._run("step", (height, width, tuple(target.shape[1:])),
                                            x_t, t, target, *self._coefficients(i, n))
                pred = sampler.predict(out, x_t, i)
                x_prev = spec.guidance.update(sampler.step(pred, noise, i), pred, grad, i)
                return x_prev, dist.clone()
            (out,) = self._run("unet", (height, width), x_t, t)
            return sampler.step(sampler.predict(out, x_t, i), noise, i), x_t.new_zeros(n)
