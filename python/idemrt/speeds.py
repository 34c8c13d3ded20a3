"""Speed presets: ``Decoder(config="fast")``, ``idemrt decompress --speed``, the demo and the service.

Each preset is a measured configuration of the perceptual decode (benchmarks/modes.py on the demo
models, docs/fast_modes.md): a :class:`~idemrt.decode_config.DecodeConfig`. Arguments given
explicitly override the preset's (:meth:`DecodeConfig.override`: a guidance chosen explicitly drops
the preset's guidance options, which belong to its own guidance); ``SPEEDS["fast"].replace(steps=20)``
derives a config directly. ``paper`` is the paper's decode, DPS with 1000 steps, and the default.
"""
from __future__ import annotations

from typing import Optional

from .decode_config import DecodeConfig

__all__ = ["DEFAULT_SPEED", "SPEEDS", "decode_config", "resolve_speed", "speed_name"]

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


def decode_config(config=None, *, owner: str, default: Optional[DecodeConfig] = None, speed: Optional[str] = None,
                  **loose) -> DecodeConfig:
    """The DecodeConfig a function of idemrt was given: ``config`` (a DecodeConfig or a preset name),
    else ``default``, else the preset ``speed`` (None: :data:`DEFAULT_SPEED`), overridden by the
    non-None ``loose`` fields. ``speed`` and the loose fields are deprecated aliases of ``config``: one
    DeprecationWarning names those ``owner`` was given."""
    import warnings

    given = sorted(k for k, v in {"speed": speed, **loose}.items() if v is not None)
    if given:
        warnings.warn(f"{owner}({'=, '.join(given)}=): loose decode options are deprecated; pass config= (an "
                      f"idemrt.DecodeConfig, e.g. SPEEDS['fast'].replace(steps=20), or a preset name)",
                      DeprecationWarning, stacklevel=3)
    if config is not None and speed is not None:
        raise ValueError("give a speed preset or a config, not both (a config is a whole decode configuration)")
    if isinstance(config, str):
        config = SPEEDS[speed_name(config)]
    elif config is not None and not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig or a preset name, got {type(config).__name__}")
    base = config if config is not None else default if default is not None and speed is None else SPEEDS[speed_name(speed)]
    return base.override(**loose)
