"""The codec layer against compressai itself: operators, gradients, bitstream, padding.

The references are plain compressai models holding the same weights (loaded by compressai's own
``load_state_dict``), compressai's own ``forward`` / ``compress`` / ``decompress``, and gradients
composed independently from the vector-Jacobian products of g_s and g_a (and float64 finite differences).
"""
import copy

import pytest
import torch

import idemrt
from idemrt.models.codec import ARCHITECTURES, KNOWN_CODECS, CompressedLatent
from idemrt.models.codec_loading import load_codec

# --- small models shared with test_codec_loading.py -------------------------------------------------

# Small widths of each model; the classes are the package's registry entries (compressai's own).
SMALL = {
    name: (ARCHITECTURES[name].cls, kwargs)
    for name, kwargs in {
        "bmshj2018-factorized": dict(N=8, M=12),
        "bmshj2018-hyperprior": dict(N=8, M=12),
        "mbt2018-mean": dict(N=8, M=12),
        "mbt2018": dict(N=8, M=12),
        "cheng2020-anchor": dict(N=8),
        "cheng2020-attn": dict(N=8),
        "elic2022-official": dict(N=8, M=16, groups=[2, 2, 4, 4, 4]),
        "elic2022-chandelier": dict(N=8, M=16, groups=[2, 2, 4, 4, 4]),
    }.items()
}


def small_state_dict(name, seed=0, update=True):
    """state_dict of a small random ``name`` model; CDF tables filled iff ``update``.

    The last layers of g_a and h_a are scaled up so that |y| reaches several units: rounding,
    means and context then matter.
    """
    cls, kwargs = SMALL[name]
    torch.manual_seed(seed)
    model = cls(**kwargs)
    g_a_last = [m for m in model.g_a if isinstance(m, torch.nn.Conv2d)][-1]
    h_a = model.latent_codec["hyper"].h_a if name.startswith("elic") else getattr(model, "h_a", None)
    h_a_last = h_a[-1] if h_a is not None else None
    with torch.no_grad():
        g_a_last.weight.mul_(20)
        if h_a_last is not None:
            h_a_last.weight.mul_(5)
    if update:
        model.update(force=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def reference_model(name, state):
    """A plain compressai model holding ``state``, loaded by compressai itself; eval mode, CDFs ready."""
    cls, kwargs = SMALL[name]
    model = cls(**kwargs)
    model.load_state_dict(state)
    if not any(v.numel() for k, v in state.items() if k.endswith("_quantized_cdf")):
        model.update(force=True)
    return model.eval()


# Half of the checkpoints carry CDF tables, half must have them computed at load time.
WITH_CDFS = {"bmshj2018-hyperprior", "mbt2018", "cheng2020-attn", "elic2022-chandelier"}
# Models whose compressai eval forward rounds exactly like their codec.
FORWARD_EXACT = ("bmshj2018-factorized", "bmshj2018-hyperprior", "mbt2018-mean", "elic2022-official",
                 "elic2022-chandelier")


@pytest.fixture(scope="module", params=KNOWN_CODECS)
def setup(request):
    name = request.param
    state = small_state_dict(name, update=name in WITH_CDFS)
    codec = load_codec(name, checkpoint=state)
    ref = reference_model(name, state)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 64)
    return name, codec, ref, x


def _norm_loss(t, out):
    return torch.linalg.vector_norm(t - out)


# --- operators --------------------------------------------------------------------------------------


def test_operator_equals_compressai(setup):
    """x-domain operator == compressai's eval forward (or, for the autoregressive models, whose forward
    rounds without the means unlike their codec, == compressai's decoder before its clamp)."""
    name, codec, ref, x = setup
    with torch.no_grad():
        assert torch.equal(codec.analysis(x), ref.g_a(x))
        ours = codec.operator(x, "x")
        if name in FORWARD_EXACT:
            assert torch.equal(ours, ref(x)["x_hat"])
        else:
            out = ref.compress(x)
            assert torch.equal(ours.clamp(0, 1), ref.decompress(out["strings"], out["shape"])["x_hat"])
    assert codec.pad_multiple == (16 if name == "bmshj2018-factorized" else 64)


def test_y_operator_is_the_real_codecs_latent(setup):
    """quantize(analysis(x)) is the y_hat that compressai's decoder reconstructs from the bitstream."""
    name, codec, ref, x = setup
    with torch.no_grad():
        out = ref.compress(x)
        y_hat = codec.operator(x, "y")
        expected = ref.decompress(out["strings"], out["shape"])["x_hat"]
    c = codec.compress(x)
    decoded = codec.decompress_latent(c.strings, c.shape)
    assert decoded.shape == y_hat.shape
    if name.startswith("elic"):
        # compressai's bitstream path computes mu on a re-arranged tensor, mu ~1e-6 apart: the same
        # symbols, except that on some CPU a y - mu within ~1e-6 of a half-integer rounds the other
        # way. Allow such one-level flips at a rate no systematic error would stay under.
        diff = (decoded - y_hat).abs()
        flips = (diff - 1).abs() < 1e-4
        assert flips.float().mean() < 1e-3 and diff[~flips].max() < 1e-4
    else:
        assert torch.equal(decoded, y_hat)
    with torch.no_grad():
        assert torch.equal(codec.synthesis(decoded).clamp(0, 1), expected)


def test_bitstream_identical_to_compressai(setup):
    name, codec, ref, x = setup
    with torch.no_grad():
        out = ref.compress(x)
        expected = ref.decompress(out["strings"], out["shape"])["x_hat"]
    c = codec.compress(x)
    assert isinstance(c, CompressedLatent)
    assert c.strings == [batch[0] for batch in out["strings"]]
    assert all(isinstance(s, bytes) for s in c.strings)
    expected_shape = out["shape"]["hyper"] if name.startswith("elic") else out["shape"]
    assert c.shape == tuple(expected_shape)
    assert torch.equal(codec.decompress(c.strings, c.shape), expected)


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "mbt2018-mean", "mbt2018", "elic2022-chandelier"])
@pytest.mark.parametrize("domain", ["x", "y"])
def test_gradient_is_ga_gs_vjp(name, domain):
    """d||t - A(x)||/dx == J_{g_a}^T J_{g_s}^T (dL/dA): identity at the rounding, nothing through mu."""
    codec = load_codec(name, checkpoint=small_state_dict(name))
    torch.manual_seed(2)
    x = torch.rand(1, 3, 64, 64)
    x_req = x.clone().requires_grad_()
    out = codec.operator(x_req, domain)
    t = torch.rand_like(out)
    _norm_loss(t, out).backward()

    # Independent composition: VJP of g_s at the (fixed) y_hat, then VJP of g_a at x.
    with torch.no_grad():
        y_hat = codec.quantize(codec.analysis(x))
    y_leaf = y_hat.clone().requires_grad_()
    loss = _norm_loss(t, codec.synthesis(y_leaf) if domain == "x" else y_leaf)
    (g_y,) = torch.autograd.grad(loss, y_leaf)
    x_leaf = x.clone().requires_grad_()
    (g_x,) = torch.autograd.grad(codec.analysis(x_leaf), x_leaf, grad_outputs=g_y)
    assert g_x.abs().max() > 0
    torch.testing.assert_close(x_req.grad, g_x, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "elic2022-chandelier"])
def test_gradient_matches_float64_finite_differences(name):
    """Directional derivative with the rounding held fixed (y_hat + g_a(x + eps d) - g_a(x)), in float64."""
    codec = load_codec(name, checkpoint=small_state_dict(name))
    torch.manual_seed(3)
    x = torch.rand(1, 3, 64, 64)
    d = torch.randn_like(x)
    x_req = x.clone().requires_grad_()
    out = codec.operator(x_req, "x")
    t = torch.rand_like(out)
    _norm_loss(t, out).backward()
    analytic = (x_req.grad.double() * d.double()).sum()

    model64 = copy.deepcopy(codec.model).double()
    x64, d64, t64 = x.double(), d.double(), t.double()
    with torch.no_grad():
        y_hat = codec.quantize(codec.analysis(x)).double()
        y0 = model64.g_a(x64)

        def loss(eps):
            return _norm_loss(t64, model64.g_s(y_hat + model64.g_a(x64 + eps * d64) - y0))

        eps = 1e-4
        numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    assert abs(numeric) > 1e-3
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric)


def test_autoregressive_batch_equals_single_images():
    """No cross-talk between the images of a batch in the serial context loop (batched convolutions
    may differ in the last bit of mu, hence the tolerance)."""
    codec = load_codec("mbt2018", checkpoint=small_state_dict("mbt2018"))
    torch.manual_seed(4)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        batch = codec.operator(x, "y")
        single = torch.cat([codec.operator(x[i : i + 1], "y") for i in range(2)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)


def test_operator_rejects_unknown_constraint():
    codec = load_codec("bmshj2018-hyperprior", checkpoint=small_state_dict("bmshj2018-hyperprior"))
    with pytest.raises(ValueError, match="constraint"):
        codec.operator(torch.rand(1, 3, 64, 64), "z")


def test_codec_is_frozen_and_stays_in_eval_mode():
    codec = idemrt.load_codec("mbt2018-mean", checkpoint=small_state_dict("mbt2018-mean"), device="cpu")
    assert isinstance(codec, idemrt.Codec)
    assert codec.device.type == "cpu" and all(p.device.type == "cpu" for p in codec.parameters())
    assert all(not p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not codec.model.training
    assert codec.name == "mbt2018-mean" and codec.family == "mean-scale"


# --- image size -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bmshj2018-factorized", "bmshj2018-hyperprior"])
def test_pad_and_crop_odd_sizes(name):
    codec = load_codec(name, checkpoint=small_state_dict(name))
    m = codec.pad_multiple
    torch.manual_seed(5)
    x = torch.rand(1, 3, 37, 50)
    xp, padding = codec.pad(x)
    H, W = -(-37 // m) * m, -(-50 // m) * m
    assert xp.shape == (1, 3, H, W)
    assert padding == (0, W - 50, 0, H - 37)
    assert torch.equal(xp[..., :37, :50], x)
    # Replicate padding: the extra rows repeat the last row, the extra columns the last column.
    assert torch.equal(xp[..., 37:, :50], x[..., 36:37, :].expand(1, 3, H - 37, 50))
    assert torch.equal(xp[..., :, 50:], xp[..., :, 49:50].expand(1, 3, H, W - 50))
    assert torch.equal(codec.crop(xp, (37, 50)), x)
    with torch.no_grad():
        assert codec.crop(codec.operator(xp), (37, 50)).shape == (1, 3, 37, 50)
    c = codec.compress(xp)
    assert codec.decompress(c.strings, c.shape).shape == xp.shape
    # Already aligned: unchanged.
    same, no_pad = codec.pad(xp)
    assert same is xp and no_pad == (0, 0, 0, 0)


def test_pad_and_compress_reject_bad_images():
    codec = load_codec("bmshj2018-hyperprior", checkpoint=small_state_dict("bmshj2018-hyperprior"))
    with pytest.raises(idemrt.ImageError):
        codec.pad(torch.rand(3, 37, 50))
    with pytest.raises(idemrt.ImageError, match="multiple of 64"):
        codec.compress(torch.rand(1, 3, 48, 64))
    with pytest.raises(idemrt.ImageError):
        codec.compress(torch.rand(2, 3, 64, 64))


# --- identity -----------------------------------------------------------------------------------------


def test_weights_hash():
    state = small_state_dict("bmshj2018-hyperprior")
    a = load_codec("bmshj2018-hyperprior", checkpoint=state).weights_hash()
    b = load_codec("bmshj2018-hyperprior", checkpoint=dict(state)).weights_hash()
    assert a == b and isinstance(a, bytes) and len(a) == 16  # the .idm container's weights_hash field
    changed = dict(state)
    changed["g_s.6.bias"] = state["g_s.6.bias"] + 1e-3
    assert load_codec("bmshj2018-hyperprior", checkpoint=changed).weights_hash() != a
    # The CDF tables are part of the identity: another scale table means another bitstream.
    other_cdf = dict(state)
    other_cdf["gaussian_conditional._offset"] = state["gaussian_conditional._offset"] - 1
    assert load_codec("bmshj2018-hyperprior", checkpoint=other_cdf).weights_hash() != a


# --- bitstream errors ---------------------------------------------------------------------------------


def test_malformed_latent_is_bitstream_error(monkeypatch):
    codec = load_codec("bmshj2018-hyperprior", checkpoint=small_state_dict("bmshj2018-hyperprior"))
    c = codec.compress(torch.rand(1, 3, 64, 64))
    with pytest.raises(idemrt.BitstreamError, match="expected 2"):
        codec.decompress_latent(c.strings[:1], c.shape)
    with pytest.raises(idemrt.BitstreamError, match="bytes"):
        codec.decompress(["abc", c.strings[1]], c.shape)
    for truncated in (c.strings[0][:-1], b"", c.strings[0][:4]):
        with pytest.raises(idemrt.BitstreamError, match="truncated"):
            codec.decompress_latent([truncated, c.strings[1]], c.shape)
    for shape in [(1,), (0, 1), (1, 1 << 20), "11", (1.0, 1)]:
        with pytest.raises(idemrt.BitstreamError, match="shape"):
            codec.decompress_latent(c.strings, shape)

    def broken(*args, **kwargs):
        raise ValueError("Invalid strings or indexes parameters")

    monkeypatch.setattr(codec.model.gaussian_conditional, "decompress", broken)
    with pytest.raises(idemrt.BitstreamError, match="entropy decoding failed"):
        codec.decompress(c.strings, c.shape)


def test_renamed_domain_argument_still_works_with_a_warning():
    """``domain`` was the old name of ``constraint`` (Codec.operator, diffusion_operator,
    export_step_gradient): it keeps working, with a DeprecationWarning."""
    import warnings

    from idemrt.models.codec import diffusion_operator

    from tiny_models import tiny_codec

    codec = tiny_codec()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = codec.operator(x, domain="y")
        old_a = diffusion_operator(codec, domain="y")(x * 2 - 1)
    assert any(issubclass(w.category, DeprecationWarning) and "constraint" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.equal(old, codec.operator(x, "y")) and torch.equal(old_a, diffusion_operator(codec, "y")(x * 2 - 1))
    with pytest.raises(ValueError, match="constraint"):
        codec.operator(x, "z")
