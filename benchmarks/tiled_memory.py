"""Peak memory of a guided decode, tiled against whole-image, at 256² to 2048² (issue 28, item 2).

    python benchmarks/tiled_memory.py --json benchmarks/tiled_memory.json

Each (size, path) runs in a fresh subprocess (``--one SIZE PATH``), so its peak resident set
(``VmHWM`` of /proc/self/status, the same as ``ru_maxrss``) is its own: load an FFHQ-256-sized ADM
UNet (``models.unet_config.PRESETS["ffhq256"]``, random weights) and a bmshj2018-hyperprior codec
of quality-1 size (N=128, M=192, random weights), compress a smooth random image of the size, and
decode it with DDPM + DPS respaced to ``--steps`` steps (DPS: every step a UNet forward and
backward; ``--start 0.4`` with ``--steps 2`` runs only the second, one guided step), eager fp32. ``tiled``: ``DecodeConfig(tile=Tiling())`` (the prior's native 256
windows, stride 192, ramp weights, ``--chunk`` windows a UNet call); ``whole``: the UNet on the whole image.

``operator``: the codec operator's forward and the distance's gradient through it alone, on the
whole image (what a tiled step did at full resolution before the operator was tiled): its peak above
the process's before. ``operator-tiled``: the same through the tiled operator of a tiled decode
(:mod:`idemrt.diffusion.tiled_operator`, ``--operator-tile`` pixels a tile, default the Tiling's).

The parent watches each child's resident set and stops a child above ``--cap-gb`` (the machine's
memory is shared): such a row says "stopped above the cap" with the time it took to reach it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

SIZES = (256, 512, 1024, 2048)
PATHS = ("tiled", "whole", "operator", "operator-tiled")


def _status_kb(pid, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_one(size: int, path: str, steps: int, chunk: int, stride=None, start: float = 1.0) -> dict:
    """The child: one decode, its peak RSS."""
    import torch
    import torch.nn.functional as F
    from compressai.models import ScaleHyperprior

    import idemrt
    from idemrt import DecodeConfig
    from idemrt.diffusion.tiling import Tiling
    from idemrt.models.unet import ADMUNet
    from idemrt.models.unet_config import PRESETS

    torch.manual_seed(0)
    unet = ADMUNet(PRESETS["ffhq256"]).eval()
    model = ScaleHyperprior(N=128, M=192)
    model.update(force=True)
    codec = idemrt.load_codec("bmshj2018-hyperprior", quality=1, checkpoint=model.state_dict())
    image = F.interpolate(torch.rand(1, 3, size // 32, size // 32), size=(size, size), mode="bilinear",
                          align_corners=False)
    data = idemrt.Encoder(codec).encode(image)
    del image, model
    loaded_kb = _status_kb("self", "VmRSS")
    tile = Tiling(chunk=chunk, stride=stride) if path == "tiled" else None
    cfg = DecodeConfig(steps=steps, sampler="ddpm", guidance="dps", scale=0.6, backend="eager", tile=tile,
                       start=start)
    decoder = idemrt.Decoder(codec, unet, config=cfg, device="cpu")
    t0 = time.perf_counter()
    out = decoder.decode(data, seed=0, output="tensor")
    seconds = time.perf_counter() - t0
    windows = None
    if tile is not None:
        from idemrt.diffusion.tiling import TiledModel

        windows = TiledModel.for_prior(unet, tile, unet).layout(size, size).count if size > 256 else 1
    return {"size": size, "path": path, "steps": steps, "steps_run": decoder.steps_run, "start": start,
            "chunk": chunk if tile else None, "windows": windows,
            "stride": TiledModel.for_prior(unet, tile, unet).stride if tile else None,
            "peak_rss_gb": _status_kb("self", "VmHWM") / 2**20,
            "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "models_loaded_rss_gb": loaded_kb / 2**20, "decode_s": seconds,
            "finite": bool(torch.isfinite(out).all()), "threads": torch.get_num_threads()}


def run_operator(size: int, tile=None) -> dict:
    """The codec operator alone: A(x0) = 2·g_s(round(g_a((x0+1)/2))) - 1 and the gradient of the
    distance through it on a ``size``² image, what a guided step does on the whole image whether or
    not the UNet is tiled (``tile``: None; else the tiled operator in ``tile``-pixel tiles). Its peak
    above the RSS before the call."""
    import torch
    from compressai.models import ScaleHyperprior

    import idemrt
    from idemrt.diffusion.guidance import distance
    from idemrt.models.codec import diffusion_operator

    torch.manual_seed(0)
    model = ScaleHyperprior(N=128, M=192)
    model.update(force=True)
    codec = idemrt.load_codec("bmshj2018-hyperprior", quality=1, checkpoint=model.state_dict())
    operator = diffusion_operator(codec, "x")
    if tile is not None:
        from idemrt.diffusion.tiled_operator import tiled_operator

        operator = tiled_operator(operator, codec, tile)
    x0 = (torch.rand(1, 3, size, size) * 2 - 1).requires_grad_(True)
    target = torch.zeros(1, 3, size, size)
    before = _status_kb("self", "VmHWM")
    (grad,) = torch.autograd.grad(distance(target, operator(x0)).sum(), x0)
    return {"size": size, "path": "operator" if tile is None else "operator-tiled", "operator_tile": tile,
            "operator_peak_above_gb": (_status_kb("self", "VmHWM") - before) / 2**20,
            "peak_rss_gb": _status_kb("self", "VmHWM") / 2**20, "finite": bool(torch.isfinite(grad).all()),
            "threads": torch.get_num_threads()}


def run_child(size: int, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", str(size), path, "--steps", str(args.steps), "--chunk", str(args.chunk)]
    cmd += (["--stride", str(args.stride)] if args.stride else []) + ["--start", str(args.start)]
    cmd += ["--operator-tile", str(args.operator_tile)] if args.operator_tile else []
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        rss = _status_kb(proc.pid, "VmRSS") / 2**20
        peak = max(peak, rss)
        if rss > args.cap_gb:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return {"size": size, "path": path, "steps": args.steps, "stopped": True, "cap_gb": args.cap_gb,
                    "seconds_to_cap": time.time() - t0,
                    "note": f"stopped above the {args.cap_gb} GB cap after {time.time() - t0:.0f} s"}
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        return {"size": size, "path": path, "error": f"exit {proc.returncode}", "output": out[-2000:]}
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--paths", nargs="+", default=["tiled", "whole"], choices=PATHS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--stride", type=int, default=None, help="tile stride (default: the Tiling's, 3/4 window)")
    p.add_argument("--start", type=float, default=1.0,
                   help="warm start: with --steps 2, --start 0.4 runs one guided step (at t = 0)")
    p.add_argument("--operator-tile", type=int, default=None,
                   help="operator-tiled: the tile side (default: Tiling().operator_tile)")
    p.add_argument("--cap-gb", type=float, default=12.0, help="stop a child whose resident set passes this")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.one:
        size, path = int(args.one[0]), args.one[1]
        if path.startswith("operator"):
            from idemrt.diffusion.tiling import Tiling

            tile = None if path == "operator" else args.operator_tile or Tiling().operator_tile
            print(json.dumps(run_operator(size, tile)))
        else:
            print(json.dumps(run_one(size, path, args.steps, args.chunk, args.stride, args.start)))
        return 0
    rows = []
    for size in args.sizes:
        for path in args.paths:
            row = run_child(size, path, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.json, rows)  # after every row: a run cut short keeps its finished rows
    return 0


def write(path, rows) -> None:
    import torch

    result = {"rows": rows, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "memory_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30}
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
