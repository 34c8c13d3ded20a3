"""Tiled images' steps in windows: windows are the unit of batching, and a step may span iterations.

A tiled image (:mod:`.tiling`) of K windows costs K window evaluations of the UNet per step (2K
with the guided step's backward). Run whole, one step of a 2048² image is a batch of a hundred
windows that nothing can share or interrupt. Here its step is cut into **units** — at most
``chunk`` windows of one image, in window order — and an iteration runs as many units as its
**window budget** allows, round-robin over the images in the order given (most urgent first), so a
large image advances within the budget beside small ones instead of holding the device::

    fwd units ─UNet, no autograd─▶ Σ W_k·out_k into the image's output   (all K windows)
         │ last one: pred, dist and d dist/d out through the operator  (step.output_gradient)
    bwd units ─UNet again, VJP of W_k·(d dist/d out)_k─▶ Σ into d dist/d x_t   (all K windows)
         │ last one: the update, with the step's noise               (step.finish_step)

The math is :mod:`.step`'s, cut at the model: the gradient is the prediction's direct part plus
the windows' VJPs (chain rule), as :class:`~.tiling.TiledModel`'s autograd function computes it in
one go — the same windows, weights and order (tested equal). Unguided steps, steps DSG skips, and
PIR's proximal steps have no backward units. The codec operator runs on the whole image (in tiles
above ``Tiling.operator_tile``: the backend's operator function).

Batching: units of several images run in one UNet call, windows stacked (each at its own image's
timestep), at most ``chunk`` windows a call, one call per window size. With ``deterministic``
every unit is its own call — an image's windows always meet the UNet in the same groups — so
its numbers do not depend on the other images, the budget, or when it was preempted.

State: a step in progress is the image's :class:`WindowWork` (its accumulators); the image's x_t
does not change until the step ends, so a parked image resumes where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .step import (StepResult, finish_proximal, finish_step, output_gradient, proximal_from_output,
                   unguided_from_output)
from .tiling import TiledModel, window_count

__all__ = ["WindowSteps", "WindowWork"]


@dataclass(eq=False)
class WindowWork:
    """One image's step in progress: ``phase`` "fwd" or "bwd", ``next`` its next window."""

    phase: str = "fwd"
    next: int = 0
    out: Optional[Tensor] = None  # the blended model output (1, C_out, H, W)
    grad: Optional[Tensor] = None  # Σ of the windows' VJPs (1, C, H, W)
    g_out: Optional[Tensor] = field(default=None, repr=False)  # d dist / d out
    partial: object = field(default=None, repr=False)  # the StepGradient before the windows' VJPs


class WindowSteps:
    """Steps of tiled images for a backend that exposes its pieces: ``model_output(x, t)`` (the
    UNet function; on a window it runs the UNet itself), ``apply_operator(x0)``, ``sampler`` and
    ``spec`` (its guidance and :class:`~.tiling.Tiling`)."""

    def __init__(self, backend):
        spec = backend.spec
        self.backend, self.sampler, self.guidance = backend, backend.sampler, spec.guidance
        self.tiled = TiledModel.for_prior(backend.model_output, spec.tile, spec.unet)
        self.chunk = self.tiled.chunk

    def tiles(self, height: int, width: int) -> bool:
        return self.tiled.tiles(height, width)

    def windows(self, height: int, width: int) -> int:
        """Windows of an image of this size (1 if it is not tiled)."""
        return window_count(height, width, self.tiled.window, self.tiled.stride)

    def unit_windows(self, state) -> int:
        """Windows of the state's next unit."""
        work = state.window_work
        k = 0 if work is None else work.next
        return min(self.chunk, self.windows(*state.x.shape[-2:]) - k)

    # -- one iteration ------------------------------------------------------------------------------
    def run(self, states: Sequence, budget: Optional[int], loop, deterministic: bool = False) -> list:
        """Run units of ``states`` (most urgent first) until ``budget`` windows are spent (None: until
        every state's step is done; the first unit always runs) or every state has ended one step.
        ``loop`` (the :class:`~.guided_sampler.GuidedSampler`) gives a step's noise
        (``step_noise(state)``, drawn when the step ends, in the documented order) and DPS scale
        (``step_scales(state)``, (1,)) and takes its result (``step_ended(state, result)``).
        Returns the states whose step ended, in order."""
        active, done, spent = list(states), [], 0
        while active:
            units = []
            for state in active:
                n = self.unit_windows(state)
                if budget is not None and spent + n > budget and spent > 0:
                    break
                units.append((state, n))
                spent += n
            if not units:
                break
            for phase in ("fwd", "bwd"):
                batch = [(s, n) for s, n in units if self._work(s).phase == phase]
                for group in ([[u] for u in batch] if deterministic else [batch]):
                    if group:
                        self._run_windows(phase, group)
            for state, n in units:
                if self._advance(state, n, loop):
                    done.append(state)
                    active.remove(state)
            if budget is not None and spent >= budget:
                break
        return done

    def _work(self, state) -> WindowWork:
        if state.window_work is None:
            state.window_work = WindowWork()
        return state.window_work

    def _pairs(self, units):
        """``(state, layout, k)`` of each window of ``units``, grouped by window size."""
        by_size: dict = {}
        for state, n in units:
            layout = self.tiled.layout(*state.x.shape[-2:], state.x.device, state.x.dtype)
            k0 = self._work(state).next
            by_size.setdefault(layout.size, []).extend((state, layout, k) for k in range(k0, k0 + n))
        return by_size

    def _run_windows(self, phase: str, units) -> None:
        """The units' windows through the UNet, ``chunk`` windows a call: forward (accumulating the
        blended output) or the VJP of the blended output's gradient (accumulating d dist/d x_t)."""
        for (h, w), pairs in self._pairs(units).items():
            for s in range(0, len(pairs), self.chunk):
                part = pairs[s:s + self.chunk]
                win = torch.stack([st.x[0, :, y:y + h, x:x + w] for st, lay, k in part for y, x in [lay.offsets[k]]])
                t = torch.cat([self.sampler.model_timesteps(st.row, 1) for st, _, _ in part])
                if phase == "fwd":
                    with torch.no_grad():
                        out = self.tiled.model(win, t)
                    for j, (st, lay, k) in enumerate(part):
                        work, (y, x) = st.window_work, lay.offsets[k]
                        if work.out is None:
                            work.out = out.new_zeros((1, out.shape[1], *st.x.shape[-2:]))
                        work.out[0, :, y:y + h, x:x + w] += lay.weights[k].to(out.dtype) * out[j]
                    continue
                # the blend's adjoint: each window's share of the output's gradient
                g_out = torch.stack([st.window_work.g_out[0, :, y:y + h, x:x + w] * lay.weights[k]
                                     for st, lay, k in part for y, x in [lay.offsets[k]]])
                with torch.enable_grad():
                    win = win.detach().requires_grad_(True)
                    out = self.tiled.model(win, t)
                    (g_win,) = torch.autograd.grad(out, win, g_out.to(out.dtype))
                for j, (st, lay, k) in enumerate(part):
                    work, (y, x) = st.window_work, lay.offsets[k]
                    if work.grad is None:
                        work.grad = torch.zeros_like(st.x)
                    work.grad[0, :, y:y + h, x:x + w] += g_win[j].to(st.x.dtype)

    def _advance(self, state, n: int, loop) -> bool:
        """After a unit of ``n`` windows: move on; at the end of a phase, the step's next part.
        True when the step ended (``loop.step_ended`` was called)."""
        work = state.window_work
        work.next += n
        if work.next < self.windows(*state.x.shape[-2:]):
            return False
        i, x, g, sampler = state.row, state.x, self.guidance, self.sampler
        rows = sampler.rows(i)
        if work.phase == "fwd" and g is not None and g.step_kind != "proximal" and g.active(i):
            work.partial, work.g_out = output_gradient(self.backend.apply_operator, sampler, x, work.out, rows,
                                                       state.target)
            work.phase, work.next = "bwd", 0
            return False
        noise = loop.step_noise(state)
        if work.phase == "bwd":
            partial = work.partial._replace(grad=work.partial.grad + work.grad)
            result = finish_step(sampler, g, partial, noise, i, rows, loop.step_scales(state))
        elif g is not None and g.step_kind == "proximal":
            p = proximal_from_output(self.backend.apply_operator, sampler, g, x, work.out, rows, state.target)
            result = StepResult(finish_proximal(sampler, g, x, p.x0, noise, i, rows), p.dist, p.x0)
        else:  # unguided, or a step the guidance skips
            result = unguided_from_output(sampler, x, work.out, i, noise)
        state.window_work = None
        loop.step_ended(state, result)
        return True
