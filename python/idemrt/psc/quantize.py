"""The measurement quantizer: float32 -> float8 e4m3fn -> one byte, as the public PSC code.

Each measurement is sent as the bit pattern of its float8 e4m3fn value (sign, 4 exponent bits
with bias 7, 3 mantissa bits): no scale, no step size. The format has 254 finite codes, |max| 448,
a worst-case relative error of 2^-4 on normal numbers and round-to-nearest-even; codes 0x7F and
0xFF are NaN and never sent. Values beyond ±448 are clamped explicitly (torch's CPU cast also
saturates, but that is an implementation detail; other casts map overflow to NaN).
"""
from __future__ import annotations

import torch

from ..errors import BitstreamError

QUANTIZER = "e4m3fn"  # the quantizer id stored in the bitstream
E4M3_MAX = 448.0
NAN_CODES = (0x7F, 0xFF)


def quantize(y: torch.Tensor) -> bytes:
    """One byte per value of the 1-D float tensor ``y``; raises ValueError on NaN."""
    if y.ndim != 1 or not y.is_floating_point():
        raise ValueError(f"expected a 1-D float tensor of measurements, got {y.dtype} {tuple(y.shape)}")
    y = y.detach().to("cpu", torch.float32)
    if torch.isnan(y).any():
        raise ValueError("a measurement is NaN: the image or the sampler produced non-finite values")
    codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.numpy().tobytes()


def dequantize(codes: bytes) -> torch.Tensor:
    """float32 values of the e4m3fn ``codes``; a NaN code raises BitstreamError."""
    raw = torch.frombuffer(bytearray(codes), dtype=torch.uint8)
    bad = (raw == NAN_CODES[0]) | (raw == NAN_CODES[1])
    if bad.any():
        first = int(bad.nonzero()[0])
        raise BitstreamError(f"corrupt PSC measurements: byte {first} is a float8 NaN code (0x{int(raw[first]):02x})")
    return raw.view(torch.float8_e4m3fn).to(torch.float32)


def round_trip(y: torch.Tensor) -> torch.Tensor:
    """``dequantize(quantize(y))``: what the decoder will condition on."""
    return dequantize(quantize(y))
