"""The query parameters of ``POST /v1/decode``, parsed and range-checked before anything else.

Every value a client sends is checked against what the server's :class:`ServeConfig` allows
before anything else looks at it; whatever is wrong (an unknown or repeated parameter, a value
out of range, a malformed number) is a 422 ``invalid-parameter`` problem naming the parameter.
Mode, speed, steps, seed and priority are checked by :func:`idemrt.decode_request.check_request`,
the check the engine and the API make too; the format, stream, timeout and prior are the HTTP
API's own. Numbers are read as plain ASCII decimals of bounded length, so no query string costs
more than a scan of its own bytes. No torch on this path (tests/test_serve_modules.py).
"""
from __future__ import annotations

import math
import re
from collections import Counter

from ..decode_request import InvalidParameterError, check_choice, check_request, show
from .config import ServeConfig
from .problems import Problem

FORMATS = {"png": "image/png", "webp": "image/webp"}  # format -> media type of the answer
DECODE_PARAMS = ("mode", "seed", "speed", "steps", "priority", "timeout", "format", "stream", "prior")
STREAM = ("0", "1")

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # the timeout: no sign, exponent, space or "_"
_MAX_DECIMAL_CHARS = 32
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # idemrt.store's ids


def _invalid(detail: str) -> Problem:
    return Problem(422, "invalid-parameter", detail)


def _seconds(name: str, value: str, hi: float) -> float:
    """Seconds 0 < t <= hi, written as a plain decimal (``30``, ``2.5``)."""
    if len(value) > _MAX_DECIMAL_CHARS or not _DECIMAL.fullmatch(value):
        raise _invalid(f"{name}={show(value)} is not a number of seconds (a plain decimal such as 2.5)")
    t = float(value)
    if not (math.isfinite(t) and 0 < t <= hi):
        raise _invalid(f"{name}={show(value)} is out of range: 0 < {name} <= {hi:g} seconds")
    return t


def parse_decode_params(query_params, config: ServeConfig) -> dict:
    """The decode parameters of a request's query, each checked against ``config``.

    ``query_params``: Starlette's ``QueryParams`` (or any multi-dict with ``multi_items()``).
    Returns ``{"mode", "seed", "speed", "steps", "priority", "timeout", "format", "stream"}``
    (``timeout`` None: the server's ``timeout_s``; ``stream`` a bool); raises :class:`Problem`
    422 ``invalid-parameter`` for anything a client may not ask for.
    """
    try:
        return _parse(query_params, config)
    except InvalidParameterError as exc:
        raise _invalid(str(exc)) from None


def _parse(query_params, config: ServeConfig) -> dict:
    counts = Counter(key for key, _ in query_params.multi_items())
    unknown = sorted(key for key in counts if key not in DECODE_PARAMS)
    if unknown:
        shown = ", ".join(show(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise _invalid(f"unknown parameter{'s' if len(unknown) > 1 else ''} {shown}; known: {list(DECODE_PARAMS)}")
    repeated = [key for key in DECODE_PARAMS if counts[key] > 1]
    if repeated:
        raise _invalid(f"parameter {repeated[0]!r} is given {counts[repeated[0]]} times; give each parameter at most once")
    q = dict(query_params.multi_items())

    params = check_request(q.get("mode", "perceptual"), choices=config, speed=q.get("speed"), steps=q.get("steps"),
                           seed=q.get("seed"), priority=q.get("priority"))
    params["timeout"] = _seconds("timeout", q["timeout"], config.timeout_s) if "timeout" in q else None
    params["format"] = check_choice("format", q.get("format", "png"), tuple(FORMATS))
    params["stream"] = check_choice("stream", q.get("stream", "0"), STREAM) == "1"
    if config.models:  # a model store: the prior by its id (the engine says whether it has it)
        prior = q.get("prior")
        if prior is not None and not _MODEL_ID.fullmatch(prior):
            raise _invalid(f"prior={show(prior)} is not a model id (letters, digits, . _ + -)")
        params["prior"] = prior
    elif "prior" in q:
        raise _invalid("this server has no model store: prior= is not accepted (GET /v1/models)")
    return params
