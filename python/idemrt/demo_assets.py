"""The bundled demo models and photographs: what the service, the tests and the benchmarks import.

The demo models (``idemrt/demo_models/``, trained by ``tools/train_demo.py`` on scikit-image's
photographs, see docs/demo.md) are tiny: a bmshj2018-hyperprior codec with N=64, M=96 at a low rate,
and a 1.9M-parameter ADM UNet, shipped as safetensors. They show the pipeline end to end on a CPU
with no download; they are not the paper's models (docs/real_weights.md). Nothing here imports the
evaluation or plotting code (:mod:`idemrt.evaluation`, :mod:`idemrt.demo`).
"""
from __future__ import annotations

import io
import json
from importlib import resources

import numpy as np
import torch

from .errors import CheckpointError, ImageError

DEMO_IMAGES = ("chelsea", "coffee")  # held out from training (tools/train_demo.py)
# Defaults of the demo: DDPM respaced to 100 steps (about 10 s of sampling at 64x64 on one CPU core).
# With 10x fewer steps than the paper's 1000, the DPS step must be larger than its 0.6; 1.0 met the
# constraint best in a sweep of 0.3-12 (docs/demo.md).
DEMO_STEPS = 100
DEMO_SIZE = 64
DEMO_SCALE = 1.0


def demo_decode_config():
    """The demo's own decode (``idemrt demo``, ``idemrt eval``): DDPM, DEMO_STEPS respaced steps, DPS
    at DEMO_SCALE (docs/demo.md)."""
    from .decode_config import DecodeConfig

    return DecodeConfig(steps=DEMO_STEPS, sampler="ddpm", guidance="dps", scale=DEMO_SCALE)


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
