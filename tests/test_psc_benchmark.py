"""Smoke tests of benchmarks/psc.py on the CPU. Speed mode: it runs on both compute paths, writes its
JSON, and the rates it reports are the hand formula; its times mean nothing here and are only checked
to be positive. RD mode (--rd, tiny settings): every row's rate and quality figures are recomputed
here, independently of the script, from the decodes it returns and from a fresh demo-codec encode."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("psc_benchmark", ROOT / "benchmarks" / "psc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options, compute", [([], "eager-fp32-cpu"), (["--backend", "fast"], "fast-bf16-cpu")])
def test_smoke_run_writes_consistent_json(bench, tmp_path, options, compute):
    out = tmp_path / "psc.json"
    bench.main(["--smoke", "--json", str(out), *options])
    result = json.loads(out.read_text())
    assert (result["size"], result["s"], result["r"], result["compute"]) == (16, 4, 2, compute)
    assert result["unet_evals_per_s"] > 0
    # --bpp 0.125 0.25 at 16x16, r = 2 with a 2-byte hash per round: 1 and 2 rounds of 4 bytes each.
    assert [(rate["rounds"], rate["bpp"], rate["extrapolated"]) for rate in result["rates"]] == \
        [(1, 8 * 4 / 16**2, False), (2, 8 * 8 / 16**2, False)]
    for rate in result["rates"]:
        for key in ("encode_s_per_image", "decode_s_per_image", "guided_restoration_s"):
            assert rate[key] > 0


def _levels(decoded: torch.Tensor) -> np.ndarray:
    """The decode as an 8-bit PNG stores it, as integer levels 0..255. The quantization is
    idemrt.demo.as_8bit itself (pinned to PIL's PNG rounding by test_demo), in the float32 the
    benchmark runs it in: a float64 re-definition disagrees with it by one level for pixels within
    about 1e-5 of a half-level, and which pixels fall there depends on the decode, which depends on
    the CPU's convolution kernels (one flipped level moved a PSNR by 6e-5 dB on another CPU)."""
    from idemrt.evaluation import as_8bit

    assert decoded.dtype == torch.float32  # the dtype the benchmark quantizes in
    levels = np.round(as_8bit(decoded).double().numpy() * 255)
    # Independent check of that definition: round-half-up of the float64 value, except within a
    # half-level rounding window, where float32 and float64 may round differently.
    exact = np.clip(decoded.double().numpy(), 0, 1) * 255
    near_half = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
    assert np.array_equal(levels[~near_half], np.floor(exact + 0.5)[~near_half])
    assert np.abs(levels - np.floor(exact + 0.5)).max() <= 1
    return levels


def _psnr_8bit(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """PSNR (peak 255) of the decode as an 8-bit PNG would store it, against the 8-bit original."""
    a = _levels(decoded)
    b = np.round(original.double().numpy() * 255)
    return 10 * np.log10(255**2 / np.mean((a - b) ** 2))


def _gradient_energy(x: torch.Tensor) -> float:
    a = x.double().numpy()
    dx, dy = np.diff(a, axis=-1), np.diff(a, axis=-2)
    return ((dx**2).sum() + (dy**2).sum()) / (dx.size + dy.size)


def test_rd_rows_match_an_independent_recomputation(bench, tmp_path):
    from PIL import Image

    import idemrt
    from idemrt import bitstream
    from idemrt.demo_assets import demo_file, load_demo_codec
    from idemrt.images import load_image

    size, r = 32, 2
    out, images = tmp_path / "rd.json", {}
    bench.main(["--rd", "--device", "cpu", "--image", "coffee", "--size", str(size), "--s", "3", "--r", str(r),
                "--steps", "2", "--rounds", "2", "--idem-steps", "2", "--json", str(out)], images)
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    # Default prefixes 1/8, 1/4, 1/2, 1 of 2 rounds: 1 and 2 rounds, each linear, projected, guided.
    assert list(rows) == ["mse", "idempotence"] + [f"psc-{m}-{k}" for k in (1, 2)
                                                   for m in ("linear", "projected", "guided")]

    # Every row is measured on the same image: the test's own bicubic resize of the held-out PNG.
    with demo_file("coffee.png").open("rb") as f:
        x = load_image(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC))
    assert torch.equal(images["original"], x)
    for name, row in rows.items():
        # Same 8-bit levels on both sides (_levels), so what is left is float32 vs float64 error of
        # the level values (~1e-7 relative): rel 1e-6. A different definition (e.g. PSNR before the
        # 8-bit cast) is off by 1e-3 or more, a wrong image by far more.
        assert row["psnr"] == pytest.approx(_psnr_8bit(images[name], x), rel=1e-6), name
        decoded = torch.from_numpy(_levels(images[name]) / 255)
        assert row["sharpness"] == pytest.approx(_gradient_energy(decoded) / _gradient_energy(x), rel=1e-6), name
        assert row["patch_swd"] >= 0 and row["file_bpp"] > row["bpp"] > 0, name

    # The MSE row is the demo codec's own encode and MSE decode of that image.
    codec = load_demo_codec("cpu")
    data = idemrt.Encoder(codec).encode(x)
    payload = sum(len(s) for s in bitstream.decode(data).streams)
    assert rows["mse"]["bpp"] == rows["idempotence"]["bpp"] == 8 * payload / size**2
    assert rows["mse"]["file_bpp"] == 8 * len(data) / size**2
    assert torch.equal(images["mse"], idemrt.Decoder(codec, device="cpu").decode(data, mode="mse", output="tensor"))
    assert rows["mse"]["sharpness"] < 1  # the MSE decode is blurred
    # PSC: r one-byte measurements and a 2-byte hash per round.
    for k in (1, 2):
        for m in ("linear", "projected", "guided"):
            assert rows[f"psc-{m}-{k}"]["bpp"] == 8 * k * (r + 2) / size**2


def test_patch_swd_is_a_distance_between_patch_statistics(bench):
    a, b = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in (1, 2))
    assert bench.patch_swd(a, a) == 0
    assert bench.patch_swd(a, b) == pytest.approx(bench.patch_swd(b, a), rel=1e-12) and bench.patch_swd(a, b) > 0
    # A brightness offset translates every projected patch set: W1 grows linearly with the offset.
    assert bench.patch_swd(a, a + 0.2) == pytest.approx(2 * bench.patch_swd(a, a + 0.1), rel=1e-9)
