"""Are the windows of a tiled decode visible? (issue 28, item 3) On the bundled demo models.

    OMP_NUM_THREADS=1 python benchmarks/tiled_seams.py --json benchmarks/tiled_seams.json

**Seams.** The held-out demo photographs (chelsea, coffee), Lanczos-upscaled from 128² to
``--size`` (256: 4× the demo prior's native 64 on each side), compressed with the demo codec and
decoded with a speed preset (``--speeds``; real step counts) by each tiling variant:
``ramp`` (the default: window 64, stride 48, linear ramps), ``gaussian``, ``uniform-overlap``
(stride 48, a plain average where windows overlap: no blending ramps) and ``naive`` (stride 64,
no overlap: windows side by side). The statistic (:func:`seam_ratio`): the mean absolute
4-neighbour Laplacian of the 8-bit decode on the rows and columns where windows meet (both pixels
either side of every window edge inside the image) over its mean on the other interior pixels.
1 means the edges look like anywhere else; the target is ≤ 1.10. Controls: the whole-image decode
and the original measured on the default's lines.

**Tiled vs whole at 2× native.** The 128² photographs (the shipped files) decoded tiled (default)
and whole: PSNR to the original, sharpness (gradient energy over the original's), the share of
equal latent symbols when the decode is re-compressed, and patch SWD to the original (the metrics
of :class:`idemrt.evaluation.Pipeline` and benchmarks/psc.py's ``patch_swd``, as benchmarks/modes.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("psc_benchmark", ROOT / "psc.py")
psc_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(psc_benchmark)
patch_swd = psc_benchmark.patch_swd  # the one definition (benchmarks/psc.py)

VARIANTS = {  # name -> Tiling fields (the window is the prior's native size)
    "ramp": dict(),
    "gaussian": dict(weights="gaussian"),
    "uniform-overlap": dict(weights="uniform"),
    "naive": dict(stride=None, weights="uniform", no_overlap=True),
}


def seam_lines(offsets: list[int], window: int, length: int) -> list[int]:
    """The boundaries (index b: between pixels b-1 and b) where a window starts or ends inside an axis."""
    return sorted({o for o in offsets if o > 0} | {o + window for o in offsets if o + window < length})


def seam_ratio(image: torch.Tensor, rows: list[int], cols: list[int]) -> dict:
    """Mean |Laplacian| (0-255 scale, channels averaged) on the pixels either side of the boundaries
    ``rows``/``cols``, over its mean on the other pixels; the image's outer pixel ring is left out
    (its Laplacian is undefined). ``image``: (1, 3, H, W) or (3, H, W) in [0, 1]."""
    x = image.reshape(-1, *image.shape[-2:]).double() * 255
    lap = (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * x[:, 1:-1, 1:-1]).abs().mean(0)
    h, w = image.shape[-2:]
    seam = torch.zeros(h, w, dtype=torch.bool)
    for b in rows:
        seam[b - 1:b + 1, :] = True
    for b in cols:
        seam[:, b - 1:b + 1] = True
    seam = seam[1:-1, 1:-1]
    on, off = lap[seam].mean().item(), lap[~seam].mean().item()
    return {"seam": on, "elsewhere": off, "ratio": on / off}


def tiling(name: str, window: int):
    from idemrt.diffusion.tiling import Tiling

    fields = dict(VARIANTS[name])
    if fields.pop("no_overlap", False):
        fields["stride"] = window
    return Tiling(**fields)


def lines_of(tile, unet, size: int) -> tuple[list[int], list[int]]:
    from idemrt.diffusion.tiling import TiledModel

    tiled = TiledModel.for_prior(None, tile, unet)
    layout = tiled.layout(size, size)
    ys = sorted({y for y, _ in layout.offsets})
    xs = sorted({x for _, x in layout.offsets})
    return seam_lines(ys, layout.size[0], size), seam_lines(xs, layout.size[1], size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--speeds", nargs="+", default=["balanced", "fast"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from idemrt.demo_assets import DEMO_IMAGES, demo_image, load_demo_codec, load_demo_unet
    from idemrt.evaluation import Pipeline, as_8bit, json_safe
    from idemrt.speeds import SPEEDS

    codec, unet = load_demo_codec(), load_demo_unet()
    window = unet.config.image_size
    default_lines = lines_of(tiling("ramp", window), unet, args.size)
    result = {"seams": [], "tiled_vs_whole": [], "size": args.size, "window": window}

    def decode(config, x):
        t0 = time.perf_counter()
        res = Pipeline(codec, unet, config, device="cpu").run(x, seed=0)
        return res, time.perf_counter() - t0

    for speed in args.speeds:
        base = SPEEDS[speed].replace(backend="eager")
        for name in DEMO_IMAGES:
            x = demo_image(name, args.size)
            original = seam_ratio(x, *default_lines)
            res, seconds = decode(base, x)  # whole image
            whole = as_8bit(res["images"]["perceptual"])
            row = {"speed": speed, "image": name, "variant": "whole (control, default's lines)",
                   **seam_ratio(whole, *default_lines), "seconds": seconds}
            result["seams"].append(row)
            result["seams"].append({"speed": speed, "image": name, "variant": "original (control, default's lines)",
                                    **original})
            print(json.dumps(json_safe(row)), flush=True)
            for variant in args.variants:
                tile = tiling(variant, window)
                res, seconds = decode(base.replace(tile=tile), x)
                img = as_8bit(res["images"]["perceptual"])
                row = {"speed": speed, "image": name, "variant": variant, **seam_ratio(img, *lines_of(tile, unet, args.size)),
                       "psnr": res["perc"]["psnr"], "seconds": seconds}
                result["seams"].append(row)
                print(json.dumps(json_safe(row)), flush=True)
        for name in DEMO_IMAGES:  # 2x native: the shipped 128x128 photographs
            x = demo_image(name, 2 * window)
            for label, config in (("whole", base), ("tiled", base.replace(tile=tiling("ramp", window)))):
                res, seconds = decode(config, x)
                perc = res["perc"]
                row = {"speed": speed, "image": name, "size": 2 * window, "path": label, "psnr": perc["psnr"],
                       "sharpness": perc["sharpness"], "symbols_equal": perc["symbols_equal"],
                       "recompress_mse": perc["recompress_mse"],
                       "patch_swd": patch_swd(as_8bit(res["images"]["perceptual"]), x), "seconds": seconds}
                result["tiled_vs_whole"].append(row)
                print(json.dumps(json_safe(row)), flush=True)
    result.update({"command": " ".join(["benchmarks/tiled_seams.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()})
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
