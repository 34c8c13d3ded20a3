"""Batch invariance of the decode engine: how much an image depends on what else is in its batch.

    python benchmarks/batch_invariance.py --json batch_invariance.json     # demo models, 100 DPS steps

For each mode (default: one batched backend call per step; deterministic: one call per image),
the same N decodes (the demo's held-out images, seeds 100..) run once one at a time and once
submitted together to one engine (they share batched steps). Reported per mode: the largest
difference in 8-bit levels and the lowest PSNR between an image's solo and batched decode, the
share of pixels that differ by more than one level, and the throughput of the batched run
(images/s), whose ratio between the modes is the deterministic mode's cost.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import numpy as np
import torch

import idemrt
from idemrt.demo_assets import DEMO_IMAGES, DEMO_STEPS, demo_image
from idemrt.serve.config import ServeConfig
from idemrt.serve.core import DecodeEngine


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def run(deterministic: bool, n: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    config = ServeConfig.demo(deterministic=deterministic, speeds_allowed=["paper"], steps_allowed=[str(steps)],
                              max_slots=n)
    engine = DecodeEngine(config, device="cpu")
    try:
        datas = [idemrt.Encoder(engine.codec).encode(demo_image(DEMO_IMAGES[k % len(DEMO_IMAGES)])) for k in range(n)]
        t0 = time.perf_counter()
        solo = [engine.submit(d, seed=100 + k).result().pixels for k, d in enumerate(datas)]
        solo_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        futures = [engine.submit(d, seed=100 + k) for k, d in enumerate(datas)]
        batched = [f.result().pixels for f in futures]
        batched_s = time.perf_counter() - t0
    finally:
        engine.close()
    diffs = [np.abs(a.astype(int) - b.astype(int)) for a, b in zip(solo, batched)]
    return {"deterministic": deterministic, "images": n, "steps": steps, "threads": threads,
            "max_levels": int(max(d.max() for d in diffs)),
            "mean_levels": float(np.mean([d.mean() for d in diffs])),
            "share_over_1_level": float(np.mean([(d > 1).mean() for d in diffs])),
            "min_psnr_db": min(psnr(a, b) for a, b in zip(solo, batched)),
            "byte_identical": all(a.tobytes() == b.tobytes() for a, b in zip(solo, batched)),
            "solo_images_per_s": n / solo_s, "batched_images_per_s": n / batched_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for deterministic in (False, True):
        row = run(deterministic, args.images, args.steps, args.threads)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows[1]["batched_images_per_s"]:
        cost = rows[0]["batched_images_per_s"] / rows[1]["batched_images_per_s"]
        print(f"deterministic mode: {cost:.2f}x the default mode's time per batched image")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
