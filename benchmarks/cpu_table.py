"""The Markdown tables of benchmarks/RESULTS.md's CPU section from one ``cpu_table.sh`` run.

    .venv/bin/python benchmarks/cpu_table.py benchmarks/cpu_table

Reads ``dps.json``, ``pir.json`` and ``speeds_<preset>.json`` (``latency.py``'s JSON) from the
directory and prints: per configuration and batch, the UNet forward and the DPS and codec-gradient
(PIR) steps per mode with the fast path's speed-up over eager fp32, then the whole decodes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("eager", "fast", "onnxruntime")
NAMES = {"ffhq256": "FFHQ-256", "imagenet256": "ImageNet-256"}


def _rows(path: Path) -> dict:
    """(preset, batch, mode) -> row, for the rows that ran (none if the file is missing)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {(r["preset"], r["batch"], r["mode"]): r for r in data["rows"] if r["status"] == "ok"}


def _s(row, key) -> str:
    value = None if row is None else row["ms"].get(key)
    return "–" if value is None else f"{value / 1e3:.2f}"


def _ratio(rows, preset, batch, key) -> str:
    eager, fast = rows.get((preset, batch, "eager")), rows.get((preset, batch, "fast"))
    if eager is None or fast is None or key not in eager["ms"] or key not in fast["ms"]:
        return "–"
    return f"**{eager['ms'][key] / fast['ms'][key]:.2f}x**"


def step_table(dps: dict, pir: dict) -> str:
    lines = ["| config | batch | UNet forward, eager / fast (s) | speed-up | DPS step, eager / fast / ORT (s) "
             "| speed-up | PIR step, eager / fast / ORT (s) | speed-up | fast DPS: % of bf16 peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset, batch in sorted({(p, b) for p, b, _ in dps} | {(p, b) for p, b, _ in pir},
                                key=lambda k: (list(NAMES).index(k[0]), k[1])):
        get = lambda rows, mode: rows.get((preset, batch, mode))  # noqa: E731
        fast = get(dps, "fast")
        lines.append(
            f"| {NAMES[preset]} | {batch} | {_s(get(dps, 'eager'), 'unet_fwd')} / {_s(fast, 'unet_fwd')} "
            f"| {_ratio(dps, preset, batch, 'unet_fwd')} "
            f"| {' / '.join(_s(get(dps, m), 'step') for m in MODES)} | {_ratio(dps, preset, batch, 'step')} "
            f"| {' / '.join(_s(get(pir, m), 'step') for m in MODES)} | {_ratio(pir, preset, batch, 'step')} "
            f"| {'–' if fast is None else round(fast['pct_peak'])} |")
    return "\n".join(lines)


def decode_table(speeds: dict) -> str:
    lines = ["| config | preset | eager fp32 (s) | fast (s) | ONNX Runtime (s; + graph export/load) | fast vs eager |",
             "|---|---|---|---|---|---|"]
    for preset in NAMES:
        rows = speeds.get(preset, {})
        presets = [s for r in rows.values() for s in r.get("speed_decode_s", {})]
        for speed in dict.fromkeys(presets):
            d = {m: rows.get((preset, 1, m), {}).get("speed_decode_s", {}).get(speed) for m in MODES}
            cell = lambda v: "–" if v is None else f"{v['seconds']:.1f}"  # noqa: E731
            ort = d["onnxruntime"]
            ort_cell = "–" if ort is None else f"{ort['seconds']:.1f} (+ {ort.get('setup_seconds', 0):.0f})"
            ratio = "–" if d["eager"] is None or d["fast"] is None else f"**{d['eager']['seconds'] / d['fast']['seconds']:.2f}x**"
            lines.append(f"| {NAMES[preset]} | `{speed}` ({d['eager']['steps'] if d['eager'] else '?'} steps) "
                         f"| {cell(d['eager'])} | {cell(d['fast'])} | {ort_cell} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["benchmarks/cpu_table"])[0])
    dps, pir = _rows(out / "dps.json"), _rows(out / "pir.json")
    speeds = {p: _rows(out / f"speeds_{p}.json") for p in NAMES}
    print(step_table(dps, pir))
    print()
    print(decode_table(speeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
