"""``idemrt demo``: compress a held-out photograph with the bundled demo models, decode it with the
MSE codec and perceptually, re-compress the perceptual image and write a side-by-side PNG.

The models and photographs: :mod:`idemrt.demo_assets`; the measurements and ``idemrt eval``:
:mod:`idemrt.evaluation`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .demo_assets import (DEMO_IMAGES, DEMO_SCALE, DEMO_SIZE, DEMO_STEPS, demo_decode_config, demo_image,
                          load_demo_codec, load_demo_unet)
from .evaluation import Pipeline, add_eval_subparser

DEMO_PNG = "idemrt_demo.png"



def side_by_side(panels, labels, scale: int = 3):
    """A PIL image: the panels (tensors of one size) in a row, upscaled ``scale``x, labelled."""
    from PIL import Image, ImageDraw

    from .images import to_pil

    tiles = [to_pil(p).resize((p.shape[-1] * scale, p.shape[-2] * scale), Image.NEAREST) for p in panels]
    w, h = tiles[0].size
    gap, top = 4, 16
    canvas = Image.new("RGB", (len(tiles) * (w + gap) - gap, h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        canvas.paste(tile, (k * (w + gap), top))
        draw.text((k * (w + gap) + 2, 2), label, fill="black")
    return canvas


def run_demo(out_dir=".", seed: int = 0, steps=None, *, config=None, image: str = "chelsea", size: int = DEMO_SIZE,
             device="cpu", progress: bool = True, sampler: str | None = None, scale: float | None = None,
             speed: str | None = None) -> dict:
    """Compress a held-out photograph with the demo codec, decode it both ways, write a PNG.

    ``config``: the decode's :class:`~idemrt.decode_config.DecodeConfig` or a preset name of
    :data:`idemrt.speeds.SPEEDS` (default: the demo's own, :func:`~idemrt.demo_assets.demo_decode_config`:
    DDPM, 100 steps, DPS scale 1.0); ``steps``, ``sampler``, ``scale`` and ``speed`` are its
    deprecated aliases.

    Writes ``out_dir/idemrt_demo.png`` (original | MSE decode | perceptual decode | MSE decode of the
    re-compressed perceptual image), atomically, replacing an older one. Prints and returns the facts.
    """
    from .fileio import atomic_writer
    from .speeds import decode_config

    t0 = time.perf_counter()
    x = demo_image(image, size)
    named = config if isinstance(config, str) else speed
    config = decode_config(config, owner="run_demo", default=demo_decode_config(), speed=speed, steps=steps,
                           sampler=sampler, scale=scale)
    pipe = Pipeline(load_demo_codec(device), load_demo_unet(device), config, device=device, progress=progress)
    preset = describe_preset(pipe.decoder, named)
    res = pipe.run(x, seed)
    ims = res["images"]
    png = Path(out_dir) / DEMO_PNG
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas = side_by_side(
        [ims["original"], ims["mse"], ims["perceptual"], ims["perc_redecoded"]],
        ["original", "MSE decode", "perceptual", "re-decoded"],
    )
    with atomic_writer(png, force=True) as f:
        canvas.save(f, format="PNG")
    facts = {
        "image": image,
        "size": f"{x.shape[-1]}x{x.shape[-2]}",
        "bpp": res["bpp"],
        "mse_psnr": res["mse"]["psnr"],
        "perceptual_psnr": res["perc"]["psnr"],
        "mse_sharpness": res["mse"]["sharpness"],
        "perceptual_sharpness": res["perc"]["sharpness"],
        "codec_mse": res["mse"]["mse"],
        "recompress_mse": res["perc"]["recompress_mse"],
        "recompress_psnr": res["perc"]["recompress_psnr"],
        "symbols_equal": res["perc"]["symbols_equal"],
        "steps": config.steps,
        "sampler": config.sampler,
        "preset": preset,
        "seconds": time.perf_counter() - t0,
        "png": str(png),
    }
    print(
        f"{png}: {image} {facts['size']}, {facts['bpp']:.3f} bpp\n"
        f"  MSE decode:        PSNR {facts['mse_psnr']:.2f} dB, sharpness {facts['mse_sharpness']:.2f} x original\n"
        f"  perceptual decode: PSNR {facts['perceptual_psnr']:.2f} dB, sharpness "
        f"{facts['perceptual_sharpness']:.2f} x original ({preset}, seed {seed})\n"
        f"  idempotence: re-compressing the perceptual decode gives MSE {facts['recompress_mse']:.2f} "
        f"(PSNR {facts['recompress_psnr']:.2f} dB) to the MSE decode, vs the codec's own MSE "
        f"{facts['codec_mse']:.2f}; {100 * facts['symbols_equal']:.1f}% of latent symbols equal\n"
        f"  time {facts['seconds']:.1f} s"
    )
    return facts


def describe_preset(decoder, speed) -> str:
    """What the demo decoded with: the speed preset's name (or "demo defaults") and its settings."""
    g = decoder.guidance
    scale = None if g is None else g.default_scale()  # a guidance with a step length (DPS) shows it
    guide = "none" if g is None else g.name if scale is None else f"{g.name.upper()} scale {scale:g}"
    warm = f", warm start {decoder.start:g}" if decoder.warm_start is not None else ""
    exact = ", exact" if decoder.exact else ""
    name = f"speed preset '{speed}'" if speed else "demo defaults, no speed preset"
    return (f"{name}: {decoder.sampler.name} {decoder.schedule.num_steps} steps, {guide}{warm}{exact}, "
            f"{decoder.steps_run} UNet evaluations")


def cmd_demo(args) -> int:
    from .speeds import SPEEDS

    if args.speed:  # a preset, with the options given on the command line over it
        config = SPEEDS[args.speed].override(steps=args.steps, sampler=args.sampler, scale=args.scale)
    else:
        config = demo_decode_config().override(steps=args.steps, sampler=args.sampler, scale=args.scale)
    run_demo(args.out_dir, seed=args.seed, config=config, image=args.image, size=args.size, device=args.device,
             progress=not args.quiet)
    return 0


def add_subparsers(subparsers) -> None:
    """Add ``demo`` and ``eval`` to the ``idemrt`` command line (``subparsers`` of build_parser)."""
    from .cli_options import steps_value
    from .diffusion import SAMPLERS
    from .speeds import SPEEDS

    d = subparsers.add_parser("demo", help="compress and decode a photograph with the bundled demo models")
    d.add_argument("--out-dir", default=".", help=f"where {DEMO_PNG} is written (replaced if present)")
    d.add_argument("--image", default="chelsea", choices=DEMO_IMAGES)
    d.add_argument("--size", type=int, default=DEMO_SIZE, help="image side in pixels (the shipped files are 128)")
    d.add_argument("--steps", type=steps_value, default=None,
                   help=f"respaced steps, e.g. 100 or 'ddim50' (default: {DEMO_STEPS}, or the --speed preset's)")
    d.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: ddpm, or the preset's")
    d.add_argument("--scale", type=float, default=None, help=f"DPS step size (default: {DEMO_SCALE}, or the preset's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--speed", default=None, choices=sorted(SPEEDS),
                   help="decode with a speed preset instead (docs/fast_modes.md)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    add_eval_subparser(subparsers)


def main(argv=None) -> int:
    """``python -m idemrt.demo [demo|eval ...]``: the demo with its defaults when no arguments are given."""
    p = argparse.ArgumentParser(prog="python -m idemrt.demo")
    add_subparsers(p.add_subparsers(dest="command"))
    args = p.parse_args(argv or ["demo"])
    return args.func(args)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
