#!/usr/bin/env bash
# The prepared GPU check (issue 7): one call on one GPU, under 8 minutes.
#   1. installs what the device lacks from wheels carried in .whl/ (megatron-core, zarr, ...)
#      and, if its parts were carried beforehand into /tmp/dali_parts, the DALI wheel;
#   2. runs the GPU tests (pack kernels vs the reference, GPU bf16 training vs CPU fp32, TE vs
#      local spec, DALI mixed vs CPU: each skips with its reason when its piece is missing);
#   3. runs the benchmarks: pack kernel vs a device-to-device copy; sphinx-tiny full-size training
#      step (seq 4096, packed + skip tokens vs --no-packing --no-skip); DALI mixed images/s;
#   4. prints one table at the end. Logs and JSON go to $OUT (default /tmp/gpu_check).
# Usage on the device machine, from the repository root: bash tools/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
SITE=/tmp/site
export HF_HUB_OFFLINE=1 TORCH_COMPILE_DISABLE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions CUDA_DEVICE_MAX_CONNECTIONS=1
[ -d .testdata/images ] && export MEGATRON_SPHINX_TESTDATA=$PWD/.testdata/images
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

section() { echo; echo "=== $1 ($(date +%T))"; }
run() {  # run NAME TIMEOUT CMD...: logs to $OUT/NAME.log, records the exit code
  local name=$1 limit=$2; shift 2
  section "$name"
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "$name $rc" >> "$OUT/status.txt"
  return 0
}

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl 2>&1 | tail -2
fi
if ls /tmp/dali_parts/part_* > /dev/null 2>&1 && [ ! -d "$SITE/nvidia/dali" ]; then
  cat /tmp/dali_parts/part_* > /tmp/nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    /tmp/nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl 2>&1 | tail -2
fi
$PY - <<'PYEOF' | tee "$OUT/versions.txt"
import importlib
for name in ["torch", "triton", "megatron.core", "transformer_engine", "nvidia.dali", "timm",
             "transformers", "zarr"]:
    try:
        mod = importlib.import_module(name)
        print(f"{name:20s} {getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:20s} MISSING ({type(exc).__name__}: {str(exc)[:80]})")
PYEOF

TESTS="tests/test_pack_kernel.py tests/test_gpu.py"
$PY -c "import nvidia.dali" 2> /dev/null && TESTS="$TESTS tests/test_images.py"
run tests_gpu 420 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $PY -m pytest -q -p no:cacheprovider -o addopts="" $TESTS -rs
run bench_pack 120 $PY tools/bench_pack_kernel.py --hidden 2048 4096 --batch 1 4 --skip 0.0 0.4
run bench_train 420 $PY tools/bench_train.py --recipe sphinx-tiny --layouts tp1 \
  --variants packed reference --steps 6 --seq-length 4096 --global-batch-size 8 \
  --json "$OUT/train.json"
if $PY -c "import nvidia.dali" 2> /dev/null; then
  run bench_images 150 $PY tools/bench_data.py --threads 16 --seconds 3
fi

section "summary"
cat "$OUT/status.txt"
grep -E "passed|failed|skipped|error" "$OUT/tests_gpu.log" | tail -3
grep -A 20 "^machine:" "$OUT/bench_train.log" | head -8
tail -n 25 "$OUT/bench_pack.log"
[ -f "$OUT/bench_images.log" ] && tail -n 12 "$OUT/bench_images.log"
exit 0
