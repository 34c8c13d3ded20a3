"""Step-level continuous batching: many decodes share the network one step at a time.

A guided decode is tens to hundreds of steps. Batching whole requests makes a request that
arrives one step late wait for the whole batch; here, as in LLM servers' iteration-level
batching, images join the running batch at the next step and leave when they are done.

Why here, at the package's top: batching requests is serving, not diffusion (it was
``diffusion/scheduler.py``, beside the noise schedule, and "scheduler" is also diffusers' word for
that), yet the API's ``Decoder.decode_batch`` drives it too, so it must import without the
service's dependencies (Ray, Starlette) that ``idemrt.serve`` brings. ``Decoder.batcher()`` and
the service's engine core (:mod:`idemrt.serve.core`) both make a :class:`StepBatcher`.

An iteration is three parts, as in vLLM's engine core:

* :meth:`StepBatcher.plan` — pure bookkeeping, no device work: drops cancelled and
  timed-out jobs, picks the **group** to step (images that can share a batch: one
  :class:`GuidedSampler` — one backend and step table — and one image and target shape), chooses
  its batch within the **budget** (``max_slots`` images and ``pixel_budget`` pixels per step) by
  **priority**, then earliest deadline, then arrival, and returns a :class:`BatchPlan`: who
  runs, who joined, who was **preempted**.
* :meth:`StepBatcher.execute` — the device work: one batched step of the plan's images, each
  at its own row of the step table (:meth:`GuidedSampler.advance`).
* :meth:`StepBatcher.update_from_output` — progress callbacks, finished attempts resolved or
  restarted for a retry.

Windows: a tiling sampler's images of every size are one group. Its whole images cost their pixels,
a tiled image at least one unit of windows (:attr:`Job.cost`); what the chosen whole images leave of
the budget goes to the tiled images' windows (``BatchPlan.pixel_budget``), so a large image's step
spans iterations while small ones step beside it (:mod:`idemrt.diffusion.window_steps`).

Groups: the group of the most urgent job (highest priority) steps; groups tied at the top
priority take turns, round-robin. Within a group, running images keep their slots against
waiting ones of the same priority (no thrashing); a waiting image of *higher* priority takes the
slot of the lowest-ranked running one, which is **parked**: its x_t, position and generator are
its whole state, so it resumes later exactly where it stopped (with ``deterministic`` sampling,
to the same bits as an uninterrupted run).

Requests: a :class:`Job` is the one object of an image's request, from admission to release: it
owns its status (:class:`RequestStatus`: waiting → running → finished, or cancelled / deadline /
failed; running → preempted → running), its slot (its :class:`ImageState`'s, in its sampler's
persistent batch) and its future. Admission (:meth:`StepBatcher.admit`) is atomic: the count of
held images is checked and raised under one lock hold, so concurrent submitters cannot overfill
the queue. Every way out — finished, failed (in start, step, update, finish or a callback),
cancelled or past its deadline (waiting, running or parked), the batcher closed — goes through
:meth:`StepBatcher.end`, which releases a job exactly once: its status made final, its slot
freed, its future resolved (a result or a typed error), the held count lowered.

``policy="static"`` is the request-level baseline a load study compares against (as
``@serve.batch`` batches): a group's batch starts when it is full or its oldest image has waited
``batch_wait_s``, and runs to its end with nobody joining; no priorities, no preemption.

Batches are padded to the next of ``slot_counts`` (default: the backend's ``slot_counts``, e.g.
1, 2, 4, 8, 16 for CUDA graphs), unused slots masked, so a graph backend captures a few shapes.

The batcher has no thread of its own: :meth:`StepBatcher.run` drives it until given jobs are
done (``Decoder.decode_batch``), :meth:`StepBatcher.step` is one iteration for a service loop.
Admitting, submitting, cancelling and reading stats are thread-safe; ending a job (:meth:`end`)
and iterations must come from one thread (the loop's).
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

from .errors import DeadlineExceeded, DecodeError, EngineClosedError, QueueFullError
from .progress import progress_bar
from .diffusion.guided_sampler import GuidedSampler, ImageState, Program


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


class JobFuture(Future):
    """A job's future. Cancelling it asks the loop to drop the job (:meth:`Job.cancel`): the slot is
    freed and the future cancelled at the loop's next iteration, so ``cancel()`` returns whether
    that has happened yet. ``job``: the request it belongs to."""

    def __init__(self, job: "Job"):
        super().__init__()
        self.job = job

    def cancel(self) -> bool:
        self.job.cancel()
        return self.cancelled()


@dataclass(eq=False)
class Job:
    """One image's request, from admission to release (see the module doc). ``future`` resolves to
    ``finish(JobResult)`` (default: the :class:`JobResult`), or raises DecodeError /
    CancelledError / DeadlineExceeded / EngineClosedError, or the error of the part that failed.
    ``state`` and ``sampler`` are None until the job is started (:meth:`StepBatcher.start`)."""

    state: Optional[ImageState] = None
    sampler: Optional[GuidedSampler] = None
    on_step: Optional[Callable[["Job"], None]] = None  # called after each step, in the loop's thread
    finish: Optional[Callable[[JobResult], object]] = None  # the future's value from the sampled result
    deadline: Optional[float] = None  # time.monotonic() value
    priority: int = 0  # higher runs first
    submitted: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    cancelled: bool = False
    preemptions: int = 0
    seq: int = field(default_factory=lambda: next(_arrival))
    reported: int = 0  # network evaluations already reported to on_step

    def __post_init__(self):
        self.future = JobFuture(self)

    @property
    def evaluations(self) -> int:
        return 0 if self.state is None else self.state.evaluations

    @property
    def pixels(self) -> int:
        return int(self.state.x.shape[-2] * self.state.x.shape[-1])

    @property
    def group(self) -> tuple:
        return (id(self.sampler), *self.sampler.group_key(self.state))

    @property
    def cost(self) -> int:
        """Pixels this job's next iteration takes at least (a tiled image's: one unit of windows)."""
        return self.sampler.cost(self.state)

    def rank(self) -> tuple:
        """Sort key, most urgent first: priority, then running before waiting (a running image
        keeps its slot against equals), then earliest deadline, then arrival."""
        return (-self.priority, self.status is not RequestStatus.RUNNING,
                math.inf if self.deadline is None else self.deadline, self.seq)

    def cancel(self) -> None:
        """Leave at the loop's next iteration (the slot is freed then); the future is cancelled.
        Only marks the job: safe from any thread."""
        self.cancelled = True

    def due(self, now: float) -> Optional[RequestStatus]:
        """CANCELLED or DEADLINE if the job must leave now, else None."""
        if self.cancelled:
            return RequestStatus.CANCELLED
        return RequestStatus.DEADLINE if self.deadline is not None and now > self.deadline else None


@dataclass
class BatchPlan:
    """The plan of one iteration (what :meth:`StepBatcher.plan` decided)."""

    run: list = field(default_factory=list)  # the jobs of this step's batch, in slot order
    slots: int = 0  # the padded batch size
    joined: list = field(default_factory=list)  # started or resumed running with this step
    preempted: list = field(default_factory=list)  # parked to make room for higher-priority jobs
    left: list = field(default_factory=list)  # (job, status): cancelled or past their deadline, released
    pixel_budget: Optional[int] = None  # pixels of windows left for tiled images (None: their whole steps)
    stepped: list = field(default_factory=list)  # the jobs whose step ended (a tiled image's may span iterations)

    @property
    def pixels(self) -> int:
        return sum(job.pixels for job in self.run)


class StepBatcher:
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
        self._jobs: dict = {}  # group -> list of started, unresolved jobs (waiting, running, preempted)
        self._turn: collections.deque = collections.deque()  # groups with work, in turn order
        self._held_jobs: set = set()  # admitted jobs not yet released (started or not)
        self._reserved = 0  # admitted room that is not a job (admit() without one)
        self.closed = False  # close() was called: admit() refuses
        self.iterations = 0  # iterations run (each one batched step of one group)
        self.step_seconds = 0.0  # of the last iteration
        self.preemptions = 0
        self.deadline_misses = 0
        self.finished = collections.Counter()  # final status -> count

    def configure(self, *, max_slots: Optional[int] = None, max_queue: Optional[int] = None,
                  pixel_budget: Optional[int] = None) -> None:
        """Change the budget between iterations (a service's reconfigure)."""
        with self._lock:
            max_slots, max_queue, pixel_budget = check_budget(
                self.max_slots if max_slots is None else max_slots, self.max_queue if max_queue is None else max_queue,
                self.pixel_budget if pixel_budget is None else pixel_budget)
            self.max_slots, self.max_queue, self.pixel_budget = max_slots, max_queue, pixel_budget
            counts = self._slot_counts_given
            if counts is None and self.sampler is not None:
                counts = self.sampler.backend.slot_counts  # declared by every backend (backends.base.Backend)
            self.slot_counts = sorted({c for c in counts or () if c <= max_slots} | ({max_slots} if counts else set()))

    # -- admitting, starting, ending -------------------------------------------------------------
    def admit(self, job: Optional[Job] = None) -> Optional[Job]:
        """Room for one image, or :class:`QueueFullError` (:class:`EngineClosedError` once closed):
        the one admission check, atomic. With ``job``, the job is held from now until
        :meth:`end`; without, the room is a reservation given back with :meth:`release`."""
        with self._lock:
            if self.closed:
                raise EngineClosedError("the decode engine is shutting down")
            if self._held_count() + 1 > self.max_queue:
                raise QueueFullError(f"the decode queue is full ({self.max_queue} images)")
            if job is None:
                self._reserved += 1
            else:
                self._held_jobs.add(job)
        return job

    def release(self) -> None:
        """Give back a reservation of :meth:`admit` without a job (e.g. an encode done)."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def start(self, job: Job, target: Tensor, seed: int, shape: Sequence[int], *, x_T: Optional[Tensor] = None,
              warm: Optional[Tensor] = None, program: Optional[Program] = None) -> Job:
        """Start an admitted job (``target`` (1, ...), ``shape`` (1, C, H, W)) with its sampler
        (default: the batcher's); it joins a running batch at the next step of its group. If the
        sampler cannot start it, the job ends failed and the error is raised."""
        job.sampler = self.sampler if job.sampler is None else job.sampler
        try:
            job.state = job.sampler.start(target, seed, shape, x_T, warm=warm, program=program)
        except BaseException as exc:
            self.end(job, RequestStatus.FAILED, error=exc)
            raise
        with self._lock:
            group = job.group
            if group not in self._jobs:
                self._jobs[group] = []
                self._turn.append(group)
            self._jobs[group].append(job)
            self.work.notify_all()
        return job

    def submit(self, target: Tensor, seed: int, shape: Sequence[int], *, x_T: Optional[Tensor] = None,
               on_step=None, timeout: Optional[float] = None, warm: Optional[Tensor] = None, priority: int = 0,
               sampler: Optional[GuidedSampler] = None, program: Optional[Program] = None) -> Job:
        """Admit and start one image (:meth:`admit`, :meth:`start`). ``timeout``: seconds until
        :class:`DeadlineExceeded`; ``warm``: the MSE decode (1, C, H, W) in [-1, 1], for a
        warm-started program; ``sampler``/``program``: the image's (default: the batcher's
        sampler and its program)."""
        job = Job(sampler=sampler, on_step=on_step, priority=int(priority),
                  deadline=None if timeout is None else time.monotonic() + timeout)
        self.admit(job)
        return self.start(job, target, seed, shape, x_T=x_T, warm=warm, program=program)

    def end(self, job: Job, status: RequestStatus, *, result=None, error: Optional[BaseException] = None) -> bool:
        """Release ``job`` with a final ``status``: the one way out, exactly once (a second call
        returns False and changes nothing). Its slot is freed, its future resolved — ``result``
        when FINISHED, cancelled when CANCELLED, else ``error`` (DeadlineExceeded by default for
        DEADLINE) — and the held count lowered. Loop thread only."""
        if not status.final:
            raise ValueError(f"end() takes a final status, got {status}")
        with self._lock:
            if job not in self._held_jobs:
                return False
            self._held_jobs.discard(job)
            group = self._jobs.get(job.group) if job.state is not None else None
            if group is not None and job in group:
                group.remove(job)
                self._forget_empty()
            job.status = status
            self.finished[status.value] += 1
            if status is RequestStatus.DEADLINE:
                self.deadline_misses += 1
        if job.state is not None:
            job.sampler.release(job.state)
        future = job.future
        if status is RequestStatus.FINISHED:
            future.set_result(result)
        elif status is RequestStatus.CANCELLED:
            Future.cancel(future) or future.done() or future.set_exception(CancelledError())
        else:
            if error is None and status is RequestStatus.DEADLINE:
                error = DeadlineExceeded(f"not decoded within its deadline ({job.evaluations} network evaluations run)")
            future.set_exception(error)
        return True

    def close(self, error: Optional[BaseException] = None) -> None:
        """Refuse new admissions and end every held job (started or not) with ``error`` (default:
        :class:`EngineClosedError`). Loop thread only, or when no iteration runs."""
        with self._lock:
            self.closed = True
            jobs = sorted(self._held_jobs, key=lambda j: j.seq)
        for job in jobs:
            self.end(job, RequestStatus.FAILED, error=error or EngineClosedError("the decode engine shut down"))

    def pending(self) -> int:
        """Images admitted and not yet resolved (a snapshot, without the lock: callers may hold
        ``work``)."""
        return self._held_count()

    def stats(self) -> dict:
        with self._lock:
            jobs = [j for group in self._jobs.values() for j in group]
            by_status = collections.Counter(j.status.value for j in jobs)
            running = [j for j in jobs if j.status is RequestStatus.RUNNING]  # the images holding a slot
            # each started image is in exactly one of waiting (never ran), running, preempted (parked)
            return {"waiting": by_status["waiting"], "running": by_status["running"],
                    "preempted": by_status["preempted"], "held": self._held_count(), "max_slots": self.max_slots,
                    "pixel_budget": self.pixel_budget, "slots_used": len(running),
                    "pixels_used": sum(j.pixels for j in running), "iterations": self.iterations,
                    "step_seconds": self.step_seconds,
                    "preemptions": self.preemptions, "deadline_misses": self.deadline_misses,
                    "finished": dict(self.finished)}

    # -- one iteration: plan (bookkeeping), execute (device), update ---------------------------
    def plan(self) -> BatchPlan:
        """Decide the next step (see the module doc). Jobs cancelled or past their deadline are
        released here (:meth:`end`: their slots freed, their futures resolved) and listed in
        ``left``; otherwise bookkeeping only."""
        out = BatchPlan()
        now = time.monotonic()
        with self._lock:
            out.left = [(job, status) for jobs in self._jobs.values() for job in jobs
                        if (status := job.due(now)) is not None]
        for job, status in out.left:
            self.end(job, status)
        with self._lock:
            if not self._turn:
                return out
            if self.policy == "static":
                return self._plan_static(out, now)
            top = max(max(j.priority for j in self._jobs[g]) for g in self._turn)
            group = next(g for g in self._turn if max(j.priority for j in self._jobs[g]) == top)
            self._turn.remove(group)
            self._turn.append(group)
            ranked = sorted(self._jobs[group], key=Job.rank)
            chosen, out.pixel_budget = self._choose(ranked)
            rest = ranked[len(chosen):]
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

    def _choose(self, ranked: list) -> tuple[list, Optional[int]]:
        """The most urgent jobs that fit ``max_slots`` and the pixel budget — each costs its pixels,
        a tiled image one unit of its windows (:attr:`Job.cost`); the first always runs — and the
        budget left for tiled images' windows (None: no budget)."""
        if not self.pixel_budget:
            return ranked[: self.max_slots], None
        chosen, used = [], 0
        for job in ranked[: self.max_slots]:
            cost = job.cost
            if chosen and used + cost > self.pixel_budget:
                break
            chosen.append(job)
            used += cost
        tiled = [j for j in chosen if j.sampler.tiled(j.state)]
        whole = sum(j.cost for j in chosen if j not in tiled)
        return chosen, (max(0, self.pixel_budget - whole) if tiled else None)

    def _plan_static(self, out: BatchPlan, now: float) -> BatchPlan:
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

    def execute(self, out: BatchPlan) -> None:
        """The plan's device work: one batched step of its images. If it raises, the caller
        fails the plan's images (:meth:`step` does)."""
        if out.run:
            t0 = time.perf_counter()
            out.run[0].sampler.advance([job.state for job in out.run], self._slots, out.pixel_budget)
            self.step_seconds = time.perf_counter() - t0
            self.iterations += 1

    def update_from_output(self, out: BatchPlan) -> None:
        """After :meth:`execute`: progress callbacks, finished attempts resolved or restarted for
        a retry. A callback or an end that raises fails its own image only."""
        for job in out.run:
            if job.status.final:  # ended meanwhile (a callback of another image cannot, but be safe)
                continue
            try:
                if job.state.evaluations != job.reported:  # a step ended
                    job.reported = job.state.evaluations
                    out.stepped.append(job)
                    if job.on_step is not None:
                        job.on_step(job)
                if job.state.done:
                    self._finished(job)
            except Exception as exc:  # noqa: BLE001 - one image's callback or end failed: that image only
                self.end(job, RequestStatus.FAILED, error=exc)

    def step(self) -> bool:
        """One iteration (plan, execute, update). Returns False when there was nothing to do.
        A failing step fails its images (their futures hold the error) and raises."""
        out = self.plan()
        if not out.run and not out.left:
            return False
        try:
            self.execute(out)
        except Exception as exc:
            self.fail(out.run, exc)
            raise
        self.update_from_output(out)
        return True

    def run(self, jobs: Sequence[Job], progress: bool = False) -> None:
        """Iterate until every one of ``jobs`` is resolved (other jobs advance meanwhile)."""
        total = max((job.state.program.evaluations for job in jobs), default=0)
        bar = progress_bar(total, progress, "decoding", "step")
        while not all(job.future.done() for job in jobs):
            if not self.step():
                raise RuntimeError("the batcher went idle with unresolved jobs")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(distance=f"{max(job.state.distance for job in jobs):.4g}", refresh=False)
        if bar is not None:
            bar.close()

    def fail(self, jobs: Sequence[Job], exc: BaseException) -> None:
        """End ``jobs`` with ``exc`` — after their step failed, their states are no longer
        trustworthy; the other jobs are not touched. The batcher stays usable."""
        for job in jobs:
            self.end(job, RequestStatus.FAILED, error=exc)

    # -- helpers --------------------------------------------------------------------------------
    def _slots(self, n: int) -> int:
        return next((c for c in self.slot_counts if c >= n), n)

    def _forget_empty(self) -> None:
        for group in [g for g, jobs in self._jobs.items() if not jobs]:
            del self._jobs[group]
            self._turn.remove(group)

    def _held_count(self) -> int:
        return len(self._held_jobs) + self._reserved

    def _finished(self, job: Job) -> None:
        """An attempt is over: end the job (its result, or its DecodeError), or leave it running
        for its retry."""
        state, sampler = job.state, job.sampler
        if not sampler.finish(state):
            return
        if state.error:
            self.end(job, RequestStatus.FAILED, error=DecodeError(state.error))
            return
        scale = sampler.step_scale(state) if sampler.has_scale(state) else None
        result = JobResult(state.x, state.distance, state.retries, scale)
        self.end(job, RequestStatus.FINISHED, result=result if job.finish is None else job.finish(result))


def check_budget(max_slots, max_queue, pixel_budget) -> tuple:
    """``(max_slots, max_queue, pixel_budget)`` as ints, or ValueError: at least one slot and one
    queued image, a budget of 0 (none) or more pixels."""
    max_slots, max_queue, pixel_budget = int(max_slots), int(max_queue), int(pixel_budget)
    if max_slots < 1 or max_queue < 1 or pixel_budget < 0:
        raise ValueError(f"max_slots and max_queue must be >= 1 and pixel_budget >= 0, got "
                         f"{max_slots}, {max_queue}, {pixel_budget}")
    return max_slots, max_queue, pixel_budget


def sample_jobs(batcher: StepBatcher, requests: Sequence[tuple], progress: bool = False) -> list:
    """Decode images through ``batcher`` until all are done: ``requests`` are ``(target (1, ...),
    seed, shape (1, C, H, W), x_T or None[, warm])``; returns their :class:`JobResult` in order.
    Images of one shape share steps, shapes take turns. The first failure is raised (naming its
    image) once every job is resolved."""
    jobs = [batcher.submit(target, seed, shape, x_T=x_T, warm=warm[0] if warm else None)
            for target, seed, shape, x_T, *warm in requests]
    batcher.run(jobs, progress)
    errors = [(k, job.future.exception()) for k, job in enumerate(jobs) if job.future.exception() is not None]
    if errors:
        k, exc = errors[0]
        raise type(exc)(f"image {k}: {exc}; check the UNet checkpoint and preset, or lower --scale") from None
    return [job.future.result() for job in jobs]
