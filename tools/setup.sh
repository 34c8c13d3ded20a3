#!/usr/bin/env bash
# Create .venv at the repository root and install idemrt with its pinned dependencies.
# compressai needs torchvision, which pulls the registry's CUDA build of torch (~6 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c tools/constraints.txt -e ".[test,diffusers]"
.venv/bin/python -c "import idemrt, idemrt._engine; print('idemrt', idemrt.__version__, 'installed in .venv')"
