"""Fast decoding modes against DPS-1000, on the bundled demo models (docs/fast_modes.md).

    OMP_NUM_THREADS=1 python benchmarks/modes.py --json benchmarks/modes.json            # every row
    OMP_NUM_THREADS=1 python benchmarks/modes.py --configs dps1000 --json benchmarks/modes_dps1000.json
    python benchmarks/modes.py --merge benchmarks/modes_dps1000.json benchmarks/modes.json --plot docs/fast_modes.png

Images: the held-out demo photographs (``idemrt/demo_models/{chelsea,coffee}.png``, 128x128), cut
into 64x64 crops on a stride-32 grid (8 per photograph: the 3x3 grid without its centre), 16 in
all; ``--full128`` adds the two 128x128 photographs. Each image is compressed with the demo codec
and decoded by each configuration (seed 0, eager fp32 on the CPU, batch 1).

Per configuration and image (idemrt.demo's definitions; ``benchmarks/psc.py``'s patch SWD):
UNet forwards and backwards (counted by a wrapper module around the UNet, not estimated), wall
seconds of the perceptual decode, re-compression MSE to the MSE decode and the fraction of equal
latent symbols, PSNR to the original, sharpness and patch SWD against the original. With
``--inception FILE`` (pytorch-fid's weights, a local file), also the paper's 64x64-patch FID and
KID (idemrt.fid) of each configuration against the originals; 16 crops of 64x64 give 16-24
patches, too few for FID to mean much, and no Inception weights were on the machine of the
recorded run.

Rows: ``dps1000`` (the paper's DPS, 1000 steps, scale 0.6: the reference), DPS and DSG at 100/50/20
respaced steps, and warm starts (x_t0 from the MSE decode) x {DPS, DSG, pir} at start 0.2/0.4/0.6
with 10/20/50 network evaluations (respacing N = evaluations / start, so that the steps at or below
t0 are the asked number). ``--reference-images k`` runs dps1000 on the first k images only in
this process (a same-run time anchor when the full reference ran in another process).

On a GPU (``--device cuda``): the numerics of the CUDA default (the fast backend: bf16, CUDA
graphs, the Triton kernels) against eager fp32 on the same device, each configuration on both
backends in turn, then their table (``gpu_session.sh lease4``)::

    python benchmarks/modes.py --device cuda --backend eager,fast --full128 \
        --configs dps100 speed-balanced speed-fast --json modes.json
    python benchmarks/modes.py --compare modes.json --json numerics.json
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from idemrt.demo_assets import demo_file, load_demo_codec, load_demo_unet
from idemrt.evaluation import Pipeline, as_8bit, json_safe

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("psc_benchmark", ROOT / "psc.py")
psc_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(psc_benchmark)
patch_swd = psc_benchmark.patch_swd  # the one definition (benchmarks/psc.py)

RESPACED_SCALE = 1.0  # DPS step for respaced runs: the demo's (docs/demo.md sweep at 100 steps)
METRICS = ("psnr", "recompress_mse", "symbols_equal", "sharpness", "patch_swd", "seconds",
           "unet_forwards", "unet_backwards", "distance")


class CountingUNet(nn.Module):
    """The UNet, counting per-sample forwards and backwards (a backward is counted when the
    gradient with respect to the UNet's output is computed, i.e. autograd went through it)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forwards = 0
        self.backwards = 0

    def _count_backward(self, grad):
        self.backwards += grad.shape[0]

    def forward(self, x, t):
        self.forwards += x.shape[0]
        out = self.inner(x, t)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out


def configs() -> list[dict]:
    rows = [dict(name="dps1000", steps=1000, guidance="dps", scale=0.6)]
    rows += [dict(name=f"speed-{speed}", speed=speed) for speed in ("fast", "balanced")]
    rows += [dict(name="warm-pir-s0.4-n20-noexact", steps=50, guidance="pir", start=0.4, exact=False)]
    # The best realism-per-cost point of the grid (warm DSG), with the exact-idempotence refinement.
    rows += [dict(name="warm-dsg-s0.4-n20-exact", steps=50, guidance="dsg", start=0.4, exact=True)]
    for guidance in ("dps", "dsg"):
        for steps in (100, 50, 20):
            rows.append(dict(name=f"{guidance}{steps}", steps=steps, guidance=guidance, scale=RESPACED_SCALE))
    for guidance in ("dps", "dsg", "pir"):
        for start in (0.2, 0.4, 0.6):
            for evals in (10, 20, 50):
                rows.append(dict(name=f"warm-{guidance}-s{start}-n{evals}", steps=round(evals / start),
                                 guidance=guidance, scale=RESPACED_SCALE, start=start))
    return rows


def crops(full128: bool) -> list[tuple[str, torch.Tensor]]:
    from PIL import Image

    from idemrt.images import load_image

    out = []
    for name in ("chelsea", "coffee"):
        with Image.open(io.BytesIO(demo_file(f"{name}.png").read_bytes())) as img:
            x = load_image(img.convert("RGB"))
        for top in (0, 32, 64):
            for left in (0, 32, 64):
                if (top, left) != (32, 32):
                    out.append((f"{name}-{top}-{left}", x[..., top : top + 64, left : left + 64].contiguous()))
        if full128:
            out.append((f"{name}-128", x))
    return out


def int8_unet(unet: nn.Module) -> nn.Module:
    """``unet``'s forward on OpenVINO with 8-bit weights and activations (issue 19's stretch),
    calibrated on noised crops of the two demo photographs — the held-out images themselves: the
    calibration only sets activation ranges, but it has seen them."""
    from idemrt.diffusion import DDPMSampler, Schedule

    spec = importlib.util.spec_from_file_location("openvino_cpu", ROOT / "openvino_cpu.py")
    openvino_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(openvino_cpu)
    photographs = [x for name, x in crops(True) if name.endswith("-128")]
    return openvino_cpu.QuantizedUNet(unet, DDPMSampler(Schedule.create(1000)), photographs)


def decoder_options(cfg: dict) -> dict:
    keys = ("steps", "guidance", "scale", "start", "sampler", "guidance_options", "exact")
    return {k: cfg[k] for k in keys if k in cfg}


def run_config(cfg: dict, images, codec, unet: CountingUNet, scores=None, backend: str = "eager",
               device: str = "cpu") -> tuple[list[dict], dict]:
    """One configuration over the images; ``scores`` (an idemrt.fid.PatchScores) also collects the
    8-bit decodes' patch features under the configuration's name. ``backend="fast"``: the fast
    backend (on this CPU bf16 where it has AVX-512 BF16, channels-last); it needs the bare ADM
    UNet, so its evaluations are not counted (the same as eager's for the same configuration).
    Returns the rows and the backend's facts (its name, and the fast backend's kernels and dtype)."""
    from idemrt.api import Decoder
    from idemrt.speeds import SPEEDS

    # as Decoder(**options) resolved them: the paper preset, the row's options over it
    config = SPEEDS[cfg["speed"]] if "speed" in cfg else SPEEDS["paper"].override(**decoder_options(cfg))
    pipe = Pipeline(codec, unet, config.replace(backend=backend), device=device, progress=False)
    if backend != "eager":  # the fast backend needs the bare ADM UNet
        pipe.decoder = Decoder(codec, unet.inner, config=pipe.decoder.config, device=device)
    rows = []
    for name, x in images:
        unet.forwards = unet.backwards = 0
        res = pipe.run(x, seed=0)
        perc = res["perc"]
        rows.append({"image": name, "size": x.shape[-1], **{k: perc[k] for k in perc},
                     "patch_swd": patch_swd(as_8bit(res["images"]["perceptual"]), x),
                     "mse_recompress_mse": res["mse"]["recompress_mse"],
                     "mse_patch_swd": patch_swd(as_8bit(res["images"]["mse"]), x),
                     **({"unet_forwards": unet.forwards, "unet_backwards": unet.backwards} if backend == "eager" else {})})
        if scores is not None:
            scores.add(cfg["name"], as_8bit(res["images"]["perceptual"]))
        print(json.dumps(json_safe({"config": cfg["name"], **rows[-1]})), file=sys.stderr, flush=True)
    run = pipe.decoder.backend
    facts = {"backend": backend, "kernels": getattr(run, "kernels", None), "graphs": getattr(run, "graphs", None),
             "dtype": str(getattr(run, "dtype", torch.float32))}
    return rows, facts


def summarise(rows: list[dict]) -> dict:
    """Mean of each metric over the rows that have it (NaN where none has)."""
    out = {}
    for k in METRICS:
        values = [r[k] for r in rows if k in r]
        out[k] = sum(values) / len(values) if values else float("nan")
    return out


TABLE = ("config", "images", "unet_forwards", "unet_backwards", "seconds", "time_ratio", "recompress_mse",
         "recompress_ratio", "symbols_equal", "psnr", "sharpness", "patch_swd", "swd_ratio")


def merged_rows(paths) -> dict:
    """config name -> per-image rows, over the given result files (later files add images)."""
    merged: dict = {}
    for path in paths:
        text = Path(path).read_text()
        if path.endswith(".json"):
            rows = [{"config": name, **r} for name, e in json.loads(text)["configs"].items() for r in e["rows"]]
        else:  # a run's log: one JSON line per decoded image (a run cut short keeps its finished images)
            rows = [json.loads(line) for line in text.splitlines() if line.startswith('{"config"')]
        for r in rows:
            merged.setdefault(r["config"], {}).setdefault(r["image"], r)  # the first file given wins
    return merged


def report(paths, plot, out_json=None) -> dict:
    """The table (markdown on stdout) and the Pareto plot of merged results. Each row's ratios are
    against DPS-1000 on the same images."""
    merged = merged_rows(paths)
    ref = merged["dps1000"]
    table = []
    for name, by_image in merged.items():
        names = [n for n in by_image if n in ref]
        mine, base = summarise([by_image[n] for n in names]), summarise([ref[n] for n in names])
        table.append({"config": name, "images": len(names), **mine,
                      "time_ratio": base["seconds"] / mine["seconds"],
                      "recompress_ratio": mine["recompress_mse"] / max(base["recompress_mse"], 1e-12),
                      "swd_ratio": mine["patch_swd"] / base["patch_swd"]})
    print("| " + " | ".join(TABLE) + " |\n|" + "---|" * len(TABLE))
    for row in table:
        cells = [row[k] if isinstance(row[k], str) else f"{row[k]:.4g}" for k in TABLE]
        print("| " + " | ".join(cells) + " |")
    if plot:
        pareto_plot(table, plot)
    if out_json:
        Path(out_json).write_text(json.dumps(json_safe({"table": table}), indent=1))
    return {"table": table}


def pareto_plot(table: list[dict], png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors: dict = {}
    for ax, key, label in ((axes[0], "recompress_mse", "re-compression MSE to the MSE decode (idempotence)"),
                           (axes[1], "patch_swd", "patch SWD to the originals (realism)")):
        for row in table:
            bwd = row["unet_backwards"]
            # A run log from before the backward counter has none: the same-run anchor's count (DPS: one
            # backward per forward, 1000 counted for dps1000 in modes.json) stands in.
            cost = row["unet_forwards"] + (row["unet_forwards"] if bwd != bwd else bwd)
            name = row["config"]
            kind = name.split("-")[1] if name.startswith("warm") else name.rstrip("0123456789")
            ax.scatter(cost, row[key], s=18, label=kind, c=f"C{colors.setdefault(kind, len(colors))}")
            if row["config"] in ("dps1000", "speed-fast", "warm-dsg-s0.4-n20-exact"):
                ax.annotate(row["config"], (cost, row[key]), fontsize=7)
        ax.set_xscale("log")
        if key == "recompress_mse":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
        ax.set_xlabel("UNet evaluations per image (forwards + backwards, counted)")
        ax.set_ylabel(label)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


# The CPU study's fidelity and realism metrics, whose means must stay within COMPARE_TOLERANCE of
# eager fp32's (issue 19 item 3 on the CPU, issue 27 item 6 on the GPU); the others are reported.
COMPARED = ("psnr", "sharpness", "patch_swd")
REPORTED = ("recompress_mse", "symbols_equal", "distance")
COMPARE_TOLERANCE = 0.05


def compare(path, out_json=None, tolerance: float = COMPARE_TOLERANCE) -> dict:
    """Each configuration run on another backend (``NAME@BACKEND``) against the same configuration
    on eager fp32 (``NAME``), over the images both decoded: means, ratios (other / eager) and
    whether every :data:`COMPARED` ratio is within ``tolerance`` of 1. A markdown table on stdout."""
    result = json.loads(Path(path).read_text())
    configs = result["configs"]
    table = []
    for name, other in configs.items():
        if "@" not in name or name.split("@")[0] not in configs:
            continue
        base = configs[name.split("@")[0]]
        ref_rows = {r["image"]: r for r in base["rows"]}
        images = [r["image"] for r in other["rows"] if r["image"] in ref_rows]
        if not images:
            continue
        ref = summarise([ref_rows[n] for n in images])
        got = summarise([r for r in other["rows"] if r["image"] in ref_rows])
        ratio = {k: got[k] / ref[k] if ref[k] else float("nan") for k in COMPARED + REPORTED}
        table.append({"config": name.split("@")[0], "backend": other.get("backend_facts", other.get("backend")),
                      "images": len(images), "eager": {k: ref[k] for k in COMPARED + REPORTED},
                      "other": {k: got[k] for k in COMPARED + REPORTED}, "ratio": ratio,
                      "within": all(abs(ratio[k] - 1) <= tolerance for k in COMPARED)})
    print(f"| configuration | images | {' | '.join(COMPARED + REPORTED)} | within {tolerance:.0%} |")
    print("|---" * (len(COMPARED + REPORTED) + 3) + "|")
    for row in table:
        cells = [f"{row['eager'][k]:.4g} → {row['other'][k]:.4g} ({row['ratio'][k]:.3f})" for k in COMPARED + REPORTED]
        print(f"| {row['config']} | {row['images']} | {' | '.join(cells)} | {'yes' if row['within'] else 'NO'} |")
    out = {"source": str(path), "environment": result.get("environment"), "tolerance": tolerance,
           "compared": COMPARED, "table": table}
    if out_json:
        Path(out_json).write_text(json.dumps(json_safe(out), indent=1))
    return out


def environment(device: str = "cpu") -> dict:
    from idemrt.defaults import default_fast_dtype

    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "device": device, "gpu": gpu,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "fast_dtype": str(default_fast_dtype(torch.device(device))), "command": " ".join(sys.argv)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=None, help="names (default: all)")
    p.add_argument("--skip", nargs="*", default=(), help="names to leave out")
    p.add_argument("--images", type=int, default=None, help="first k images only")
    p.add_argument("--every", type=int, default=1, help="every k-th image only (alternates the photographs)")
    p.add_argument("--grid-every", type=int, default=None,
                   help="grid rows (not dps1000 or speed-*) on every k-th image only")
    p.add_argument("--reference-images", type=int, default=None, help="dps1000 on the first k images only")
    p.add_argument("--full128", action="store_true", help="add the two 128x128 photographs")
    p.add_argument("--names", nargs="*", default=None, help="these images only (e.g. coffee-128)")
    p.add_argument("--json", default=None, help="write results here (rewritten after each config)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="eager",
                   help="eager, fast or openvino-int8, or a comma-separated list (each configuration on each "
                        "backend in turn, e.g. eager,fast). fast: the fast backend (bf16 on a CPU with AVX-512 BF16; "
                        "on CUDA with graphs and the Triton kernels); openvino-int8: eager with the "
                        "UNet forward on OpenVINO in 8 bits (benchmarks/openvino_cpu.py; forward-only, codec-gradient "
                        "configurations only; needs openvino and nncf; alone); rows are named NAME@BACKEND")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compare", default=None,
                   help="a result JSON with NAME and NAME@BACKEND rows: their table against eager (no decoding)")
    p.add_argument("--inception", default=None,
                   help="pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth): adds the "
                        "paper's 64x64-patch FID and KID of each configuration against the originals")
    p.add_argument("--merge", nargs="*", default=None,
                   help="result JSON files or run logs to merge into a table (no decoding)")
    p.add_argument("--plot", default=None, help="Pareto plot PNG of the merged results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge is not None:
        return report(args.merge, args.plot, args.json)
    if args.compare is not None:
        return compare(args.compare, args.json)
    backends = [b for b in args.backend.split(",") if b]
    if set(backends) - {"eager", "fast", "openvino-int8"} or ("openvino-int8" in backends and len(backends) > 1):
        raise SystemExit(f"--backend: eager, fast or openvino-int8 (that one alone), got {args.backend!r}")
    torch.set_num_threads(args.threads)
    codec, unet = load_demo_codec(args.device), load_demo_unet(args.device)
    images = [(n, x) for n, x in crops(args.full128)[: args.images : args.every]
              if args.names is None or n in args.names]
    if backends == ["openvino-int8"]:
        unet = int8_unet(unet)
    unet = CountingUNet(unet)
    chosen = [c for c in configs() if (args.configs is None or c["name"] in args.configs)
              and c["name"] not in args.skip]
    result = {"environment": environment(args.device), "configs": {}}
    scores = None
    if args.inception:
        from idemrt.fid import PatchScores, load_inception

        scores = PatchScores(load_inception(args.inception))
        for _, x in images:
            scores.add("original", x)
    for cfg in chosen:
        imgs = images[: args.reference_images] if cfg["name"] == "dps1000" and args.reference_images else images
        if args.grid_every and cfg["name"] != "dps1000" and not cfg["name"].startswith("speed-"):
            imgs = images[:: args.grid_every]
        for backend in backends:
            name = cfg["name"] if backend == "eager" else f"{cfg['name']}@{backend}"
            rows, facts = run_config(dict(cfg, name=name), imgs, codec, unet, scores,
                                     "eager" if backend == "openvino-int8" else backend, args.device)
            result["configs"][name] = {"config": cfg, "backend": backend, "backend_facts": facts,
                                       "mean": summarise(rows), "rows": rows}
            if scores is not None:  # patches of every image the configuration decoded, against all originals
                kid, kid_std = scores.kid("original", name, subsets=10, subset_size=min(100, scores.count(name)))
                result["configs"][name].update(fid=scores.fid("original", name), kid=kid, kid_std=kid_std)
            if args.json:
                Path(args.json).write_text(json.dumps(json_safe(result), indent=1))
    return result


if __name__ == "__main__":
    main()
