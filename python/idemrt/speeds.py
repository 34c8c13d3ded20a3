"""Speed presets: ``Decoder(speed=...)``, ``idemrt decompress --speed``, the demo and the service.

Each preset is a measured configuration of the perceptual decode (benchmarks/modes.py on the demo
models, docs/fast_modes.md): the Decoder arguments it sets. Arguments given explicitly override
the preset's (a guidance chosen explicitly drops the preset's guidance options, which belong to
its own guidance). ``paper`` is the paper's decode, DPS with 1000 steps, and the default.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["DEFAULT_SPEED", "SPEEDS", "resolve_speed"]

SPEEDS: dict[str, dict] = {
    # The paper: DDPM, 1000 steps, DPS scale 0.6 (2,000 UNet evaluations: 1000 forwards + backwards).
    "paper": dict(steps=1000, sampler="ddpm", guidance="dps", scale=0.6, start=1.0, exact=False),
    # DSG warm-started from the MSE decode at t0 = 400 on a 50-step respacing: 20 forwards + 20
    # backwards, then the codec-only exact-idempotence refinement (the study's best realism per
    # cost: patch SWD 0.99x DPS-1000's, every symbol reproduced).
    "balanced": dict(steps=50, sampler="ddpm", guidance="dsg", start=0.4, exact=True),
    # Codec-gradient guidance (PIR, its defaults), warm start at t0 = 400 on a 50-step respacing:
    # 20 UNet forwards and no UNet backward, then the exact-idempotence refinement.
    "fast": dict(steps=50, sampler="ddpm", guidance="pir", start=0.4, guidance_options={}, exact=True),
}
DEFAULT_SPEED = "paper"
_KEYS = ("steps", "sampler", "guidance", "scale", "start", "guidance_options", "exact")


def resolve_speed(speed: Optional[str], **given) -> dict:
    """The Decoder arguments of preset ``speed`` (None: :data:`DEFAULT_SPEED`) with the non-None
    ``given`` ones (keys of the presets) taking precedence. ValueError for an unknown preset."""
    name = DEFAULT_SPEED if speed is None else speed
    if name not in SPEEDS:
        raise ValueError(f"speed must be one of {tuple(SPEEDS)}, got {speed!r}")
    unknown = set(given) - set(_KEYS)
    if unknown:
        raise ValueError(f"resolve_speed() got unknown arguments {sorted(unknown)}")
    out = {k: None for k in _KEYS}
    out.update(SPEEDS[name])
    if given.get("guidance") is not None and given["guidance"] != out["guidance"]:
        out["guidance_options"] = None
    out.update({k: v for k, v in given.items() if v is not None})
    out["speed"] = name
    return out
