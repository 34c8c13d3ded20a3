"""Image loading and saving: conversion rules, 16-bit PNGs, EXIF orientation, hostile files."""
import io
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from idemrt import ImageError
from idemrt.bitstream import MAGIC
from idemrt.fileio import OutputExistsError, SameFileError
from idemrt.images import load_image, save_image, to_pil


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def as_hwc(x: torch.Tensor) -> np.ndarray:
    assert x.dtype == torch.float32 and x.shape[:2] == (1, 3)
    return x[0].permute(1, 2, 0).numpy()


# ---- an independent 16-bit PNG writer (filters and Adam7 by the PNG spec) ----

def _filter_rows(rows: np.ndarray, bpp: int, ftype: int) -> np.ndarray:
    x = rows.astype(np.int32)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    if ftype == 0:
        pred = 0
    elif ftype == 1:
        pred = a
    elif ftype == 2:
        pred = b
    elif ftype == 3:
        pred = (a + b) // 2
    else:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    return ((x - pred) % 256).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png16(arr: np.ndarray, color_type: int, ftype: int = 0, interlace: bool = False) -> bytes:
    """16-bit PNG of an H×W×C uint16 array (color type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA)."""
    h, w = arr.shape[:2]
    bpp = 2 * {0: 1, 2: 3, 4: 2, 6: 4}[color_type]

    def scanlines(sub):
        rows = sub.astype(">u2").reshape(sub.shape[0], -1).view(np.uint8).reshape(sub.shape[0], -1)
        return b"".join(bytes([ftype]) + r.tobytes() for r in _filter_rows(rows, bpp, ftype))

    if interlace:
        raw = b"".join(scanlines(arr[y0::dy, x0::dx]) for x0, y0, dx, dy in ADAM7 if arr[y0::dy, x0::dx].size)
    else:
        raw = scanlines(arr)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))


RNG = np.random.default_rng(0)


# ---- modes and conversion rules ----

def test_rgb_png_bytes_path_and_pil_agree(tmp_path):
    a = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(a))
    (tmp_path / "a.png").write_bytes(data)
    expected = a.astype(np.float32) / 255
    for src in (data, bytearray(data), tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(a), a):
        x = load_image(src)
        assert x.shape == (1, 3, 5, 7) and x.is_contiguous()
        np.testing.assert_array_equal(as_hwc(x), expected)


def test_grayscale_is_replicated():
    g = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    for src in (encoded(Image.fromarray(g)), g, g[..., None]):
        np.testing.assert_array_equal(as_hwc(load_image(src)), np.repeat(g[..., None] / np.float32(255), 3, 2))


def test_bilevel_image():
    im = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(as_hwc(load_image(encoded(im)))[0], [[0, 0, 0], [1, 1, 1]])


def white_composite(rgb: np.ndarray, alpha: np.ndarray, scale: float) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / scale
    return rgb.astype(np.float64) / scale * a + (1 - a)


def test_rgba_and_la_are_composited_on_white():
    rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    expected = white_composite(rgba[..., :3], rgba[..., 3], 255)
    for src in (encoded(Image.fromarray(rgba)), rgba):
        out = as_hwc(load_image(src))
        np.testing.assert_allclose(out, expected, atol=1e-6)
        assert (out[0, 0] == 1).all()
    la = rgba[..., ::2].copy()  # (gray, alpha)
    expected = white_composite(np.repeat(la[..., :1], 3, 2), la[..., 1], 255)
    for src in (encoded(Image.fromarray(la, "LA")), la):
        np.testing.assert_allclose(as_hwc(load_image(src)), expected, atol=1e-6)


def test_palette_with_and_without_transparency():
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 0, 255, 255, 255]
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    colors = np.array(palette, dtype=np.float32).reshape(3, 3) / 255
    np.testing.assert_allclose(as_hwc(load_image(encoded(im))), colors[idx], atol=1e-7)
    im.info["transparency"] = 1
    out = as_hwc(load_image(encoded(im, transparency=1)))
    assert (out[idx == 1] == 1).all()
    np.testing.assert_allclose(out[0, 0], colors[0], atol=1e-7)


def test_cmyk_goes_through_pillow_conversion():
    cmyk = Image.fromarray(RNG.integers(0, 256, (3, 4, 4), dtype=np.uint8), "CMYK")
    ref = np.asarray(cmyk.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(as_hwc(load_image(encoded(cmyk, "TIFF"))), ref)


def test_16bit_grayscale_png():
    g = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    g[0, 0], g[0, 1] = 0, 65535
    data = png16(g, 0)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = np.repeat((g / 65535.0)[..., None], 3, 2)
    np.testing.assert_allclose(as_hwc(load_image(data)), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(as_hwc(load_image(g)), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("ftype", range(5))
@pytest.mark.parametrize("interlace", [False, True])
def test_16bit_rgb_png_keeps_all_16_bits(ftype, interlace):
    a = RNG.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    data = png16(a, 2, ftype, interlace)
    out = as_hwc(load_image(data)).astype(np.float64)
    np.testing.assert_allclose(out, a / 65535.0, rtol=0, atol=1e-7)
    # Pillow alone keeps the high byte: the error it would make is what the low-byte pass fixes.
    assert np.abs(np.asarray(Image.open(io.BytesIO(data))) / 255.0 - a / 65535.0).max() > 1e-3


@pytest.mark.parametrize("ftype", [0, 4])
def test_16bit_png_with_alpha(ftype):
    rgba = RNG.integers(0, 65536, (6, 5, 4), dtype=np.uint16)
    expected = white_composite(rgba[..., :3], rgba[..., 3], 65535)
    np.testing.assert_allclose(as_hwc(load_image(png16(rgba, 6, ftype))), expected, atol=1e-6)
    np.testing.assert_allclose(as_hwc(load_image(rgba)), expected, atol=1e-6)
    la = rgba[..., 2:]
    expected = white_composite(np.repeat(la[..., :1], 3, 2), la[..., 1], 65535)
    np.testing.assert_allclose(as_hwc(load_image(png16(la, 4, ftype))), expected, atol=1e-6)


def test_32bit_integer_and_float_modes():
    i32 = np.array([[0, 65535]], dtype=np.int32)
    np.testing.assert_array_equal(as_hwc(load_image(Image.fromarray(i32, "I")))[0, :, 0], [0, 1])
    with pytest.raises(ImageError, match="16-bit range"):
        load_image(Image.fromarray(np.array([[70000]], dtype=np.int32), "I"))
    with pytest.raises(ImageError, match="mode F"):
        load_image(Image.fromarray(np.zeros((2, 2), np.float32), "F"))


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (4, 3), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(as_hwc(load_image(data))[0, 0], [1, 0, 0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    a = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(a), exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), np.float32) / 255
    out = as_hwc(load_image(data))
    assert out.shape == ref.shape and (orientation < 5) == (out.shape[:2] == (3, 5))
    np.testing.assert_array_equal(out, ref)


def test_one_pixel_images():
    px = np.array([[[10, 20, 30]]], dtype=np.uint8)
    for src in (encoded(Image.fromarray(px)), px, torch.tensor([[[0.5]], [[0.25]], [[1.0]]])):
        assert load_image(src).shape == (1, 3, 1, 1)


# ---- arrays and tensors ----

def test_uint16_and_float_arrays():
    a = RNG.integers(0, 65536, (2, 3, 3), dtype=np.uint16)
    np.testing.assert_allclose(as_hwc(load_image(a)), a / 65535.0, atol=1e-7)
    f = RNG.random((2, 3, 3))
    np.testing.assert_allclose(as_hwc(load_image(f)), f, atol=1e-7)


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 4, 3), np.int64), "dtype int64"),
    (np.zeros((4, 4, 3), bool), "dtype bool"),
    (np.zeros((3, 8, 8), np.uint8), "channels last"),
    (np.zeros((4, 4, 5), np.uint8), "got shape"),
    (np.zeros((2, 4, 4, 3), np.uint8), "got shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.full((2, 2, 3), np.nan, np.float32), "NaN"),
    (np.full((2, 2, 3), 1.5), r"\[0, 1\]"),
])
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        load_image(arr)


def test_tensors():
    x = torch.rand(3, 4, 5, dtype=torch.float64)
    out = load_image(x)
    assert out.shape == (1, 3, 4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], x.float())
    u = torch.randint(0, 256, (1, 3, 2, 2), dtype=torch.uint8)
    torch.testing.assert_close(load_image(u), u.float() / 255)


@pytest.mark.parametrize("x, match", [
    (torch.full((1, 3, 2, 2), float("nan")), "NaN"),
    (torch.full((1, 3, 2, 2), float("inf")), "NaN or infinite"),
    (torch.full((3, 2, 2), -0.01), r"\[0, 1\]"),
    (torch.full((3, 2, 2), 1.01), r"\[0, 1\]"),
    (torch.rand(2, 3, 4, 4), "one RGB image"),
    (torch.rand(1, 4, 4), "one RGB image"),
    (torch.rand(4, 4), "one RGB image"),
    (torch.zeros(1, 3, 4, 4, dtype=torch.int32), "dtype torch.int32"),
    (torch.zeros(1, 3, 0, 4), "empty"),
])
def test_bad_tensors(x, match):
    with pytest.raises(ImageError, match=match):
        load_image(x)


# ---- hostile and broken files ----

def test_size_limit_is_checked_before_decoding():
    data = png_header_only(9000, 9000)  # 81 Mpx: below Pillow's own bomb limit, above ours
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="max_pixels=67108864"):
            load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    small = encoded(Image.new("RGB", (20, 10)))
    assert load_image(small, max_pixels=200).shape == (1, 3, 10, 20)
    for src in (small, np.zeros((10, 20, 3), np.uint8), torch.zeros(3, 10, 20)):
        with pytest.raises(ImageError, match="200 pixels, more than max_pixels=199"):
            load_image(src, max_pixels=199)


def test_decompression_bomb_is_an_image_error():
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(png_header_only(30000, 30000))


@pytest.mark.parametrize("data, match", [
    (b"", "not a supported image"),
    (b"hello, I am a text file\n" * 10, "not a supported image"),
    (MAGIC + bytes(60), r"\.idm bitstream, not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a supported image"),
])
def test_non_images(data, match):
    with pytest.raises(ImageError, match=match):
        load_image(data)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="cannot read .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="cannot load an image from a list"):
        load_image([[0, 1]])


SMALL = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
BROKEN_FILES = {"PNG": encoded(Image.fromarray(SMALL)), "JPEG": encoded(Image.fromarray(SMALL), "JPEG"),
                "PNG16": png16(SMALL.astype(np.uint16) * 257, 2, 4)}


@pytest.mark.parametrize("fmt", sorted(BROKEN_FILES))
def test_every_truncation_gives_an_image_error_or_an_image(fmt):
    data = BROKEN_FILES[fmt]
    full = load_image(data)
    decoded = []
    for n in range(len(data)):
        try:
            x = load_image(data[:n])
        except ImageError:
            continue
        # A cut after the last pixel byte (zlib checksum, chunk CRC, IEND) may still decode, but
        # then to the complete image.
        torch.testing.assert_close(x, full, rtol=0, atol=0)
        decoded.append(n)
    assert all(n >= len(data) - 20 for n in decoded), decoded


@pytest.mark.parametrize("fmt", sorted(BROKEN_FILES))
def test_corrupted_files_give_an_image_error_or_an_image(fmt):
    rng = random.Random(fmt)
    data = BROKEN_FILES[fmt]
    for _ in range(300):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            x = load_image(bytes(b), max_pixels=1 << 16)
        except ImageError:
            continue
        assert x.dim() == 4 and x.shape[1] == 3 and torch.isfinite(x).all()


# ---- output ----

def reference_quantize(x: np.ndarray) -> np.ndarray:
    """torchvision save_image: float32 x·255 + 0.5, clamped to [0, 255], truncated."""
    y = x.astype(np.float32) * np.float32(255) + np.float32(0.5)
    return np.trunc(np.clip(y, 0, 255)).astype(np.uint8)


def test_to_pil_rounds_like_the_reference():
    k = np.arange(256, dtype=np.float64)
    values = np.concatenate([k / 255, (k + 0.5) / 255, (k + 0.499) / 255, (k + 0.501) / 255,
                             [-1, -1e-3, 1 + 1e-3, 2, 1e30, -1e30]]).astype(np.float32)
    values = values[: len(values) // 3 * 3]
    x = torch.from_numpy(values.reshape(3, 1, -1))
    out = np.asarray(to_pil(x))
    np.testing.assert_array_equal(out, reference_quantize(values.reshape(3, 1, -1)).transpose(1, 2, 0))
    np.testing.assert_array_equal(np.asarray(to_pil((torch.arange(256.0) / 255).expand(1, 3, 1, 256)))[0, :, 0],
                                  np.arange(256))


@pytest.mark.parametrize("x, match", [
    (torch.full((3, 2, 2), float("nan")), "NaN"),
    (torch.zeros(2, 3, 2, 2), "got shape"),
    (torch.zeros(4, 2, 2), "got shape"),
    (torch.zeros(3, 2, 2, dtype=torch.uint8), "float tensor"),
    (np.zeros((2, 2, 3)), "float tensor"),
])
def test_to_pil_refuses(x, match):
    with pytest.raises(ImageError, match=match):
        to_pil(x)


def test_save_image_round_trip_and_refusals(tmp_path):
    x = torch.rand(1, 3, 6, 4)
    out = tmp_path / "out.png"
    save_image(x, out)
    back = load_image(out)
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(to_pil(x)))
    with pytest.raises(OutputExistsError):
        save_image(x, out)
    save_image(torch.zeros(3, 6, 4), out, force=True)
    assert load_image(out).max() == 0
    with pytest.raises(SameFileError):
        save_image(x, out, force=True, inputs=[out])
    with pytest.raises(ImageError, match="use a .png file name"):
        save_image(x, tmp_path / "out.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
