"""Errors as HTTP answers: RFC 9457 ``application/problem+json`` bodies, one status per kind.

==========================================  ======  ===================================
what                                        status  kind
==========================================  ======  ===================================
malformed or foreign ``.idm``, bad image    400     bitstream / image
body or pixel count over the limits         413     too-large
unknown parameter, value not allowed        422     invalid-parameter
non-finite decode (retries spent)           500     decode
queue full                                  503     overloaded (with Retry-After)
replica died or restarting                  503     unavailable (with Retry-After)
deadline passed                             504     timeout
==========================================  ======  ===================================
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..diffusion import DeadlineExceeded, QueueFullError
from ..errors import BitstreamError, DecodeError, ImageError, TooLargeError

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 2


@dataclass
class Problem(Exception):
    status: int
    kind: str
    detail: str
    retry_after: Optional[int] = None

    @property
    def title(self) -> str:
        return {400: "Bad Request", 413: "Content Too Large", 422: "Unprocessable Content",
                500: "Decode Failed", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(self.status, "Error")

    def body(self) -> bytes:
        return json.dumps({"type": f"https://idemrt.invalid/problems/{self.kind}", "title": self.title,
                           "status": self.status, "detail": self.detail}).encode()

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def problem_from(exc: BaseException) -> Problem:
    """The problem of an exception raised while serving (also through Ray's task-error wrapper)."""
    exc = getattr(exc, "cause", None) or exc
    if isinstance(exc, Problem):
        return exc
    for kind, status, retry in _KINDS:
        if isinstance(exc, kind):
            return Problem(status, _NAMES[kind], str(exc), RETRY_AFTER_S if retry else None)
    if type(exc).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError", "ActorUnschedulableError"):
        return Problem(503, "unavailable", "the decoder replica stopped; retry (it is being restarted)", RETRY_AFTER_S)
    return Problem(500, "internal", f"{type(exc).__name__}: {exc}")


_KINDS = ((TooLargeError, 413, False), (BitstreamError, 400, False), (ImageError, 400, False),
          (QueueFullError, 503, True), (DeadlineExceeded, 504, False), (DecodeError, 500, False))
_NAMES = {TooLargeError: "too-large", BitstreamError: "bitstream", ImageError: "image", QueueFullError: "overloaded",
          DeadlineExceeded: "timeout", DecodeError: "decode"}
