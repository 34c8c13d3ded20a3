"""Prometheus text metrics of the decode service (exposition format 0.0.4), kept by hand: a few
counters, gauges and one latency histogram need no client library."""
from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (mode, status code) -> count
        self.errors = defaultdict(int)  # kind -> count
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, last: +Inf
        self.latency_sum = 0.0
        self.steps = 0
        self.step_seconds = 0.0
        self.slot_occupancy = 0.0

    def observe_request(self, mode: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(mode, status)] += 1
            if status < 400:
                k = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.latency[k] += 1
                self.latency_sum += seconds

    def observe_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def observe_step(self, seconds: float, slots_used: int, slots: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_seconds = seconds
            self.slot_occupancy = slots_used / max(1, slots)

    def render(self, gauges: dict) -> str:
        """The text exposition; ``gauges``: name -> (help, value) read at scrape time."""
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP idemrt_{name} {help_}", f"# TYPE idemrt_{name} {kind}"])
            lines.extend(f"idemrt_{name}{labels} {value}" for labels, value in samples)

        with self._lock:
            metric("requests_total", "counter", "Decode requests by mode and HTTP status.",
                   [(f'{{mode="{m}",code="{c}"}}', n) for (m, c), n in sorted(self.requests.items())])
            metric("errors_total", "counter", "Failed requests by kind.",
                   [(f'{{kind="{k}"}}', n) for k, n in sorted(self.errors.items())])
            cumulative, samples = 0, []
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.latency):
                cumulative += count
                samples.append((f'_bucket{{le="{bound}"}}', cumulative))
            samples += [("_sum", self.latency_sum), ("_count", cumulative)]
            metric("decode_seconds", "histogram", "End-to-end decode latency of successful requests.", samples)
            metric("steps_total", "counter", "Batched sampler steps run.", [("", self.steps)])
            metric("step_seconds", "gauge", "Duration of the last batched step.", [("", self.step_seconds)])
            metric("slot_occupancy", "gauge", "Fraction of batch slots used by the last step.",
                   [("", self.slot_occupancy)])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(lines) + "\n"
