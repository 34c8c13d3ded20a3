"""What a decode service serves: its models and limits, from the server's configuration only.

A client never names a file or a model: requests pick among what this configuration allows
(its ``speeds`` and their ``respacings``, modes, formats, priorities). The same object is the Ray
Serve application's argument and what ``idemrt serve --print-config`` writes into the YAML that
``serve deploy`` takes.

Every speed a request may ask for is a :class:`~idemrt.decode_config.DecodeConfig`: ``speeds``
maps each to its fields (a preset's, :data:`idemrt.speeds.SPEEDS`, unless given), the default speed
first; ``respacings`` maps each to the respacings a request may ask for (the first is the default).
Made from its own ``to_dict()`` (what the ingress and the replicas get) a config is complete data
and needs no torch; the presets are read (torch) only to fill in a config given by names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any, Optional

from ..decode_config import DecodeConfig
from ..decode_request import MAX_SEED, PRIORITIES  # noqa: F401 - re-exported: the service's limits

PROXY_LOCATIONS = ("HeadOnly", "EveryNode")
USER_CONFIG = ("max_slots", "queue", "pixel_budget")  # applied by DecoderReplica.reconfigure, no restart


@dataclass
class ServeConfig:
    unet: Optional[str] = None  # ADM UNet checkpoint (None: MSE decodes only)
    preset: str = "ffhq256"
    unet_overrides: dict = field(default_factory=dict)  # create_model keyword arguments (non-preset UNets)
    codec: str = "bmshj2018-hyperprior"
    quality: Optional[int] = None
    codec_checkpoint: Optional[str] = None
    pretrained_codec: bool = False
    models: Optional[str] = None  # a model store (docs/model_store.md): every codec and prior in it, instead of the above
    prior: Optional[str] = None  # with models: the default prior's id (None: the store's only prior, if one)
    speed: Optional[str] = None  # the default speed (None: the first of ``speeds``, else "paper", DPS-1000)
    speeds: Optional[dict] = None  # speed -> its DecodeConfig (or the fields over the preset of that name); None: every preset
    respacings: Optional[dict] = None  # speed -> respacings a request may ask for, default first (None: its config's steps)
    backend: Optional[str] = None  # default: idemrt.defaults.default_backend
    replicas: int = 1  # fixed replica count (the initial one when autoscaling)
    min_replicas: Optional[int] = None  # either bound given: autoscale on ongoing requests instead
    max_replicas: Optional[int] = None
    proxy_location: str = "HeadOnly"  # Serve's HTTP proxies: "HeadOnly" or "EveryNode"
    gpus_per_replica: float = 0.0  # > 0: one replica per GPU share, decoding on CUDA
    cpus_per_replica: float = 1.0
    # images per batched step. On CUDA to be chosen from the throughput curve (per-image step time
    # against batch size: benchmarks/gpu_variants.py, issue 30 item 4) once a GPU run has measured it.
    max_slots: int = 16
    deterministic: bool = False  # each image's result independent of its batch (one backend call per image)
    batching: str = "continuous"  # "static": request-level batches, the load study's baseline
    batch_wait_s: float = 0.0  # static batching: how long a batch waits to fill
    queue: int = 256  # images a replica holds (running and waiting) before answering 503
    pixel_budget: int = 0  # pixels per step of one replica (0: derived by the engine)
    max_body_bytes: int = 64 << 20
    max_pixels: int = 4096 * 4096  # an image's (padded) pixels; more: 413
    # Images larger than the prior's native size decode in windows of it (idemrt.diffusion.tiling),
    # each window a slot of the step batch: True (the default windows), False (the whole image), or
    # a mapping of Tiling's fields. The windows of one image are limited too (more: 413).
    tile: Any = True
    max_windows: int = 1024
    timeout_s: float = 600.0  # per-request deadline (504 after it)
    preview_every: int = 0  # stream a preview every this many steps (0: about 10 per decode)
    preview_size: int = 64  # longest side of a preview, pixels
    # Shorthands a config may be made with (not kept: folded into ``speeds`` and ``respacings``):
    # the speeds a request may ask for (presets, the default first), and the respacings, sampler,
    # guidance and DPS scale of the default speed.
    speeds_allowed: InitVar[Optional[list]] = None
    steps_allowed: InitVar[Optional[list]] = None
    sampler: InitVar[Optional[str]] = None
    guidance: InitVar[Optional[str]] = None
    scale: InitVar[Optional[float]] = None

    def __post_init__(self, speeds_allowed, steps_allowed, sampler, guidance, scale):
        self._set_speeds(speeds_allowed, {"sampler": sampler, "guidance": guidance, "scale": scale})
        self._set_respacings(steps_allowed)
        if self.models is not None and (self.unet or self.codec_checkpoint or self.pretrained_codec):
            raise ValueError("models (a model store) replaces unet, codec_checkpoint and pretrained_codec: "
                             "give either")
        if self.prior is not None and self.models is None:
            raise ValueError("prior names a prior of a model store: give models too")
        for name in ("replicas", "max_slots", "queue", "max_body_bytes", "max_pixels", "max_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.timeout_s <= 0 or self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("timeout_s must be > 0 and the resources per replica >= 0")
        if int(self.pixel_budget) < 0:
            raise ValueError(f"pixel_budget must be >= 0 (0: derived by the engine), got {self.pixel_budget!r}")
        if self.proxy_location not in PROXY_LOCATIONS:
            raise ValueError(f"proxy_location must be one of {PROXY_LOCATIONS}, got {self.proxy_location!r}")
        if self.autoscaling:
            if self.min_replicas is None:
                self.min_replicas = 1
            if self.max_replicas is None:
                self.max_replicas = max(self.min_replicas, self.replicas)
            if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
                raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                                 f"{self.min_replicas}, {self.max_replicas}")

    def _set_speeds(self, allowed: Optional[list], own: dict) -> None:
        """``speeds``: every allowed speed's whole DecodeConfig as data, the default first. A speed
        given by name only, or by some fields, is completed from its preset (:func:`idemrt.speeds.resolve_speed`,
        which imports torch); the server's backend and determinism apply to every speed."""
        if allowed is not None and self.speeds is not None:
            raise ValueError("give speeds (a map of speed -> DecodeConfig) or speeds_allowed (preset names), not both")
        speeds = dict.fromkeys(str(s) for s in allowed) if allowed is not None else dict(self.speeds or {})
        if self.speed is None and speeds:
            self.speed = next(iter(speeds))
        own = {k: v for k, v in own.items() if v is not None}
        if not isinstance(self.tile, (bool, dict)):
            raise ValueError(f"tile must be true, false or a mapping of Tiling's fields, got {self.tile!r}")
        tile = (dict(self.tile) if isinstance(self.tile, dict) else {}) if self.tile is not False else None
        wide = {"deterministic": self.deterministic, "tile": tile, **({"backend": self.backend} if self.backend else {})}
        if not speeds or own or not all(_complete(v) for v in speeds.values()):
            from ..speeds import SPEEDS, resolve_speed, speed_name

            if not speeds:  # every preset, the default first
                self.speed = speed_name(self.speed)
                speeds = dict.fromkeys([self.speed, *SPEEDS])
            unknown = [s for s, v in speeds.items() if s not in SPEEDS and not _complete(v)]
            if unknown:
                raise ValueError(f"speeds {unknown} are not presets of {list(SPEEDS)}: give each its whole DecodeConfig")
            speeds = {s: _fields(v) if _complete(v) else
                      resolve_speed(s, **_fields(v), **(own if s == self.speed else {})).to_dict()
                      for s, v in speeds.items()}
        if self.speed not in speeds:
            raise ValueError(f"the speeds must hold the default speed {self.speed!r}, got {list(speeds)}")
        self.speeds = {s: {**_fields(speeds[s]), **wide} for s in [self.speed, *(s for s in speeds if s != self.speed)]}

    def _set_respacings(self, steps_allowed: Optional[list]) -> None:
        given = dict(self.respacings or {})
        if steps_allowed is not None:
            if self.respacings is not None:
                raise ValueError("give respacings (a map of speed -> respacings) or steps_allowed, not both")
            given[self.speed] = steps_allowed
        unknown = sorted(set(given) - set(self.speeds))
        if unknown:
            raise ValueError(f"respacings of speeds {unknown} this server does not serve ({list(self.speeds)})")
        self.respacings = {s: [str(r) for r in given.get(s, [_respacing_name(cfg["steps"])])]
                           for s, cfg in self.speeds.items()}
        empty = [s for s, r in self.respacings.items() if not r]
        if empty:
            raise ValueError(f"speeds {empty} need at least one respacing")
        for s, respacings in self.respacings.items():  # a speed's config holds its default respacing
            self.speeds[s]["steps"] = _respacing(respacings[0])

    @property
    def autoscaling(self) -> bool:
        """Whether the decoder replicas autoscale (``min_replicas``/``max_replicas``) instead of a fixed count."""
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def perceptual(self) -> bool:
        """Whether the server may have a diffusion prior (a UNet file, or a model store's priors)."""
        return bool(self.unet or self.models)

    def user_config(self) -> dict:
        """The tunables a running replica applies without a restart (Serve's ``user_config``)."""
        return {name: int(getattr(self, name)) for name in USER_CONFIG}

    @classmethod
    def demo(cls, **overrides) -> "ServeConfig":
        """The bundled demo models (idemrt/demo_models; 64x64-trained UNet, small hyperprior codec),
        DDPM + DPS at the demo's 100 steps, or a ``speed`` preset's configuration."""
        from ..demo_assets import DEMO_SCALE, DEMO_STEPS, demo_config, demo_file

        cfg = demo_config()
        files = {k: str(demo_file(cfg[k]["file"])) for k in ("unet", "codec")}
        own = {} if overrides.get("speed") else {"steps_allowed": [str(DEMO_STEPS)], "scale": DEMO_SCALE}
        return cls(**{"unet": files["unet"], "unet_overrides": cfg["unet"]["config"], "codec": cfg["codec"]["name"],
                      "codec_checkpoint": files["codec"], **own, **overrides})

    def steps_for(self, speed: str) -> list:
        """The respacings a request of ``speed`` may ask for, the default first."""
        return list(self.respacings[speed])

    def decode_config(self, speed: Optional[str] = None, steps=None) -> DecodeConfig:
        """The :class:`~idemrt.decode_config.DecodeConfig` of a request of ``speed`` (None: the
        default speed) at respacing ``steps`` (None: its default)."""
        speed = self.speed if speed is None else speed
        steps = self.steps_for(speed)[0] if steps is None else steps
        return DecodeConfig.from_dict({**self.speeds[speed], "steps": _respacing(steps)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"


# Read-only views, set after the class: a dataclass's InitVar of the same name would take a
# property defined in the class body as its default.
ServeConfig.speeds_allowed = property(lambda self: list(self.speeds), doc="The speeds a request may ask for, the default first.")
ServeConfig.steps_allowed = property(lambda self: self.steps_for(self.speed),
                                     doc="The default speed's respacings, the default first.")

_DECODE_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodeConfig))


def _complete(value) -> bool:
    """Whether ``value`` is a whole DecodeConfig (an object, or every field of one as data)."""
    return isinstance(value, DecodeConfig) or (isinstance(value, dict) and set(value) == _DECODE_FIELDS)


def _fields(value) -> dict:
    """A speed's given fields: a DecodeConfig's ``to_dict()``, a dict as it is, None: none."""
    if isinstance(value, DecodeConfig):
        return value.to_dict()
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"a speed's configuration is a DecodeConfig or a dict of its fields, got {value!r}")
    unknown = sorted(set(value or {}) - _DECODE_FIELDS)
    if unknown:
        raise ValueError(f"unknown decode options {unknown}; the fields are {sorted(_DECODE_FIELDS)}")
    return dict(value or {})


def _respacing(name):
    """A request's respacing as a DecodeConfig's ``steps``: "100" is the int 100, others stay as named."""
    return int(name) if isinstance(name, str) and name.isdigit() else name


def _respacing_name(steps) -> str:
    """A respacing as a request names it: "1000", "ddim50", "10,20" (a tuple of section counts)."""
    return ",".join(map(str, steps)) if isinstance(steps, (list, tuple)) else str(steps)
