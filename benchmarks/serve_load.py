"""Load test of ``idemrt serve``: throughput and latency against concurrency, with and without
step-level batching (``max_slots`` 1 = one image per step, i.e. no batching).

Runs an embedded local Ray instance (loopback only) with the demo models, then for each
``max_slots`` and each concurrency level sends ``--requests`` perceptual decodes of distinct demo
crops from that many client threads, and prints one JSON line per cell:

    .venv/bin/python benchmarks/serve_load.py --steps 20 --requests 16 --concurrency 1,4,8 --slots 1,8

Numbers go to benchmarks/RESULTS.md with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bitstreams(n: int, size: int) -> list:
    from idemrt import Encoder
    from idemrt.demo import DEMO_IMAGES, demo_image, load_demo_codec

    codec = load_demo_codec("cpu")
    out = []
    for k in range(n):
        image = demo_image(DEMO_IMAGES[k % len(DEMO_IMAGES)], 128)
        y, x = (k // 2 * 16) % (128 - size + 1), (k * 24) % (128 - size + 1)
        out.append(Encoder(codec).encode(image[..., y : y + size, x : x + size]))
    return out


def run_cell(url: str, data: list, concurrency: int, steps: str) -> dict:
    from idemrt.serve import Client

    client, latencies, lock = Client(url), [], threading.Lock()
    queue = list(enumerate(data))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                k, d = queue.pop()
            t0 = time.perf_counter()
            client.decode(d, seed=k, steps=steps)
            with lock:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"concurrency": concurrency, "requests": len(data), "wall_s": round(wall, 2),
            "images_per_s": round(len(data) / wall, 3), "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="20")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--slots", default="1,8", help="max_slots values to compare")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from idemrt.serve import ServeConfig
    from idemrt.serve.runner import start_service

    data = _bitstreams(args.requests, args.size)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        for slots in (int(s) for s in args.slots.split(",")):
            config = ServeConfig.demo(steps_allowed=[args.steps], max_slots=slots, cpus_per_replica=0)
            start_service(config, port=port, temp_dir=tmp, num_cpus=2)
            url = f"http://127.0.0.1:{port}"
            run_cell(url, data[:2], 2, args.steps)  # warm-up: first allocations, thread pools
            for c in (int(c) for c in args.concurrency.split(",")):
                row = {"max_slots": slots, **run_cell(url, data, c, args.steps), "steps": args.steps,
                       "size": args.size, "device": "cpu", "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "ray": ray.__version__}
                print(json.dumps(row), flush=True)
            serve.delete("idemrt")
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
