"""PSC on the fast path: the fast denoiser, the compute mode in the stream, determinism settings.

CPU (always): the fast denoiser (the fast backend's inference copy, graphs off) against the eager
x̂0; encoder -> decoder round trips in fast fp32 and bf16 with every row hash checked; the decoder
follows the stream's mode and refuses one it cannot run; the round-0 cache keys on the mode; the
PSC UNet never runs with cuDNN autotuning. GPU (``-m gpu``, skipped without CUDA): the captured
graph equals the uncaptured run bitwise, and a CUDA encode decodes in this and in another process.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from idemrt import DecodeError, psc
from idemrt import bitstream as bsfmt
from idemrt.psc.cache import cache_key
from idemrt.psc.sampling import Denoiser, FastDenoiser, deterministic
from idemrt.psc.stream import Compute
from tiny_models import tiny_unet

H, W = 15, 17  # padded to 16x18 for the tiny UNet (factor 2)
KW = dict(s=4, r=2, steps=3, seed=5, device="cpu", cache=False)
STEPS = 5


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return F.interpolate(torch.rand(1, 3, 4, 4), size=(H, W), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def encoded(unet, image):
    """Streams of the same image in three compute modes (2 rounds each)."""
    modes = {"eager": dict(), "fast-fp32": dict(backend="fast", dtype=torch.float32),
             "fast-bf16": dict(backend="fast", dtype=torch.bfloat16)}
    return {name: psc.Encoder(unet, **KW, **kw).encode(image, rounds=2) for name, kw in modes.items()}


def _inputs(shape=(2, 3, 16, 18), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _with_compute(data: bytes, compute: str) -> bytes:
    bs = bsfmt.unpack(data)
    bs.extra["compute"] = compute
    return bsfmt.pack(bs)


def test_fast_denoiser_matches_the_eager_x0(unet):
    eager = Denoiser(unet, STEPS, "cpu")
    fast = FastDenoiser(unet, STEPS, "cpu", torch.float32)
    assert fast.unet is not unet and not any(p.requires_grad for p in fast.unet.parameters())
    assert fast.num_graphs == 0 and str(fast.compute) == "fast-fp32-cpu"
    # The device tables hold exactly the eager path's float32 values.
    assert fast._timesteps.tolist() == eager.timesteps
    assert fast._coef.T.tolist() == [eager.sqrt_1m_abar, eager.sqrt_abar]
    x = _inputs()
    with torch.no_grad():
        for i in (0, 4, 2, 3, 1):  # any order: the step index is read from the device tensor each call
            assert rel_err(fast.x0(x, i), eager.x0(x, i)) <= 1e-5
        bf16 = FastDenoiser(unet, STEPS, "cpu", torch.bfloat16)
        err = rel_err(bf16.x0(x, 2), eager.x0(x, 2))
    assert 1e-5 < err < 5e-2  # bf16 convolutions: close, but not the fp32 numbers


def test_fast_denoiser_is_differentiable_for_the_guided_restoration(unet):
    fast = FastDenoiser(unet, STEPS, "cpu", torch.float32)
    eager = Denoiser(unet, STEPS, "cpu")
    x = _inputs(seed=2)
    grads = []
    for den in (fast, eager):
        xt = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(den.x0(xt, 3).square().sum(), xt)
        grads.append(g)
    assert rel_err(*grads) <= 1e-4


@pytest.mark.parametrize("mode", ["fast-fp32", "fast-bf16"])
def test_fast_streams_round_trip_with_every_hash_checked(unet, encoded, mode):
    data = encoded[mode]
    assert bsfmt.unpack(data).extra["compute"] == f"{mode}-cpu"
    dec = psc.Decoder(unet, device="cpu", cache=False)  # default restoration: eager on the CPU
    img = dec.decode(data, output="tensor")
    assert (dec.last.rounds, dec.last.hashes_checked, dec.last.compute) == (2, 2, f"{mode}-cpu")
    assert img.shape == (1, 3, H, W) and dec.last.residual < 1e-4
    # The fast restoration (same mode as the rows) meets the measurements as well.
    fast = psc.Decoder(unet, device="cpu", cache=False, backend="fast", dtype=torch.float32)
    fast.decode(data, output="tensor")
    assert fast.last.hashes_checked == 2 and fast.last.residual < 1e-4


def test_modes_make_different_rows(encoded):
    hashes = {name: bsfmt.unpack(data).streams[1] for name, data in encoded.items()}
    assert hashes["fast-bf16"] != hashes["eager"] and hashes["fast-bf16"] != hashes["fast-fp32"]


def test_the_decoder_follows_the_streams_mode(unet, encoded):
    dec = psc.Decoder(unet, device="cpu", cache=False)
    # An eager stream relabelled bf16: the decoder runs bf16 as told, builds other rows, and the
    # first row hash stops it.
    with pytest.raises(DecodeError, match="rows of round 0 differ"):
        dec.measurements(_with_compute(encoded["eager"], "fast-bf16-cpu"))
    # A version-1 stream (no mode recorded) was made by the eager path: it still decodes.
    bs = bsfmt.unpack(encoded["eager"])
    del bs.extra["compute"]
    bs.extra["version"] = 1
    dec.measurements(bsfmt.pack(bs))
    assert (dec.last.hashes_checked, dec.last.compute) == (2, "eager-fp32-cpu")


def test_a_stream_of_another_device_type_is_refused_with_the_reason(unet, encoded):
    cuda_stream = _with_compute(encoded["fast-bf16"], "fast-bf16-cuda")
    with pytest.raises(DecodeError, match=r"fast bf16 UNet on cuda .*would diverge.*device='cuda'"):
        psc.Decoder(unet, device="cpu", cache=False).decode(cuda_stream)


def test_bad_compute_arguments(unet):
    with pytest.raises(ValueError, match="eager path computes in fp32"):
        psc.Encoder(unet, backend="eager", dtype=torch.bfloat16, **KW)
    with pytest.raises(ValueError, match="backend must be"):
        psc.Encoder(unet, backend="tensorrt", **KW)
    with pytest.raises(ValueError, match="dtype must be one of"):
        psc.Decoder(unet, device="cpu", backend="fast", dtype=torch.float64)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        FastDenoiser(unet, STEPS, "cpu", torch.float32, graphs=True)
    assert str(psc.Encoder(unet, **KW).compute) == "eager-fp32-cpu"  # the CPU default
    assert str(psc.Encoder(unet, backend="fast", **KW).compute) == "fast-bf16-cpu"


def test_the_round0_cache_is_keyed_by_the_compute_mode(unet, image, tmp_path):
    args = (bytes(16), 0, 4, 2, 3, (3, 16, 18), torch.device("cpu"), 1)
    keys = {cache_key(*args, Compute(*mode)) for mode in
            [("eager", "fp32", "cpu"), ("fast", "fp32", "cpu"), ("fast", "bf16", "cpu"), ("fast", "bf16", "cuda")]}
    assert len(keys) == 4
    kw = {**KW, "cache_dir": tmp_path}  # a shared on-disk cache
    psc.Encoder(unet, **kw).encode(image, rounds=1)
    fast = psc.Encoder(unet, backend="fast", dtype=torch.float32, **kw)
    fast.encode(image, rounds=1)
    assert not fast.last.cache_hit  # eager's round 0 is not served to the fast mode
    assert psc.Encoder(unet, backend="fast", dtype=torch.float32, **kw).encode(image, rounds=1) == \
        fast.encode(image, rounds=1)
    assert fast.last.cache_hit


def _settings():
    cudnn = torch.backends.cudnn
    return [cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32]


@pytest.fixture
def autotuning_settings():
    """cuDNN autotuning on, nondeterministic algorithms and TF32 allowed, as a user (or the fast
    backend's autotuning) may leave them; restored afterwards."""
    cudnn, before = torch.backends.cudnn, _settings()
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32 = True, False, True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", ["eager", "fast"])
def test_the_psc_unet_never_runs_with_cudnn_autotuning(unet, image, backend, monkeypatch, autotuning_settings):
    seen = []
    dtype = torch.float32 if backend == "fast" else None
    enc = psc.Encoder(unet, backend=backend, dtype=dtype, **KW)
    model = enc.denoiser.unet
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (seen.append(_settings()), forward(*a, **k))[1])
    data = enc.encode(image, rounds=1)
    psc.Decoder(unet, device="cpu", cache=False, backend=backend, dtype=dtype).decode(data)
    assert len(seen) == 3 * 3  # encoder round, decoder round, restoration: 3 steps each, one shared model
    assert all(s == [False, True, False, False] for s in seen)
    assert _settings() == [True, False, True, True]  # restored afterwards


def test_deterministic_restores_the_settings_after_an_error(autotuning_settings):
    with pytest.raises(RuntimeError):
        with deterministic():
            raise RuntimeError("boom")
    assert _settings() == [True, False, True, True]


# --- GPU ----------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_captured_denoiser_equals_the_uncaptured_one_bitwise(dtype):
    unet = tiny_unet().cuda()
    captured = FastDenoiser(unet, STEPS, "cuda", dtype)
    plain = FastDenoiser(unet, STEPS, "cuda", dtype, graphs=False)
    assert captured.unet is plain.unet  # one shared inference copy
    with deterministic(), torch.no_grad():
        for shape in ((4, 3, 32, 32), (1, 3, 32, 32)):
            x = _inputs(shape, seed=3).cuda()
            for _ in range(2):  # every step of two "rounds" replays the shape's one graph
                for i in range(STEPS - 1, -1, -1):
                    got, want = captured.x0(x, i), plain.x0(x, i)
                    assert torch.equal(got, want), f"step {i}, shape {shape}"
                    x = got.clamp(-3, 3)
    assert captured.num_graphs == 2 and plain.num_graphs == 0


_ENCODE = """
import sys, torch
sys.path.insert(0, {tests!r})
from idemrt import psc
from tiny_models import tiny_unet
torch.set_num_threads(1)  # as conftest.py: the encoder's CPU measurement products see the same threads
torch.backends.cudnn.benchmark = True  # must not matter: PSC pins its own settings
image = torch.rand(1, 3, 30, 32, generator=torch.Generator().manual_seed(0))
sys.stdout.buffer.write(psc.Encoder(tiny_unet(), s=4, r=2, steps=3, seed=5, device="cuda", cache=False)
                        .encode(image, rounds=3))
"""


@pytest.mark.gpu
@gpu
def test_gpu_encode_decodes_here_and_in_another_process():
    unet = tiny_unet()
    image = torch.rand(1, 3, 30, 32, generator=torch.Generator().manual_seed(0))
    enc = psc.Encoder(unet, s=4, r=2, steps=3, seed=5, device="cuda", cache=False)
    data = enc.encode(image, rounds=3)
    assert enc.last.compute == "fast-bf16-cuda" and enc.denoiser.num_graphs == 1
    assert enc.encode(image, rounds=3) == data and enc.denoiser.num_graphs == 1  # graphs reused
    dec = psc.Decoder(unet, device="cuda", cache=False)
    img = dec.decode(data, output="tensor")
    assert (dec.last.hashes_checked, dec.last.compute) == (3, "fast-bf16-cuda") and torch.isfinite(img).all()
    script = _ENCODE.format(tests=os.path.dirname(os.path.abspath(__file__)))
    other = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, check=True)
    assert other.stdout == data  # another process computes the same rows, bit for bit
