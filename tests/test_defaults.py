"""The default backend and compute dtype: fast (bf16) on CUDA and on CPUs with native bf16, eager
(fp32) on other CPUs; $IDEMRT_BACKEND and an explicit choice override it (the CPU's flags are
simulated: the test must hold on any machine)."""
import pytest
import torch

import idemrt
from idemrt import defaults
from tiny_models import tiny_codec, tiny_unet

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_pin(monkeypatch):
    monkeypatch.delenv(defaults.BACKEND_ENV, raising=False)


@pytest.mark.parametrize("flags, backend, dtype", [
    ({"avx2", "avx512f", "avx512_bf16"}, "fast", torch.bfloat16),
    ({"avx2", "amx_bf16", "amx_tile"}, "fast", torch.bfloat16),
    ({"avx2", "avx512f"}, "eager", torch.float32),  # bf16 would be emulated: slower than fp32
    (set(), "eager", torch.float32),  # not Linux, or no /proc/cpuinfo
])
def test_cpu_default_follows_native_bf16(monkeypatch, no_pin, flags, backend, dtype):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: flags)
    assert defaults.default_backend(CPU) == backend
    assert defaults.default_fast_dtype(CPU) == dtype
    assert defaults.default_backend(CUDA) == "fast" and defaults.default_fast_dtype(CUDA) == torch.bfloat16


def test_environment_and_explicit_choice_override(monkeypatch, no_pin):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv(defaults.BACKEND_ENV, "eager")
    assert defaults.default_backend(CPU) == "eager" and defaults.default_backend(CUDA) == "eager"
    assert defaults.default_backend(CPU, "fast") == "fast"


def test_decoder_takes_the_default(monkeypatch, no_pin):
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx512_bf16"})
    codec, unet = tiny_codec(), tiny_unet()
    decoder = idemrt.Decoder(codec, unet, steps=2, device="cpu")
    assert decoder.backend_name == "fast" and decoder.backend.dtype == torch.bfloat16
    assert idemrt.Decoder(codec, unet, steps=2, device="cpu", backend="eager").backend_name == "eager"
    monkeypatch.setattr(defaults, "cpu_flags", lambda: {"avx2"})
    assert idemrt.Decoder(codec, unet, steps=2, device="cpu").backend_name == "eager"
