#!/usr/bin/env bash
# Makes .te/: Transformer Engine for the lent GPU machines' image (Python 3.12, torch
# 2.11.0+cu130; docs/gpu/RUNBOOK.md), as an xz tar of a site-packages folder in parts of at most
# 50 MiB, which tools/gpu_check.sh joins and installs like DALI's.
#
# TE's PyTorch extension (transformer_engine_torch) is published only as source, and the
# device has neither the time nor the internet to build it, so it is built here: a Python 3.12
# venv with the device's torch (PyPI's torch 2.11.0 is its cu130 build), the CUDA headers of
# NVIDIA's wheels plus this machine's toolkit for the compiler's own (crt/), and TE's core
# (transformer-engine-cu13, the CUDA kernels, prebuilt). It compiles C++ only (no nvcc):
# ~12 minutes on 2 cores. With the core's ~340 MB library the tar is ~280 MB: six parts.
#
# Usage, from the repository root (the work folder is kept: a rerun skips what is done):
#   bash tools/te_bundle.sh     # PY312=... CUDA_INCLUDE=... TE_WORK=... to change the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
TE_VERSION=2.20.2
TORCH_VERSION=2.11.0  # the device image's (docs/PERFORMANCE.md, "Machines")
PY312=${PY312:-python3.12}
CUDA_INCLUDE=${CUDA_INCLUDE:-/usr/local/cuda/include}
WORK=${TE_WORK:-/tmp/te_bundle}
INDEX=(--index-url "${PIP_INDEX_URL:-https://pypi.org/simple}")
if ls .te/te.tar.xz.part_a? > /dev/null 2>&1; then
  ls -l .te | grep -v "^total"
  echo "[te] .te/ is there already: remove it to make it again"
  exit 0
fi
if ! "$PY312" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2> /dev/null; then
  echo "error: $PY312 is not a Python 3.12 (the device's): set PY312" >&2
  exit 2
fi
if [ ! -f "$CUDA_INCLUDE/crt/host_config.h" ]; then
  echo "error: no CUDA toolkit headers at $CUDA_INCLUDE (crt/host_config.h): set CUDA_INCLUDE" >&2
  exit 2
fi
grep -qxF /.te/ .git/info/exclude 2> /dev/null || echo /.te/ >> .git/info/exclude
mkdir -p "$WORK"
VPY=$WORK/venv/bin/python
if [ ! -x "$VPY" ] || ! "$VPY" -c "import torch" 2> /dev/null; then
  echo "[te] Python 3.12 venv with torch $TORCH_VERSION (cu130) and its CUDA wheels -> $WORK/venv"
  "$PY312" -m venv "$WORK/venv"
  "$VPY" -m pip install -q "${INDEX[@]}" "torch==$TORCH_VERSION" "setuptools<82" wheel packaging \
    pybind11 ninja "nvidia-cudnn-frontend>=1.29.0"
fi
if [ ! -d "$WORK/dl/transformer_engine_torch-$TE_VERSION" ]; then
  echo "[te] Transformer Engine $TE_VERSION: the core wheels and the extension's source"
  "$VPY" -m pip download -q "${INDEX[@]}" --no-deps -d "$WORK/dl" \
    "transformer-engine==$TE_VERSION" "transformer-engine-cu13==$TE_VERSION" \
    "transformer_engine_torch==$TE_VERSION"
  "$VPY" -m pip install -q --no-deps "$WORK"/dl/transformer_engine*.whl
  tar -C "$WORK/dl" -xzf "$WORK/dl/transformer_engine_torch-$TE_VERSION.tar.gz"
fi
if ! ls "$WORK"/dist/transformer_engine_torch-*.whl > /dev/null 2>&1; then
  echo "[te] building transformer_engine_torch (C++, ~12 minutes on 2 cores)"
  # NVIDIA's wheels' headers (cuDNN, NCCL, cuSPARSE, ...) first; the toolkit's for crt/
  (cd "$WORK/dl/transformer_engine_torch-$TE_VERSION" && rm -rf build &&
   CPATH=$CUDA_INCLUDE NVTE_BUILD_USE_NVIDIA_WHEELS=1 NVTE_PYTORCH_FORCE_BUILD=TRUE \
   MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip wheel . -q --no-deps --no-build-isolation \
   -w "$WORK/dist")
fi
echo "[te] site folder: TE and what it imports that the image lacks"
rm -rf "$WORK/site"
"$VPY" -m pip install -q --no-deps --target "$WORK/site" "$WORK"/dl/transformer_engine*.whl \
  "$WORK"/dist/transformer_engine_torch-*.whl
# transformer_engine.pytorch imports einops, pydantic, onnx and onnxscript (its ONNX export) at
# import time; numpy, packaging, sympy and mpmath are the image's own (torch's)
"$VPY" -m pip install -q "${INDEX[@]}" --target "$WORK/site" einops pydantic onnx onnxscript
rm -rf "$WORK/site/bin" "$WORK/site/share" "$WORK/site/transformer_engine/jax" \
  "$WORK"/site/numpy* "$WORK"/site/packaging* "$WORK"/site/sympy* "$WORK"/site/mpmath* \
  "$WORK/site/isympy.py"
echo "[te] check: transformer_engine.pytorch imports from the folder alone (no GPU needed)"
PYTHONPATH=$WORK/site "$VPY" -W ignore -c "import torch, transformer_engine.pytorch as te, \
transformer_engine_torch; print('[te] imports:', te.__file__)"
mkdir -p .te
tar -C "$WORK/site" -cf - . | xz -T2 -6 > "$WORK/te.tar.xz"
split -b 50m "$WORK/te.tar.xz" .te/te.tar.xz.part_
ls -l .te | grep -v "^total"
echo "[te] ready: carry .te's parts as docs/gpu/RUNBOOK.md says"
