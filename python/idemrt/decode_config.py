"""How a perceptual decode runs, as data: :class:`DecodeConfig`.

One frozen value holds every choice of the decode — the respacing, sampler, guidance and its
options, warm start, exact refinement, constraint, backend and dtype, retries, tiling — and nothing about
the models, the device or the inputs. ``Decoder(codec, unet, config=cfg)``, the speed presets
(:data:`idemrt.speeds.SPEEDS` maps names to DecodeConfigs), ``idemrt decompress --config FILE``
and the service all take it; ``cfg.replace(steps=20)`` (:func:`dataclasses.replace`) derives
another, and ``to_dict``/``from_dict``, ``to_json``/``from_json``, ``to_yaml``/``from_yaml`` and
``load``/``save`` round-trip it (a torch dtype is written by its name: "fp32", "bf16", "fp16").

Values are checked when the config is made (ValueError/TypeError naming the field); what depends
on the prior (a respacing of its T steps, a warm start that finds a step) is checked by the Decoder.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .decode_request import check_choice
from .defaults import DTYPE_CHOICES

__all__ = ["DecodeConfig", "CONSTRAINTS"]

CONSTRAINTS = ("x", "y")  # the idempotence constraint in image space (x) or in latent space (y)


@dataclass(frozen=True)
class DecodeConfig:
    """The configuration of a perceptual decode (the defaults: the paper's, DPS with 1000 steps).

    ``steps``: a respacing of the prior's training steps (an int, a string such as "ddim50" or
    "10,20", or a tuple of section counts); ``sampler``: a name of :data:`idemrt.diffusion.SAMPLERS`;
    ``guidance``: a name of :data:`idemrt.diffusion.GUIDANCE` or "none"; ``scale``: DPS's step size
    (None: the guidance's default, 0.6); ``interval``: DSG's; ``guidance_options``: further fields
    of the guidance (e.g. PIR's iters, lam, zeta); ``start``: warm start from the MSE decode at t0 =
    round(start·T) (1: pure noise); ``exact``: refine until the decode re-encodes to the received
    latent; ``constraint``: "x" or "y"; ``eta``: DDIM's; ``max_retries``/``retry_threshold``/
    ``nan_retries``: :class:`idemrt.diffusion.RetryPolicy`'s; ``check_every``: how often (steps) the
    sampler looks at the distance; ``deterministic``: one backend call per image; ``backend``: a
    name of :func:`idemrt.backends.base.available_backends` (None: the device's default; checked when
    the backend is made) with its
    ``backend_options``; ``dtype``: the UNet's compute dtype (a torch dtype, or its name in
    :data:`idemrt.defaults.DTYPE_CHOICES`; None: the backend's or the prior's); ``tile``: run the prior
    on overlapping windows of images larger than its native size (:class:`idemrt.diffusion.tiling.Tiling`,
    or a mapping of its fields, or True for its defaults; None or False: the whole image, the default)."""

    steps: Union[int, str, tuple] = 1000
    sampler: str = "ddpm"
    guidance: str = "dps"
    scale: Optional[float] = None
    interval: int = 1
    guidance_options: dict = field(default_factory=dict)
    start: float = 1.0
    exact: bool = False
    constraint: str = "x"
    eta: float = 1.0
    max_retries: int = 0
    retry_threshold: float = 20.0
    nan_retries: int = 1
    check_every: int = 10
    deterministic: bool = False
    backend: Optional[str] = None
    backend_options: dict = field(default_factory=dict)
    dtype: Any = None
    tile: Any = None

    def __post_init__(self):
        from .diffusion.guidance import RetryPolicy, _check_finite, make_guidance
        from .diffusion.samplers import SAMPLERS
        from .diffusion.schedule import check_start, parse_respacing

        steps = tuple(self.steps) if isinstance(self.steps, list) else self.steps
        if not isinstance(steps, (int, str, tuple)) or isinstance(steps, bool):
            raise TypeError(f"steps must be an int, a respacing string or a tuple of ints, got {steps!r}")
        parse_respacing(steps)
        _set(self, "steps", steps)
        check_choice("sampler", self.sampler, tuple(SAMPLERS))
        check_choice("constraint", self.constraint, CONSTRAINTS)
        for name in ("guidance_options", "backend_options"):
            value = getattr(self, name)
            value = {} if value is None else value
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise TypeError(f"{name} must be a dict with str keys, got {value!r}")
            _set(self, name, dict(value))  # a copy: the caller's dict cannot change this config
        if self.scale is not None:
            _set(self, "scale", _check_finite("scale", self.scale))
        make_guidance(self.guidance, scale=self.scale, interval=self.interval, options=self.guidance_options)
        _set(self, "start", check_start(self.start))
        _set(self, "eta", _check_finite("eta", self.eta))
        RetryPolicy(threshold=self.retry_threshold, max_retries=self.max_retries, nan_retries=self.nan_retries)
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {self.check_every!r}")
        for name in ("exact", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.backend is not None and not isinstance(self.backend, str):
            # The name is checked where the backend is made (a BackendError naming the choices).
            raise TypeError(f"backend must be a backend's name (str) or None, got {self.backend!r}")
        from .diffusion.tiling import Tiling

        _set(self, "tile", Tiling.from_value(self.tile))
        if isinstance(self.dtype, str):
            from .defaults import dtype_from_name

            _set(self, "dtype", dtype_from_name(self.dtype))
        elif self.dtype is not None:
            import torch

            if not isinstance(self.dtype, torch.dtype):
                raise TypeError(f"dtype must be a torch dtype, one of {DTYPE_CHOICES} or None, got {self.dtype!r}")

    def __hash__(self):
        return hash(self.to_json())

    def __getitem__(self, name: str):
        """``cfg["steps"]``: the field, as the speed presets' dicts were read before they were DecodeConfigs."""
        if name not in _FIELDS:
            raise KeyError(name)
        return getattr(self, name)

    # -- deriving --------------------------------------------------------------------------------------
    def replace(self, **changes) -> DecodeConfig:
        """:func:`dataclasses.replace`: a copy with ``changes`` (checked like any new config)."""
        return dataclasses.replace(self, **changes)

    def override(self, **given) -> DecodeConfig:
        """A copy with the non-None ``given`` fields, the rule of explicit arguments over a preset: a
        guidance other than this config's drops its ``guidance_options`` (they belong to its own guidance)."""
        _check_fields(given, "override()")
        changes = {k: v for k, v in given.items() if v is not None}
        if "guidance" in changes and changes["guidance"] != self.guidance and "guidance_options" not in changes:
            changes["guidance_options"] = {}
        return self.replace(**changes) if changes else self

    # -- as data -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON/YAML values: the dtype by name, a tuple respacing as a list."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["guidance_options"], out["backend_options"] = dict(self.guidance_options), dict(self.backend_options)
        if isinstance(self.steps, tuple):
            out["steps"] = list(self.steps)
        if self.dtype is not None:
            from .defaults import dtype_name

            out["dtype"] = dtype_name(self.dtype)
        if self.tile is not None:
            out["tile"] = self.tile.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DecodeConfig:
        """The config of ``to_dict``'s mapping; fields left out take their defaults, unknown ones are a ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"a DecodeConfig is read from a mapping, got {type(data).__name__}")
        _check_fields(data, "DecodeConfig")
        return cls(**data)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> DecodeConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> DecodeConfig:
        import yaml

        return cls.from_dict(yaml.safe_load(text))

    @classmethod
    def load(cls, path) -> DecodeConfig:
        """A config file: YAML for ``.yaml``/``.yml`` names, JSON otherwise."""
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls.from_yaml(text) if _is_yaml(path) else cls.from_json(text)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml() if _is_yaml(path) else self.to_json(indent=2) + "\n")


_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeConfig))


def _set(config: DecodeConfig, name: str, value) -> None:
    object.__setattr__(config, name, value)  # __post_init__'s normalisation of a frozen instance


def _check_fields(given, where: str) -> None:
    unknown = sorted(set(given) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown decode options {unknown}; the fields are {list(_FIELDS)}")


def _is_yaml(path) -> bool:
    return str(path).lower().endswith((".yaml", ".yml"))
