"""idemrt: perceptual image decoding by idempotence-guided diffusion.

Heavy modules (compressai, the models) are imported on first use so that
``import idemrt`` stays fast.
"""
from importlib import import_module

from .errors import (
    BackendError,
    BitstreamError,
    CheckpointError,
    DecodeError,
    IdemrtError,
    ImageError,
)

__version__ = "0.1.0"

_LAZY = {
    "load_unet": "idemrt.models.unet_loading",
    "load_codec": "idemrt.models.codec",
    "Codec": "idemrt.models.codec",
    "Encoder": "idemrt.api",
    "Decoder": "idemrt.api",
}

__all__ = [
    "BackendError",
    "BitstreamError",
    "CheckpointError",
    "DecodeError",
    "IdemrtError",
    "ImageError",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'idemrt' has no attribute {name!r}")
