"""What a decode service serves: its models and limits, from the server's configuration only.

A client never names a file or a model: requests pick among what this configuration allows
(``speeds_allowed``, ``steps_allowed``, modes, formats, priorities). The same object is the Ray Serve application's argument and
what ``idemrt serve --print-config`` writes into the YAML that ``serve deploy`` takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

PRIORITIES = range(0, 10)  # a request's priority: higher runs first (and may preempt lower ones)
MAX_SEED = 2**63 - 1  # seeds are 0 <= seed <= MAX_SEED (torch.Generator.manual_seed's signed range)
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
    speed: Optional[str] = None  # the default preset of idemrt.speeds (None: "paper", DPS-1000); the fields below override it
    speeds_allowed: Optional[list] = None  # presets a request may ask for (None: all, the default first)
    steps_allowed: Optional[list] = None  # respacings of the default speed; first = default (None: the preset's)
    sampler: Optional[str] = None
    guidance: Optional[str] = None
    scale: Optional[float] = None
    backend: Optional[str] = None  # default: idemrt.defaults.default_backend
    replicas: int = 1  # fixed replica count (the initial one when autoscaling)
    min_replicas: Optional[int] = None  # either bound given: autoscale on ongoing requests instead
    max_replicas: Optional[int] = None
    proxy_location: str = "HeadOnly"  # Serve's HTTP proxies: "HeadOnly" or "EveryNode"
    gpus_per_replica: float = 0.0  # > 0: one replica per GPU share, decoding on CUDA
    cpus_per_replica: float = 1.0
    max_slots: int = 16  # images per batched step
    deterministic: bool = False  # each image's result independent of its batch (one backend call per image)
    batching: str = "continuous"  # "static": request-level batches, the load study's baseline
    batch_wait_s: float = 0.0  # static batching: how long a batch waits to fill
    queue: int = 256  # images a replica holds (running and waiting) before answering 503
    pixel_budget: int = 0  # pixels per step of one replica (0: derived by the engine)
    max_body_bytes: int = 64 << 20
    max_pixels: int = 4096 * 4096
    timeout_s: float = 600.0  # per-request deadline (504 after it)
    preview_every: int = 0  # stream a preview every this many steps (0: about 10 per decode)
    preview_size: int = 64  # longest side of a preview, pixels

    def __post_init__(self):
        from ..speeds import SPEEDS, speed_name

        self.speed = speed_name(self.speed)
        if self.speeds_allowed is None:
            self.speeds_allowed = [self.speed] + [s for s in SPEEDS if s != self.speed]
        self.speeds_allowed = [str(s) for s in self.speeds_allowed]
        unknown = [s for s in self.speeds_allowed if s not in SPEEDS]
        if unknown or self.speed not in self.speeds_allowed:
            raise ValueError(f"speeds_allowed must be presets of {list(SPEEDS)} and hold the default speed "
                             f"{self.speed!r}, got {self.speeds_allowed}")
        if self.models is not None and (self.unet or self.codec_checkpoint or self.pretrained_codec):
            raise ValueError("models (a model store) replaces unet, codec_checkpoint and pretrained_codec: "
                             "give either")
        if self.prior is not None and self.models is None:
            raise ValueError("prior names a prior of a model store: give models too")
        if self.steps_allowed is None:
            self.steps_allowed = [SPEEDS[self.speed].steps]
        self.steps_allowed = [str(s) for s in self.steps_allowed]
        if not self.steps_allowed:
            raise ValueError("steps_allowed needs at least one respacing")
        for name in ("replicas", "max_slots", "queue", "max_body_bytes", "max_pixels"):
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
        """The respacings a request of ``speed`` may ask for, the default first: ``steps_allowed``
        for the server's default speed, the preset's own for the others."""
        from ..speeds import SPEEDS

        return list(self.steps_allowed) if speed == self.speed else [str(SPEEDS[speed].steps)]

    def decode_config(self, speed: Optional[str] = None, steps=None):
        """The :class:`~idemrt.decode_config.DecodeConfig` of a request of ``speed`` (None: the
        default speed) at respacing ``steps`` (None: its default): the preset, with this server's
        sampler, guidance and scale for its default speed, and its backend and determinism."""
        from ..speeds import resolve_speed

        speed = self.speed if speed is None else speed
        own = speed == self.speed
        steps = self.steps_for(speed)[0] if steps is None else steps
        steps = int(steps) if isinstance(steps, str) and steps.isdigit() else steps
        return resolve_speed(speed, steps=steps, sampler=self.sampler if own else None,
                             guidance=self.guidance if own else None, scale=self.scale if own else None,
                             backend=self.backend, deterministic=self.deterministic)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"
