"""Tiled model function (idemrt.diffusion.tiling) against independent references: the blend weights in
closed form, the windows run one by one, and autograd through a naive float64 per-window loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from idemrt.speeds import SPEEDS
from idemrt.diffusion.tiling import BLEND_WEIGHTS, TiledModel, Tiling, tile_layout
from idemrt.models.prior import prior_traits
from tiny_models import tiny_unet

WINDOW = 32  # the tiny UNet's native size


@pytest.fixture(scope="module")
def unet():
    return tiny_unet().eval()


def _x_t(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=g), torch.tensor([700, 300][:n])


def test_ramp_weights_are_the_linear_cross_fade_in_closed_form():
    # Two windows of 8 at offsets 0 and 6 (stride 6, overlap 2): in the overlap the second window's
    # weight rises (d + 1/2)/2 = 1/4, 3/4 and the first's falls 3/4, 1/4; alone, a window weighs 1.
    lay = tile_layout(8, 14, window=8, stride=6, weights="ramp")
    assert lay.offsets == ((0, 0), (0, 6)) and lay.size == (8, 8)
    row0, row1 = lay.weights[0, 0, 3], lay.weights[1, 0, 3]
    torch.testing.assert_close(row0, torch.tensor([1, 1, 1, 1, 1, 1, 0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(row1, torch.tensor([0.25, 0.75, 1, 1, 1, 1, 1, 1], dtype=torch.float64))


@pytest.mark.parametrize("weights", BLEND_WEIGHTS)
@pytest.mark.parametrize("size,stride", [((100, 77), 24), ((64, 200), 32), ((33, 65), 5)])
def test_blend_weights_sum_to_one_at_every_pixel(weights, size, stride):
    lay = tile_layout(*size, window=32, stride=stride, weights=weights)
    total = torch.zeros(size, dtype=torch.float64)
    for (y, x), w in zip(lay.offsets, lay.weights):
        total[y:y + lay.size[0], x:x + lay.size[1]] += w[0]
    assert (lay.weights > 0).all()
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-12)
    # the windows reach both edges of each axis
    assert max(y for y, _ in lay.offsets) + lay.size[0] == size[0]
    assert max(x for _, x in lay.offsets) + lay.size[1] == size[1]


def test_native_size_image_calls_the_model_itself(unet):
    calls = []
    tiled = TiledModel(lambda x, t: calls.append(x.shape) or unet(x, t), WINDOW, 24)
    x, t = _x_t(2, WINDOW, WINDOW)
    assert torch.equal(tiled(x, t), unet(x, t)) and calls == [x.shape]


def test_non_overlapping_windows_equal_the_windows_run_one_by_one(unet):
    x, t = _x_t(2, 2 * WINDOW, 3 * WINDOW)
    with torch.no_grad():
        got = TiledModel(unet, WINDOW, WINDOW, "ramp", chunk=1)(x, t)
        want = torch.zeros(2, 6, 2 * WINDOW, 3 * WINDOW)
        for b in range(2):
            for y in range(0, 2 * WINDOW, WINDOW):
                for xx in range(0, 3 * WINDOW, WINDOW):
                    want[b:b + 1, :, y:y + WINDOW, xx:xx + WINDOW] = unet(
                        x[b:b + 1, :, y:y + WINDOW, xx:xx + WINDOW], t[b:b + 1])
    assert torch.equal(got, want)


def _naive_blend(model, x, t, lay):
    """The blend written as the definition: Σ_k pad(W_k · model(window_k)), autograd all the way."""
    (h, w), H, W = lay.size, x.shape[-2], x.shape[-1]
    out = 0
    for (y, xx), wk in zip(lay.offsets, lay.weights.to(x.dtype)):
        o = model(x[:, :, y:y + h, xx:xx + w], t) * wk
        out = out + F.pad(o, (xx, W - xx - w, y, H - y - h))
    return out


class _ConvNet(torch.nn.Module):
    """A small nonlinear, time-dependent model that also runs in float64 (the ADM UNet's time
    embedding is float32 by construction): the tiling treats the model as a black box."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.tanh(self.a(x) * (1 + t[:, None, None, None].to(x.dtype) / 1000)))


@pytest.mark.parametrize("weights", ["ramp", "gaussian"])
def test_output_and_gradient_equal_autograd_through_a_float64_reference(weights):
    x, t = _x_t(2, 48, 72, seed=1)
    lay = tile_layout(48, 72, WINDOW, 20, weights)
    unet = _ConvNet()
    unet64 = _ConvNet().double()
    g = torch.randn(2, 6, 48, 72, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    x64 = x.double().requires_grad_(True)
    ref = _naive_blend(unet64, x64, t, lay)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), x64)

    for model, xin, tol in ((unet64, x.double(), 1e-10), (unet, x, 1e-5)):
        xin = xin.clone().requires_grad_(True)
        out = TiledModel(model, WINDOW, 20, weights, chunk=4)(xin, t)
        (grad,) = torch.autograd.grad((out * g.to(out.dtype)).sum(), xin)
        scale = ref.abs().max().item(), ref_grad.abs().max().item()
        assert (out.double() - ref).abs().max().item() <= tol * scale[0]
        assert (grad.double() - ref_grad).abs().max().item() <= tol * scale[1]


def test_chunked_equals_unchunked(unet):
    x, t = _x_t(2, 40, 56, seed=3)
    results = []
    for chunk in (1, 3, 100):
        xin = x.clone().requires_grad_(True)
        out = TiledModel(unet, WINDOW, 16, "ramp", chunk=chunk)(xin, t)
        (grad,) = torch.autograd.grad(out.square().sum(), xin)
        results.append((out.detach(), grad))
    for out, grad in results[1:]:
        # batch composition changes the CPU kernels' summation order only
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-5)


def test_backward_holds_one_chunk_of_windows_at_a_time():
    seen = []

    def model(x, t):
        seen.append((x.shape[0], torch.is_grad_enabled()))
        return x * 2

    x = torch.randn(1, 3, 40, 40, requires_grad=True)
    out = TiledModel(model, 16, 12, chunk=2)(x, torch.tensor([5]))
    (grad,) = torch.autograd.grad(out.sum(), x)
    # 3x3 windows: forwards without autograd, then recomputed in chunks of at most 2 with autograd
    assert seen == [(2, False)] * 4 + [(1, False)] + [(2, True)] * 4 + [(1, True)]
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))


def test_tiling_config_checks_and_round_trip(unet):
    assert Tiling.from_value(True) == Tiling() and Tiling.from_value(None) is None and Tiling.from_value(False) is None
    tiling = Tiling(window=32, stride=16, weights="gaussian", chunk=2)
    assert Tiling.from_value(tiling.to_dict()) == tiling
    for bad in (dict(window=0), dict(stride=-1), dict(chunk=True), dict(weights="box"), dict(window=16, stride=17)):
        with pytest.raises(ValueError):
            Tiling(**bad)
    with pytest.raises(ValueError, match="unknown tile options"):
        Tiling.from_value({"size": 3})
    with pytest.raises(TypeError):
        Tiling.from_value("on")
    assert prior_traits(unet).image_size == WINDOW  # the window's default: the prior's declared native size
    assert Tiling().resolve(prior_traits(unet).image_size) == (32, 24)
    tiled = TiledModel.for_prior(unet, Tiling(), unet)
    assert (tiled.window, tiled.stride) == (32, 24)
    assert "6 windows" in tiled.describe(40, 72) and "tiling off" in tiled.describe(32, 32)


# --- through the Decoder and the backends ----------------------------------------------------------

def _encoded(codec, h, w, seed=3):
    import idemrt

    torch.manual_seed(seed)
    image = F.interpolate(torch.rand(1, 3, 8, 8), size=(h, w), mode="bilinear", align_corners=False)
    return idemrt.Encoder(codec).encode(image)


@pytest.fixture(scope="module")
def codec():
    from tiny_models import tiny_codec

    return tiny_codec()


def test_decode_config_tile_round_trips_and_is_checked():
    from idemrt import DecodeConfig

    cfg = DecodeConfig(steps=4, tile={"window": 32, "weights": "gaussian"})
    assert cfg.tile == Tiling(window=32, weights="gaussian")
    assert DecodeConfig.from_json(cfg.to_json()) == cfg and DecodeConfig.from_yaml(cfg.to_yaml()) == cfg
    assert DecodeConfig(tile=True).tile == Tiling() and DecodeConfig(tile=False).tile is None
    assert DecodeConfig().tile is None  # the default: the whole image, as before tiling existed
    assert cfg.override(tile=False).tile is None
    with pytest.raises(ValueError, match="tile stride"):
        DecodeConfig(tile={"window": 32, "stride": 40})


def test_image_within_the_window_decodes_bit_for_bit_as_without_tiling(unet, codec):
    import idemrt

    data = _encoded(codec, 40, 48)  # padded to 64x64: within a 64 window
    base = SPEEDS["balanced"].replace(steps=10, backend="eager")
    images = [idemrt.Decoder(codec, unet, config=base.replace(tile=tile)).decode(data, seed=5, output="tensor")
              for tile in (None, Tiling(window=64, stride=32, chunk=1))]
    assert torch.equal(images[0], images[1])


@pytest.mark.parametrize("speed,options", [("paper", dict(steps=6)), ("balanced", dict(steps=10)),
                                           ("fast", dict(steps=10)), ("paper", dict(steps="ddim6", sampler="ddim",
                                                                                     guidance="dsg"))])
def test_tiled_decoder_step_is_the_step_with_the_tiled_model(unet, codec, speed, options):
    """Every guidance (DPS, DSG, PIR) with warm start and exact refinement decodes a 64x96 image in
    32-pixel windows, and the Decoder's step equals the step math given the tiled model by hand."""
    import idemrt
    from idemrt.diffusion.step import guided_step

    cfg = SPEEDS[speed].replace(backend="eager", tile=Tiling(window=WINDOW, stride=24, chunk=4), **options)
    dec = idemrt.Decoder(codec, unet, config=cfg)
    img = dec.decode(_encoded(codec, 64, 96), seed=1, output="tensor")
    assert img.shape == (1, 3, 64, 96) and torch.isfinite(img).all()
    assert all(torch.isfinite(torch.tensor(dec.last.distance)))

    g = torch.Generator().manual_seed(4)
    x, noise = torch.randn(2, 3, 64, 96, generator=g), torch.randn(2, 3, 64, 96, generator=g)
    target = dec.target_from_latent(torch.round(codec.model.g_a(torch.rand(2, 3, 64, 96, generator=g))))
    i = dec.schedule.num_steps - 2
    got = dec.step(x, i, target, noise)
    tiled = TiledModel(unet, WINDOW, 24, chunk=4)
    want = guided_step(tiled, dec.operator, dec.sampler, dec.guidance, x, i, target, noise)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    whole = guided_step(unet, dec.operator, dec.sampler, dec.guidance, x, i, target, noise)
    assert not torch.allclose(got[0], whole[0], atol=1e-3)  # the tiling did change the model output


def test_fast_backend_tiles_like_eager_and_exporting_backends_refuse(unet, codec):
    from idemrt.backends.base import StepSpec, create_backend
    from idemrt.backends.graph import GraphStepBackend
    from idemrt.diffusion import DDPMSampler, DPS, Schedule
    from idemrt.errors import BackendError
    from idemrt.models.codec import diffusion_operator

    sampler = DDPMSampler(Schedule.create(1000, 10))
    spec = StepSpec(unet=unet, operator=diffusion_operator(codec, "x"), codec=codec, constraint="x",
                    sampler=sampler, guidance=DPS(0.6), tile=Tiling(window=WINDOW, stride=16, chunk=3))
    g = torch.Generator().manual_seed(6)
    x, noise = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    target = 2 * codec.synthesis(torch.round(codec.model.g_a(torch.rand(2, 3, 64, 64, generator=g)))) - 1
    eager = create_backend("eager", spec, device=torch.device("cpu")).step(x, 7, target.detach(), noise)
    fast = create_backend("fast", spec, device=torch.device("cpu"), dtype=torch.float32).step(x, 7, target.detach(), noise)
    torch.testing.assert_close(fast[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1], eager[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(BackendError, match="tiled decoding"):
        GraphStepBackend(spec, device="cpu")


def test_decompress_prints_the_tiling_choice_and_no_tile_turns_it_off(tmp_path, capsys, monkeypatch, codec):
    from idemrt import cli
    from idemrt.models import unet_loading
    from tiny_models import TINY_UNET, tiny_codec_state, tiny_unet_state

    torch.save(tiny_codec_state(), tmp_path / "codec.pth")
    torch.save(tiny_unet_state(), tmp_path / "unet.pt")
    real = unet_loading.load_unet
    monkeypatch.setattr(unet_loading, "load_unet", lambda src, preset=None: real(src, **TINY_UNET))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the command line would take every core of a shared machine
    (tmp_path / "a.idm").write_bytes(_encoded(codec, 64, 96))
    common = ["--unet", str(tmp_path / "unet.pt"), "--codec-checkpoint", str(tmp_path / "codec.pth"), "--quiet",
              "--steps", "3", "--backend", "eager"]
    outs = {}
    for name, extra in (("tiled", ["--tile-chunk", "3"]), ("whole", ["--no-tile"])):
        assert cli.main(["decompress", str(tmp_path / "a.idm"), str(tmp_path / f"{name}.png"), *common, *extra]) == 0
        outs[name] = capsys.readouterr().out
    assert "tiling 128x64: 15 windows of 32x32, stride 24, ramp weights, 3 windows a UNet call" in outs["tiled"]
    assert "tiling off: the prior runs on the whole 128x64 image" in outs["whole"]
    from PIL import Image

    tiled, whole = (torch.tensor(list(Image.open(tmp_path / f"{n}.png").getdata())) for n in ("tiled", "whole"))
    assert not torch.equal(tiled, whole)


def test_eval_on_a_folder_of_photographs_larger_than_the_demo_prior(tmp_path, capsys, monkeypatch):
    """`idemrt eval` tiles by default: 96x160 photographs through the 64x64 demo prior."""
    import json

    from idemrt import cli
    from idemrt.demo_assets import demo_image
    from idemrt.images import save_image

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "photos").mkdir()
    for name in ("chelsea", "coffee"):
        save_image(demo_image(name, 160)[..., 32:128, :], tmp_path / "photos" / f"{name}.png")
    assert cli.main(["eval", str(tmp_path / "photos"), "--out", str(tmp_path / "eval"), "--steps", "4",
                     "--quiet"]) == 0
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"]
    assert [(r["width"], r["height"]) for r in rows] == [(160, 96), (160, 96)]
    # 4 steps make no good perceptual decode: this checks the path, the quality is benchmarks/tiled_seams.py's
    assert all(r["mse_psnr"] > 20 and math.isfinite(r["perc_psnr"]) for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "eval" / "perceptual" / "chelsea.png").size == (160, 96)


def _seams_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tiled_seams.py"
    spec = importlib.util.spec_from_file_location("tiled_seams", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seam_statistic_finds_a_seam_and_only_a_seam():
    bench = _seams_benchmark()
    assert bench.seam_lines([0, 48, 96], 64, 160) == [48, 64, 96, 112]
    # a stationary smooth texture: Gaussian-filtered white noise (sigma 2 px)
    g = torch.Generator().manual_seed(0)
    k = torch.exp(-torch.arange(-6, 7.0) ** 2 / 8)
    k = k / k.sum()
    noise = torch.rand(3, 1, 204, 204, generator=g)
    smooth = F.conv2d(F.conv2d(noise, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1)).view(1, 3, 192, 192)
    lines = [48, 64, 96, 112, 144]
    assert abs(bench.seam_ratio(smooth, lines, lines)["ratio"] - 1) < 0.05
    seamed = smooth.clone()
    seamed[..., :, 96:] += 0.02  # a step of 5 grey levels at column 96
    assert bench.seam_ratio(seamed, lines, lines)["ratio"] > 1.10
    assert bench.seam_ratio(seamed, [], [96])["ratio"] > 1.5
    assert abs(bench.seam_ratio(seamed, [40, 130], [40, 130])["ratio"] - 1) < 0.05  # off the step: no seam
