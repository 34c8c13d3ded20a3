#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels for its Python 3.12, into .whl/ (git-ignored),
# for benchmarks/gpu_session.sh. That machine has torch, triton, torchvision, onnx, onnxruntime,
# einops, pandas, torch-geometric and scipy already; it cannot reach a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    compressai==1.2.8 pytorch-fid==0.3.0 pytorch-msssim==1.0.0
ls -l .whl
