#!/usr/bin/env python
"""Train the demo models shipped in ``python/idemrt/demo_models/``: a small MSE codec and a small ADM UNet.

Both are trained from scratch on the colour photographs bundled with scikit-image (no download),
deterministically (fixed seeds, one CPU thread by default), in minutes on a CPU:

* codec: compressai's ``ScaleHyperprior`` (the bmshj2018-hyperprior architecture) with small widths,
  rate-distortion loss ``lambda * 255^2 * MSE + bpp`` on random crops, as compressai's example trainer;
  then ``update(force=True)`` builds the CDF tables from the fp16-rounded weights that are shipped;
* UNet: ``idemrt.models.unet.ADMUNet`` with ``learn_sigma=True`` trained with guided-diffusion's hybrid
  loss (eps-MSE plus the variational bound on the learned-range variance with the mean frozen) on the
  linear 1000-step schedule, random crops with horizontal flips; the EMA of the weights is shipped.

The defaults are the run whose weights are committed (see docs/demo.md for the command, the timings
and the loss curves). ``--device cuda`` and larger ``--unet-stages`` / widths give better models.

    python tools/train_demo.py                      # both models, sequentially
    python tools/train_demo.py --only codec         # one model (two processes can run side by side)
    python tools/train_demo.py --plot-only docs/demo_loss.png
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import idemrt  # noqa: F401
except ImportError:  # a checkout that is not installed: the pure-Python package is enough here
    sys.path.insert(0, str(ROOT / "python"))

from idemrt.diffusion import Schedule  # noqa: E402
from idemrt.models.checkpoint_io import save_state_dict  # noqa: E402
from idemrt.models.unet import ADMUNet, UNetConfig  # noqa: E402

# Colour photographs bundled in scikit-image's wheel (0.26). skimage.data.cat is chelsea again, and the
# stereo pair is two views of one scene, so both views are on the same side of the split.
TRAIN_IMAGES = (
    "astronaut",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
HELD_OUT_IMAGES = ("chelsea", "coffee")

CODEC_NAME = "bmshj2018-hyperprior"
CODEC_FILE = "codec.safetensors"
UNET_FILE = "unet.safetensors"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------------------------------
# Data


def skimage_photo(name: str) -> np.ndarray:
    """An H x W x 3 uint8 photograph from ``skimage.data`` (motorcycle_left/right: the stereo pair)."""
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("tools/train_demo.py needs scikit-image: pip install scikit-image==0.26.0") from None

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


class CropSampler:
    """Random crops (with horizontal flips) from an image pyramid, as float tensors in [0, 1].

    Each image contributes levels at scales 1, 1/2, 1/4, ... (Lanczos) while the shorter side stays
    >= 128, so crops show both fine texture and whole objects. Every (image, level) is equally likely.
    """

    def __init__(self, names, generator: torch.Generator, min_side: int = 128):
        from PIL import Image

        self.levels = []
        for name in names:
            img = Image.fromarray(skimage_photo(name))
            while min(img.size) >= min_side:
                self.levels.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
                img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS)
        self.gen = generator

    def batch(self, n: int, size: int) -> torch.Tensor:
        out = torch.empty(n, 3, size, size)
        pick = torch.randint(len(self.levels), (n,), generator=self.gen)
        for k, j in enumerate(pick.tolist()):
            img = self.levels[j]
            top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=self.gen))
            left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=self.gen))
            crop = img[:, top : top + size, left : left + size]
            out[k] = crop.flip(-1) if bool(torch.rand((), generator=self.gen) < 0.5) else crop
        return out


def write_demo_images(out_dir: Path, size: int = 128) -> None:
    """The held-out photographs as the demo inputs: centre square crop, Lanczos to ``size`` x ``size``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT_IMAGES:
        img = Image.fromarray(skimage_photo(name))
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        img.save(out_dir / f"{name}.png", optimize=True)


# --------------------------------------------------------------------------------------------------
# Logging


class CsvLog:
    def __init__(self, path: Path, columns):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(columns)

    def row(self, *values):
        self.writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])
        self.file.flush()

    def close(self):
        self.file.close()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (short runs need the decay to settle)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fp16_state(module: torch.nn.Module) -> dict:
    """state_dict with floating-point parameters in fp16; buffers (CDF tables, scale table) kept exact."""
    params = {name for name, _ in module.named_parameters()}
    return {
        k: (v.detach().to(torch.float16) if k in params else v.detach()).clone().cpu()
        for k, v in module.state_dict().items()
    }


def round_params_to_fp16(module: torch.nn.Module) -> None:
    """Make the fp32 weights equal to what the fp16 file will hold (CDFs are then built from them)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))


def update_config(out_dir: Path, key: str, value: dict) -> None:
    path = out_dir / CONFIG_FILE
    config = json.loads(path.read_text()) if path.exists() else {}
    config[key] = value
    config["data"] = {"source": "skimage.data (scikit-image 0.26.0)", "train": list(TRAIN_IMAGES),
                      "held_out": list(HELD_OUT_IMAGES)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Codec


def train_codec(args, device: torch.device) -> None:
    from compressai.models import ScaleHyperprior

    torch.manual_seed(args.seed)
    data = CropSampler(TRAIN_IMAGES, torch.Generator().manual_seed(args.seed + 1))
    model = ScaleHyperprior(args.codec_n, args.codec_m).to(device).train()
    main_params = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux_params = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    opt = torch.optim.Adam(main_params, lr=args.codec_lr)
    aux_opt = torch.optim.Adam(aux_params, lr=1e-3)
    log = CsvLog(Path(args.log_dir) / "codec.csv", ["step", "seconds", "loss", "mse", "bpp", "aux"])
    t0 = time.perf_counter()
    for step in range(args.codec_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.codec_steps, args.codec_lr, warmup=50)
        x = data.batch(args.codec_batch, args.codec_crop).to(device)
        out = model(x)
        num_pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = sum(torch.log(lk).sum() for lk in out["likelihoods"].values()) / (-math.log(2) * num_pixels)
        mse = F.mse_loss(out["x_hat"], x)
        loss = args.codec_lmbda * 255**2 * mse + bpp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        opt.step()
        aux = model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        aux.backward()
        aux_opt.step()
        if step % 10 == 0 or step == args.codec_steps - 1:
            log.row(step, time.perf_counter() - t0, loss.item(), mse.item(), bpp.item(), aux.item())
        if step % 100 == 0:
            print(f"codec {step}/{args.codec_steps}: loss {loss.item():.4f} mse {mse.item():.5f} "
                  f"bpp {bpp.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    log.close()
    model = model.cpu().eval()
    round_params_to_fp16(model)
    model.update(force=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(fp16_state(model), out_dir / CODEC_FILE, force=True, metadata={"model": "codec"})
    update_config(out_dir, "codec", {
        "file": CODEC_FILE, "name": CODEC_NAME, "N": args.codec_n, "M": args.codec_m,
        "lambda": args.codec_lmbda, "steps": args.codec_steps, "batch": args.codec_batch,
        "crop": args.codec_crop, "lr": args.codec_lr, "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
    })
    print(f"codec saved to {out_dir / CODEC_FILE} ({time.perf_counter() - t0:.0f} s)", flush=True)


# --------------------------------------------------------------------------------------------------
# UNet: guided-diffusion's hybrid loss (L_simple + L_vlb with the mean frozen), learned-range variance


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data in [-1, 1] under a Gaussian discretised into 2/255 bins (edges open)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class HybridLoss:
    """guided-diffusion ``training_losses`` for eps prediction + learned_range variance, loss_type MSE."""

    def __init__(self, device: torch.device):
        s = Schedule.create(steps=1000)
        self.T = s.num_steps

        def table(a):
            return torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)

        self.sqrt_abar = table(np.sqrt(s.alphas_cumprod))
        self.sqrt_1m_abar = table(np.sqrt(1 - s.alphas_cumprod))
        self.recip = table(s.sqrt_recip_alphas_cumprod)
        self.recipm1 = table(s.sqrt_recipm1_alphas_cumprod)
        self.coef1 = table(s.posterior_mean_coef1)
        self.coef2 = table(s.posterior_mean_coef2)
        self.post_logvar = table(s.posterior_log_variance_clipped)
        self.log_betas = table(np.log(s.betas))

    def __call__(self, model, x0, t, noise):
        def at(table):
            return table[t][:, None, None, None]

        x_t = at(self.sqrt_abar) * x0 + at(self.sqrt_1m_abar) * noise
        eps, v = model(x_t, t).float().chunk(2, dim=1)
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        # Variational bound on the variance only: the mean comes from eps.detach() (the "frozen" output).
        frac = (v + 1) / 2
        model_logvar = frac * at(self.log_betas) + (1 - frac) * at(self.post_logvar)
        x0_pred = at(self.recip) * x_t - at(self.recipm1) * eps.detach()
        model_mean = at(self.coef1) * x0_pred + at(self.coef2) * x_t
        true_mean = at(self.coef1) * x0 + at(self.coef2) * x_t
        kl = normal_kl(true_mean, at(self.post_logvar), model_mean, model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3)) / math.log(2)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean(), mse.mean(), vb.mean()


def parse_stages(spec: str) -> list[tuple[int, int]]:
    """``"32x900,64x100"`` -> [(crop 32, 900 steps), (crop 64, 100 steps)]."""
    try:
        stages = [tuple(int(v) for v in part.split("x")) for part in spec.split(",")]
    except ValueError:
        raise SystemExit(f"--unet-stages must look like '32x900,64x100', got {spec!r}") from None
    if not stages or any(len(s) != 2 or s[0] % 8 or s[1] < 1 for s in stages):
        raise SystemExit(f"--unet-stages: crops must be multiples of 8 and steps >= 1, got {spec!r}")
    return stages


def train_unet(args, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    data = CropSampler(TRAIN_IMAGES, torch.Generator().manual_seed(args.seed + 2))
    noise_gen = torch.Generator().manual_seed(args.seed + 3)
    config = UNetConfig(
        image_size=64, num_channels=args.unet_channels, num_res_blocks=args.unet_res_blocks,
        channel_mult=args.unet_mult, learn_sigma=True, attention_resolutions=args.unet_attention,
        num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True,
    )
    model = ADMUNet(config).to(device).to(memory_format=torch.channels_last).train()
    ema = ADMUNet(config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.unet_lr)
    loss_fn = HybridLoss(device)
    stages = parse_stages(args.unet_stages)
    total = sum(n for _, n in stages)
    log = CsvLog(Path(args.log_dir) / "unet.csv", ["step", "seconds", "crop", "loss", "mse", "vb"])
    t0 = time.perf_counter()
    step = 0
    for crop, n in stages:
        for _ in range(n):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.unet_lr, warmup=100)
            x0 = data.batch(args.unet_batch, crop) * 2 - 1
            t = torch.randint(loss_fn.T, (x0.shape[0],), generator=noise_gen)
            noise = torch.randn(x0.shape, generator=noise_gen)
            x0, t, noise = (v.to(device) for v in (x0, t, noise))
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
            loss, mse, vb = loss_fn(model, x0, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            # EMA with the usual warm-up, so a short run is not dominated by the random init.
            decay = min(args.unet_ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            if step % 10 == 0 or step == total - 1:
                log.row(step, time.perf_counter() - t0, crop, loss.item(), mse.item(), vb.item())
            if step % 100 == 0:
                print(f"unet {step}/{total} (crop {crop}): loss {loss.item():.4f} mse {mse.item():.4f} "
                      f"vb {vb.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            step += 1
    log.close()
    ema = ema.cpu().eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(fp16_state(ema), out_dir / UNET_FILE, force=True, metadata={"model": "unet"})
    cfg = asdict(config)
    cfg["channel_mult"] = ",".join(str(m) for m in config.channel_mults)
    cfg["attention_resolutions"] = ",".join(str(r) for r in config.attention_resolutions)
    update_config(out_dir, "unet", {
        "file": UNET_FILE, "config": cfg, "stages": args.unet_stages, "batch": args.unet_batch,
        "lr": args.unet_lr, "ema": args.unet_ema, "loss": "hybrid (eps MSE + L_vlb, learned_range)",
        "schedule": "linear, 1000 steps", "seed": args.seed,
        "params": sum(p.numel() for p in ema.parameters()),
        "seconds": round(time.perf_counter() - t0, 1), "device": str(device),
    })
    print(f"unet saved to {out_dir / UNET_FILE} ({time.perf_counter() - t0:.0f} s)", flush=True)


# --------------------------------------------------------------------------------------------------


def plot_losses(log_dir: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(name):
        with open(log_dir / name, newline="") as f:
            rows = list(csv.DictReader(f))
        return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}

    def smooth(y, k=10):
        return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y

    codec, unet = read("codec.csv"), read("unet.csv")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(codec["step"][: len(smooth(codec["mse"]))], -10 * np.log10(smooth(codec["mse"])), label="PSNR (dB)")
    ax.set_xlabel("step"), ax.set_title("codec: distortion"), ax.set_ylabel("PSNR of train crops (dB)")
    ax = axes[1]
    ax.plot(codec["step"][: len(smooth(codec["bpp"]))], smooth(codec["bpp"]), color="C1")
    ax.set_xlabel("step"), ax.set_title("codec: rate"), ax.set_ylabel("bpp (likelihoods)")
    ax = axes[2]
    s = unet["step"]
    ax.plot(s[: len(smooth(unet["mse"]))], smooth(unet["mse"]), label="eps MSE")
    ax.plot(s[: len(smooth(unet["vb"]))], smooth(unet["vb"]), label="L_vlb term (bits/dim)")
    for step in s[1:][np.diff(unet["crop"]) != 0]:
        ax.axvline(step, color="gray", ls=":", lw=1)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title("UNet: hybrid loss terms"), ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "python/idemrt/demo_models"))
    p.add_argument("--log-dir", default=str(ROOT / "build/train_demo"))
    p.add_argument("--only", choices=["codec", "unet"], default=None)
    p.add_argument("--plot-only", metavar="PNG", default=None, help="plot the loss CSVs of --log-dir and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible, shared machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--codec-n", type=int, default=64)
    p.add_argument("--codec-m", type=int, default=96)
    p.add_argument("--codec-lmbda", type=float, default=0.0018)
    p.add_argument("--codec-steps", type=int, default=1500)
    p.add_argument("--codec-batch", type=int, default=8)
    p.add_argument("--codec-crop", type=int, default=64)
    p.add_argument("--codec-lr", type=float, default=5e-4)
    p.add_argument("--unet-channels", type=int, default=32)
    p.add_argument("--unet-mult", default="1,2,2,2")
    p.add_argument("--unet-res-blocks", type=int, default=1)
    p.add_argument("--unet-attention", default="16")
    p.add_argument("--unet-stages", default="32x900,64x100", help="crop x steps, in order")
    p.add_argument("--unet-batch", type=int, default=8)
    p.add_argument("--unet-lr", type=float, default=4e-4)
    p.add_argument("--unet-ema", type=float, default=0.995)
    args = p.parse_args(argv)
    if args.plot_only:
        plot_losses(Path(args.log_dir), Path(args.plot_only))
        return
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    write_demo_images(Path(args.out))
    if args.only in (None, "codec"):
        train_codec(args, device)
    if args.only in (None, "unet"):
        train_unet(args, device)


if __name__ == "__main__":
    main()
