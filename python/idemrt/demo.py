"""``idemrt demo``: compress a held-out photograph with the bundled demo models, decode it with the
MSE codec and perceptually, re-compress the perceptual image and write a side-by-side PNG.

The models and photographs: :mod:`idemrt.demo_assets`; the measurements and ``idemrt eval``:
:mod:`idemrt.evaluation`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .demo_assets import DEMO_IMAGES, DEMO_SCALE, DEMO_SIZE, DEMO_STEPS, demo_image, load_demo_codec, load_demo_unet
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


def run_demo(out_dir=".", seed: int = 0, steps=DEMO_STEPS, *, sampler: str = "ddpm", scale: float = DEMO_SCALE,
             image: str = "chelsea", size: int = DEMO_SIZE, device="cpu", progress: bool = True,
             speed: str | None = None, config=None) -> dict:
    """Compress a held-out photograph with the demo codec, decode it both ways, write a PNG.

    ``speed``: a preset of :data:`idemrt.speeds.SPEEDS` (it then sets the steps, sampler, guidance
    and scale); ``config``: a whole :class:`~idemrt.decode_config.DecodeConfig` (``steps``,
    ``sampler`` and ``scale`` are then ignored); neither: the demo's own configuration (``steps``,
    ``sampler``, DPS ``scale``).

    Writes ``out_dir/idemrt_demo.png`` (original | MSE decode | perceptual decode | MSE decode of the
    re-compressed perceptual image), atomically, replacing an older one. Prints and returns the facts.
    """
    from .fileio import atomic_writer

    t0 = time.perf_counter()
    x = demo_image(image, size)
    if speed is not None or config is not None:
        steps = sampler = scale = None  # the preset's, or the config's
    pipe = Pipeline(load_demo_codec(device), load_demo_unet(device), steps=steps, sampler=sampler,
                    guidance=None if speed or config else "dps", scale=scale, device=device, progress=progress,
                    speed=speed, config=config)
    preset = describe_preset(pipe.decoder, speed, given_config=config is not None)
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
        "steps": steps,
        "sampler": sampler,
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


def describe_preset(decoder, speed, given_config: bool = False) -> str:
    """What the demo decoded with: the speed preset's name (or "demo defaults") and its settings."""
    g = decoder.guidance
    guide = f"DPS scale {g.scale:g}" if getattr(g, "name", None) == "dps" else getattr(g, "name", "none")
    warm = f", warm start {decoder.start:g}" if decoder.warm_start is not None else ""
    exact = ", exact" if decoder.exact else ""
    name = ("the DecodeConfig given" if given_config else
            f"speed preset '{speed}'" if speed else "demo defaults, no speed preset")
    return (f"{name}: {type(decoder.sampler).__name__[:4].lower()} {decoder.schedule.num_steps} steps, {guide}{warm}{exact}, "
            f"{decoder.steps_run} UNet evaluations")



def cmd_demo(args) -> int:
    run_demo(args.out_dir, seed=args.seed, steps=args.steps, sampler=args.sampler, scale=args.scale,
             image=args.image, size=args.size, device=args.device, progress=not args.quiet, speed=args.speed)
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
    d.add_argument("--steps", type=steps_value, default=DEMO_STEPS, help="respaced steps, e.g. 100 or 'ddim50'")
    d.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    d.add_argument("--scale", type=float, default=DEMO_SCALE, help="DPS step size")
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
