"""idemrt: perceptual image decoding by idempotence-guided diffusion.

Heavy modules (compressai, the models) are imported on first use so that
``import idemrt`` stays fast.
"""
from .lazy import lazy_getattr

from .errors import (
    BackendError,
    BitstreamError,
    CheckpointError,
    DecodeError,
    IdemrtError,
    ImageError,
    ModelNotFoundError,
    TooLargeError,
)

__version__ = "0.1.0"

_LAZY = {  # module -> the names it provides
    ".models.unet_loading": ("load_unet",),
    ".models.codec_loading": ("load_codec",),
    ".models.codec": ("Codec",),
    ".api": ("Encoder", "Decoder"),
    ".decode_config": ("DecodeConfig",),
    ".store": ("ModelStore",),
}

__all__ = [
    "BackendError",
    "BitstreamError",
    "CheckpointError",
    "DecodeError",
    "IdemrtError",
    "ImageError",
    "ModelNotFoundError",
    "TooLargeError",
    *(name for names in _LAZY.values() for name in names),
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
