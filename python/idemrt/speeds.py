"""Speed presets: ``Decoder(speed=...)``, ``idemrt decompress --speed``, the demo and the service.

Each preset is a measured configuration of the perceptual decode (benchmarks/modes.py on the demo
models, docs/fast_modes.md): a :class:`~idemrt.decode_config.DecodeConfig`. Arguments given
explicitly override the preset's (:meth:`DecodeConfig.override`: a guidance chosen explicitly drops
the preset's guidance options, which belong to its own guidance); ``SPEEDS["fast"].replace(steps=20)``
derives a config directly. ``paper`` is the paper's decode, DPS with 1000 steps, and the default.
"""
from __future__ import annotations

from typing import Optional

from .decode_config import DecodeConfig

__all__ = ["DEFAULT_SPEED", "SPEEDS", "resolve_speed", "speed_name"]

SPEEDS: dict[str, DecodeConfig] = {
    # The paper: DDPM, 1000 steps, DPS scale 0.6 (2,000 UNet evaluations: 1000 forwards + backwards).
    "paper": DecodeConfig(steps=1000, sampler="ddpm", guidance="dps", scale=0.6, start=1.0, exact=False),
    # DSG warm-started from the MSE decode at t0 = 400 on a 50-step respacing: 20 forwards + 20
    # backwards, then the codec-only exact-idempotence refinement (the study's best realism per
    # cost: patch SWD 0.99x DPS-1000's, every symbol reproduced).
    "balanced": DecodeConfig(steps=50, sampler="ddpm", guidance="dsg", start=0.4, exact=True),
    # Codec-gradient guidance (PIR, its defaults), warm start at t0 = 400 on a 50-step respacing:
    # 20 UNet forwards and no UNet backward, then the exact-idempotence refinement.
    "fast": DecodeConfig(steps=50, sampler="ddpm", guidance="pir", start=0.4, guidance_options={}, exact=True),
}
DEFAULT_SPEED = "paper"


def speed_name(speed: Optional[str]) -> str:
    """``speed`` checked against :data:`SPEEDS` (None: :data:`DEFAULT_SPEED`); ValueError for an unknown preset."""
    name = DEFAULT_SPEED if speed is None else speed
    if name not in SPEEDS:
        raise ValueError(f"speed must be one of {tuple(SPEEDS)}, got {speed!r}")
    return name


def resolve_speed(speed: Optional[str], **given) -> DecodeConfig:
    """The DecodeConfig of preset ``speed`` (None: :data:`DEFAULT_SPEED`) with the non-None
    ``given`` fields taking precedence (:meth:`DecodeConfig.override`). ValueError for an unknown
    preset or field."""
    return SPEEDS[speed_name(speed)].override(**given)
