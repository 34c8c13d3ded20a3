"""Step-level continuous batching: many decodes share the network one step at a time.

A guided decode is tens to hundreds of steps. Batching whole requests makes a request that
arrives one step late wait for the whole batch; here, as in LLM servers' iteration-level
batching, images join the running batch at the next step and leave when they are done.

An iteration is three parts, as in vLLM's engine core:

* :meth:`StepScheduler.schedule` — pure bookkeeping, no device work: drops cancelled and
  timed-out jobs, picks the **group** to step (images that can share a batch: one
  :class:`GuidedSampler` — one backend and step table — and one image and target shape), chooses
  its batch within the **budget** (``max_slots`` images and ``pixel_budget`` pixels per step) by
  **priority**, then earliest deadline, then arrival, and returns a :class:`SchedulerOutput`: who
  runs, who joined, who was **preempted**.
* :meth:`StepScheduler.execute` — the device work: one batched step of the plan's images, each
  at its own row of the step table (:meth:`GuidedSampler.advance`).
* :meth:`StepScheduler.update_from_output` — progress callbacks, finished attempts resolved or
  restarted for a retry.

Groups: the group of the most urgent job (highest priority) steps; groups tied at the top
priority take turns, round-robin. Within a group, running images keep their slots against
waiting ones of the same priority (no thrashing); a waiting image of *higher* priority takes the
slot of the lowest-ranked running one, which is **parked**: its x_t, position and generator are
its whole state, so it resumes later exactly where it stopped (with ``deterministic`` sampling,
to the same bits as an uninterrupted run).

Request states (:class:`RequestStatus`): waiting → running → finished, or cancelled / deadline /
failed; running → preempted → running. Admission (:meth:`StepScheduler.admit`) is atomic: the
count of held images is checked and raised under one lock hold, so concurrent submitters cannot
overfill the queue.

``policy="static"`` is the request-level baseline a load study compares against (as
``@serve.batch`` batches): a group's batch starts when it is full or its oldest image has waited
``batch_wait_s``, and runs to its end with nobody joining; no priorities, no preemption.

Batches are padded to the next of ``slot_counts`` (default: the backend's ``slot_counts``, e.g.
1, 2, 4, 8, 16 for CUDA graphs), unused slots masked, so a graph backend captures a few shapes.

The scheduler has no thread of its own: :meth:`StepScheduler.run` drives it until given jobs are
done (``Decoder.decode_batch``), :meth:`StepScheduler.step` is one iteration for a service loop.
Admitting, submitting, cancelling and reading stats are thread-safe; iterations must come from
one thread.
"""
from __future__ import annotations

import collections
import enum
import itertools
import math
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

from torch import Tensor

from ..errors import DecodeError
from ..progress import progress_bar
from .guided_sampler import GuidedSampler, ImageState, Program


class QueueFullError(RuntimeError):
    """The scheduler holds ``max_queue`` images already: retry later."""


class DeadlineExceeded(TimeoutError):
    """An image was still being decoded when its deadline passed."""


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.DEADLINE, RequestStatus.FAILED)


class JobResult(NamedTuple):
    x: Tensor  # (1, C, H, W) in [-1, 1], unclamped, float32
    distance: float  # constraint distance of the last step
    retries: int  # distance retries used
    scale: Optional[float]  # DPS scale of the final attempt (None without a scale)


_arrival = itertools.count()
POLICIES = ("continuous", "static")


@dataclass(eq=False)
class Job:
    """One image in the scheduler. ``future`` resolves to a :class:`JobResult`, or raises
    DecodeError / CancelledError / DeadlineExceeded."""

    state: ImageState
    sampler: GuidedSampler
    future: Future = field(default_factory=Future)
    on_step: Optional[Callable[["Job"], None]] = None  # called after each step, in the loop's thread
    deadline: Optional[float] = None  # time.monotonic() value
    priority: int = 0  # higher runs first
    submitted: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    cancelled: bool = False
    preemptions: int = 0
    seq: int = field(default_factory=lambda: next(_arrival))

    @property
    def steps_done(self) -> int:
        return self.state.steps_run

    @property
    def pixels(self) -> int:
        return int(self.state.x.shape[-2] * self.state.x.shape[-1])

    @property
    def group(self) -> tuple:
        return (id(self.sampler), *self.state.key())

    def rank(self) -> tuple:
        """Sort key, most urgent first: priority, then running before waiting (a running image
        keeps its slot against equals), then earliest deadline, then arrival."""
        return (-self.priority, self.status is not RequestStatus.RUNNING,
                math.inf if self.deadline is None else self.deadline, self.seq)

    def cancel(self) -> None:
        """Leave at the next step (the slot is freed then); the future is cancelled."""
        self.cancelled = True


@dataclass
class SchedulerOutput:
    """The plan of one iteration (what :meth:`StepScheduler.schedule` decided)."""

    run: list = field(default_factory=list)  # the jobs of this step's batch, in slot order
    slots: int = 0  # the padded batch size
    joined: list = field(default_factory=list)  # started or resumed running with this step
    preempted: list = field(default_factory=list)  # parked to make room for higher-priority jobs
    left: list = field(default_factory=list)  # (job, status): cancelled or past their deadline

    @property
    def pixels(self) -> int:
        return sum(job.pixels for job in self.run)


class StepScheduler:
    """Continuous batching of :class:`Job`s (see the module doc).

    ``sampler``: the default :class:`GuidedSampler` (a job may name another one: a service keeps
    one per step function); ``max_slots``: images per step; ``pixel_budget``: pixels (H·W, the
    images' own, not the padding) per step, 0 for no limit; ``max_queue``: images held (admitted,
    waiting and running) before :meth:`admit` refuses with :class:`QueueFullError`.
    """

    def __init__(self, sampler: Optional[GuidedSampler] = None, *, max_slots: int = 16, max_queue: int = 256,
                 slot_counts: Optional[Sequence[int]] = None, pixel_budget: int = 0, policy: str = "continuous",
                 batch_wait_s: float = 0.0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.sampler, self.policy, self.batch_wait_s = sampler, policy, float(batch_wait_s)
        self._slot_counts_given = slot_counts
        self._lock = threading.Lock()
        self.work = threading.Condition(self._lock)  # notified when a job is submitted
        self.configure(max_slots=max_slots, max_queue=max_queue, pixel_budget=pixel_budget)
        self._jobs: dict = {}  # group -> list of unresolved jobs (waiting, running, preempted)
        self._turn: collections.deque = collections.deque()  # groups with work, in turn order
        self._held = 0  # admitted images not yet resolved (jobs and reservations)
        self.steps = 0  # iterations run
        self.step_seconds = 0.0  # of the last iteration
        self.slots_used = 0  # images in the last iteration's batch
        self.pixels_used = 0  # their pixels
        self.preemptions = 0
        self.deadline_misses = 0
        self.finished = collections.Counter()  # final status -> count

    def configure(self, *, max_slots: Optional[int] = None, max_queue: Optional[int] = None,
                  pixel_budget: Optional[int] = None) -> None:
        """Change the budget between iterations (a service's reconfigure)."""
        with self._lock:
            max_slots = self.max_slots if max_slots is None else int(max_slots)
            max_queue = self.max_queue if max_queue is None else int(max_queue)
            pixel_budget = self.pixel_budget if pixel_budget is None else int(pixel_budget)
            if max_slots < 1 or max_queue < 1 or pixel_budget < 0:
                raise ValueError(f"max_slots and max_queue must be >= 1 and pixel_budget >= 0, got "
                                 f"{max_slots}, {max_queue}, {pixel_budget}")
            self.max_slots, self.max_queue, self.pixel_budget = max_slots, max_queue, pixel_budget
            counts = self._slot_counts_given
            if counts is None and self.sampler is not None:
                counts = getattr(self.sampler.backend, "slot_counts", None)
            self.slot_counts = sorted({c for c in counts or () if c <= max_slots} | ({max_slots} if counts else set()))

    # -- admitting and submitting ---------------------------------------------------------------
    def admit(self, n: int = 1) -> None:
        """Reserve room for ``n`` images, or raise :class:`QueueFullError`: the one admission
        check, atomic. A reservation becomes a job (:meth:`submit` with ``admitted=True``) or is
        given back (:meth:`release`)."""
        with self._lock:
            if self._held + n > self.max_queue:
                raise QueueFullError(f"the decode queue is full ({self.max_queue} images)")
            self._held += n

    def release(self, n: int = 1) -> None:
        """Give back ``n`` reservations that did not become jobs (e.g. an MSE decode done)."""
        with self._lock:
            self._held = max(0, self._held - n)

    def submit(self, target: Tensor, seed: int, shape: Sequence[int], *, x_T: Optional[Tensor] = None,
               on_step=None, timeout: Optional[float] = None, warm: Optional[Tensor] = None, priority: int = 0,
               sampler: Optional[GuidedSampler] = None, program: Optional[Program] = None,
               admitted: bool = False) -> Job:
        """Queue one image (``target`` (1, ...), ``shape`` (1, C, H, W)); it joins a running batch
        at the next step of its group. ``timeout``: seconds until :class:`DeadlineExceeded`;
        ``warm``: the MSE decode (1, C, H, W) in [-1, 1], for a warm-started program;
        ``sampler``/``program``: the image's (default: the scheduler's sampler and its program);
        ``admitted``: room was reserved with :meth:`admit` already."""
        if not admitted:
            self.admit()
        sampler = self.sampler if sampler is None else sampler
        try:
            state = sampler.start(target, seed, shape, x_T, warm=warm, program=program)
        except BaseException:
            self.release()
            raise
        job = Job(state, sampler, on_step=on_step, priority=int(priority),
                  deadline=None if timeout is None else time.monotonic() + timeout)
        with self._lock:
            group = job.group
            if group not in self._jobs:
                self._jobs[group] = []
                self._turn.append(group)
            self._jobs[group].append(job)
            self.work.notify_all()
        return job

    def pending(self) -> int:
        """Images admitted and not yet resolved (a snapshot)."""
        return self._held

    def stats(self) -> dict:
        with self._lock:
            jobs = [j for group in self._jobs.values() for j in group]
            by_status = collections.Counter(j.status.value for j in jobs)
            return {"waiting": by_status["waiting"] + by_status["preempted"], "running": by_status["running"],
                    "preempted": by_status["preempted"], "held": self._held, "max_slots": self.max_slots,
                    "pixel_budget": self.pixel_budget, "slots_used": self.slots_used,
                    "pixels_used": self.pixels_used, "steps": self.steps, "step_seconds": self.step_seconds,
                    "preemptions": self.preemptions, "deadline_misses": self.deadline_misses,
                    "finished": dict(self.finished)}

    # -- one iteration: schedule (bookkeeping), execute (device), update ---------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide the next step (see the module doc). No device work; jobs that leave are
        marked and listed in ``left``, their futures resolved by :meth:`update_from_output`."""
        out = SchedulerOutput()
        now = time.monotonic()
        with self._lock:
            for group, jobs in self._jobs.items():
                for job in list(jobs):
                    status = (RequestStatus.CANCELLED if job.cancelled else RequestStatus.DEADLINE
                              if job.deadline is not None and now > job.deadline else None)
                    if status is not None:
                        jobs.remove(job)
                        job.status = status
                        out.left.append((job, status))
            self._forget_empty()
            if not self._turn:
                return out
            if self.policy == "static":
                return self._schedule_static(out, now)
            top = max(max(j.priority for j in self._jobs[g]) for g in self._turn)
            group = next(g for g in self._turn if max(j.priority for j in self._jobs[g]) == top)
            self._turn.remove(group)
            self._turn.append(group)
            ranked = sorted(self._jobs[group], key=Job.rank)
            room = self.max_slots
            if self.pixel_budget:
                room = min(room, max(1, self.pixel_budget // ranked[0].pixels))  # one image always runs
            chosen, rest = ranked[:room], ranked[room:]
            for job in chosen:
                if job.status is not RequestStatus.RUNNING:
                    job.status = RequestStatus.RUNNING
                    out.joined.append(job)
            for job in rest:
                if job.status is RequestStatus.RUNNING:
                    job.status, job.preemptions = RequestStatus.PREEMPTED, job.preemptions + 1
                    self.preemptions += 1
                    out.preempted.append(job)
            out.run = chosen
            out.slots = self._slots(len(chosen))
        return out

    def _schedule_static(self, out: SchedulerOutput, now: float) -> SchedulerOutput:
        """Request-level batching (under the lock): the first group in turn whose batch runs or is
        ready — full, or its oldest image waited ``batch_wait_s`` — steps; nobody joins a running batch."""
        for group in list(self._turn):
            jobs = self._jobs[group]
            running = [j for j in jobs if j.status is RequestStatus.RUNNING]
            if not running:
                room = self.max_slots
                if self.pixel_budget:
                    room = min(room, max(1, self.pixel_budget // jobs[0].pixels))
                if len(jobs) < room and now - min(j.submitted for j in jobs) < self.batch_wait_s:
                    continue
                running = sorted(jobs, key=lambda j: j.seq)[:room]
                for job in running:
                    job.status = RequestStatus.RUNNING
                    out.joined.append(job)
            self._turn.remove(group)
            self._turn.append(group)
            out.run, out.slots = running, self._slots(len(running))
            return out
        return out

    def execute(self, out: SchedulerOutput) -> None:
        """The plan's device work: one batched step of its images."""
        if out.run:
            t0 = time.perf_counter()
            out.run[0].sampler.advance([job.state for job in out.run], out.slots)
            self.step_seconds = time.perf_counter() - t0
            self.slots_used, self.pixels_used, self.steps = len(out.run), out.pixels, self.steps + 1

    def update_from_output(self, out: SchedulerOutput) -> None:
        """After :meth:`execute`: resolve leaving jobs, call progress callbacks, resolve or restart
        finished attempts."""
        for job, status in out.left:
            if status is RequestStatus.CANCELLED:
                job.future.cancel() or job.future.done() or job.future.set_exception(CancelledError())
            else:
                self.deadline_misses += 1
                job.future.set_exception(DeadlineExceeded(f"not decoded within its deadline "
                                                          f"({job.steps_done} steps run)"))
            self._resolved(job)
        for job in out.run:
            try:
                if job.on_step is not None:
                    job.on_step(job)
                finished = job.state.done and self._finished(job)
            except Exception as exc:  # noqa: BLE001 - one image's callback or end failed: that image only
                self.fail([job], exc)
                continue
            if finished:
                with self._lock:
                    self._jobs[job.group].remove(job)
                self._resolved(job)
        with self._lock:
            self._forget_empty()

    def step(self) -> bool:
        """One iteration (schedule, execute, update). Returns False when there was nothing to do."""
        out = self.schedule()
        if not out.run and not out.left:
            return False
        self.execute(out)
        self.update_from_output(out)
        return True

    def run(self, jobs: Sequence[Job], progress: bool = False) -> None:
        """Iterate until every one of ``jobs`` is resolved (other jobs advance meanwhile)."""
        total = max((job.state.program.steps_run for job in jobs), default=0)
        bar = progress_bar(total, progress, "decoding", "step")
        while not all(job.future.done() for job in jobs):
            if not self.step():
                raise RuntimeError("the scheduler went idle with unresolved jobs")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(distance=f"{max(job.state.distance for job in jobs):.4g}", refresh=False)
        if bar is not None:
            bar.close()

    def fail(self, jobs: Optional[Sequence[Job]], exc: BaseException) -> None:
        """Resolve ``jobs`` (None: every job) with ``exc`` and forget them — after their step or
        their callback failed, their states are no longer trustworthy; the other jobs are not
        touched. The scheduler stays usable."""
        with self._lock:
            if jobs is None:
                jobs = [j for group in self._jobs.values() for j in group]
            jobs = [j for j in jobs if j in self._jobs.get(j.group, ())]
            for job in jobs:
                self._jobs[job.group].remove(job)
            self._forget_empty()
        for job in jobs:
            job.status = RequestStatus.FAILED
            if not job.future.done():
                job.future.set_exception(exc)
            self._resolved(job)

    # -- helpers --------------------------------------------------------------------------------
    def _slots(self, n: int) -> int:
        return next((c for c in self.slot_counts if c >= n), n)

    def _forget_empty(self) -> None:
        for group in [g for g, jobs in self._jobs.items() if not jobs]:
            del self._jobs[group]
            self._turn.remove(group)

    def _resolved(self, job: Job) -> None:
        self.finished[job.status.value] += 1
        with self._lock:
            self._held = max(0, self._held - 1)

    def _finished(self, job: Job) -> bool:
        """An attempt is over: resolve the job (True), or keep it for its retry (False)."""
        state, sampler = job.state, job.sampler
        if not sampler.finish(state):
            return False
        if state.error:
            job.status = RequestStatus.FAILED
            job.future.set_exception(DecodeError(state.error))
        else:
            job.status = RequestStatus.FINISHED
            scale = sampler.step_scale(state) if sampler.has_scale(state) else None
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
