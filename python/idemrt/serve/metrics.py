"""Prometheus text metrics of the decode service (exposition format 0.0.4), kept by hand: a few
counters, gauges and histograms need no client library.

Two sources, one endpoint: the ingress counts requests, errors and end-to-end latency
(:class:`Metrics`); each replica's engine counts its steps, pixels, preemptions, deadline misses
and per-speed decode latency and reports its queue (:class:`EngineMetrics`). Replicas send
snapshots to the application's metrics hub (:mod:`.app`), and ``/metrics`` renders their sum:
counters summed over every replica that ever reported (a dead replica's work still happened),
gauges over the replicas that reported recently.
"""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATUSES = ("waiting", "running", "preempted")


class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum = buckets, [0] * (len(buckets) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"counts": list(self.counts), "sum": self.sum}


class Metrics:
    """The ingress's own: requests by mode and status, errors by kind, end-to-end latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (mode, status code) -> count
        self.errors = defaultdict(int)  # kind -> count
        self.latency = _Histogram(LATENCY_BUCKETS)

    def observe_request(self, mode: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(mode, status)] += 1
            if status < 400:
                self.latency.observe(seconds)

    def observe_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def render(self, engine: dict | None = None) -> str:
        """The text exposition: this ingress's metrics and ``engine``, the replicas' merged
        snapshot (:func:`merge`)."""
        lines = []
        with self._lock:
            _metric(lines, "requests_total", "counter", "Decode requests by mode and HTTP status.",
                    [(f'{{mode="{m}",code="{c}"}}', n) for (m, c), n in sorted(self.requests.items())])
            _metric(lines, "errors_total", "counter", "Failed requests by kind.",
                    [(f'{{kind="{k}"}}', n) for k, n in sorted(self.errors.items())])
            _histogram(lines, "decode_seconds", "End-to-end latency of successful requests (at the ingress).",
                       LATENCY_BUCKETS, self.latency.snapshot())
        if engine is not None:
            _render_engine(lines, engine)
        return "\n".join(lines) + "\n"


class EngineMetrics:
    """One replica's engine: written by its core thread, read as a :meth:`snapshot`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.steps = 0
        self.step_seconds = _Histogram(STEP_BUCKETS)
        self.step_pixels = 0  # pixels stepped, summed over steps
        self.step_images = 0
        self.batch_pixels = 0  # of the last step
        self.preemptions = 0
        self.deadline_misses = 0
        self.decode_seconds: dict = {}  # speed -> histogram
        self.gauges = {"queue_depth": 0, "pixel_budget": 0, **{f"images_{s}": 0 for s in STATUSES}}

    def observe_step(self, seconds: float, pixels: int, images: int, preempted: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_seconds.observe(seconds)
            self.step_pixels += pixels
            self.step_images += images
            self.batch_pixels = pixels
            self.preemptions += preempted

    def observe_deadline_misses(self, n: int) -> None:
        with self._lock:
            self.deadline_misses += n

    def observe_decode(self, speed: str, seconds: float) -> None:
        with self._lock:
            self.decode_seconds.setdefault(speed, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def set_gauges(self, stats: dict, inbox: int) -> None:
        with self._lock:
            self.gauges = {"queue_depth": stats["waiting"] + stats["preempted"] + inbox,
                           "pixel_budget": stats["pixel_budget"], "images_waiting": stats["waiting"] + inbox,
                           "images_running": stats["running"], "images_preempted": stats["preempted"]}

    def snapshot(self) -> dict:
        with self._lock:
            return {"counters": {"steps": self.steps, "step_pixels": self.step_pixels, "step_images": self.step_images,
                                 "preemptions": self.preemptions, "deadline_misses": self.deadline_misses},
                    "step_seconds": self.step_seconds.snapshot(),
                    "decode_seconds": {k: h.snapshot() for k, h in self.decode_seconds.items()},
                    "gauges": {**self.gauges, "batch_pixels": self.batch_pixels}}


def merge(snapshots: list, live: list) -> dict:
    """One snapshot of many replicas: counters and histograms summed over ``snapshots`` (every
    replica that reported), gauges over ``live`` (those that reported recently)."""
    out = {"counters": defaultdict(int), "step_seconds": {"counts": [0] * (len(STEP_BUCKETS) + 1), "sum": 0.0},
           "decode_seconds": {}, "gauges": defaultdict(int), "replicas": len(live)}
    for snap in snapshots:
        for k, v in snap["counters"].items():
            out["counters"][k] += v
        _add(out["step_seconds"], snap["step_seconds"])
        for speed, h in snap["decode_seconds"].items():
            _add(out["decode_seconds"].setdefault(speed, {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0}), h)
    for snap in live:
        for k, v in snap["gauges"].items():
            out["gauges"][k] += v
    return out


def _add(into: dict, h: dict) -> None:
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"])]
    into["sum"] += h["sum"]


def _render_engine(lines: list, m: dict) -> None:
    c, g = m["counters"], m["gauges"]
    _metric(lines, "replicas_reporting", "gauge", "Decoder replicas that reported in the last seconds.",
            [("", m["replicas"])])
    _metric(lines, "steps_total", "counter", "Batched sampler steps run, all replicas.", [("", c["steps"])])
    _histogram(lines, "step_seconds", "Duration of batched sampler steps.", STEP_BUCKETS, m["step_seconds"])
    _metric(lines, "step_pixels_total", "counter", "Image pixels advanced by batched steps (batch occupancy).",
            [("", c["step_pixels"])])
    _metric(lines, "step_images_total", "counter", "Images advanced by batched steps.", [("", c["step_images"])])
    _metric(lines, "batch_pixels", "gauge", "Pixels in the last batched step of each replica, summed.",
            [("", g["batch_pixels"])])
    _metric(lines, "pixel_budget", "gauge", "Pixels a batched step may hold, summed over replicas.",
            [("", g["pixel_budget"])])
    _metric(lines, "queue_depth", "gauge", "Images waiting for a batch slot (not yet started or preempted).",
            [("", g["queue_depth"])])
    _metric(lines, "images", "gauge", "Images held by the engines, by request status.",
            [(f'{{status="{s}"}}', g[f"images_{s}"]) for s in STATUSES])
    _metric(lines, "preemptions_total", "counter", "Running images parked for higher-priority ones.",
            [("", c["preemptions"])])
    _metric(lines, "deadline_misses_total", "counter", "Images dropped because their deadline passed.",
            [("", c["deadline_misses"])])
    lines.extend(["# HELP idemrt_replica_decode_seconds Decode latency on the replica (queueing included), by speed.",
                  "# TYPE idemrt_replica_decode_seconds histogram"])
    for speed, h in sorted(m["decode_seconds"].items()):
        lines.extend(_histogram_samples("replica_decode_seconds", LATENCY_BUCKETS, h, f'speed="{speed}"'))


def _metric(lines: list, name: str, kind: str, help_: str, samples) -> None:
    lines.extend([f"# HELP idemrt_{name} {help_}", f"# TYPE idemrt_{name} {kind}"])
    lines.extend(f"idemrt_{name}{labels} {value}" for labels, value in samples)


def _histogram(lines: list, name: str, help_: str, buckets, h: dict) -> None:
    lines.extend([f"# HELP idemrt_{name} {help_}", f"# TYPE idemrt_{name} histogram"])
    lines.extend(_histogram_samples(name, buckets, h))


def _histogram_samples(name: str, buckets, h: dict, label: str = "") -> list:
    sep = "," if label else ""
    out, cumulative = [], 0
    for bound, count in zip([*map(str, buckets), "+Inf"], h["counts"]):
        cumulative += count
        out.append(f'idemrt_{name}_bucket{{{label}{sep}le="{bound}"}} {cumulative}')
    tail = f"{{{label}}}" if label else ""
    return out + [f"idemrt_{name}_sum{tail} {h['sum']}", f"idemrt_{name}_count{tail} {cumulative}"]
