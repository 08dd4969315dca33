#!/usr/bin/env bash
# Runs, on this CPU machine, the tests whose code meets the lent GPU image's own versions:
# Python 3.12, torch 2.11.0+cu130 and triton 3.6.0 (docs/PERFORMANCE.md, "Machines") instead of
# the project's pinned Python 3.11, torch 2.14 and triton 3.8. A torch or Triton API that
# differs there (H100 run 4 met torch 2.11's varlen_attn signature) then fails here, before it
# costs a lent machine's minutes: the fused AdamW's checkpoint hooks, the packed attention's
# API probing, the vision fusions, exact resumes and parallel layouts on gloo, and every Triton
# kernel compiled ahead of time for sm_90 by triton 3.6. Not the interpreter cases: triton
# 3.6's interpreter passes scalar arguments as 1-element arrays, which a loop bound cannot take
# (the compiled kernels are not affected; the GPU never interprets).
# Usage, from the repository root:
#   bash tools/device_like_tests.sh [pytest args]   # ~5 minutes; the venv ~2 minutes the first
#                                                   # time (DEVICE_VENV=... PY312=... to change)
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
VENV=${DEVICE_VENV:-/tmp/device_venv}
INDEX=(--index-url "${PIP_INDEX_URL:-https://pypi.org/simple}")
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, megatron.core" \
    2> /dev/null; then
  if ! "$PY312" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2> /dev/null; then
    echo "error: $PY312 is not a Python 3.12 (the device's): set PY312" >&2
    exit 2
  fi
  echo "[device-like] venv with the device's torch 2.11.0 (cu130) and triton 3.6.0 -> $VENV"
  "$PY312" -m venv "$VENV"
  grep -v "^torch\|^#" requirements.txt > "$VENV/requirements.txt"
  "$VENV/bin/python" -m pip install -q "${INDEX[@]}" torch==2.11.0 torchvision==0.26.0 \
    -r "$VENV/requirements.txt"
  "$VENV/bin/python" -m pip install -q "${INDEX[@]}" --no-deps megatron-core==0.19.2
fi
"$VENV/bin/python" -c "import sys, torch, triton; print('[device-like] Python', \
sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
export TORCH_COMPILE_DISABLE=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=$VENV/torch_extensions
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider \
  tests/test_adam.py tests/test_attention.py tests/test_upstream_fixes.py \
  tests/test_wgrad_fusion.py tests/test_rope_kernel.py tests/test_swiglu_kernel.py \
  tests/test_cross_entropy_kernel.py tests/test_dwconv_norm_kernel.py tests/test_pack_kernel.py \
  tests/test_vision.py tests/test_model.py tests/test_megatron_cpu.py tests/test_step_flops.py \
  tests/test_resume.py tests/test_parallel.py tests/test_checkpoint.py tests/test_loop.py "$@"
