"""The sampling loop, apart from any bitstream: per-image state advanced one step at a time.

Each image of a decode is an :class:`ImageState` — its x_t, its position in the respaced
schedule, its own generator, its constraint target, its DPS scale and its retries — so images
need not move in lockstep: :meth:`GuidedSampler.advance` steps any list of compatible states
(same shape and target shape) as one batch, each at its own step index, and images can join or
leave between two calls. The loop over them — which images share a step, when they join and
leave — is :class:`~idemrt.batching.StepBatcher`'s, for a single decode as for a
service.

Random numbers (documented order, so a decode is reproducible and the same alone, in a batch or
joining a running batch late): each image owns one ``torch.Generator`` seeded with its seed, on
``noise_device``. From it the sampler draws x_T ~ N(0, I) of the image's shape first, then one
noise tensor of the same shape per step, for i = N-1 down to 0 (the last one is drawn but
multiplied by 0, as in the reference). A warm start (``warm_start``, :meth:`Schedule.warm_start`)
draws eps of the image's shape first instead of x_T — x_t0 = sqrt(abar)·x_mse + sqrt(1-abar)·eps —
then one noise tensor per step for i = position down to 0. A retry draws a fresh x_T and its steps' noise from the
same generator, continuing after the full previous attempt (an attempt cut short by non-finite
values draws its remaining steps' noise first, so a retry does not depend on when the failure
was seen).

Persistent batch (as vLLM's persistent input batch): images of one group — one sampler, one image
and target shape — live in a :class:`SlotBatch`, slot-indexed device buffers of x_t, the target,
the noise, the DPS scale and the step row. An image joining the batch writes its slot; one leaving
(finished, failed, cancelled, or parked for another: its x_t is copied out) frees it, and the last
slot moves into the hole, so the images always hold slots 0..n-1. A step reads the buffers as they
are — no concatenation, no split, no host-to-device copy of per-image values: the noise is drawn
into each image's slot from its own generator (so an image's random numbers do not depend on its
slot; a ``noise_device`` other than the batch's costs one copy of the noise per step), the rows
count down on the device beside their host copy, and scales and rows are written only when they
change (a join, a retry). Masked slots (``pad_to``) hold what their last image left and repeat the
first image's row; their results are dropped. Finiteness and distances stay on the device and come back in one
small copy every ``check_every`` steps, which includes each image's last step. Each step keeps
its x0 estimate per image (``ImageState.x0``): a decode service's preview, at no extra cost.

Programs: how an image is sampled — its respacing's rows in the backend's step table (one table
may stack several respacings, :class:`~idemrt.diffusion.samplers.StackedSampler`), its DPS scale
and its warm start — is the image's :class:`Program`, so images of a 1000-step, a 100-step and a
warm-started 20-step decode advance in one batch, each at its own row.

Batch invariance: in the default mode a batch runs as one backend call, and an image's numbers can
depend on what else is in the batch (other kernels, other summation orders; DPS amplifies such
float differences over the steps: docs/serving.md gives the measured size). With
``deterministic=True`` every image runs its step as its own call of batch 1, so its result does
not depend on the batch or on when it joined — at the cost of batching.

Tiled images: with a tiling backend (``StepSpec.tile``) an image larger than the window holds no
slot; its step runs in units of windows (:mod:`.window_steps`), within the pixel budget
:meth:`GuidedSampler.advance` is given, so it may span several calls of :meth:`advance`. Its noise
is drawn when its step ends (the same order: one draw a step), its checks follow ``check_every``.
Images of every size of such a sampler are one group (:meth:`GuidedSampler.group_key`).

Retries (:class:`~idemrt.diffusion.guidance.RetryPolicy`, per image): non-finite values -> the
DPS scale times ``nan_factor`` (then :class:`idemrt.DecodeError` when they are spent); a final
distance above the threshold -> the scale times ``factor``. The scale is per-sample data of the
step, so a retry runs on the same backend (and the same captured graphs) as the first attempt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..backends.base import StepRows
from .guidance import RetryPolicy
from .schedule import WarmStart
from .window_steps import WindowSteps


@dataclass(frozen=True)
class Program:
    """How one image is sampled. ``offset``: the first row of its respacing in the backend's step
    table; ``num_steps``: the respacing's length; ``scale``: the DPS step length (None: the
    guidance has none, and no retry is made); ``warm_start``: where it starts from its MSE decode
    (None: from x_T at the last step)."""

    num_steps: int
    scale: Optional[float] = None
    warm_start: Optional[WarmStart] = None
    offset: int = 0
    name: str = ""

    @property
    def evaluations(self) -> int:
        """Network evaluations of one attempt."""
        return self.num_steps if self.warm_start is None else self.warm_start.position + 1


@dataclass(eq=False)
class ImageState:
    """One image being sampled. ``position`` is the next step index i (counting down to 0);
    -1 once its attempt is over. ``x`` is x_t (1, C, H, W) until then, the sample after — a view
    of its slot while it holds one in a :class:`SlotBatch` (``slot``), its own tensor otherwise."""

    x: Tensor
    target: Tensor  # (1, ...) on the decoding device
    generator: torch.Generator
    scale: float  # the attempt's base DPS scale (a distance retry multiplies it)
    position: int
    distance: float = 0.0  # of the last step run (measured at that step's x0)
    retries: int = 0  # distance retries used
    nan_tries: int = 0  # non-finite retries used in this attempt
    failed_at: Optional[int] = None  # step index at which this attempt went non-finite
    error: Optional[str] = None  # set when the image cannot be decoded (retries spent)
    evaluations: int = 0  # network evaluations, all attempts
    warm: Optional[Tensor] = None  # (1, C, H, W) x_mse in [-1, 1] of a warm start (each attempt restarts from it)
    program: Optional[Program] = None
    slot: Optional[int] = None  # its slot in ``batch`` while it holds one
    batch: Optional["SlotBatch"] = field(default=None, repr=False)
    x0: Optional[Tensor] = field(default=None, repr=False)  # (1, C, H, W): the last step's x0 estimate (held in a batch)
    window_work: object = field(default=None, repr=False)  # a tiled image's step in progress (window_steps.WindowWork)

    @property
    def row(self) -> int:
        """The backend table row of the next step."""
        return self.program.offset + self.position

    @property
    def running(self) -> bool:
        return self.position >= 0

    @property
    def done(self) -> bool:
        return not self.running

    def key(self) -> tuple:
        """States with equal keys can share a batch."""
        return (tuple(self.x.shape), tuple(self.target.shape), self.x.device)


class SlotBatch:
    """The persistent batch of one group (see the module doc): device buffers of ``capacity``
    slots, images in slots 0..n-1 (``states``), the rows also on the host (``rows_host``)."""

    def __init__(self, x_shape: tuple, target_shape: tuple, device: torch.device, noise_device: torch.device):
        self.x_shape, self.target_shape = tuple(x_shape), tuple(target_shape)
        self.device, self.noise_device = device, noise_device
        self.states: list = []
        self.capacity = 0
        self.rows_host: list = []

    def reserve(self, slots: int) -> None:
        """Room for ``slots`` (grown by doubling; the occupied slots copied over, their views rebound)."""
        if slots <= self.capacity:
            return
        old, cap = self.capacity, max(slots, 2 * self.capacity)
        dev = self.device
        buffers = {"x": torch.zeros((cap, *self.x_shape), device=dev),
                   "target": torch.zeros((cap, *self.target_shape), device=dev),
                   "noise": torch.zeros((cap, *self.x_shape), device=dev),
                   "scale": torch.zeros(cap, device=dev),
                   "rows": torch.zeros(cap, dtype=torch.long, device=dev),
                   "dist": torch.zeros(cap, device=dev)}
        if self.noise_device != dev:  # drawn where the generators are, then one copy per step
            buffers["noise_host"] = torch.zeros((cap, *self.x_shape), device=self.noise_device,
                                                pin_memory=self.noise_device.type == "cpu" and dev.type == "cuda")
        for name, buf in buffers.items():
            if old:
                buf[:old].copy_(getattr(self, name)[:old])
            setattr(self, name, buf)
        self.rows_host += [0] * (cap - old)
        self.capacity = cap
        for k, state in enumerate(self.states):
            state.x = self.x[k : k + 1]

    def join(self, state: ImageState) -> None:
        """Write a state into the next free slot (its x_t, target, scale and row)."""
        k = len(self.states)
        self.reserve(k + 1)
        self.x[k].copy_(state.x[0])
        self.target[k].copy_(state.target[0])
        self.states.append(state)
        state.slot, state.batch, state.x = k, self, self.x[k : k + 1]

    def write(self, state: ImageState, scale: float) -> None:
        """The per-image values of a state's slot that change only at a join or a retry."""
        k = state.slot
        self.scale[k] = scale
        self.rows[k] = self.rows_host[k] = state.row

    def leave(self, state: ImageState) -> None:
        """Free a state's slot: its x_t copied out; the last slot moves into the hole."""
        k = state.slot
        state.x, state.x0, state.slot, state.batch = state.x.clone(), None, None, None
        last = self.states.pop()
        if last is state:
            return
        for buf in (self.x, self.target, self.scale, self.rows):
            buf[k].copy_(buf[len(self.states)])
        self.rows_host[k] = self.rows_host[len(self.states)]
        self.states[k] = last
        last.slot, last.x = k, self.x[k : k + 1]


class GuidedSampler:
    """The loop over a backend's ``step(x_t, i, target, noise, scale) -> (x_prev, distance)`` and
    the step's x0 (:class:`~idemrt.diffusion.step.StepResult`).

    ``num_steps``: the respaced schedule's length; ``scale``: the guidance's default DPS scale
    (None when the guidance has none: no retry then); ``check_every``: how often (in steps) the
    states are checked for non-finite values, one host sync each (non-finite values never heal,
    so a check every few steps is enough); ``warm_start``: where and how images start from their
    MSE decode (:meth:`~idemrt.diffusion.schedule.Schedule.warm_start`; None: from x_T). These
    make the default :class:`Program`; :meth:`start` takes another one per image.
    ``deterministic``: one backend call per image (see the module doc).
    """

    def __init__(self, backend, num_steps: int, *, device, scale: Optional[float] = None,
                 retry: RetryPolicy = RetryPolicy(), noise_device=None, check_every: int = 10,
                 progress: bool = False, warm_start: Optional[WarmStart] = None, deterministic: bool = False):
        self.backend = backend
        self.program = Program(int(num_steps), scale, warm_start)
        self.device = torch.device(device)
        self.noise_device = torch.device(noise_device) if noise_device is not None else self.device
        self.retry = retry
        self.check_every = max(1, int(check_every))
        self.deterministic = bool(deterministic)
        self._batches: dict = {}  # ImageState.key() -> SlotBatch
        # A tiling backend's images larger than its window step in windows (window_steps), the others as before.
        self.windows = WindowSteps(backend) if backend.spec.tile is not None else None

    @property
    def num_steps(self) -> int:
        return self.program.num_steps

    # -- per-image state ----------------------------------------------------------------------
    def start(self, target: Tensor, seed: int, shape: Sequence[int], x_T: Optional[Tensor] = None,
              warm: Optional[Tensor] = None, program: Optional[Program] = None) -> ImageState:
        """A new image at its first step: x_T drawn from its generator (or ``x_T`` (1, C, H, W)), or
        with a warm start, x_t0 from ``warm`` (1, C, H, W), the MSE decode in [-1, 1]. ``program``:
        the image's (default: this sampler's)."""
        program = self.program if program is None else program
        if (program.warm_start is not None) != (warm is not None):
            raise ValueError("a warm-started program needs warm= (the MSE decode), and only it takes one")
        if warm is not None and x_T is not None:
            raise ValueError("pass x_T or warm, not both")
        gen = torch.Generator(self.noise_device).manual_seed(int(seed))
        state = ImageState(x=x_T, target=target.to(self.device), generator=gen,
                           scale=program.scale if program.scale is not None else math.nan, position=-1,
                           warm=None if warm is None else warm.to(self.device, torch.float32), program=program)
        self._begin_attempt(state, tuple(shape), x_T)
        return state

    def _begin_attempt(self, state: ImageState, shape: tuple, x_T: Optional[Tensor] = None) -> None:
        state.failed_at, state.window_work = None, None
        ws = state.program.warm_start
        if ws is None:
            x = self._noise([state], shape) if x_T is None else x_T.to(self.device, torch.float32)
            state.position = state.program.num_steps - 1
        else:
            x = ws.sqrt_abar * state.warm + ws.sqrt_one_minus_abar * self._noise([state], shape)
            state.position = ws.position
        if state.slot is None:
            state.x = x
        else:  # a retry in place: its slot takes the new x_t, scale and row
            state.x.copy_(x)
            state.batch.write(state, self.step_scale(state))

    def _noise(self, states: Sequence[ImageState], shape: tuple) -> Tensor:
        noise = torch.stack([torch.randn(shape[1:], generator=s.generator, device=self.noise_device)
                             for s in states])
        return noise.to(self.device, non_blocking=True)

    @staticmethod
    def has_scale(state: ImageState) -> bool:
        return state.program.scale is not None

    def step_scale(self, state: ImageState) -> float:
        """The DPS scale of the state's next step: the attempt's, shrunk after non-finite tries."""
        return state.scale * self.retry.nan_factor ** state.nan_tries

    # -- one step of a batch --------------------------------------------------------------------
    def group_key(self, state: ImageState) -> tuple:
        """States of one group can share an iteration (:class:`~idemrt.batching.StepBatcher`): of one
        key (:meth:`ImageState.key`); with a tiling backend, of any size (each size its own step call,
        tiled images in windows)."""
        return state.key() if self.windows is None else ("any size", state.target.device)

    def tiled(self, state: ImageState) -> bool:
        """Whether the state's image steps in windows (larger than a tiling backend's window)."""
        return self.windows is not None and self.windows.tiles(*state.x.shape[-2:])

    def cost(self, state: ImageState) -> int:
        """Pixels the state's next iteration takes at least: its own, or a tiled image's next unit of
        windows (:mod:`.window_steps`)."""
        if not self.tiled(state):
            return int(state.x.shape[-2] * state.x.shape[-1])
        return self.windows.unit_windows(state) * self.windows.tiled.window ** 2

    def advance(self, states: Sequence[ImageState], pad_to=None, pixel_budget: Optional[int] = None) -> None:
        """One iteration for every running state: one batched step of each image size, and units of
        tiled images' steps (:mod:`.window_steps`) within ``pixel_budget`` pixels of windows (None:
        each tiled image's whole step).

        The states hold the slots of their size's :class:`SlotBatch`: those not in the batch yet
        join it, and those of the batch not among ``states`` leave it (parked: their x_t is kept).
        ``pad_to``: run a batch of this many slots (an int, or a function of the images' count), the
        unused ones masked — their results dropped (samples are independent, so they change
        nothing) — so that a backend with captured graphs sees few batch sizes."""
        states = [s for s in states if s.running]
        if not states:
            return
        if self.windows is None:  # one batch of one key, as a sampler without tiling always stepped
            key, tiled = states[0].key(), []
            if any(s.key() != key for s in states):
                raise ValueError("advance() batches states of one shape and target shape only")
            by_key = {key: states}
        else:
            tiled, by_key = [s for s in states if self.tiled(s)], {}
            for s in states:
                if s not in tiled:
                    by_key.setdefault(s.key(), []).append(s)
        for key, group in by_key.items():
            n = len(group)
            self._advance_batch(key, group, pad_to(n) if callable(pad_to) else max(n, pad_to or n))
        if tiled:
            window = self.windows.tiled.window ** 2
            budget = None if pixel_budget is None else max(1, pixel_budget // window)
            self.windows.run(tiled, budget, self, self.deterministic)

    def _advance_batch(self, key: tuple, states: list, slots: int) -> None:
        """One batched step of ``states`` (of one key) in their SlotBatch, padded to ``slots``."""
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = SlotBatch(key[0][1:], key[1][1:], self.device, self.noise_device)
        stepping = {id(s) for s in states}
        for s in [s for s in batch.states if id(s) not in stepping]:
            batch.leave(s)
        for s in states:
            if s.batch is not batch:
                batch.join(s)
                batch.write(s, self.step_scale(s))
        n = len(batch.states)
        batch.reserve(slots)
        if slots > n:  # masked slots repeat the first row, so that a backend decides as for the images
            batch.rows[n:slots].copy_(batch.rows[0].expand(slots - n))
            batch.rows_host[n:slots] = [batch.rows_host[0]] * (slots - n)
        self._draw_noise(batch)
        rows_host = batch.rows_host[:slots]
        x, target, noise, scale = (batch.x[:slots], batch.target[:slots], batch.noise[:slots], batch.scale[:slots])
        if self.deterministic:  # each image alone: its numbers do not depend on the batch
            for k, s in enumerate(batch.states):
                out = self.backend.step(x[k : k + 1], rows_host[k], target[k : k + 1], noise[k : k + 1],
                                        scale[k : k + 1])
                x[k : k + 1].copy_(out[0])
                batch.dist[k : k + 1].copy_(out[1])
                s.x0 = out.x0
        else:
            # One row for all: the int (as a lone decode always ran); else the rows on both sides.
            i = rows_host[0] if rows_host.count(rows_host[0]) == slots else StepRows(rows_host, batch.rows[:slots])
            out = self.backend.step(x, i, target, noise, scale)
            x.copy_(out[0])
            batch.dist[:slots].copy_(out[1])
            for k, s in enumerate(batch.states):
                s.x0 = out.x0[k : k + 1]
        self._after_step(batch, n)

    # -- a tiled image's step, ended by window_steps ------------------------------------------------
    def step_noise(self, state: ImageState) -> Tensor:
        """The step's noise, from the image's generator (the documented order: one draw a step)."""
        return self._noise([state], tuple(state.x.shape))

    def step_scales(self, state: ImageState) -> Tensor:
        return torch.full((1,), self.step_scale(state), device=self.device)

    def step_ended(self, state: ImageState, result) -> None:
        """A tiled image's step is over: its x_t moves on, with the bookkeeping of :meth:`_after_step`."""
        x_prev, dist = result
        state.x, state.x0 = x_prev, result.x0
        state.evaluations += 1
        if state.position % self.check_every == 0:
            finite, distance = torch.stack(((torch.isfinite(x_prev).all() & torch.isfinite(dist).all()).float(),
                                            dist.reshape(()))).tolist()
            if not finite:
                self._drain(state)
            state.position -= 1
            if state.done:
                state.distance = distance
            return
        state.position -= 1

    def _draw_noise(self, batch: SlotBatch) -> None:
        """Each image's step noise into its slot, from its own generator (the documented order)."""
        noise = batch.noise if batch.noise_device == batch.device else batch.noise_host
        for k, s in enumerate(batch.states):
            torch.randn(batch.x_shape, generator=s.generator, out=noise[k])  # on the generator's device, as out
        if noise is not batch.noise:  # not non_blocking: the next step overwrites the host buffer
            batch.noise[: len(batch.states)].copy_(noise[: len(batch.states)])

    def _after_step(self, batch: SlotBatch, n: int) -> None:
        """The host's bookkeeping of a step: positions and rows count down; every ``check_every``
        steps (and at every image's last) one small copy reads finiteness and distances back."""
        states = batch.states
        check = any(s.position % self.check_every == 0 for s in states)
        flags = None
        if check:
            finite = torch.isfinite(batch.x[:n]).flatten(1).all(1) & torch.isfinite(batch.dist[:n])
            flags = torch.stack((finite.float(), batch.dist[:n])).tolist()
        batch.rows[:n].sub_(1)
        for k, s in enumerate(list(states)):
            s.evaluations += 1
            batch.rows_host[k] -= 1
            if flags is not None and not flags[0][k]:
                self._drain(s)
            s.position -= 1
            if s.done:
                s.distance = flags[1][k]

    def _drain(self, state: ImageState) -> None:
        """End an attempt that went non-finite at ``state.position``, drawing the noise its
        remaining steps would have drawn (the retry's draws then do not depend on when the
        failure was seen)."""
        state.failed_at = state.position
        for _ in range(state.position):
            torch.randn(state.x.shape[1:], generator=state.generator, device=self.noise_device)
        state.position = 0  # advance() moves it to -1: the attempt is over

    def release(self, state: ImageState) -> None:
        """The state leaves its slot (finished, failed, cancelled); its x is kept. A no-op
        without one. An emptied batch gives its buffers back."""
        state.window_work = None
        batch = state.batch
        if batch is None:
            return
        batch.leave(state)
        if not batch.states:
            self._batches = {k: b for k, b in self._batches.items() if b is not batch}

    def slots_used(self) -> int:
        """Slots held in this sampler's batches."""
        return sum(len(b.states) for b in self._batches.values())

    # -- after an attempt -----------------------------------------------------------------------
    def finish(self, state: ImageState) -> bool:
        """Decide about a state whose attempt is over: True if it is final (a result or an
        ``error``), False if it was restarted for a retry (then keep advancing it)."""
        if state.running:
            raise ValueError("finish() of a state that is still running")
        has_scale = self.has_scale(state)
        if state.failed_at is not None:
            if not has_scale or state.nan_tries >= self.retry.nan_retries:
                tried = f" and {state.nan_tries} retries down to scale {self.step_scale(state):g}" if has_scale else ""
                state.error = f"the sampler produced non-finite values at step {state.failed_at}{tried}"
                self.release(state)
                return True
            state.nan_tries += 1
        elif has_scale and bool(self.retry.needs_retry(torch.tensor([state.distance]), state.retries)):
            state.scale, state.retries, state.nan_tries = self.retry.next_scale(state.scale), state.retries + 1, 0
        else:
            self.release(state)
            return True
        self._begin_attempt(state, tuple(state.x.shape))
        return False
