"""The guided step for backends that run exported graphs (onnxruntime, TensorRT).

The step-gradient graph is :func:`idemrt.diffusion.step.step_gradient` traced
(:mod:`idemrt.export.joint_graph`): it computes what needs the networks — ``model_out``,
``dist`` and ``grad = d dist / d x_t`` — from the step's sampler rows, and the rest of the step
is :func:`idemrt.diffusion.step.finish_step`, as on every backend::

    model_out, dist, grad = graph(x_t, t, target, rows)     # rows = sampler.rows(i), per sample
    x_prev, dist = finish_step(sampler, guidance, ..., noise, i, rows, scale)

With proximal guidance (PIR) the graph is :func:`idemrt.diffusion.step.proximal_x0` traced,
returning ``(model_out, x0', dist)``, and the step ends with :func:`~idemrt.diffusion.step.finish_proximal`.
Steps that the guidance skips for every sample (no guidance, or DSG off-interval) run the UNet
graph alone and report distance 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..diffusion.step import StepGradient, StepResult, finish_proximal, finish_step
from ..errors import BackendError
from .base import check_step_inputs, step_index

__all__ = ["GraphStepBackend"]


class GraphStepBackend:
    """``step(x_t, i, target, noise, scale=None) -> (x_prev, distance)`` over exported graphs.

    Subclasses implement :meth:`_runner` (an exported graph and the batch size it is first
    needed for -> a callable from torch tensors to torch tensors on ``self.device``), and
    :meth:`_batch_bucket` if a runner serves only some batch sizes.
    """

    slot_counts = None  # the batcher's batches run as they come (runners bucket batch sizes themselves)

    def __init__(self, spec, *, device, cache_dir=None, dynamic_hw: bool = False):
        from idemrt.export.graph_cache import StepGraphs

        if spec.guidance is not None and spec.codec is None:
            raise BackendError("guided sampling on an exporting backend needs StepSpec.codec")
        if spec.tile is not None:
            raise BackendError("the exported step graph runs the UNet on the whole image: tiled decoding "
                               "(DecodeConfig.tile) runs on the eager or fast backend")
        self.spec = spec
        self.device = torch.device(device)
        self.sampler = spec.sampler.to(self.device)
        self.graphs = StepGraphs(spec, cache_dir, dynamic_hw=dynamic_hw)
        self._runners: dict = {}

    def _runner(self, graph, batch: int):
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
            rows = self.sampler.rows(torch.zeros(n, dtype=torch.long, device=self.device))
            self._run("step", (height, width, tuple(target_shape)), x, t, target, rows)
        # The UNet graph serves unguided steps: no guidance, or DSG off its interval.
        if self.spec.guidance is None or self.spec.guidance.interval != 1:
            self._run("unet", (height, width), x, t)

    def step(self, x_t: Tensor, i, target: Tensor, noise: Tensor, scale=None) -> tuple[Tensor, Tensor]:
        spec, sampler = self.spec, self.sampler
        n, _, height, width = x_t.shape
        x_t = x_t.to(self.device, torch.float32)
        noise = noise.to(self.device, torch.float32)
        guided = spec.guidance is not None
        if guided:
            target = target.to(self.device, torch.float32)
        steps = check_step_inputs(self.device, sampler.num_steps, x_t, i, target, noise, guided=guided)
        i = step_index(i if isinstance(i, list) else steps, self.device)
        # The graphs take the original timesteps as float32 (exact for integers < 2^24).
        t = sampler.model_timesteps(i, n).to(torch.float32)
        with torch.no_grad():
            if guided and spec.guidance.step_kind == "proximal":  # PIR: the graph holds the data step
                rows = sampler.rows(i)
                _, x0, dist = self._run("step", (height, width, tuple(target.shape[1:])), x_t, t, target, rows)
                return StepResult(finish_proximal(sampler, spec.guidance, x_t, x0, noise, i, rows), dist.clone(),
                                  x0.clone())
            if guided and any(bool(spec.guidance.active(s)) for s in set(steps)):
                rows = sampler.rows(i)
                out, dist, grad = self._run("step", (height, width, tuple(target.shape[1:])), x_t, t, target, rows)
                g = StepGradient(out, sampler.predict_rows(out, x_t, rows), dist.clone(), grad)
                return finish_step(sampler, spec.guidance, g, noise, i, rows, scale)
            (out,) = self._run("unet", (height, width), x_t, t)
            pred = sampler.predict(out, x_t, i)
            return StepResult(sampler.step(pred, noise, i), x_t.new_zeros(n), pred.x0)
