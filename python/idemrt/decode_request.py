"""What a decode request may ask for, and the one check of it: mode, speed, steps, seed, priority.

The service's ingress (:func:`idemrt.serve.params.parse_decode_params`, on query strings), its
engine (``DecodeEngine.submit``, on Python values) and the API (``Decoder.decode_batch``'s mode and
output) call :func:`check_request`; :class:`~idemrt.decode_config.DecodeConfig` checks its named
choices with :func:`check_choice`. No torch here: the ingress checks a request without it.

A bad value is an :class:`InvalidParameterError` (a ValueError) naming the parameter; a value
quoted back is cut to a few dozen characters, so a hostile one never comes back whole. Integers
may be ints or plain ASCII decimal strings (a query's), whose digits are counted before ``int()``
converts them: a huge string costs a scan, never a conversion.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

from .errors import IdemrtError

__all__ = ["MAX_SEED", "MODES", "OUTPUTS", "PRIORITIES", "InvalidParameterError", "RequestChoices", "check_choice",
           "check_integer", "check_request", "show"]

MODES = ("perceptual", "mse")  # a perceptual decode (the prior), or the MSE codec's own
OUTPUTS = ("pil", "tensor")  # what Decoder.decode returns
PRIORITIES = range(0, 10)  # a request's priority: higher runs first (and may preempt lower ones)
MAX_SEED = 2**63 - 1  # seeds are 0 <= seed <= MAX_SEED (torch.Generator.manual_seed's signed range)
_SHOW = 40  # characters of a value quoted back in a message


class InvalidParameterError(IdemrtError, ValueError):
    """A request parameter that is not allowed; ``name`` is the parameter."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class RequestChoices(Protocol):
    """What a server allows (:class:`idemrt.serve.config.ServeConfig` is one)."""

    speed: str  # the default speed
    speeds_allowed: list

    @property
    def perceptual(self) -> bool: ...  # whether it has a diffusion prior (else: mode "mse" only)

    def steps_for(self, speed: str) -> list: ...  # the respacings of ``speed``, the default first


def show(value) -> str:
    """``repr(value)``, cut to a few dozen characters (a string's quotes kept)."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = f"an int of {value.bit_length()} bits"
    cut = text if len(text) <= _SHOW else text[:_SHOW] + "..."
    return repr(cut) if isinstance(value, str) else cut


def check_choice(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``, else InvalidParameterError."""
    if not _is_one_of(value, choices):
        raise InvalidParameterError(name, f"{name} must be one of {list(choices)}, got {show(value)}")
    return value


def _is_one_of(value, choices) -> bool:
    try:
        return value in choices
    except TypeError:  # an unhashable value asked of a dict's keys
        return False


def check_integer(name: str, value, lo: int, hi: int) -> int:
    """An int lo <= n <= hi, given as an int (not a bool) or as ASCII decimal digits (no sign, space,
    "_" or exponent)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not lo <= value <= hi:
            raise InvalidParameterError(name, f"{name}={show(value)} is out of range: {lo} <= {name} <= {hi}")
        return value
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        raise InvalidParameterError(name, f"{name}={show(value)} is not a decimal integer in [{lo}, {hi}]")
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(hi)) or not lo <= int(digits) <= hi:
        raise InvalidParameterError(name, f"{name}={show(value)} is out of range: {lo} <= {name} <= {hi}")
    return int(digits)


def check_request(mode: str, *, choices: Optional[RequestChoices] = None, speed: Optional[str] = None,
                  steps=None, seed=None, priority=None, output: Optional[str] = None) -> dict:
    """The checked request: ``{"mode", "speed", "steps", "seed", "priority"}`` (and ``"output"`` when
    given). ``choices``: what the server allows (its speeds and their respacings; None: the API's
    Decoder, whose one configuration has neither); ``speed`` None: the default, ``steps`` None: the
    speed's default (a respacing is compared as its string); ``seed`` None: 0, ``priority`` None:
    the lowest. InvalidParameterError for the first value that is not allowed."""
    check_choice("mode", mode, MODES)
    if choices is not None and mode == "perceptual" and not choices.perceptual:
        raise InvalidParameterError("mode", "this server has no diffusion model: only mode=mse")
    if choices is not None:
        speed = check_choice("speed", choices.speed if speed is None else speed, choices.speeds_allowed)
        allowed = choices.steps_for(speed)
        steps = check_choice("steps", allowed[0] if steps is None else str(steps), allowed)
    out = {"mode": mode, "speed": speed, "steps": None if steps is None else str(steps),
           "seed": check_integer("seed", 0 if seed is None else seed, 0, MAX_SEED),
           "priority": check_integer("priority", PRIORITIES[0] if priority is None else priority,
                                     PRIORITIES[0], PRIORITIES[-1])}
    if output is not None:
        out["output"] = check_choice("output", output, OUTPUTS)
    return out
