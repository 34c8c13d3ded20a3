#!/usr/bin/env bash
# The CPU table of benchmarks/RESULTS.md (issue 19) in one run, back to back: FFHQ-256 and
# ImageNet-256 configurations, batch 1 and 4, the UNet forward and the DPS / codec-gradient (PIR)
# steps, then whole `balanced` / `fast` decodes (batch 1), for eager fp32, the CPU fast path and
# ONNX Runtime; then where the ImageNet-256 forward's time goes; then the Markdown tables
# (benchmarks/cpu_table.py). About 1.6 h on a 2-core VM.
# Run it alone: anything else on the machine shows up in the numbers.
#
#   bash benchmarks/cpu_table.sh [OUT_DIR]      # default benchmarks/cpu_table
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/cpu_table}
mkdir -p "$OUT"
# One warm-up and one timed repeat per number (the full-size steps take up to minutes at batch 4);
# 20-step decodes are extrapolated from the step (--max-decode-seconds 1): the whole decodes are
# the --speeds rows.
common=(--device cpu --codec hyperprior --modes eager,fast,onnxruntime --components unet_fwd
        --decode-steps 20 --max-decode-seconds 1 --warmup 1 --repeats 1)
run() { echo "== $(date -u +%H:%M:%S) $*"; "$PY" "$@"; }
run benchmarks/latency.py "${common[@]}" --preset ffhq256,imagenet256 --batch 1,4 --guidance dps --json "$OUT/dps.json"
run benchmarks/latency.py "${common[@]}" --preset ffhq256,imagenet256 --batch 1,4 --guidance pir --json "$OUT/pir.json"
for preset in ffhq256 imagenet256; do
    run benchmarks/latency.py "${common[@]}" --preset "$preset" --batch 1 --guidance dps --speeds balanced,fast \
        --json "$OUT/speeds_$preset.json"
done
run benchmarks/cpu_profile.py --preset imagenet256 --modes eager,fast --guidance pir --warmup 1 --repeats 1 \
    --json "$OUT/profile_imagenet256_pir.json"
echo "== $(date -u +%H:%M:%S) done"
"$PY" benchmarks/cpu_table.py "$OUT"
