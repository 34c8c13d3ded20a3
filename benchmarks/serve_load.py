"""Open-loop load study of the decode engine: continuous (step-level) batching against static
(request-level) batching and against no batching, under a mixed Poisson workload.

What is compared is the **engine**, in-process (:class:`idemrt.serve.core.DecodeEngine` on the
demo models): no Ray, no HTTP, no client threads. The service's proxy and transport add the same
cost to every policy, so leaving them out isolates what the batching policy changes.

Workload (the same sequence, from ``--seed``, for every policy at a given rate):

* arrivals: a Poisson process of ``rate`` requests/s conditioned on ``--requests`` arrivals in
  ``requests / rate`` seconds (exponential gaps from a seeded numpy RNG, scaled to that span: the
  uniform order statistics), so every cell offers exactly ``rate`` and lasts a known time;
* image size: 64 px (75%) or 128 px (25%), crops of the held-out demo photographs;
* speed: ``paper`` (50%, DPS; respaced to ``--paper-steps``, default 20 instead of the preset's
  1000 so that the study fits a CPU), ``balanced`` (25%, warm-started DSG, 20 of 50 steps + exact
  refinement) and ``fast`` (25%, codec-gradient PIR, 20 of 50 steps + exact refinement);
* priority: 5 for 10% of the requests, 0 otherwise (so a continuous engine preempts when its
  batch is full);
* a deadline of ``--deadline`` seconds per request, well above the expected latency: a deadline
  miss is a failure of the cell, not a way to shed load.

The shares are exact (rounded by largest remainder; in a seeded random order, each attribute
independently), so that a cell of a few tens of requests carries the intended mix.

Policies (the same ``--max-slots`` and pixel budget, i.e. ``max_slots`` images of 64² per step):

* ``continuous``: step-level batching, images join and leave the running batch at every step,
  priorities and preemption;
* ``static``: request-level batches (as Ray Serve's ``@serve.batch``): a batch starts when full
  or when its oldest image waited ``--batch-wait`` seconds, then runs to its end with nobody
  joining; no priorities;
* ``none``: continuous with ``max_slots`` 1 (one image per step).

For every policy one engine is built and warmed up (one decode of each speed and size; with CUDA
graphs a burst of every slot count too, so that no graph is captured inside a cell), all before
any timing; then for every rate, policy after policy (the order rotating from rate to rate,
so that the cells compared at one rate ran close together in time on a shared machine), the driver
thread submits ``--requests`` requests at their arrival times, open loop (it never waits for a
result before submitting the next one), and waits until all are resolved. ``loadavg_1m`` (the
machine's 1-minute load average before and after the cell, this process included) shows how
busy the machine was.

Per request: latency (submit → result) and time to first preview (submit → first preview event,
``--preview-every`` steps). One JSON line per cell (policy × rate):

* ``throughput``: the achieved departure rate, (finished − 1) / (last result − first result),
  images/s: the offered rate when the engine keeps up, its capacity when it does not (the first
  and last latencies, which a short cell cannot amortise, do not enter it);
* ``throughput_makespan``: finished / (last result − start of the arrivals), for comparison;
* ``latency_p50/p95/p99_s``, ``ttfp_p50/p95_s``: over finished requests (numpy's linear
  interpolation; with a few tens of requests per cell p99 is close to the maximum);
* ``preemptions``, ``steps``: the engine's counters over the cell;
* ``failed`` (decode errors), ``timeouts`` (deadline misses), ``rejected`` (queue full),
  ``unresolved`` (cancelled after the drain limit): ``finished`` + these = ``requests``;
* ``backlog_*``: requests in the engine (submitted, unresolved) seen by each arrival;
* ``sustained``: the engine kept up with the offered rate: every request finished (no failure,
  timeout, rejection), ``throughput >= 0.9 * rate``, and the backlog did not grow: its mean over
  the last quarter of arrivals is at most 1.5 × its mean over the second quarter + 1. With a few
  tens of requests per cell this separates clear overload from load the engine carries; it cannot
  resolve a rate within ~10% of the capacity.

At the end, the checks of the study: at the highest rate the static baseline sustained, p95
latency of continuous / p95 of static (target <= 0.6); at every rate, p95 of continuous / p95 of
none (target <= 1: batching never makes the tail worse than decoding one image at a time); and
the failures (failed, timeouts, rejected, unresolved) per policy over all its cells (target 0).

    .venv/bin/python benchmarks/serve_load.py --rates 0.13,0.2,0.3 --requests 12 --max-slots 4 --json load.json
    .venv/bin/python benchmarks/serve_load.py --smoke    # seconds: paper speed only, 2 steps

Numbers go to benchmarks/RESULTS.md with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import wait as wait_futures

import numpy as np
import torch

POLICIES = ("continuous", "static", "none")
SIZES = {64: 0.75, 128: 0.25}
SPEEDS = {"paper": 0.5, "balanced": 0.25, "fast": 0.25}
HIGH_PRIORITY, HIGH_SHARE = 5, 0.1
TARGET_RATIO = 0.6


def _bitstreams(sizes, per_size: int = 4) -> dict:
    """size -> a few distinct .idm bitstreams (crops / flips of the held-out demo photographs)."""
    from idemrt import Encoder
    from idemrt.demo_assets import DEMO_IMAGES, demo_image, load_demo_codec

    codec = load_demo_codec("cpu")
    images = [demo_image(name, 128) for name in DEMO_IMAGES]
    out = {}
    for size in sizes:
        out[size] = []
        for k in range(per_size):
            image = images[k % len(images)]
            if size >= 128:
                crop = image if k < len(images) else image.flip(-1)
            else:
                y, x = (k // 2 * 32) % (128 - size + 1), (k * 24) % (128 - size + 1)
                crop = image[..., y: y + size, x: x + size]
            out[size].append(Encoder(codec).encode(crop.contiguous()))
    return out


def workload(n: int, rate: float, seed: int, sizes: dict = SIZES, speeds: dict = SPEEDS) -> list:
    """``n`` requests: dicts of arrival (s from the start), size, speed, priority, seed."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, n + 1)
    arrivals = np.cumsum(gaps[:n]) / gaps.sum() * (n / rate)
    size = _quota(sizes, n, rng)
    speed = _quota(speeds, n, rng)
    priority = _quota({HIGH_PRIORITY: HIGH_SHARE, 0: 1 - HIGH_SHARE}, n, rng)
    seeds = rng.integers(2**31, size=n)
    return [{"k": k, "arrival": float(arrivals[k]), "size": int(size[k]), "speed": speed[k],
             "priority": int(priority[k]), "seed": int(seeds[k])} for k in range(n)]


def _quota(shares: dict, n: int, rng) -> list:
    """``n`` values of ``shares`` {value: share}, each exactly its rounded share (largest
    remainder), in a random order."""
    keys = list(shares)
    want = np.array([shares[k] for k in keys], float)
    want = want / want.sum() * n
    counts = np.floor(want).astype(int)
    for i in np.argsort(-(want - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    values = [k for k, c in zip(keys, counts) for _ in range(c)]
    return [values[i] for i in rng.permutation(n)]


def _percentile(values, q):
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def run_cell(engine, data: dict, requests: list, rate: float, *, deadline: float, drain_s: float) -> dict:
    """Submit ``requests`` open loop at their arrival times from this thread; wait for all; stats."""
    from idemrt.errors import DeadlineExceeded, QueueFullError

    lock = threading.Lock()
    records = [dict(r, submitted=None, preview=None, done=None, status=None) for r in requests]
    unresolved = [0]
    backlog = []
    futures = []

    def on_event_for(rec):
        def on_event(event):
            if event["event"] == "preview" and rec["preview"] is None:
                rec["preview"] = time.perf_counter()
        return on_event

    def on_done_for(rec):
        def on_done(future):
            now = time.perf_counter()
            if future.cancelled():
                status = "unresolved"
            else:
                exc = future.exception()
                status = ("ok" if exc is None else "timeout" if isinstance(exc, DeadlineExceeded)
                          else "unresolved" if isinstance(exc, CancelledError) else "failed")
            with lock:
                rec["done"], rec["status"] = now, status
                unresolved[0] -= 1
        return on_done

    counters0 = engine.stats()
    lag = 0.0
    t0 = time.perf_counter()
    for k, rec in enumerate(records):
        wait = t0 + rec["arrival"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter()
        lag = max(lag, now - (t0 + rec["arrival"]))
        with lock:
            backlog.append(unresolved[0])
            unresolved[0] += 1
        rec["submitted"] = now
        d = data[rec["size"]][k % len(data[rec["size"]])]
        try:
            future = engine.submit(d, seed=rec["seed"], speed=rec["speed"], priority=rec["priority"],
                                   timeout=deadline, on_event=on_event_for(rec))
        except QueueFullError:
            with lock:
                rec["done"], rec["status"] = time.perf_counter(), "rejected"
                unresolved[0] -= 1
            continue
        futures.append(future)
        future.add_done_callback(on_done_for(rec))
    _, pending = wait_futures(futures, timeout=deadline + drain_s)
    for future in pending:  # the engine enforces deadlines; this only bounds a stuck engine
        future.job.cancel()
    wait_futures(futures, timeout=60)
    counters = engine.stats()

    ok = [r for r in records if r["status"] == "ok"]
    latencies = [r["done"] - r["submitted"] for r in ok]
    ttfp = [r["preview"] - r["submitted"] for r in ok if r["preview"] is not None]
    n = len(records)
    count = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "timeout", "rejected")}
    count["unresolved"] = n - sum(count.values())
    done = sorted(r["done"] for r in ok)
    makespan = len(ok) / (done[-1] - t0) if ok else 0.0
    throughput = (len(ok) - 1) / (done[-1] - done[0]) if len(ok) > 1 and done[-1] > done[0] else makespan
    q = max(1, n // 4)
    growth_mid = float(np.mean(backlog[q: 2 * q])) if n >= 4 else 0.0
    growth_end = float(np.mean(backlog[-q:])) if n >= 4 else 0.0
    sustained = (count["ok"] == n and throughput >= 0.9 * rate and growth_end <= 1.5 * growth_mid + 1)
    return {"requests": n, "finished": count["ok"], "failed": count["failed"], "timeouts": count["timeout"],
            "rejected": count["rejected"], "unresolved": count["unresolved"],
            "throughput": round(throughput, 4), "throughput_makespan": round(makespan, 4),
            "latency_p50_s": _percentile(latencies, 50), "latency_p95_s": _percentile(latencies, 95),
            "latency_p99_s": _percentile(latencies, 99), "latency_max_s": _percentile(latencies, 100),
            "ttfp_p50_s": _percentile(ttfp, 50), "ttfp_p95_s": _percentile(ttfp, 95),
            "previewed": len(ttfp),
            "preemptions": counters["preemptions"] - counters0["preemptions"],
            "steps": counters["iterations"] - counters0["iterations"],
            "backlog_max": max(backlog), "backlog_at_last_arrival": backlog[-1],
            "backlog_q2_mean": round(growth_mid, 2), "backlog_q4_mean": round(growth_end, 2),
            "sustained": bool(sustained), "wall_s": round(time.perf_counter() - t0, 1),
            "submit_lag_max_s": round(lag, 3),
            "high_priority": sum(r["priority"] > 0 for r in records),
            "mix": {f"{s}/{z}": sum(r["speed"] == s and r["size"] == z for r in records)
                    for s in sorted({r["speed"] for r in records}) for z in sorted({r["size"] for r in records})},
            "records": [{"k": r["k"], "arrival": round(r["arrival"], 3), "size": r["size"], "speed": r["speed"],
                         "priority": r["priority"], "status": r["status"],
                         "latency_s": None if r["status"] != "ok" else round(r["done"] - r["submitted"], 3),
                         "ttfp_s": None if r["preview"] is None else round(r["preview"] - r["submitted"], 3)}
                        for r in records]}


def build_engine(policy: str, args, speeds):
    from idemrt.serve import ServeConfig
    from idemrt.serve.core import DecodeEngine

    config = ServeConfig.demo(steps_allowed=[args.paper_steps], speeds_allowed=list(speeds),
                              max_slots=1 if policy == "none" else args.max_slots,
                              batching="static" if policy == "static" else "continuous",
                              batch_wait_s=args.batch_wait if policy == "static" else 0.0,
                              preview_every=args.preview_every, timeout_s=args.deadline,
                              queue=max(256, 2 * args.requests))
    return DecodeEngine(config, device=args.device)


def warm_up(engine, data: dict, speeds) -> float:
    """One decode of every speed and size (first allocations, thread pools) — and, where the
    backend pads batches to slot counts (CUDA graphs: one capture per count, shape and step
    function), a burst of every slot count too, so that no capture happens inside a cell.
    Seconds taken."""
    t0 = time.perf_counter()
    counts = engine.batcher.slot_counts or [1]
    for n in counts:
        futures = [engine.submit(data[size][k % len(data[size])], seed=k, speed=speed)
                   for speed in speeds for size in data for k in range(n)]
        [f.result() for f in futures]
    return time.perf_counter() - t0


def check(rows: list) -> dict:
    """p95 continuous / p95 static at the highest rate the static baseline sustained."""
    static = [r for r in rows if r["policy"] == "static" and r["sustained"]]
    if not static:
        return {"rate": None, "ratio": None, "met": None,
                "line": "the static baseline sustained none of the rates: no p95 ratio (lower --rates)"}
    rate = max(r["rate"] for r in static)
    s = next(r for r in static if r["rate"] == rate)
    c = next((r for r in rows if r["policy"] == "continuous" and r["rate"] == rate), None)
    if c is None or c["latency_p95_s"] is None or not s["latency_p95_s"]:
        return {"rate": rate, "ratio": None, "met": None, "line": f"no continuous cell at rate {rate}"}
    ratio = c["latency_p95_s"] / s["latency_p95_s"]
    met = ratio <= TARGET_RATIO
    return {"rate": rate, "ratio": round(ratio, 3), "met": met,
            "line": f"at the highest sustained rate of the static baseline ({rate}/s), p95 continuous / p95 static "
                    f"= {c['latency_p95_s']:.2f} s / {s['latency_p95_s']:.2f} s = {ratio:.2f} "
                    f"(target <= {TARGET_RATIO}: {'met' if met else 'NOT met'})"}


def check_none(rows: list) -> dict:
    """p95 continuous / p95 none at every rate that has both (target <= 1 at each)."""
    ratios = {}
    for rate in sorted({r["rate"] for r in rows}):
        c = next((r for r in rows if r["policy"] == "continuous" and r["rate"] == rate), None)
        n = next((r for r in rows if r["policy"] == "none" and r["rate"] == rate), None)
        if c is not None and n is not None:
            ok = c["latency_p95_s"] is not None and bool(n["latency_p95_s"])
            ratios[rate] = round(c["latency_p95_s"] / n["latency_p95_s"], 3) if ok else None
    met = bool(ratios) and all(v is not None and v <= 1 for v in ratios.values())
    parts = ", ".join(f"{rate}/s: {'n/a' if v is None else f'{v:.2f}'}" for rate, v in ratios.items())
    return {"ratios": ratios, "met": met if ratios else None,
            "line": f"p95 continuous / p95 none: {parts or 'no rate with both'} "
                    f"(target <= 1 at every rate: {'met' if met else 'NOT met'})"}


def failures(rows: list) -> dict:
    """Requests that did not finish (failed, timeouts, rejected, unresolved), per policy over all its cells."""
    out: dict = {}
    for r in rows:
        out[r["policy"]] = out.get(r["policy"], 0) + r["requests"] - r["finished"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="0.05,0.1,0.15", help="offered arrival rates, requests/s")
    p.add_argument("--requests", type=int, default=24, help="requests per cell")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"subset of {','.join(POLICIES)}")
    p.add_argument("--max-slots", type=int, default=8, help="images per step (continuous and static)")
    p.add_argument("--batch-wait", type=float, default=0.5, help="static: seconds a batch waits to fill")
    p.add_argument("--paper-steps", default="20", help="respacing of the paper speed (DPS)")
    p.add_argument("--preview-every", type=int, default=5, help="a preview every this many steps")
    p.add_argument("--deadline", type=float, default=300.0, help="per-request deadline, seconds")
    p.add_argument("--drain", type=float, default=60.0, help="extra seconds to wait past the deadline")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the engine's default: the fast backend)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write environment, rows and the check here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny and fast: paper speed only at 2 steps, 6 requests at 1/s, previews every step")
    args = p.parse_args(argv)
    speeds, sizes = dict(SPEEDS), dict(SIZES)
    if args.smoke:
        args.paper_steps, args.preview_every, args.deadline, args.drain = "2", 1, 120.0, 30.0
        args.requests = min(args.requests, 6)
        if args.rates == p.get_default("rates"):
            args.rates = "1"
        speeds = {"paper": 1.0}
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        p.error(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
    rates = [float(r) for r in args.rates.split(",")]
    if args.requests < 1 or min(rates) <= 0:
        p.error("--requests must be >= 1 and --rates > 0")

    from idemrt.defaults import cpu_model

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    environment = {"device": device, "cpu": cpu_model(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    data = _bitstreams(sizes)
    rows, engines, warm = [], {}, {}

    def write(**checks):  # after every cell too: a run cut short keeps its cells
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment, "argv": sys.argv[1:] if argv is None else list(argv),
                           "args": vars(args), "rows": rows, **checks}, f, indent=1)

    try:
        for policy in policies:  # every engine up and warm first; an idle engine's core only waits
            engines[policy] = build_engine(policy, args, speeds)
            warm[policy] = warm_up(engines[policy], data, speeds)
        for r, rate in enumerate(rates):
            requests = workload(args.requests, rate, args.seed, sizes, speeds)
            # the cells of one rate back to back, the policies' order rotating from rate to rate
            for policy in policies[r % len(policies):] + policies[: r % len(policies)]:
                engine = engines[policy]
                load0 = _loadavg()
                cell = run_cell(engine, data, requests, rate, deadline=args.deadline, drain_s=args.drain)
                row = {"policy": policy, "rate": rate, "max_slots": engine.config.max_slots,
                       "batch_wait_s": engine.config.batch_wait_s if policy == "static" else None,
                       **cell, "loadavg_1m": [load0, _loadavg()], "paper_steps": args.paper_steps,
                       "warmup_s": round(warm[policy], 1), "threads": environment["threads"],
                       "torch": environment["torch"]}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "records"}), flush=True)
                write()
    finally:
        for engine in engines.values():
            engine.close()
    result = check(rows) if {"continuous", "static"} <= set(policies) else None
    against_none = check_none(rows) if {"continuous", "none"} <= set(policies) else None
    lost = failures(rows)
    print(f"requests not finished, per policy over its cells: {lost} (target 0)", flush=True)
    if against_none is not None:
        print(against_none["line"], flush=True)
    if result is not None:
        print(result["line"], flush=True)
    write(check=result, check_none=against_none, failures=lost)
    return 0


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
