"""The bundled demo models, ``idemrt demo`` and ``idemrt eval``.

The demo models (``idemrt/demo_models/``, trained by ``tools/train_demo.py`` on scikit-image's
photographs, see docs/demo.md) are tiny: a bmshj2018-hyperprior codec with N=64, M=96 at a low rate,
and a 1.9M-parameter ADM UNet. They show the pipeline end to end on a CPU in well under a minute, with
no download; they are not the paper's models (docs/real_weights.md).

``run_demo`` compresses a held-out photograph, decodes it with the MSE codec and perceptually,
re-compresses the perceptual image and writes a side-by-side PNG. ``evaluate`` does the same for a
folder of images and writes per-image and mean metrics (CSV, JSON) and a rate-distortion plot.

Metrics (images in [0, 1]; MSE values are on the 0-255 scale, PSNR with peak 255):

* ``bpp``: entropy-coded payload bits per pixel;
* ``psnr``/``mse``: decode vs the original;
* ``recompress_mse``/``recompress_psnr``: ``decode_mse(encode(x̂))`` vs the MSE decode ``x_mse`` of
  the original, with x̂ the decode saved as 8-bit PNG. For x̂ = x_mse it is the MSE codec's own
  idempotence error; for the perceptual decode it is the constraint the sampler enforced;
* ``symbols_equal``: fraction of the latent symbols of ``encode(x̂)`` equal to the original's;
* ``sharpness``: mean squared finite-difference gradient of x̂ over the original's (1 = as detailed
  as the original; MSE decodes are blurry and score below 1).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, ImageError
from .images import mse255, psnr  # noqa: F401 (the demo's metrics; tests use them from here)

DEMO_IMAGES = ("chelsea", "coffee")  # held out from training (tools/train_demo.py)
DEMO_PNG = "idemrt_demo.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pnm")
# Defaults of the demo: DDPM respaced to 100 steps (about 10 s of sampling at 64x64 on one CPU core).
# With 10x fewer steps than the paper's 1000, the DPS step must be larger than its 0.6; 1.0 met the
# constraint best in a sweep of 0.3-12 (docs/demo.md).
DEMO_STEPS = 100
DEMO_SIZE = 64
DEMO_SCALE = 1.0


# --------------------------------------------------------------------------------------------------
# The bundled models


def demo_file(name: str):
    """A file of ``idemrt/demo_models`` (an importlib.resources Traversable)."""
    return resources.files("idemrt").joinpath("demo_models", name)


def demo_config() -> dict:
    """The configs the demo models were trained with (``demo_models/config.json``)."""
    try:
        return json.loads(demo_file("config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"the demo models are missing or damaged (idemrt/demo_models): {exc}") from None


def load_demo_codec(device=None):
    """The demo MSE codec (bmshj2018-hyperprior, N=64, M=96, trained at lambda=0.0018)."""
    from .models.codec_loading import load_codec

    cfg = demo_config()["codec"]
    with resources.as_file(demo_file(cfg["file"])) as path:
        return load_codec(cfg["name"], checkpoint=path, device=device)


def load_demo_unet(device=None):
    """The demo ADM UNet (64x64-trained, learn_sigma, linear 1000-step schedule)."""
    from .models.unet_loading import load_unet

    cfg = demo_config()["unet"]
    with resources.as_file(demo_file(cfg["file"])) as path:
        return load_unet(path, device=device, **cfg["config"])


def demo_image(name: str = "chelsea", size: int = DEMO_SIZE) -> torch.Tensor:
    """A held-out demo photograph as a (1, 3, size, size) tensor.

    The shipped files are 128x128 (centre crops of scikit-image's photographs); other sizes are
    Lanczos-resampled from them. The demo UNet was trained on 32 and 64 pixel crops.
    """
    from PIL import Image

    from .images import load_image

    if name not in DEMO_IMAGES:
        raise ImageError(f"unknown demo image {name!r}; choose one of {DEMO_IMAGES}")
    with Image.open(io.BytesIO(demo_file(f"{name}.png").read_bytes())) as img:
        if img.size != (size, size):
            img = img.convert("RGB").resize((size, size), Image.LANCZOS)
        return load_image(np.asarray(img.convert("RGB")))


# --------------------------------------------------------------------------------------------------
# Measurements


def gradient_energy(x: torch.Tensor) -> float:
    """Mean squared horizontal and vertical finite differences (a sharpness statistic)."""
    x = x.double()
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return float((dx.pow(2).sum() + dy.pow(2).sum()) / (dx.numel() + dy.numel()))


def as_8bit(x: torch.Tensor) -> torch.Tensor:
    """``x`` as it is after saving as an 8-bit PNG (to_pil's rounding)."""
    return x.clamp(0, 1).mul(255).add(0.5).floor().div(255)


class Pipeline:
    """An Encoder and a Decoder, plus the re-compression measurements of one decode."""

    def __init__(self, codec, unet, *, steps, sampler, guidance, scale, device, progress, interval: int = 1,
                 speed=None):
        from .api import Decoder, Encoder

        self.encoder = Encoder(codec)
        self.decoder = Decoder(codec, unet, steps=steps, sampler=sampler, guidance=guidance, scale=scale,
                               interval=interval, device=device, progress=progress, speed=speed)

    def latent(self, data: bytes) -> torch.Tensor:
        from . import bitstream as bsfmt

        bs = bsfmt.unpack(data)
        with torch.no_grad():
            return self.decoder.codec.decompress_latent(bs.streams, bs.latent_shape).cpu()

    def run(self, x: torch.Tensor, seed: int) -> dict:
        """Encode ``x``; decode as MSE and perceptual; re-compress both. Images and metrics."""
        from . import bitstream as bsfmt

        data = self.encoder.encode(x)
        bpp = bsfmt.describe(bsfmt.unpack(data))["bpp"]
        x_mse = self.decoder.decode(data, mode="mse", output="tensor")
        t0 = time.perf_counter()
        x_perc = self.decoder.decode(data, seed=seed, mode="perceptual", output="tensor")
        seconds = time.perf_counter() - t0
        distance = self.decoder.last.distance[0]
        y_hat = self.latent(data)
        out = {"bpp": bpp, "images": {"original": x, "mse": x_mse, "perceptual": x_perc}}
        sharp_ref = gradient_energy(x)
        for name, img in (("mse", x_mse), ("perc", x_perc)):
            img = as_8bit(img)
            re_data = self.encoder.encode(img)
            re_decoded = self.decoder.decode(re_data, mode="mse", output="tensor")
            out["images"][f"{name}_redecoded"] = re_decoded
            err = mse255(x, img)
            re_err = mse255(re_decoded, x_mse)
            out[name] = {
                "psnr": psnr(err),
                "mse": err,
                "recompress_mse": re_err,
                "recompress_psnr": psnr(re_err),
                "symbols_equal": float((self.latent(re_data) == y_hat).double().mean()),
                "sharpness": gradient_energy(img) / sharp_ref if sharp_ref > 0 else float("nan"),
            }
        out["perc"]["distance"] = distance
        out["perc"]["seconds"] = seconds
        return out


# --------------------------------------------------------------------------------------------------
# idemrt demo


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
             speed: str | None = None) -> dict:
    """Compress a held-out photograph with the demo codec, decode it both ways, write a PNG.

    ``speed``: a preset of :data:`idemrt.speeds.SPEEDS` (it then sets the steps, sampler, guidance
    and scale); None: the demo's own configuration (``steps``, ``sampler``, DPS ``scale``).

    Writes ``out_dir/idemrt_demo.png`` (original | MSE decode | perceptual decode | MSE decode of the
    re-compressed perceptual image), atomically, replacing an older one. Prints and returns the facts.
    """
    from .fileio import atomic_writer

    t0 = time.perf_counter()
    x = demo_image(image, size)
    if speed is not None:
        steps = sampler = scale = None  # the preset's
    pipe = Pipeline(load_demo_codec(device), load_demo_unet(device), steps=steps, sampler=sampler,
                    guidance=None if speed else "dps", scale=scale, device=device, progress=progress, speed=speed)
    preset = describe_preset(pipe.decoder, speed)
    res = pipe.run(x, seed)
    ims = res["images"]
    png = Path(out_dir) / DEMO_PNG
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


def describe_preset(decoder, speed) -> str:
    """What the demo decoded with: the speed preset's name (or "demo defaults") and its settings."""
    g = decoder.guidance
    guide = f"DPS scale {g.scale:g}" if getattr(g, "name", None) == "dps" else getattr(g, "name", "none")
    warm = f", warm start {decoder.start:g}" if decoder.warm_start is not None else ""
    exact = ", exact" if decoder.exact else ""
    name = f"speed preset '{speed}'" if speed else "demo defaults, no speed preset"
    return (f"{name}: {type(decoder.sampler).__name__[:4].lower()} {decoder.schedule.num_steps} steps, {guide}{warm}{exact}, "
            f"{decoder.steps_run} UNet evaluations")


# --------------------------------------------------------------------------------------------------
# idemrt eval

COLUMNS = ["image", "width", "height", "bpp"] + [
    f"{d}_{m}" for d in ("mse", "perc")
    for m in ("psnr", "mse", "recompress_mse", "recompress_psnr", "symbols_equal", "sharpness")
] + ["perc_distance", "perc_seconds"]

FID_NO_WEIGHTS = ("FID/KID skipped: no --inception weights given (pytorch-fid's FID Inception, "
                  "pt_inception-2015-12-05-6726825d.pth; see docs/real_weights.md)")


def list_images(image_dir) -> list[Path]:
    d = Path(image_dir)
    if not d.is_dir():
        raise ImageError(f"{image_dir}: not a directory of images")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def evaluate(image_dir, out_dir, *, codec=None, unet=None, steps=DEMO_STEPS, sampler: str = "ddpm",
             guidance: str = "dps", scale: float = DEMO_SCALE, interval: int = 1, seed: int = 0, device="cpu",
             inception=None, inception_sha256=None, force: bool = False, progress: bool = True) -> dict:
    """Per-image and mean metrics of the MSE and perceptual decodes of every image in ``image_dir``.

    ``codec``/``unet``: models (default: the demo models). Writes into ``out_dir``: ``metrics.csv``
    (one row per image, then the mean), ``metrics.json``, ``rd.png`` and the decodes as PNGs
    (``mse/``, ``perceptual/``). Returns the JSON content.

    ``inception``: path of pytorch-fid's FID Inception weights: adds patch FID and KID of both
    decodes against the originals (:mod:`idemrt.fid`, the paper's 64×64-patch protocol).
    """
    from .fileio import atomic_write_bytes, check_output_path
    from .images import load_image, save_image

    files = list_images(image_dir)
    out = Path(out_dir)
    outputs = [out / n for n in ("metrics.csv", "metrics.json", "rd.png")]
    outputs += [out / sub / f"{f.stem}.png" for sub in ("mse", "perceptual") for f in files]
    for path in outputs:  # fail before the expensive part
        check_output_path(path, force=force, inputs=files)
    scores = None
    if inception is not None:
        from .fid import PatchScores, load_inception

        scores = PatchScores(load_inception(inception, device, inception_sha256))
    codec = load_demo_codec(device) if codec is None else codec
    unet = load_demo_unet(device) if unet is None else unet
    pipe = Pipeline(codec, unet, steps=steps, sampler=sampler, guidance=guidance, scale=scale, interval=interval,
                    device=device,
                    progress=progress)
    (out / "mse").mkdir(parents=True, exist_ok=True)
    (out / "perceptual").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, path in enumerate(files):
        x = load_image(path)
        res = pipe.run(x, seed + k)
        save_image(res["images"]["mse"], out / "mse" / f"{path.stem}.png", force=force)
        save_image(res["images"]["perceptual"], out / "perceptual" / f"{path.stem}.png", force=force)
        if scores is not None:  # the images as saved: 8-bit, like the paper's test_codec.py reads them
            scores.add("original", x)
            scores.add("mse", as_8bit(res["images"]["mse"]))
            scores.add("perceptual", as_8bit(res["images"]["perceptual"]))
        row = {"image": path.name, "width": x.shape[-1], "height": x.shape[-2], "bpp": res["bpp"]}
        for d in ("mse", "perc"):
            row.update({f"{d}_{m}": v for m, v in res[d].items()})
        rows.append(row)
        if progress:
            print(f"{path.name}: {row['bpp']:.3f} bpp, PSNR mse {row['mse_psnr']:.2f} / perceptual "
                  f"{row['perc_psnr']:.2f} dB, re-compression MSE mse {row['mse_recompress_mse']:.2f} / "
                  f"perceptual {row['perc_recompress_mse']:.2f}")
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in COLUMNS if c not in ("image", "width", "height")}
    fid = fid_scores(scores)
    result = {
        "images": rows,
        "mean": mean,
        "settings": {"steps": steps, "sampler": sampler, "guidance": guidance, "scale": scale, "seed": seed,
                     "codec": codec.name, "codec_quality": codec.quality},
        "fid": fid,
    }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows + [{"image": "mean", "width": "", "height": "", **mean}]:
        writer.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in r.items()})
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode(), force=force)
    text = json.dumps(json_safe(result), indent=2, allow_nan=False)
    atomic_write_bytes(out / "metrics.json", (text + "\n").encode(), force=force)
    plot_rd(rows, mean, out / "rd.png", force=force)
    print(f"mean over {len(rows)} images: {mean['bpp']:.3f} bpp; PSNR mse {mean['mse_psnr']:.2f} / perceptual "
          f"{mean['perc_psnr']:.2f} dB; re-compression MSE mse {mean['mse_recompress_mse']:.2f} / perceptual "
          f"{mean['perc_recompress_mse']:.2f}; sharpness mse {mean['mse_sharpness']:.2f} / perceptual "
          f"{mean['perc_sharpness']:.2f}\n{fid_line(fid)}\nwrote {out / 'metrics.csv'}, {out / 'metrics.json'}, "
          f"{out / 'rd.png'}")
    return result


def json_safe(value):
    """Strict JSON: an infinite PSNR (an exact re-compression) is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def fid_scores(scores) -> dict:
    """Patch FID and KID of each decode against the originals, or {"skipped": why}."""
    if scores is None:
        return {"skipped": FID_NO_WEIGHTS}
    n = scores.count("original")
    if n < 2:
        return {"skipped": f"FID/KID skipped: {n} patches of {scores.patch}x{scores.patch} in all; images "
                           f"smaller than a patch give none"}
    result = {"patch": scores.patch, "patches": n}
    for name in ("mse", "perceptual"):
        kid, kid_std = scores.kid("original", name)
        result[name] = {"fid": scores.fid("original", name), "kid": kid, "kid_std": kid_std}
    return result


def fid_line(fid: dict) -> str:
    if "skipped" in fid:
        return fid["skipped"]
    line = (f"patch FID mse {fid['mse']['fid']:.2f} / perceptual {fid['perceptual']['fid']:.2f}; KID mse "
            f"{fid['mse']['kid']:.4f} / perceptual {fid['perceptual']['kid']:.4f} ({fid['patches']} patches of "
            f"{fid['patch']}x{fid['patch']})")
    if fid["patches"] < 2048:
        line += (f"; with fewer patches than the 2048 feature dimensions FID is biased high: compare it only "
                 f"at equal counts (the paper uses 16,000)")
    return line


def plot_rd(rows, mean, png: Path, *, force: bool) -> None:
    """Rate vs PSNR, vs sharpness (a perception proxy) and vs re-compression MSE, for both decodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_writer

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("psnr", "PSNR vs original (dB)"), ("sharpness", "sharpness (1 = original)"),
              ("recompress_mse", "re-compression MSE (0-255 scale)"))
    for ax, (metric, label) in zip(axes, panels):
        for d, name, marker, color in (("mse", "MSE decode", "o", "C0"), ("perc", "perceptual", "^", "C3")):
            ax.scatter([r["bpp"] for r in rows], [r[f"{d}_{metric}"] for r in rows], marker=marker, color=color,
                       alpha=0.4, label=f"{name} (images)")
            ax.scatter([mean["bpp"]], [mean[f"{d}_{metric}"]], marker=marker, color=color, s=120,
                       edgecolor="black", label=f"{name} (mean)")
        ax.set_xlabel("bpp"), ax.set_ylabel(label)
    axes[1].axhline(1.0, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_writer(png, force=force) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line (added to ``idemrt`` by cli.py)


def cmd_demo(args) -> int:
    run_demo(args.out_dir, seed=args.seed, steps=args.steps, sampler=args.sampler, scale=args.scale,
             image=args.image, size=args.size, device=args.device, progress=not args.quiet, speed=args.speed)
    return 0


def cmd_eval(args) -> int:
    codec = unet = None
    if args.codec_checkpoint or args.pretrained_codec:
        from .models.codec_loading import load_codec

        if args.codec is None:
            raise CheckpointError("--codec NAME is needed with --codec-checkpoint / --pretrained-codec")
        codec = load_codec(args.codec, quality=args.quality, checkpoint=args.codec_checkpoint,
                           pretrained=args.pretrained_codec, device=args.device)
    elif args.codec is not None:
        raise CheckpointError(f"--codec {args.codec}: pass --codec-checkpoint FILE or --pretrained-codec "
                              "(without them the demo codec is used)")
    if args.unet:
        from .models.unet_loading import load_unet

        unet = load_unet(args.unet, preset=args.preset)
    evaluate(args.dir, args.out, codec=codec, unet=unet, steps=args.steps, sampler=args.sampler,
             guidance=args.guidance, scale=args.scale, interval=args.interval, seed=args.seed, device=args.device,
             inception=args.inception, inception_sha256=args.inception_sha256, force=args.force,
             progress=not args.quiet)
    return 0


def add_subparsers(subparsers) -> None:
    """Add ``demo`` and ``eval`` to the ``idemrt`` command line (``subparsers`` of build_parser)."""
    from .cli_options import add_sampling_options, add_unet_options, steps_value
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

    e = subparsers.add_parser("eval", help="rate, distortion, idempotence and sharpness over a folder of images")
    e.add_argument("dir", help="folder of images")
    e.add_argument("--out", default="idemrt_eval", help="output folder (metrics.csv, metrics.json, rd.png)")
    e.add_argument("--codec", default=None, help="codec name (with --codec-checkpoint or --pretrained-codec)")
    e.add_argument("--codec-checkpoint", default=None)
    e.add_argument("--pretrained-codec", action="store_true", help="compressai's zoo weights (downloads)")
    e.add_argument("--quality", type=int, default=None)
    add_unet_options(e, unet_help="ADM UNet checkpoint (default: the demo UNet)")
    add_sampling_options(e, steps=str(DEMO_STEPS), scale=DEMO_SCALE, guidance_none=False)
    e.add_argument("--device", default="cpu")
    e.add_argument("--inception", default=None,
                   help="pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth: adds patch FID/KID")
    e.add_argument("--inception-sha256", default=None, help="pin the Inception file's sha256 (or a prefix)")
    e.add_argument("--force", action="store_true", help="overwrite existing outputs")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    """``python -m idemrt.demo [demo|eval ...]``: the demo with its defaults when no arguments are given."""
    p = argparse.ArgumentParser(prog="python -m idemrt.demo")
    add_subparsers(p.add_subparsers(dest="command"))
    args = p.parse_args(argv or ["demo"])
    return args.func(args)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
