"""Retrying a replica call whose replica died (a lost node, a killed or crashed replica process).

Ray Serve routes a retry to another live replica (the dead one leaves its routing table); a call
that fails for any other reason (a bad request, a full queue, a deadline) is never retried.

Ray's errors about replicas are classified here, once (:func:`replica_lost`): the retry asks it,
and so does :func:`idemrt.serve.problems.problem_from` (503 unavailable). No Ray import here: the
errors are recognised by class name, through Ray's wrappers.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

# What Ray raises about a replica's actor (RayTaskError subclasses these dynamically when it wraps
# them, so the names are looked up along the class hierarchy too): gone or unreachable, so another
# replica may take the call ("died"), or not placeable on any node ("unschedulable": never retried).
REPLICA_LOST = {"ActorDiedError": "died", "RayActorError": "died", "ActorUnavailableError": "died",
                "ActorUnschedulableError": "unschedulable"}

log = logging.getLogger(__name__)


def unwrap(exc: BaseException) -> BaseException:
    """The exception Ray's ``RayTaskError`` wraps (its ``cause``), or ``exc`` itself."""
    # Ray is not imported on the ingress path, so its wrapper is known by the attribute it sets.
    return getattr(exc, "cause", None) or exc


def replica_lost(exc: BaseException) -> Optional[str]:
    """"died", "unschedulable" (:data:`REPLICA_LOST`) if ``exc`` (or what it wraps: Ray's ``cause``,
    ``__cause__``) says the replica is lost, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for cls in type(exc).__mro__:
            if cls.__name__ in REPLICA_LOST:
                return REPLICA_LOST[cls.__name__]
        wrapped = unwrap(exc)
        exc = wrapped if wrapped is not exc else exc.__cause__
    return None


def replica_died(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica died (a retry on another replica may succeed)."""
    return replica_lost(exc) == "died"


async def call_with_retry(make_call: Callable[[], Awaitable], *, tries: int = 3, deadline: Optional[float] = None,
                          backoff_s: float = 0.2, on_retry: Optional[Callable[[int, BaseException], None]] = None,
                          retryable: Callable[[BaseException], bool] = replica_died,
                          clock: Callable[[], float] = time.monotonic, sleep=asyncio.sleep):
    """``await make_call()``, retried up to ``tries`` calls in all while it fails ``retryable``
    (the replica died) and ``deadline`` (a ``clock`` time) leaves room: waits ``backoff_s``,
    then twice that, ... between calls. A retry gets what is left of the deadline (then
    :class:`~idemrt.errors.DeadlineExceeded`). Any other failure, or the last one, is raised."""
    for attempt in range(1, tries + 1):
        try:
            if attempt == 1 or deadline is None:
                return await make_call()
            return await _within(make_call(), deadline - clock())
        except Exception as exc:  # noqa: BLE001 - re-raised unless retryable
            delay = backoff_s * 2 ** (attempt - 1)
            if attempt == tries or not retryable(exc) or (deadline is not None and clock() + delay >= deadline):
                raise
            log.warning("replica call failed (%s); retry %d of %d in %.2f s", type(exc).__name__, attempt,
                        tries - 1, delay)
            if on_retry is not None:
                on_retry(attempt, exc)
            await sleep(delay)


async def _within(awaitable, seconds: float):
    """``await awaitable`` for at most ``seconds`` (then it is cancelled: DeadlineExceeded)."""
    from ..errors import DeadlineExceeded

    async def awaited():
        return await awaitable

    task = asyncio.ensure_future(awaited())
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, seconds))
    except asyncio.CancelledError:  # the client went away: so does the call
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise DeadlineExceeded("the request's deadline passed while it was retried on another replica")
    return task.result()
