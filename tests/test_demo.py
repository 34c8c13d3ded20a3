"""The bundled demo models, ``idemrt demo``, ``idemrt eval`` and the demo trainer's loss terms."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from idemrt import demo, demo_assets, evaluation, images
from idemrt.errors import CheckpointError
from idemrt.fileio import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]


def _train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codec():
    return demo_assets.load_demo_codec()


@pytest.fixture(scope="module")
def unet():
    return demo_assets.load_demo_unet()


# -- the committed weights -----------------------------------------------------------------------


def test_demo_files_are_package_resources_of_bounded_size():
    cfg = demo_assets.demo_config()
    names = [cfg["codec"]["file"], cfg["unet"]["file"], "config.json", *(f"{n}.png" for n in demo_assets.DEMO_IMAGES)]
    sizes = [demo_assets.demo_file(n).stat().st_size if hasattr(demo_assets.demo_file(n), "stat")
             else len(demo_assets.demo_file(n).read_bytes()) for n in names]
    assert all(s > 0 for s in sizes)
    assert sum(sizes) <= 25 * 2**20
    assert sorted(cfg["data"]["held_out"]) == sorted(demo_assets.DEMO_IMAGES)
    assert not set(cfg["data"]["held_out"]) & set(cfg["data"]["train"])


def test_parameters_are_fp16_on_disk(codec, unet):
    cfg = demo_assets.demo_config()
    for module, entry in ((codec.model, cfg["codec"]), (unet, cfg["unet"])):
        # Shipped as safetensors (no pickle), read without idemrt's loader.
        assert entry["file"].endswith(".safetensors")
        state = safetensors.torch.load(demo_assets.demo_file(entry["file"]).read_bytes())
        params = [name for name, _ in module.named_parameters()]
        assert len(params) > 10 and set(params) <= set(state)
        # Buffers (the codec's CDF tables and scale table) are kept exact; every parameter is fp16.
        assert {state[name].dtype for name in params} == {torch.float16}


def test_demo_codec_matches_its_config_and_compresses_at_a_low_rate(codec):
    cfg = demo_assets.demo_config()["codec"]
    assert codec.name == cfg["name"] == "bmshj2018-hyperprior"
    assert (codec.model.N, codec.model.M) == (cfg["N"], cfg["M"])
    x = demo_assets.demo_image("chelsea")
    pipe = evaluation.Pipeline(codec, None, steps=2, sampler="ddpm", guidance="dps", scale=1.0, device="cpu",
                         progress=False)
    data = pipe.encoder.encode(x)
    x_mse = pipe.decoder.decode(data, mode="mse", output="tensor")
    # A trained codec: a low rate and a far better reconstruction than the image's mean colour.
    mean_colour = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    assert 0.02 < 8 * len(data) / x[0, 0].numel() < 1.0
    assert images.mse255(x, x_mse) < 0.6 * images.mse255(x, mean_colour)


def test_demo_unet_matches_its_config_and_predicts_the_noise(unet):
    cfg = demo_assets.demo_config()["unet"]
    assert sum(p.numel() for p in unet.parameters()) == cfg["params"] <= 5_000_000
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    x0 = demo_assets.demo_image("coffee")[:, :, :64, :64] * 2 - 1
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for t in (100, 500):
        x_t = (abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise).float()
        with torch.no_grad():
            eps = unet(x_t, torch.tensor([t]))[:, :3]
        # Predicting zero has error E[noise^2] = 1; a trained denoiser does far better.
        assert float((eps - noise).pow(2).mean()) < 0.5


# -- measurements --------------------------------------------------------------------------------


def test_psnr_and_mse_known_values():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 1 / 255)
    assert images.mse255(a, b) == pytest.approx(1.0)
    assert images.psnr(1.0) == pytest.approx(20 * math.log10(255))
    assert images.psnr(255.0**2) == pytest.approx(0.0)
    assert images.psnr(0.0) == float("inf")


def test_gradient_energy_of_a_ramp():
    # Horizontal ramp of slope s: dx = s everywhere (H*(W-1) values), dy = 0 (W*(H-1) values).
    h, w, s = 5, 7, 0.1
    x = (torch.arange(w, dtype=torch.float64) * s).expand(1, 3, h, w)
    expected = s**2 * h * (w - 1) / (h * (w - 1) + w * (h - 1))
    assert evaluation.gradient_energy(x) == pytest.approx(expected)


def test_as_8bit_is_the_saved_png(tmp_path):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    from idemrt.images import load_image, save_image

    save_image(x, tmp_path / "a.png")
    assert torch.equal(evaluation.as_8bit(x), load_image(tmp_path / "a.png"))


# -- idemrt demo ---------------------------------------------------------------------------------


def test_run_demo_writes_the_panel_and_prints_the_facts(tmp_path, capsys):
    facts = demo.run_demo(tmp_path, seed=0, steps=3, progress=False)
    out = capsys.readouterr().out
    for word in ("bpp", "MSE decode", "perceptual decode", "re-compressing", "time"):
        assert word in out
    png = np.asarray(Image.open(tmp_path / demo.DEMO_PNG).convert("RGB")).astype(np.float64)
    original = np.round(demo_assets.demo_image("chelsea")[0].permute(1, 2, 0).numpy().astype(np.float64) * 255)
    h, w = original.shape[:2]
    assert (h, w) == (demo_assets.DEMO_SIZE, demo_assets.DEMO_SIZE)
    tile = 3 * w + 4  # panels are upscaled 3x (nearest) with 4-pixel gaps, below a 16-pixel label row
    assert png.shape == (3 * h + 16, 4 * tile - 4, 3)
    panels = [png[16::3, k * tile : k * tile + 3 * w : 3] for k in range(4)]
    assert np.array_equal(panels[0], original)
    # The printed PSNRs are those of the images in the panel (independent numpy recomputation).
    for panel, key in ((panels[1], "mse_psnr"), (panels[2], "perceptual_psnr")):
        mse = np.mean((panel - original) ** 2)
        # (the facts are computed from float32 values k/255, hence the 1e-4 dB tolerance)
        assert facts[key] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-4)
    # (the fact compares float decodes, the panels are 8-bit: rounding adds about 0.2 on average)
    assert facts["recompress_mse"] == pytest.approx(np.mean((panels[3] - panels[1]) ** 2), abs=1.0)
    assert 0.02 < facts["bpp"] < 1.0 and facts["steps"] == 3


# -- idemrt eval ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    img = Image.open(demo_assets.demo_file("coffee.png"))
    img.crop((0, 0, 64, 64)).save(d / "a.png")
    img.crop((64, 64, 128, 128)).save(d / "b.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_eval_writes_csv_json_and_plot(tiny_dir, tmp_path, codec, unet, capsys):
    out = tmp_path / "eval"
    result = evaluation.evaluate(tiny_dir, out, codec=codec, unet=unet, steps=2, progress=False)
    assert "FID/KID skipped" in capsys.readouterr().out
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["a.png", "b.png", "mean"]
    for col in ("bpp", "mse_psnr", "perc_psnr", "mse_recompress_mse", "perc_recompress_mse"):
        assert float(rows[2][col]) == pytest.approx((float(rows[0][col]) + float(rows[1][col])) / 2, rel=1e-4)
    def strict(token):
        raise ValueError(f"non-standard JSON number {token}")

    saved = json.loads((out / "metrics.json").read_text(), parse_constant=strict)
    assert {k: float(v) for k, v in saved["mean"].items()} == pytest.approx(result["mean"])
    assert saved["fid"]["skipped"].startswith("FID/KID skipped: no --inception weights")
    assert Image.open(out / "rd.png").format == "PNG"
    # The saved decodes are the measured ones.
    original = np.asarray(Image.open(tiny_dir / "a.png")).astype(np.float64)
    decoded = np.asarray(Image.open(out / "mse" / "a.png")).astype(np.float64)
    assert float(rows[0]["mse_mse"]) == pytest.approx(np.mean((decoded - original) ** 2), rel=1e-5)
    # Outputs are never overwritten silently.
    with pytest.raises(OutputExistsError):
        evaluation.evaluate(tiny_dir, out, codec=codec, unet=unet, steps=2, progress=False)


def test_eval_patch_fid_kid_of_the_saved_decodes(tiny_dir, tmp_path, codec, unet, capsys):
    """With Inception weights, eval reports FID/KID of the decodes as saved (8-bit PNGs) against the
    originals: recomputed here from the files with idemrt.fid's pieces."""
    from tiny_models import random_inception_state

    from idemrt.fid import frechet_distance, kernel_inception_distance, load_inception, statistics

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), weights)
    out = tmp_path / "eval"
    result = evaluation.evaluate(tiny_dir, out, codec=codec, unet=unet, steps=2, progress=False, inception=weights)
    printed = capsys.readouterr().out
    fid = json.loads((out / "metrics.json").read_text())["fid"]
    assert fid == json.loads(json.dumps(result["fid"])) and fid["patches"] == 2 and fid["patch"] == 64
    assert "patch FID mse" in printed and "biased high" in printed
    net = load_inception(weights)

    def features(folder):
        # One contiguous image per Inception call, as evaluate() adds them: another batch size or
        # memory layout may take other conv kernels on another CPU (last-bit feature differences),
        # and with 2 patches in 2048 dimensions FID/KID move by ~1e-6 relative per 1e-7 of
        # feature noise. Same path and same pixels as evaluate(), so rel=1e-6 below holds anywhere.
        files = sorted(folder.glob("*.png"))
        return torch.cat([net(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)[None]
                              .float().contiguous() / 255) for f in files])

    reference = features(tiny_dir)
    for name in ("mse", "perceptual"):
        decoded = features(out / name)
        assert fid[name]["fid"] == pytest.approx(frechet_distance(*statistics(reference), *statistics(decoded)),
                                                 rel=1e-6)
        assert fid[name]["kid"] == pytest.approx(kernel_inception_distance(reference, decoded)[0], rel=1e-6)
        assert fid[name]["fid"] > 0
    with pytest.raises(CheckpointError, match="sha256"):  # a pinned file is checked before any decoding
        evaluation.evaluate(tiny_dir, tmp_path / "eval2", codec=codec, unet=unet, steps=2, progress=False,
                      inception=weights, inception_sha256="0" * 64)


def test_eval_refuses_an_empty_dir(tmp_path):
    from idemrt.errors import ImageError

    with pytest.raises(ImageError, match="no images"):
        evaluation.evaluate(tmp_path, tmp_path / "out", progress=False)


def test_subcommands_parse_and_check_their_arguments(tmp_path):
    p = argparse.ArgumentParser()
    demo.add_subparsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["demo", "--steps", "ddim5", "--out-dir", str(tmp_path)])
    assert (args.func, args.steps, args.sampler) == (demo.cmd_demo, "ddim5", None)  # None: the demo config's
    assert p.parse_args(["demo"]).steps is None and demo_assets.demo_decode_config().steps == demo_assets.DEMO_STEPS
    assert p.parse_args(["demo", "--steps", "100"]).steps == 100  # parsed to an int, as the Decoder takes it
    assert p.parse_args(["demo", "--steps", "ddim50"]).steps == "ddim50"
    from idemrt.cli_options import steps_value

    assert steps_value("100") == 100 and steps_value("ddim5") == "ddim5" and steps_value("10,20") == "10,20"
    args = p.parse_args(["eval", str(tmp_path), "--codec", "mbt2018-mean"])
    with pytest.raises(CheckpointError, match="--codec-checkpoint"):
        args.func(args)


# -- the trainer's hybrid loss (tools/train_demo.py) ---------------------------------------------


def test_discretized_gaussian_likelihood_sums_to_one():
    td = _train_demo()
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.9, math.log(0.3)), (0.999, math.log(0.01))):
        logp = td.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                       torch.full_like(bins, log_scale))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_normal_kl_matches_the_closed_form():
    td = _train_demo()
    m1, v1, m2, v2 = 0.3, 0.5, -0.2, 2.0
    expected = math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    got = td.normal_kl(torch.tensor(m1), torch.tensor(math.log(v1)), torch.tensor(m2), torch.tensor(math.log(v2)))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_hybrid_loss_vanishes_for_the_true_noise_and_posterior_variance():
    td = _train_demo()
    loss_fn = td.HybridLoss(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([1, 10, 500, 999])
    # v = -1 selects the posterior variance; with eps = the true noise, eps-MSE and KL are both 0.
    oracle = lambda x_t, tt: torch.cat([noise, -torch.ones_like(noise)], dim=1)  # noqa: E731
    loss, mse, vb = loss_fn(oracle, x0, t, noise)
    assert float(mse) == pytest.approx(0.0, abs=1e-10)
    assert float(vb) == pytest.approx(0.0, abs=1e-4)
    # A wrong variance (v = +1: beta_t) costs a positive KL.
    wrong = lambda x_t, tt: torch.cat([noise, torch.ones_like(noise)], dim=1)  # noqa: E731
    assert float(loss_fn(wrong, x0, t, noise)[2]) > 1e-3


def test_json_safe_writes_infinite_psnr_as_a_string():
    value = {"a": [float("inf"), 1.5], "b": {"c": float("nan")}}
    assert evaluation.json_safe(value) == {"a": ["inf", 1.5], "b": {"c": "nan"}}


def test_the_service_finds_the_demo_models_without_evaluation_or_plotting_code():
    import subprocess
    import sys

    code = ("import sys; from idemrt.serve.config import ServeConfig; ServeConfig.demo(); "
            "bad = [m for m in ('idemrt.evaluation', 'idemrt.demo', 'idemrt.fid', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
