"""ADM UNet configurations: guided-diffusion's ``create_model`` arguments and the named presets.

Torch-free, so that the command line can list the presets without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["GROUPS", "PRESETS", "UNetConfig", "unet_config"]

# create_model's channel multipliers when channel_mult == "".
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
GROUPS = 32  # GroupNorm32


@dataclass(frozen=True)
class UNetConfig:
    """The keyword arguments of guided-diffusion's ``create_model`` (same names, same defaults).

    ``use_checkpoint`` and ``use_fp16`` are accepted for compatibility and ignored: this
    model never checkpoints and always builds fp32 weights. Only unconditional models
    are supported (``class_cond=False``).
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: str | tuple[float, ...] = ""
    learn_sigma: bool = False
    class_cond: bool = False
    use_checkpoint: bool = False
    attention_resolutions: int | str | tuple[int, ...] = "16"
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self):
        if self.class_cond:
            raise ValueError("class-conditional ADM models (class_cond=True) are not supported")
        for name in ("image_size", "num_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Canonical forms, so that e.g. attention_resolutions=16 and "16" compare equal.
        # channel_mult "" stays "": its meaning depends on image_size (also after replace()).
        if self.channel_mult != "":
            object.__setattr__(self, "channel_mult", _parse_channel_mult(self.channel_mult, self.image_size))
        object.__setattr__(self, "attention_resolutions", _parse_attention_resolutions(self.attention_resolutions))
        for ch in {int(m * self.num_channels) for m in self.channel_mults}:
            if ch < GROUPS or ch % GROUPS:
                raise ValueError(f"width {ch} is not a multiple of the {GROUPS} GroupNorm groups")

    @property
    def channel_mults(self) -> tuple[float, ...]:
        """Per-level width multipliers (create_model's parsing of ``channel_mult``)."""
        return _parse_channel_mult(self.channel_mult, self.image_size)

    @property
    def attention_ds(self) -> frozenset[int]:
        """Downsample factors (1 = full resolution) that get attention: image_size // resolution."""
        return frozenset(self.image_size // r for r in self.attention_resolutions)

    @property
    def out_channels(self) -> int:
        """6 (epsilon + variance interpolation) with learn_sigma, else 3."""
        return 6 if self.learn_sigma else 3

    @property
    def decoder_heads(self) -> int:
        """num_heads of the decoder's attention blocks (used only when num_head_channels == -1)."""
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample


def _parse_channel_mult(mult, image_size: int) -> tuple[float, ...]:
    if mult == "":
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {image_size} "
                f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}); pass channel_mult"
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    try:
        parsed = tuple(int(m) for m in mult.split(",")) if isinstance(mult, str) else tuple(mult)
    except (TypeError, ValueError):
        raise ValueError(f"channel_mult must be '' or like '1,2,4', got {mult!r}") from None
    if not parsed or not all(isinstance(m, (int, float)) and m > 0 for m in parsed):
        raise ValueError(f"channel_mult must be positive numbers, got {mult!r}")
    return parsed


def _parse_attention_resolutions(res) -> tuple[int, ...]:
    try:
        values = tuple(int(r) for r in (res.split(",") if isinstance(res, str) else
                                        [res] if isinstance(res, int) else res))
    except (TypeError, ValueError):
        raise ValueError(f"attention_resolutions must be like '32,16,8', got {res!r}") from None
    if any(r <= 0 for r in values):
        raise ValueError(f"attention resolutions must be positive, got {res!r}")
    return values


PRESETS = {
    "ffhq256": UNetConfig(
        image_size=256, num_channels=128, num_res_blocks=1, learn_sigma=True,
        attention_resolutions=16, num_heads=4, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True,
    ),
    "imagenet256": UNetConfig(
        image_size=256, num_channels=256, num_res_blocks=2, learn_sigma=True,
        attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
        use_scale_shift_norm=True, resblock_updown=True,
    ),
}


def unet_config(preset: str | UNetConfig | None = None, **overrides) -> UNetConfig:
    """A preset name or config, optionally with ``create_model`` keyword overrides."""
    names = {f.name for f in fields(UNetConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown UNet config arguments {unknown}; valid: {sorted(names)}")
    if preset is None:
        if not overrides:
            raise ValueError(
                f"the UNet architecture cannot be inferred from a checkpoint: pass preset="
                f"{' or '.join(map(repr, PRESETS))}, or the create_model keyword arguments"
            )
        return UNetConfig(**overrides)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown UNet preset {preset!r}; known: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if not isinstance(preset, UNetConfig):
        raise TypeError(f"preset must be a name or a UNetConfig, got {type(preset).__name__}")
    return replace(preset, **overrides)
