"""Command-line options shared by ``idemrt`` subcommands (decompress, demo, eval, export, PSC).

Choices come from the registries (UNet presets, samplers, guidance, backends, dtype names), so a
new entry shows up on every command at once.
"""
from __future__ import annotations

import argparse
import dataclasses

from .defaults import DTYPE_CHOICES
from .models.unet_config import PRESETS


def steps_value(text: str):
    """``--steps`` as the Decoder takes it: an int count, or a respacing string ("ddim50", "10,20")."""
    return int(text) if isinstance(text, str) and text.isdigit() else text


def start_value(text: str) -> float:
    """``--start``: a number in (0, 1] (a usage error otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def add_unet_options(parser, *, unet_help: str = "ADM UNet checkpoint (guided-diffusion .pt)") -> None:
    parser.add_argument("--unet", default=None, help=unet_help)
    parser.add_argument("--preset", default="ffhq256", choices=sorted(PRESETS), help="the UNet's architecture")


def add_dtype_option(parser, help: str) -> None:
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help=help)


def add_sampling_options(parser, *, steps: str | None, scale, guidance_none: bool = True, speed: bool = False) -> None:
    """--steps, --sampler, --guidance, --scale, --interval and --seed of a perceptual decode; with
    ``speed``, also --speed, --start and --exact, and the sampling options default to the preset's."""
    from .diffusion import GUIDANCE, SAMPLERS

    preset = " (default: the --speed preset's)" if speed else ""
    parser.add_argument("--steps", type=steps_value, default=steps_value(steps),
                        help="respaced steps: 1000, 100, 'ddim200', or section counts '10,20'" + preset)
    parser.add_argument("--sampler", default=None if speed else "ddpm", choices=sorted(SAMPLERS), help=preset or None)
    parser.add_argument("--guidance", default=None if speed else "dps",
                        choices=[*GUIDANCE, *(["none"] if guidance_none else [])], help=preset or None)
    parser.add_argument("--scale", type=float, default=scale, help="DPS step size (default %(default)s)")
    parser.add_argument("--interval", type=int, default=None if speed else 1,
                        help="DSG: guide every k-th step (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    if speed:
        from .speeds import DEFAULT_SPEED, SPEEDS

        parser.add_argument("--speed", default=None, choices=sorted(SPEEDS),
                            help=f"a measured preset (docs/fast_modes.md; default {DEFAULT_SPEED}: DPS, 1000 steps)")
        parser.add_argument("--start", type=start_value, default=None,
                            help="warm start from the MSE decode at t0 = start*1000, start in (0, 1]")
        parser.add_argument("--exact", action=argparse.BooleanOptionalAction, default=None,
                            help="refine the decode until it re-encodes to the received symbols")
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="a DecodeConfig file (.json, or .yaml/.yml) instead of --speed; the options "
                                 "given explicitly override it")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved DecodeConfig as JSON and exit (no input needed)")


def add_tile_options(parser) -> None:
    """--tile/--no-tile and the window options of a tiled decode (:mod:`idemrt.diffusion.tiling`)."""
    from .diffusion.tiling import BLEND_WEIGHTS

    parser.add_argument("--tile", action=argparse.BooleanOptionalAction, default=None,
                        help="run the prior on overlapping windows of its native size when the image is larger "
                             "(default: on, or a --config file's choice); --no-tile: the whole image")
    parser.add_argument("--tile-stride", type=int, default=None, help="pixels between windows (default: 3/4 window)")
    parser.add_argument("--tile-weights", default=None, choices=BLEND_WEIGHTS, help="blend weights (default ramp)")
    parser.add_argument("--tile-chunk", type=int, default=None,
                        help="at most this many windows a UNet call (default 8): the memory a step takes")


def tile_from_args(args, base):
    """The ``tile`` of a command's DecodeConfig: off with --no-tile; else ``base`` (a config file's
    Tiling, or None for the default Tiling()) with the --tile-* options given."""
    from .diffusion.tiling import Tiling

    if args.tile is False:
        return False
    tiling = base if base is not None else Tiling()
    changes = {k: v for k, v in dict(stride=args.tile_stride, weights=args.tile_weights,
                                     chunk=args.tile_chunk).items() if v is not None}
    return dataclasses.replace(tiling, **changes)


def decode_config_from_args(args):
    """The :class:`~idemrt.decode_config.DecodeConfig` of ``add_sampling_options(speed=True)``'s options:
    ``--config FILE`` or the ``--speed`` preset, overridden by the options given (those left at None).
    With :func:`add_tile_options`: a preset decode is tiled unless --no-tile; a config file's tile holds
    unless --tile/--no-tile or a --tile-* option is given."""
    from .defaults import dtype_from_name
    from .speeds import resolve_speed

    given = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, scale=args.scale,
                 interval=args.interval, start=args.start, exact=args.exact,
                 constraint=getattr(args, "constraint", None), max_retries=getattr(args, "max_retries", None),
                 backend=getattr(args, "backend", None), dtype=dtype_from_name(getattr(args, "dtype", None)))
    if args.config is None:
        config = resolve_speed(args.speed, **given)
    elif args.speed is not None:
        raise ValueError("--config FILE is a whole decode configuration: give it or --speed, not both")
    else:
        from .decode_config import DecodeConfig

        config = DecodeConfig.load(args.config).override(**given)
        if not hasattr(args, "tile") or (args.tile is None and (args.tile_stride, args.tile_weights,
                                                                args.tile_chunk) == (None, None, None)):
            return config  # the file's tiling
    return config.replace(tile=tile_from_args(args, config.tile)) if hasattr(args, "tile") else config


def add_backend_option(parser) -> None:
    from .backends.base import available_backends

    parser.add_argument("--backend", default=None, choices=available_backends(),
                        help="how a step runs (default: fast on CUDA and on CPUs with native bf16, else eager; $IDEMRT_BACKEND overrides)")
