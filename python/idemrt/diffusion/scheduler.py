"""Step-level continuous batching: many decodes share the network one step at a time.

A guided decode is tens to hundreds of steps. Batching whole requests makes a request that
arrives one step late wait for the whole batch; here, as in LLM servers' iteration-level
batching, images join the running batch at the next step and leave when they are done.

* A **group** is the set of images that can share a batch: same image and target shape (one
  Decoder fixes the models, schedule and guidance). Each iteration advances every running image
  of one group by one step — each at its own step index (:meth:`GuidedSampler.advance`).
* Between two iterations, waiting images **join** their group's running batch (up to
  ``max_slots``) and finished, cancelled or timed-out ones **leave**. A finished attempt that
  needs a retry restarts in place (:meth:`GuidedSampler.finish`).
* Groups of different shapes **take turns**, round-robin, so no group starves another.
* Batches are padded to the next of ``slot_counts`` (default: the backend's ``slot_counts``, e.g.
  1, 2, 4, 8, 16 for CUDA graphs), unused slots masked, so a graph backend captures a few shapes.

Each image's result equals its decode alone with the same seed: samples are independent (per-sample
norms, per-sample step indices and scales) and each image draws its noise from its own generator.
The scheduler has no thread of its own: :meth:`StepScheduler.run` drives it until given jobs are
done (``Decoder.decode_batch``), :meth:`StepScheduler.step` is one iteration for a service loop.
Submitting, cancelling and reading stats are thread-safe; iterations must come from one thread.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

from torch import Tensor

from ..errors import DecodeError
from ..progress import progress_bar
from .guided_sampler import GuidedSampler, ImageState


class QueueFullError(RuntimeError):
    """The scheduler holds ``max_queue`` images already: retry later."""


class DeadlineExceeded(TimeoutError):
    """An image was still being decoded when its deadline passed."""


class JobResult(NamedTuple):
    x: Tensor  # (1, C, H, W) in [-1, 1], unclamped, float32
    distance: float  # constraint distance of the last step
    retries: int  # distance retries used
    scale: Optional[float]  # DPS scale of the final attempt (None without a scale)


@dataclass(eq=False)
class Job:
    """One image in the scheduler. ``future`` resolves to a :class:`JobResult`, or raises
    DecodeError / CancelledError / DeadlineExceeded."""

    state: ImageState
    future: Future = field(default_factory=Future)
    on_step: Optional[Callable[["Job"], None]] = None  # called after each step, in the loop's thread
    deadline: Optional[float] = None  # time.monotonic() value
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def steps_done(self) -> int:
        return self.state.steps_run

    def cancel(self) -> None:
        """Leave at the next step (the slot is freed then); the future is cancelled."""
        self.cancelled = True


class StepScheduler:
    """Continuous batching of :class:`Job`s over one :class:`GuidedSampler` (see the module doc).

    ``max_slots``: images per step of one group; ``max_queue``: images held (running and
    waiting) before :meth:`submit` refuses with :class:`QueueFullError`.
    """

    def __init__(self, sampler: GuidedSampler, *, max_slots: int = 16, max_queue: int = 256,
                 slot_counts: Optional[Sequence[int]] = None):
        if max_slots < 1 or max_queue < 1:
            raise ValueError(f"max_slots and max_queue must be >= 1, got {max_slots}, {max_queue}")
        self.sampler = sampler
        self.max_slots, self.max_queue = int(max_slots), int(max_queue)
        counts = slot_counts if slot_counts is not None else getattr(sampler.backend, "slot_counts", None)
        self.slot_counts = sorted({c for c in counts or () if c <= max_slots} | ({max_slots} if counts else set()))
        self._waiting: dict = collections.OrderedDict()  # group key -> deque of jobs not yet running
        self._running: dict = {}  # group key -> list of running jobs
        self._turn: collections.deque = collections.deque()  # group keys with work, in turn order
        self._lock = threading.Lock()
        self.work = threading.Condition(self._lock)  # notified when a job is submitted
        self.steps = 0  # iterations run
        self.step_seconds = 0.0  # of the last iteration
        self.slots_used = 0  # images in the last iteration's batch

    # -- submitting -----------------------------------------------------------------------------
    def submit(self, target: Tensor, seed: int, shape: Sequence[int], *, x_T: Optional[Tensor] = None,
               on_step=None, timeout: Optional[float] = None, warm: Optional[Tensor] = None) -> Job:
        """Queue one image (``target`` (1, ...), ``shape`` (1, C, H, W)); it joins a running batch
        at the next step of its group. ``timeout``: seconds until :class:`DeadlineExceeded`;
        ``warm``: the MSE decode (1, C, H, W) in [-1, 1], for a warm-started sampler."""
        with self._lock:
            if self.pending() >= self.max_queue:
                raise QueueFullError(f"the decode queue is full ({self.max_queue} images)")
        job = Job(self.sampler.start(target, seed, shape, x_T, warm=warm), on_step=on_step,
                  deadline=None if timeout is None else time.monotonic() + timeout)
        key = job.state.key()
        with self._lock:
            if key not in self._waiting and key not in self._running:
                self._turn.append(key)
            self._waiting.setdefault(key, collections.deque()).append(job)
            self.work.notify_all()
        return job

    def pending(self) -> int:
        """Images waiting or running (call with or without the lock: a snapshot)."""
        return sum(map(len, self._waiting.values())) + sum(map(len, self._running.values()))

    def stats(self) -> dict:
        with self._lock:
            waiting = sum(map(len, self._waiting.values()))
            running = sum(map(len, self._running.values()))
        return {"waiting": waiting, "running": running, "max_slots": self.max_slots,
                "slots_used": self.slots_used, "steps": self.steps, "step_seconds": self.step_seconds}

    # -- iterating ------------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: the next group in turn takes in waiting jobs, drops leaving ones and
        advances one step. Returns False when there was nothing to do."""
        with self._lock:
            if not self._turn:
                return False
            key = self._turn.popleft()
            running = self._running.setdefault(key, [])
            running[:] = [job for job in running if not self._leaves(job)]
            waiting = self._waiting.get(key, collections.deque())
            while waiting and len(running) < self.max_slots:
                job = waiting.popleft()
                if not self._leaves(job):
                    running.append(job)
        if running:
            t0 = time.perf_counter()
            self.sampler.advance([job.state for job in running], self._slots(len(running)))
            self.step_seconds, self.slots_used, self.steps = time.perf_counter() - t0, len(running), self.steps + 1
            for job in running:
                if job.on_step is not None:
                    job.on_step(job)
            running[:] = [job for job in running if job.state.running or not self._finished(job)]
        with self._lock:
            if running or self._waiting.get(key):
                self._turn.append(key)
            else:
                self._running.pop(key, None)
                self._waiting.pop(key, None)
        return True

    def run(self, jobs: Sequence[Job], progress: bool = False) -> None:
        """Iterate until every one of ``jobs`` is resolved (other jobs advance meanwhile)."""
        bar = progress_bar(self.sampler.num_steps, progress, "decoding", "step")
        while not all(job.future.done() for job in jobs):
            if not self.step():
                raise RuntimeError("the scheduler went idle with unresolved jobs")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(distance=f"{max(job.state.distance for job in jobs):.4g}", refresh=False)
        if bar is not None:
            bar.close()

    def fail_all(self, exc: BaseException) -> None:
        """Resolve every job with ``exc`` and forget them (after a step failed: their states are
        no longer trustworthy). The scheduler stays usable for new jobs."""
        with self._lock:
            jobs = [j for group in self._running.values() for j in group]
            jobs += [j for group in self._waiting.values() for j in group]
            self._running.clear()
            self._waiting.clear()
            self._turn.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    def _slots(self, n: int) -> int:
        return next((c for c in self.slot_counts if c >= n), n)

    def _leaves(self, job: Job) -> bool:
        """Cancelled or past its deadline: resolve its future and free its slot."""
        if job.cancelled:
            job.future.cancel() or job.future.set_exception(CancelledError())
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExceeded(f"not decoded within its deadline ({job.steps_done} steps run)"))
            return True
        return False

    def _finished(self, job: Job) -> bool:
        """An attempt is over: resolve the job (True), or keep it for its retry (False)."""
        state = job.state
        if not self.sampler.finish(state):
            return False
        if state.error:
            job.future.set_exception(DecodeError(state.error))
        else:
            scale = self.sampler.step_scale(state) if self.sampler.scale is not None else None
            job.future.set_result(JobResult(state.x, state.distance, state.retries, scale))
        return True


def sample_jobs(scheduler: StepScheduler, requests: Sequence[tuple], progress: bool = False) -> list:
    """Decode images through ``scheduler`` until all are done: ``requests`` are ``(target (1, ...),
    seed, shape (1, C, H, W), x_T or None[, warm])``; returns their :class:`JobResult` in order.
    Images of one shape share steps, shapes take turns. The first failure is raised (naming its
    image) once every job is resolved."""
    jobs = [scheduler.submit(target, seed, shape, x_T=x_T, warm=warm[0] if warm else None)
            for target, seed, shape, x_T, *warm in requests]
    scheduler.run(jobs, progress)
    errors = [(k, job.future.exception()) for k, job in enumerate(jobs) if job.future.exception() is not None]
    if errors:
        k, exc = errors[0]
        raise type(exc)(f"image {k}: {exc}; check the UNet checkpoint and preset, or lower --scale") from None
    return [job.future.result() for job in jobs]

