"""What a decode service serves: its models and limits, from the server's configuration only.

A client never names a file or a model: requests pick among what this configuration allows
(``steps_allowed``, modes, formats). The same object is the Ray Serve application's argument and
what ``idemrt serve --print-config`` writes into the YAML that ``serve deploy`` takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ServeConfig:
    unet: Optional[str] = None  # ADM UNet checkpoint (None: MSE decodes only)
    preset: str = "ffhq256"
    unet_overrides: dict = field(default_factory=dict)  # create_model keyword arguments (non-preset UNets)
    codec: str = "bmshj2018-hyperprior"
    quality: Optional[int] = None
    codec_checkpoint: Optional[str] = None
    pretrained_codec: bool = False
    speed: Optional[str] = None  # a preset of idemrt.speeds (None: "paper", DPS-1000); the fields below override it
    steps_allowed: Optional[list] = None  # respacings a request may ask for; first = default (None: the preset's)
    sampler: Optional[str] = None
    guidance: Optional[str] = None
    scale: Optional[float] = None
    backend: Optional[str] = None  # default: fast on CUDA, eager otherwise
    replicas: int = 1
    gpus_per_replica: float = 0.0  # > 0: one replica per GPU share, decoding on CUDA
    cpus_per_replica: float = 1.0
    max_slots: int = 16  # images per step of one group
    queue: int = 256  # images a replica holds (running and waiting) before answering 503
    max_body_bytes: int = 64 << 20
    max_pixels: int = 4096 * 4096
    timeout_s: float = 600.0  # per-request deadline (504 after it)
    preview_every: int = 0  # stream a preview every this many steps (0: about 10 per decode)
    preview_size: int = 64  # longest side of a preview, pixels

    def __post_init__(self):
        from ..speeds import resolve_speed

        if self.steps_allowed is None:
            self.steps_allowed = [resolve_speed(self.speed)["steps"]]
        self.steps_allowed = [str(s) for s in self.steps_allowed]
        if not self.steps_allowed:
            raise ValueError("steps_allowed needs at least one respacing")
        for name in ("replicas", "max_slots", "queue", "max_body_bytes", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.timeout_s <= 0 or self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ValueError("timeout_s must be > 0 and the resources per replica >= 0")

    @classmethod
    def demo(cls, **overrides) -> "ServeConfig":
        """The bundled demo models (idemrt/demo_models; 64x64-trained UNet, small hyperprior codec),
        DDPM + DPS at the demo's 100 steps, or a ``speed`` preset's configuration."""
        from ..demo import DEMO_SCALE, DEMO_STEPS, demo_config, demo_file

        cfg = demo_config()
        files = {k: str(demo_file(cfg[k]["file"])) for k in ("unet", "codec")}
        own = {} if overrides.get("speed") else {"steps_allowed": [str(DEMO_STEPS)], "scale": DEMO_SCALE}
        return cls(**{"unet": files["unet"], "unet_overrides": cfg["unet"]["config"], "codec": cfg["codec"]["name"],
                      "codec_checkpoint": files["codec"], **own, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_replica > 0 else "cpu"
