"""The sampling loop, apart from any bitstream: per-image state advanced one step at a time.

Each image of a decode is an :class:`ImageState` — its x_t, its position in the respaced
schedule, its own generator, its constraint target, its DPS scale and its retries — so images
need not move in lockstep: :meth:`GuidedSampler.advance` steps any list of compatible states
(same shape and target shape) as one batch, each at its own step index, and images can join or
leave between two calls. The loop over them — which images share a step, when they join and
leave — is :class:`~idemrt.diffusion.scheduler.StepScheduler`'s, for a single decode as for a
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

Programs: how an image is sampled — its respacing's rows in the backend's step table (one table
may stack several respacings, :class:`~idemrt.diffusion.samplers.StackedSampler`), its DPS scale
and its warm start — is the image's :class:`Program`, so images of a 1000-step, a 100-step and a
warm-started 20-step decode advance in one batch, each at its own row.

Batch invariance: in the default mode a batch runs as one backend call, and an image's numbers can
depend on what else is in the batch (other kernels, other summation orders; DPS amplifies such
float differences over the steps: docs/serving.md gives the measured size). With
``deterministic=True`` every image runs its step as its own call of batch 1, so its result does
not depend on the batch or on when it joined — at the cost of batching.

Retries (:class:`~idemrt.diffusion.guidance.RetryPolicy`, per image): non-finite values -> the
DPS scale times ``nan_factor`` (then :class:`idemrt.DecodeError` when they are spent); a final
distance above the threshold -> the scale times ``factor``. The scale is per-sample data of the
step, so a retry runs on the same backend (and the same captured graphs) as the first attempt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .guidance import RetryPolicy
from .schedule import WarmStart


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
    def steps_run(self) -> int:
        """Network evaluations of one attempt."""
        return self.num_steps if self.warm_start is None else self.warm_start.position + 1


@dataclass
class ImageState:
    """One image being sampled. ``position`` is the next step index i (counting down to 0);
    -1 once its attempt is over. ``x`` is x_t (1, C, H, W) until then, the sample after."""

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
    steps_run: int = 0  # network evaluations, all attempts
    warm: Optional[Tensor] = None  # (1, C, H, W) x_mse in [-1, 1] of a warm start (each attempt restarts from it)
    program: Optional[Program] = None

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


class GuidedSampler:
    """The loop over a backend's ``step(x_t, i, target, noise, scale) -> (x_prev, distance)``.

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
        state.failed_at = None
        ws = state.program.warm_start
        if ws is None:
            state.x = self._noise([state], shape) if x_T is None else x_T.to(self.device, torch.float32)
            state.position = state.program.num_steps - 1
            return
        state.x = ws.sqrt_abar * state.warm + ws.sqrt_one_minus_abar * self._noise([state], shape)
        state.position = ws.position

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
    def advance(self, states: Sequence[ImageState], pad_to: Optional[int] = None) -> None:
        """One step for every running state (one batch; they must share :meth:`ImageState.key`).

        ``pad_to``: run a batch of this many slots, the unused ones masked — filled with a copy
        of the first image and zero noise, their results dropped (samples are independent, so
        they change nothing) — so that a backend with captured graphs sees few batch sizes."""
        states = [s for s in states if s.running]
        if not states:
            return
        if len({s.key() for s in states}) != 1:
            raise ValueError("advance() batches states of one shape and target shape only")
        n = len(states)
        shape = (n, *states[0].x.shape[1:])
        pad = max(0, (pad_to or n) - n)
        x = torch.cat([s.x for s in states] + [states[0].x] * pad)
        target = torch.cat([s.target for s in states] + [states[0].target] * pad)
        noise = self._noise(states, shape)
        rows = [s.row for s in states] + [states[0].row] * pad
        scales = [self.step_scale(s) for s in states] + [self.step_scale(states[0])] * pad
        if pad:
            noise = torch.cat([noise, noise.new_zeros((pad, *shape[1:]))])
        if self.deterministic:  # each image alone: its numbers do not depend on the batch
            outs = [self.backend.step(x[k : k + 1], rows[k], target[k : k + 1], noise[k : k + 1],
                                      torch.tensor(scales[k : k + 1], device=self.device)) for k in range(n)]
            x, dist = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        else:
            # Host ints: a backend that picks its graph from the indices (fast, ONNX) reads them
            # without a device sync; the others put them on the device themselves.
            i = rows[0] if len(set(rows)) == 1 else rows
            x, dist = self.backend.step(x, i, target, noise, torch.tensor(scales, device=self.device))
        positions = [s.position for s in states]
        check = any(p % self.check_every == 0 for p in positions)
        finite = (torch.isfinite(x).flatten(1).all(1) & torch.isfinite(dist)).tolist() if check else None
        for k, s in enumerate(states):
            s.x, s.steps_run = x[k : k + 1], s.steps_run + 1
            if finite is not None and not finite[k]:
                self._drain(s)
            s.position -= 1
            if s.done:
                s.distance = float(dist[k])

    def _drain(self, state: ImageState) -> None:
        """End an attempt that went non-finite at ``state.position``, drawing the noise its
        remaining steps would have drawn (the retry's draws then do not depend on when the
        failure was seen)."""
        state.failed_at = state.position
        for _ in range(state.position):
            torch.randn(state.x.shape[1:], generator=state.generator, device=self.noise_device)
        state.position = 0  # advance() moves it to -1: the attempt is over

    def release(self, state: ImageState) -> None:
        """The state leaves for good (finished, failed, cancelled): its slot is freed."""

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
                return True
            state.nan_tries += 1
        elif has_scale and bool(self.retry.needs_retry(torch.tensor([state.distance]), state.retries)):
            state.scale, state.retries, state.nan_tries = self.retry.next_scale(state.scale), state.retries + 1, 0
        else:
            return True
        self._begin_attempt(state, tuple(state.x.shape))
        return False
