"""Command-line options shared by ``idemrt`` subcommands (decompress, demo, eval, export, PSC).

Choices come from the registries (UNet presets, samplers, guidance, backends, dtype names), so a
new entry shows up on every command at once.
"""
from __future__ import annotations

from .defaults import DTYPE_CHOICES
from .models.unet_config import PRESETS


def steps_value(text: str):
    """``--steps`` as the Decoder takes it: an int count, or a respacing string ("ddim50", "10,20")."""
    return int(text) if isinstance(text, str) and text.isdigit() else text


def add_unet_options(parser, *, unet_help: str = "ADM UNet checkpoint (guided-diffusion .pt)") -> None:
    parser.add_argument("--unet", default=None, help=unet_help)
    parser.add_argument("--preset", default="ffhq256", choices=sorted(PRESETS), help="the UNet's architecture")


def add_dtype_option(parser, help: str) -> None:
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=help)


def add_sampling_options(parser, *, steps: str, scale, guidance_none: bool = True) -> None:
    """--steps, --sampler, --guidance, --scale, --interval and --seed of a perceptual decode."""
    from .diffusion import GUIDANCE, SAMPLERS

    parser.add_argument("--steps", type=steps_value, default=steps_value(steps),
                        help="respaced steps: 1000, 100, 'ddim200', or section counts '10,20'")
    parser.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    parser.add_argument("--guidance", default="dps", choices=[*GUIDANCE, *(["none"] if guidance_none else [])])
    parser.add_argument("--scale", type=float, default=scale, help="DPS step size (default %(default)s)")
    parser.add_argument("--interval", type=int, default=1, help="DSG: guide every k-th step (default 1)")
    parser.add_argument("--seed", type=int, default=0)


def add_backend_option(parser) -> None:
    from .backends.base import available_backends

    parser.add_argument("--backend", default=None, choices=available_backends(),
                        help="how a step runs (default: fast on CUDA, eager otherwise)")
