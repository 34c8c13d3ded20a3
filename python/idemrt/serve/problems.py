"""Errors as HTTP answers: RFC 9457 ``application/problem+json`` bodies, one status per kind.

==========================================  ======  ===================================
what                                        status  kind
==========================================  ======  ===================================
malformed or foreign ``.idm``, bad image    400     bitstream / image
no codec (model store) / prior of that id   422     model-not-found
body or pixel count over the limits         413     too-large
unknown parameter, value not allowed        422     invalid-parameter (InvalidParameterError)
non-finite decode (retries spent)           500     decode
queue full                                  503     overloaded (with Retry-After)
replica died or restarting                  503     unavailable (with Retry-After)
deadline passed                             504     timeout
unknown path                                404     not-found
method not allowed (with Allow)             405     method-not-allowed
anything else (logged, never shown)         500     internal
==========================================  ======  ===================================

:func:`install_problem_handlers` makes FastAPI's own answers (404, 405, its request validation,
an unexpected exception) problem+json too.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Optional

from ..decode_request import InvalidParameterError
from ..errors import (BitstreamError, DeadlineExceeded, DecodeError, ImageError, ModelNotFoundError, QueueFullError,
                      TooLargeError)
from .retry import replica_lost, unwrap

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 2
INTERNAL_DETAIL = "the server failed to answer this request; the failure is logged on the server"


@dataclass
class Problem(Exception):
    status: int
    kind: str
    detail: str
    retry_after: Optional[int] = None

    @property
    def title(self) -> str:
        if self.kind == "internal":
            return "Internal Server Error"
        titles = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large",
                  422: "Unprocessable Content", 500: "Decode Failed", 503: "Service Unavailable",
                  504: "Gateway Timeout"}
        if self.status in titles:
            return titles[self.status]
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return "Error"

    def body(self) -> bytes:
        return json.dumps({"type": f"https://idemrt.invalid/problems/{self.kind}", "title": self.title,
                           "status": self.status, "detail": self.detail}).encode()

    def headers(self) -> dict:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def response(self, headers: Optional[dict] = None):
        """The problem as a Starlette response (``headers`` added to its own)."""
        from starlette.responses import Response

        return Response(self.body(), status_code=self.status, media_type=PROBLEM_JSON,
                        headers={**(headers or {}), **self.headers()})


def problem_from(exc: BaseException) -> Problem:
    """The problem of an exception raised while serving (also through Ray's task-error wrapper)."""
    exc = unwrap(exc)
    if isinstance(exc, Problem):
        return exc
    for kind, status, retry in _KINDS:
        if isinstance(exc, kind):
            return Problem(status, _NAMES[kind], str(exc), RETRY_AFTER_S if retry else None)
    if replica_lost(exc) is not None:
        return Problem(503, "unavailable", "the decoder replica stopped; retry (it is being restarted)", RETRY_AFTER_S)
    # a bug or an unforeseen failure: its text stays in the server's log, never in an answer
    log.error("unexpected %s while serving a request", type(exc).__name__, exc_info=exc)
    return Problem(500, "internal", INTERNAL_DETAIL)


_KINDS = ((TooLargeError, 413, False), (BitstreamError, 400, False), (ImageError, 400, False),
          (QueueFullError, 503, True), (DeadlineExceeded, 504, False), (DecodeError, 500, False),
          (ModelNotFoundError, 422, False), (InvalidParameterError, 422, False))
_NAMES = {TooLargeError: "too-large", BitstreamError: "bitstream", ImageError: "image", QueueFullError: "overloaded",
          DeadlineExceeded: "timeout", DecodeError: "decode", ModelNotFoundError: "model-not-found",
          InvalidParameterError: "invalid-parameter"}


_HTTP_KINDS = {404: "not-found", 405: "method-not-allowed"}


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def install_problem_handlers(app) -> None:
    """Make a FastAPI app's own answers problem+json: its HTTPExceptions (404 unknown path, 405 with
    its ``Allow`` header, ...), its request validation (422) and any exception no route caught (500,
    logged, its text never in the body)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_exception(request, exc: HTTPException):
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 404:
            detail = f"nothing at {_clip(request.url.path)!r}; the API is described in docs/serving.md"
        elif status == 405:
            detail = f"{_clip(request.method)} is not allowed on {_clip(request.url.path)!r}; allowed: " \
                     f"{headers.get('Allow', 'none')}"
        else:
            try:
                detail = HTTPStatus(status).description or HTTPStatus(status).phrase
            except ValueError:
                detail = "the request could not be answered"
        return Problem(status, _HTTP_KINDS.get(status, "http"), detail).response(headers)

    async def validation_error(request, exc: RequestValidationError):
        where = ["/".join(map(str, e.get("loc", ()))) + ": " + str(e.get("msg", "invalid")) for e in exc.errors()[:5]]
        return Problem(422, "invalid-parameter", _clip("; ".join(where) or "invalid request", 500)).response()

    async def unexpected(request, exc: Exception):
        return problem_from(exc).response()

    app.add_exception_handler(HTTPException, http_exception)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
