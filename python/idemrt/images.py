"""Image input and output. The codecs see one (1, 3, H, W) float32 tensor in [0, 1].

Conversion rules of :func:`load_image` (docs/reliability.md lists the tests):

* grayscale (1, L, I;16, I) is replicated to RGB;
* alpha (RGBA, LA, PA, premultiplied, palette or color-key transparency) is
  composited on white, in float: ``c·a + (1 - a)``;
* palette, CMYK, YCbCr and other modes go through Pillow's ``convert("RGB")``
  (no ICC colour management: stored values are taken as sRGB);
* 8-bit samples are divided by 255, 16-bit ones by 65535. Pillow keeps only the
  high byte of 16-bit RGB/RGBA/LA PNGs, so for those the low bytes are decoded
  in a second pass and the full 16-bit value is used (when the source is a path
  or bytes; an already opened PIL image keeps Pillow's 8 bits);
* 32-bit integer images (mode I) must hold 16-bit values; float images (mode F)
  are refused;
* the EXIF orientation tag is applied (as ``ImageOps.exif_transpose``);
* animated files give their first frame;
* only PNG, JPEG, WebP, BMP, TIFF, GIF and PNM files are opened (no EPS, which
  would run Ghostscript on untrusted input).

Arrays are H×W, H×W×1, H×W×2 (gray+alpha), H×W×3 or H×W×4 of uint8, uint16 or
float in [0, 1]; tensors are (3, H, W) or (1, 3, H, W), float in [0, 1] or uint8.
Images above ``max_pixels`` are refused before their pixels are decoded.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bitstream import DEFAULT_MAX_PIXELS, MAGIC as _IDM_MAGIC
from .errors import ImageError, ImageTooLargeError
from .fileio import atomic_writer

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
_ORIENTATION_TAG = 0x0112
# Pillow's rawmode for a 16-bit PNG -> the rawmode that yields its low bytes
# instead (little-endian unpackers take the other byte of each sample). PNG
# filters work byte-wise on same-offset bytes, so re-decoding with another
# unpacker of the same width unfilters correctly.
_PNG16_LOW_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
# 16-bit gray+alpha: 32 bits per pixel, so the 8-bit RGBA unpacker returns the
# four raw bytes (L hi, L lo, A hi, A lo).
_PNG_LA16 = "LA;16B"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(src, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Return ``src`` as a (1, 3, H, W) float32 tensor in [0, 1]; bad input raises ImageError.

    ``src`` may be a path, the bytes of an image file, a PIL image, a numpy
    array or a torch tensor (tensors keep their device).
    """
    if isinstance(src, torch.Tensor):
        return _from_tensor(src, max_pixels)
    if isinstance(src, np.ndarray):
        return _to_tensor(_from_array(src, max_pixels))
    if isinstance(src, Image.Image):
        return _to_tensor(_decode(lambda: src, "the PIL image", max_pixels, reopen=False))
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _to_tensor(_decode(lambda: Image.open(io.BytesIO(data), formats=FORMATS), "the image bytes",
                                  max_pixels, reopen=True, head=data[:16]))
    if isinstance(src, (str, os.PathLike)):
        return _to_tensor(_decode_path(Path(src), max_pixels))
    raise ImageError(f"cannot load an image from a {type(src).__name__}; pass a path, bytes, a PIL image, "
                     f"a numpy array or a torch tensor")


def to_pil(x: torch.Tensor) -> Image.Image:
    """8-bit RGB image of a (3, H, W) or (1, 3, H, W) tensor in [0, 1] (see :func:`to_uint8`)."""
    return Image.fromarray(to_uint8(x))


def to_uint8(x: torch.Tensor):
    """The 8-bit (H, W, 3) numpy array of a (3, H, W) or (1, 3, H, W) tensor in [0, 1].

    Values are clamped and rounded half up, ``floor(x·255 + 0.5)``, exactly as
    torchvision's ``save_image`` used by the reference code.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ImageError(f"to_pil needs a float tensor, got {_describe(x)}")
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3 or x.numel() == 0:
        raise ImageError(f"to_pil needs a (3, H, W) or (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ImageError("cannot save an image with NaN or infinite values")
    q = x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return q.permute(1, 2, 0).contiguous().numpy()


def save_image(x: torch.Tensor, path, *, force: bool = False, inputs=()) -> None:
    """Write ``x`` (see :func:`to_pil`) as an 8-bit PNG, atomically (see idemrt.fileio.atomic_writer)."""
    if Path(path).suffix.lower() != ".png":
        raise ImageError(f"{os.fspath(path)}: images are saved as PNG; use a .png file name")
    img = to_pil(x)
    with atomic_writer(path, force=force, inputs=inputs) as f:
        img.save(f, format="PNG")


def mse255(a: torch.Tensor, b: torch.Tensor) -> float:
    """MSE on the 0-255 scale of two images in [0, 1] (float64)."""
    return float(((a.double() - b.double()) * 255).pow(2).mean())


def psnr(mse: float) -> float:
    """PSNR (dB, peak 255) of an MSE on the 0-255 scale: the one PSNR of the project."""
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def _decode_path(path: Path, max_pixels: int) -> np.ndarray:
    label = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ImageError(f"cannot read {label}: {exc.strerror or exc}") from None
    return _decode(lambda: Image.open(path, formats=FORMATS), label, max_pixels, reopen=True, head=head)


def _decode(open_image, label: str, max_pixels: int, *, reopen: bool, head: bytes = b"") -> np.ndarray:
    """Decode through Pillow into an H×W×C float32 array, checking the size before the pixels.

    ``reopen``: ``open_image`` opens a fresh image each call (a path or bytes),
    which idemrt owns and closes, and which can be decoded twice.
    """
    im = None
    try:
        im = open_image()
        _check_pixels(im.width, im.height, max_pixels, label)
        rawmode = _single_tile_rawmode(im) if reopen else None
        if rawmode == _PNG_LA16:
            im.tile = [im.tile[0]._replace(args="RGBA")]
        im.load()
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        if rawmode in _PNG16_LOW_RAWMODE:
            with open_image() as low:
                low.tile = [low.tile[0]._replace(args=_PNG16_LOW_RAWMODE[rawmode])]
                low.load()
                planes = np.asarray(im).astype(np.uint16) << 8 | np.asarray(low)
            arr = _float_channels(planes, 65535.0)
        elif rawmode == _PNG_LA16:
            raw = np.asarray(im).astype(np.uint16)
            arr = _float_channels(raw[..., 0::2] << 8 | raw[..., 1::2], 65535.0)
        else:
            arr = _pil_channels(im, label)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: refused as too large to decode safely: {exc}") from None
    except Image.UnidentifiedImageError:
        if head.startswith(_IDM_MAGIC):
            raise ImageError(f"{label} is an .idm bitstream, not an image (decode it instead)") from None
        raise ImageError(f"{label} is not a supported image file ({', '.join(FORMATS)})") from None
    except Exception as exc:
        # Pillow's plugins report malformed or truncated files with a mix of
        # OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError.
        raise ImageError(f"{label}: cannot decode the image ({type(exc).__name__}: {exc})") from None
    finally:
        if reopen and im is not None:
            im.close()
    return _orient(_composite(arr), orientation)


def _single_tile_rawmode(im: Image.Image) -> str | None:
    tile = getattr(im, "tile", None)
    if im.format == "PNG" and tile and len(tile) == 1 and isinstance(tile[0].args, str):
        return tile[0].args
    return None


def _pil_channels(im: Image.Image, label: str) -> np.ndarray:
    """H×W×C float32 array (C = 1, 2, 3 or 4) of an 8- or 16-bit Pillow image."""
    mode = im.mode
    if mode.startswith("I;16"):
        return _float_channels(np.asarray(im), 65535.0)
    if mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{label}: 32-bit integer pixels outside the 16-bit range are not supported")
        return _float_channels(a, 65535.0)
    if mode == "F":
        raise ImageError(f"{label}: floating-point images (mode F) are not supported; use 8- or 16-bit")
    if mode in ("1", "L") and "transparency" not in im.info:
        return _float_channels(np.asarray(im.convert("L")), 255.0)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _float_channels(np.asarray(im.convert("RGBA")), 255.0)
    return _float_channels(np.asarray(im.convert("RGB")), 255.0)


def _from_array(a: np.ndarray, max_pixels: int) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        hint = " (numpy images are H×W×C, channels last)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"expected an H×W, H×W×1, H×W×2, H×W×3 or H×W×4 array, got shape {a.shape}{hint}")
    _check_pixels(a.shape[1], a.shape[0], max_pixels, "the array")
    if a.dtype == np.uint8:
        arr = _float_channels(a, 255.0)
    elif a.dtype == np.uint16:
        arr = _float_channels(a, 65535.0)
    elif a.dtype in (np.float16, np.float32, np.float64):
        arr = a.astype(np.float32)
        _check_unit_range(np.isfinite(arr).all(), arr.min(), arr.max())
    else:
        raise ImageError(f"unsupported array dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    return _composite(arr)


def _from_tensor(x: torch.Tensor, max_pixels: int) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ImageError(f"expected a (3, H, W) or (1, 3, H, W) tensor (one RGB image), got shape {tuple(x.shape)}")
    _check_pixels(x.shape[3], x.shape[2], max_pixels, "the tensor")
    x = x.detach()
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255).contiguous()
    if not x.is_floating_point():
        raise ImageError(f"unsupported tensor dtype {x.dtype}; use float in [0, 1] or uint8")
    x = x.to(torch.float32).contiguous()
    _check_unit_range(bool(torch.isfinite(x).all()), float(x.min()), float(x.max()))
    return x


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{label} is empty ({height}x{width})")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{label} is {height}x{width} = {width * height} pixels, more than "
                         f"max_pixels={max_pixels}; downscale it or raise max_pixels")


def _check_unit_range(finite: bool, lo: float, hi: float) -> None:
    if not finite:
        raise ImageError("the image contains NaN or infinite values")
    if lo < 0 or hi > 1:
        raise ImageError(f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                         f"clamp or rescale them first")


def _float_channels(a: np.ndarray, scale: float) -> np.ndarray:
    a = a.astype(np.float32) / np.float32(scale)
    return a[..., None] if a.ndim == 2 else a


def _composite(a: np.ndarray) -> np.ndarray:
    """H×W×{1,2,3,4} -> H×W×3: alpha over white, gray replicated."""
    if a.shape[2] in (2, 4):
        alpha = a[..., -1:]
        a = a[..., :-1] * alpha + (1 - alpha)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a


def _orient(a: np.ndarray, orientation) -> np.ndarray:
    """Apply an EXIF orientation (1..8) the way PIL.ImageOps.exif_transpose does."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(a, -1)
    if orientation == 7:
        return a[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(a, 1)
    return a


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))[None]


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
