"""``idemrt eval``: rate, distortion, idempotence and sharpness of the MSE and perceptual decodes
over a folder of images, and the measurements the demo and the benchmarks share.

Metrics (images in [0, 1]; MSE values are on the 0-255 scale, PSNR with peak 255):

* ``bpp``: entropy-coded payload bits per pixel;
* ``psnr``/``mse``: decode vs the original;
* ``recompress_mse``/``recompress_psnr``: ``decode_mse(encode(x̂))`` vs the MSE decode ``x_mse`` of
  the original, with x̂ the decode saved as 8-bit PNG. For x̂ = x_mse it is the MSE codec's own
  idempotence error; for the perceptual decode it is the constraint the sampler enforced;
* ``symbols_equal``: fraction of the latent symbols of ``encode(x̂)`` equal to the original's
  (:func:`idemrt.exact.symbols_equal` of the 8-bit x̂, padded as the encoder pads it);
* ``sharpness``: mean squared finite-difference gradient of x̂ over the original's (1 = as detailed
  as the original; MSE decodes are blurry and score below 1).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import torch

from .demo_assets import DEMO_SCALE, DEMO_STEPS, demo_decode_config, load_demo_codec, load_demo_unet
from .errors import CheckpointError, ImageError
from .exact import symbols_equal
from .images import mse255, psnr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pnm")


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

    def __init__(self, codec, unet, config=None, *, device=None, progress=False, steps=None, sampler=None,
                 guidance=None, scale=None, interval=None, speed=None):
        """``config``: a :class:`~idemrt.decode_config.DecodeConfig` or a preset name (default "paper");
        ``steps``, ``sampler``, ``guidance``, ``scale``, ``interval`` and ``speed`` are its deprecated
        aliases, as :class:`~idemrt.api.Decoder`'s."""
        from .api import Decoder, Encoder
        from .speeds import decode_config

        config = decode_config(config, owner="Pipeline", speed=speed, steps=steps, sampler=sampler,
                               guidance=guidance, scale=scale, interval=interval)
        self.encoder = Encoder(codec)
        self.decoder = Decoder(codec, unet, config=config, device=device, progress=progress)

    def latent(self, data: bytes) -> torch.Tensor:
        from . import bitstream as bsfmt
        from .api import entropy_decode

        return entropy_decode(self.decoder.codec, bsfmt.unpack(data)).cpu()

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
        codec = self.decoder.codec
        y_hat = self.latent(data).to(codec.device)
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
                "symbols_equal": symbols_equal(codec, codec.pad(img.to(codec.device))[0], y_hat),
                "sharpness": gradient_energy(img) / sharp_ref if sharp_ref > 0 else float("nan"),
            }
        out["perc"]["distance"] = distance
        out["perc"]["seconds"] = seconds
        return out


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


def evaluate(image_dir, out_dir, *, codec=None, unet=None, config=None, seed: int = 0, device="cpu",
             inception=None, inception_sha256=None, force: bool = False, progress: bool = True, steps=None,
             sampler=None, guidance=None, scale=None, interval=None) -> dict:
    """Per-image and mean metrics of the MSE and perceptual decodes of every image in ``image_dir``.

    ``codec``/``unet``: models (default: the demo models). ``config``: the decode's
    :class:`~idemrt.decode_config.DecodeConfig` or a preset name (default: the demo's,
    :func:`idemrt.demo_assets.demo_decode_config`); ``steps``, ``sampler``, ``guidance``, ``scale`` and
    ``interval`` are its deprecated aliases. Writes into ``out_dir``: ``metrics.csv``
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
    from .speeds import decode_config

    config = decode_config(config, owner="evaluate", default=demo_decode_config(), steps=steps, sampler=sampler,
                           guidance=guidance, scale=scale, interval=interval)
    pipe = Pipeline(codec, unet, config, device=device, progress=progress)
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
    from .cli_options import tile_from_args

    config = demo_decode_config().override(steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                           scale=args.scale, interval=args.interval, tile=tile_from_args(args, None))
    evaluate(args.dir, args.out, codec=codec, unet=unet, config=config, seed=args.seed, device=args.device,
             inception=args.inception, inception_sha256=args.inception_sha256, force=args.force,
             progress=not args.quiet)
    return 0


def add_eval_subparser(subparsers) -> None:
    """Add ``eval`` to the ``idemrt`` command line."""
    from .cli_options import add_sampling_options, add_tile_options, add_unet_options

    e = subparsers.add_parser("eval", help="rate, distortion, idempotence and sharpness over a folder of images")
    e.add_argument("dir", help="folder of images")
    e.add_argument("--out", default="idemrt_eval", help="output folder (metrics.csv, metrics.json, rd.png)")
    e.add_argument("--codec", default=None, help="codec name (with --codec-checkpoint or --pretrained-codec)")
    e.add_argument("--codec-checkpoint", default=None)
    e.add_argument("--pretrained-codec", action="store_true", help="compressai's zoo weights (downloads)")
    e.add_argument("--quality", type=int, default=None)
    add_unet_options(e, unet_help="ADM UNet checkpoint (default: the demo UNet)")
    add_sampling_options(e, steps=str(DEMO_STEPS), scale=DEMO_SCALE, guidance_none=False)
    add_tile_options(e)  # large photographs: the prior in windows of its native size (default on)
    e.add_argument("--device", default="cpu")
    e.add_argument("--inception", default=None,
                   help="pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth: adds patch FID/KID")
    e.add_argument("--inception-sha256", default=None, help="pin the Inception file's sha256 (or a prefix)")
    e.add_argument("--force", action="store_true", help="overwrite existing outputs")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)
