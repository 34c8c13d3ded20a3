"""The query parameters of ``POST /v1/decode``, parsed and range-checked in one place.

Every value a client sends is checked against what the server's :class:`ServeConfig` allows
before anything else looks at it; whatever is wrong (an unknown or repeated parameter, a value
out of range, a malformed number) is a 422 ``invalid-parameter`` problem naming the parameter.
Numbers are read as plain ASCII decimals of bounded length, so no query string costs more than
a scan of its own bytes.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from .config import MAX_SEED, PRIORITIES, ServeConfig
from .engine import MODES
from .problems import Problem

FORMATS = {"png": "image/png", "webp": "image/webp"}  # format -> media type of the answer
DECODE_PARAMS = ("mode", "seed", "speed", "steps", "priority", "timeout", "format", "stream", "prior")
STREAM = ("0", "1")

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # the timeout: no sign, exponent, space or "_"
_MAX_DECIMAL_CHARS = 32
_SHOW = 40  # characters of a client's value quoted back in a detail
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # idemrt.store's ids


def _show(value: str) -> str:
    return repr(value if len(value) <= _SHOW else value[:_SHOW] + "...")


def _invalid(detail: str) -> Problem:
    return Problem(422, "invalid-parameter", detail)


def _choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise _invalid(f"{name}={_show(value)} is not allowed here; choose one of {list(choices)}")
    return value


def _integer(name: str, value: str, lo: int, hi: int) -> int:
    """A decimal integer lo <= n <= hi: ASCII digits only (no sign, space, "_" or exponent); the
    digits are counted before int() converts them, so a huge string costs a scan, never a conversion."""
    if not (value.isascii() and value.isdigit()):
        raise _invalid(f"{name}={_show(value)} is not a decimal integer in [{lo}, {hi}]")
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(hi)) or not lo <= int(digits) <= hi:
        raise _invalid(f"{name}={_show(value)} is out of range: {lo} <= {name} <= {hi}")
    return int(digits)


def _seconds(name: str, value: str, hi: float) -> float:
    """Seconds 0 < t <= hi, written as a plain decimal (``30``, ``2.5``)."""
    if len(value) > _MAX_DECIMAL_CHARS or not _DECIMAL.fullmatch(value):
        raise _invalid(f"{name}={_show(value)} is not a number of seconds (a plain decimal such as 2.5)")
    t = float(value)
    if not (math.isfinite(t) and 0 < t <= hi):
        raise _invalid(f"{name}={_show(value)} is out of range: 0 < {name} <= {hi:g} seconds")
    return t


def parse_decode_params(query_params, config: ServeConfig) -> dict:
    """The decode parameters of a request's query, each checked against ``config``.

    ``query_params``: Starlette's ``QueryParams`` (or any multi-dict with ``multi_items()``).
    Returns ``{"mode", "seed", "speed", "steps", "priority", "timeout", "format", "stream"}``
    (``timeout`` None: the server's ``timeout_s``; ``stream`` a bool); raises :class:`Problem`
    422 ``invalid-parameter`` for anything a client may not ask for.
    """
    counts = Counter(key for key, _ in query_params.multi_items())
    unknown = sorted(key for key in counts if key not in DECODE_PARAMS)
    if unknown:
        shown = ", ".join(_show(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise _invalid(f"unknown parameter{'s' if len(unknown) > 1 else ''} {shown}; known: {list(DECODE_PARAMS)}")
    repeated = [key for key in DECODE_PARAMS if counts[key] > 1]
    if repeated:
        raise _invalid(f"parameter {repeated[0]!r} is given {counts[repeated[0]]} times; give each parameter at most once")
    q = dict(query_params.multi_items())

    mode = _choice("mode", q.get("mode", "perceptual"), MODES)
    if mode == "perceptual" and not config.perceptual:
        raise _invalid("this server has no diffusion model: only mode=mse")
    speed = _choice("speed", q.get("speed", config.speed), config.speeds_allowed)
    steps_allowed = config.steps_for(speed)
    steps = _choice("steps", q.get("steps", steps_allowed[0]), steps_allowed)
    seed = _integer("seed", q.get("seed", "0"), 0, MAX_SEED)
    priority = _integer("priority", q.get("priority", str(PRIORITIES[0])), PRIORITIES[0], PRIORITIES[-1])
    timeout = _seconds("timeout", q["timeout"], config.timeout_s) if "timeout" in q else None
    fmt = _choice("format", q.get("format", "png"), tuple(FORMATS))
    stream = _choice("stream", q.get("stream", "0"), STREAM) == "1"
    params = {"mode": mode, "seed": seed, "speed": speed, "steps": steps, "priority": priority, "timeout": timeout,
              "format": fmt, "stream": stream}
    if config.models:  # a model store: the prior by its id (the engine says whether it has it)
        prior = q.get("prior")
        if prior is not None and not _MODEL_ID.fullmatch(prior):
            raise _invalid(f"prior={_show(prior)} is not a model id (letters, digits, . _ + -)")
        params["prior"] = prior
    elif "prior" in q:
        raise _invalid("this server has no model store: prior= is not accepted (GET /v1/models)")
    return params
