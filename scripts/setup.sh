#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with pinned versions.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.setup-$(cat requirements.txt setup.py scripts/setup.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup] creating .venv with $($PY --version)"
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
# megatron-core 0.19.2 declares Requires-Python>=3.12 but ships a working cp311 wheel.
.venv/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, megatron.core, timm, zarr, nvidia.dali, megatron_sphinx" \
  || { echo "[setup] import check failed: see the pip output above"; exit 1; }
rm -f .venv/.setup-*; touch "$stamp"
echo "[setup] .venv ready"
