"""idemrt.Encoder / idemrt.Decoder end to end on tiny random models.

References are independent: compressai's own ScaleHyperprior holding the same weights (its
``compress``/``decompress``/``forward``), and ``idemrt.diffusion.guided_step`` composed by hand.
"""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressai.models import ScaleHyperprior
from PIL import Image

import idemrt
from idemrt import bitstream as bsfmt
from idemrt.diffusion import DDPMSampler, DPS, Schedule, guided_step
from tiny_models import tiny_codec, tiny_codec_state, tiny_unet

H, W = 40, 48  # not a multiple of the codec's 64: exercises padding and cropping


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


@pytest.fixture(scope="module")
def reference():
    model = ScaleHyperprior(N=8, M=12)
    model.load_state_dict(tiny_codec_state())
    return model.eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return F.interpolate(torch.rand(1, 3, 8, 8), size=(H, W), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def data(models, image):
    return idemrt.Encoder(models[1]).encode(image)


def _padded(x):
    return F.pad(x, (0, 64 - W, 0, 64 - H), mode="replicate")


def test_bitstream_is_compressais_and_mse_mode_equals_its_decompress(models, reference, image, data):
    bs = bsfmt.unpack(data)
    with torch.no_grad():
        out = reference.compress(_padded(image))
        assert bs.streams == [s[0] for s in out["strings"]]
        expected = reference.decompress(out["strings"], out["shape"])["x_hat"][..., :H, :W]
    dec = idemrt.Decoder(models[1], device="cpu")  # no UNet: MSE decodes only
    got = dec.decode(data, mode="mse", output="tensor")
    assert got.shape == (1, 3, H, W)
    assert torch.equal(got, expected)
    assert (bs.height, bs.width, bs.padded_height, bs.padded_width) == (H, W, 64, 64)


def test_operator_and_target_are_the_references(models, reference, image, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=5, device="cpu")
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = 2 * reference((x0 + 1) / 2)["x_hat"] - 1
        assert torch.allclose(dec.operator(x0), expected, atol=1e-6)
        bs = bsfmt.unpack(data)
        y_hat = codec.decompress_latent(bs.streams, bs.latent_shape)
        target = dec.target_from_latent(y_hat)
        # The reference's target: the unclamped synthesis of round(g_a(x)), in [-1, 1] units.
        expected_target = 2 * reference.g_s(torch.round(reference.g_a(_padded(image)))) - 1
    assert torch.allclose(target, expected_target, atol=1e-6)


def test_step_is_a_pure_function_equal_to_guided_step(models, reference):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=10, scale=0.6, device="cpu")
    torch.manual_seed(1)
    x_t, noise = torch.randn(2, 1, 3, 64, 64).unbind(0)
    target = torch.randn(1, 3, 64, 64) * 0.1
    a = dec.step(x_t, 7, target, noise)
    b = dec.step(x_t.clone(), 7, target, noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sampler = DDPMSampler(Schedule.create(1000, respacing=10))

    def operator(x0):
        # The reference's straight-through rounding (compressai's eval forward rounds without one).
        y = reference.g_a((x0 + 1) / 2)
        return 2 * reference.g_s(y + (torch.round(y) - y).detach()) - 1

    x_ref, d_ref = guided_step(unet, operator, sampler, DPS(0.6), x_t, 7, target, noise)
    assert torch.allclose(a[0], x_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a[1], d_ref, rtol=1e-5)


def test_decode_is_deterministic_and_the_same_alone_or_in_a_batch(models, data, image):
    unet, codec = models
    other = idemrt.Encoder(codec).encode(image.flip(-1))
    dec = idemrt.Decoder(codec, unet, steps=4, device="cpu")
    alone = dec.decode(data, seed=5, output="tensor")
    again = dec.decode(data, seed=5, output="tensor")
    assert torch.equal(alone, again)
    assert alone.shape == (1, 3, H, W) and 0 <= alone.min() and alone.max() <= 1
    assert not torch.equal(alone, dec.decode(data, seed=6, output="tensor"))
    batch = dec.decode_batch([other, data], seeds=[9, 5], output="tensor")
    assert torch.allclose(batch[1], alone, atol=1e-5)
    assert len(dec.last.distance) == 2 and dec.last.timings["total"] > 0
    pil = dec.decode(data, seed=5)
    assert isinstance(pil, Image.Image) and pil.size == (W, H) and pil.mode == "RGB"


def test_guidance_pulls_the_sample_towards_the_code(models, data):
    """The Decoder applies the constraint: same seeds, the guided sample re-encodes closer to the
    received code than the unguided one. (The strong effect test, with a model of a known prior,
    is in tests/test_guidance.py; random tiny models only show the direction.)"""
    unet, codec = models
    bs = bsfmt.unpack(data)
    distances = {}
    for guidance in ("dps", "none"):
        dec = idemrt.Decoder(codec, unet, steps=25, scale=2.0, guidance=guidance, device="cpu")
        target = dec.target_from_latent(codec.decompress_latent(bs.streams, bs.latent_shape))
        x, _ = dec.sample(target, seed=0)
        with torch.no_grad():
            distances[guidance] = float((dec.operator(x) - target).norm())
    assert distances["dps"] < 0.8 * distances["none"]


def test_y_constraint_and_ddim_dsg_run(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps="ddim5", sampler="ddim", guidance="dsg", constraint="y", device="cpu")
    img = dec.decode(data, seed=0, output="tensor")
    assert img.shape == (1, 3, H, W) and torch.isfinite(img).all()
    assert np.isfinite(dec.last.distance[0])


def test_wrong_codec_is_a_bitstream_error(models, data):
    other = tiny_codec(seed=1)
    dec = idemrt.Decoder(other, models[0], steps=2, device="cpu")
    with pytest.raises(idemrt.BitstreamError, match="weights|codec"):
        dec.decode(data, seed=0)
    with pytest.raises(idemrt.BitstreamError):
        dec.decode(data[:-3], seed=0)


def test_one_decoder_shared_by_threads(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=3, device="cpu")
    expected = {s: dec.decode(data, seed=s, output="tensor") for s in range(3)}
    results, errors = {}, []

    def work(seed):
        try:
            results[seed] = dec.decode(data, seed=seed, output="tensor")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in range(3):
        assert torch.equal(results[s], expected[s])


class _Poisoned(torch.nn.Module):
    """Wraps a UNet; its first ``bad_calls`` forwards return NaN."""

    def __init__(self, unet, bad_calls):
        super().__init__()
        self.unet, self.bad_calls, self.calls = unet, bad_calls, 0

    def forward(self, x, t):
        self.calls += 1
        out = self.unet(x, t)
        return out * float("nan") if self.calls <= self.bad_calls else out


def test_non_finite_values_retry_with_a_smaller_step_then_fail(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, _Poisoned(unet, bad_calls=1), steps=4, device="cpu", check_every=1)
    img = dec.decode(data, seed=0, output="tensor")  # first attempt NaN at once, the retry is clean
    assert torch.isfinite(img).all()
    dec = idemrt.Decoder(codec, _Poisoned(unet, bad_calls=10**6), steps=4, device="cpu", nan_retries=1)
    with pytest.raises(idemrt.DecodeError, match="non-finite.*step"):
        dec.decode(data, seed=0)


def test_retry_loop_escalates_when_the_distance_stays_high(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=2, device="cpu", max_retries=2, retry_threshold=0.0)
    backend = dec.backend
    step, used = backend.step, []

    def recording_step(x, i, target, noise, scale=None):
        used.append(round(float(scale[0]), 6))
        return step(x, i, target, noise, scale)

    backend.step = recording_step
    dec.decode(data, seed=0)
    assert dec.last.retries == [2] and dec.last.scales == pytest.approx([1.35])
    # Each retry escalates the per-sample scale, as data of the same backend (no new backend).
    assert used == pytest.approx([0.6, 0.6, 0.9, 0.9, 1.35, 1.35]) and dec.backend is backend


def test_images_in_every_form_encode_alike(models, image, tmp_path):
    codec = models[1]
    arr = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    enc = idemrt.Encoder(codec)
    from_array = enc.encode(arr)
    assert enc.encode(Image.fromarray(arr)) == from_array
    assert enc.encode(str(path)) == from_array
    assert enc.encode(torch.from_numpy(arr).permute(2, 0, 1).float() / 255) == from_array
    with pytest.raises(idemrt.ImageError):
        enc.encode(tmp_path / "missing.png")


def test_bad_arguments():
    codec = tiny_codec()
    for kwargs in (dict(sampler="euler"), dict(guidance="mcg"), dict(constraint="z")):
        with pytest.raises(ValueError):
            idemrt.Decoder(codec, None, device="cpu", **kwargs)
    with pytest.raises(idemrt.BackendError, match="unknown backend"):
        idemrt.Decoder(codec, tiny_unet(), steps=2, device="cpu", backend="cuda-magic").step(
            torch.zeros(1, 3, 64, 64), 1, torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
        )


def test_backend_choice_and_options(models, data):
    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=3, device="cpu")
    assert dec.backend_name == "eager"  # the tests pin the reference (IDEMRT_BACKEND, conftest.py)
    eager = dec.decode(data, seed=0, output="tensor")
    fast = idemrt.Decoder(codec, unet, steps=3, device="cpu", backend="fast", dtype=torch.float32,
                          backend_options={"kernels": "torch"}).decode(data, seed=0, output="tensor")
    assert torch.allclose(fast, eager, atol=1e-4)
    with pytest.raises(idemrt.BackendError, match="options"):
        idemrt.Decoder(codec, unet, steps=3, device="cpu", backend_options={"warp": 9}).decode(data, seed=0)


def test_the_old_signature_is_one_config_and_one_warning(models):
    """The Decoder's deprecated options (positional, in the old order, or loose keywords) become
    one DecodeConfig through api.deprecated_options, with one DeprecationWarning naming them all;
    a twice-given or unknown option is a TypeError, as Python's own signature check was."""
    from idemrt.api import deprecated_options
    from idemrt.speeds import SPEEDS

    unet, codec = models
    assert deprecated_options((5, "ddim"), {"exact": 1}) == (
        {"steps": 5, "sampler": "ddim", "exact": True, "deterministic": None}, None)
    assert deprecated_options((5, None, None, None, "x", "cpu"), {})[1] == "cpu"  # device was 6th
    with pytest.raises(TypeError, match=r"multiple values for \['steps'\]"):
        deprecated_options((5,), {"steps": 6})
    with pytest.raises(TypeError, match=r"multiple values for \['device'\]"):
        deprecated_options((5, None, None, None, "x", "cpu"), {}, device="cpu")
    with pytest.raises(TypeError, match=r"unexpected \['stpes'\]"):
        idemrt.Decoder(codec, unet, stpes=5)
    with pytest.warns(DeprecationWarning, match=r"Decoder\(sampler=, start=, steps=\)") as caught:
        old = idemrt.Decoder(codec, unet, 4, "ddim", start=0.5, device="cpu")
    assert len([w for w in caught if w.category is DeprecationWarning]) == 1
    assert old.config == SPEEDS["paper"].replace(steps=4, sampler="ddim", start=0.5)
    assert old.device == torch.device("cpu") and old.speed == "paper"
