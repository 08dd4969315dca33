#!/usr/bin/env bash
# Why the pack op's C++ glue extension crashed (segfault) on the H100 image instead of raising
# its input error as a RuntimeError (run 4; tests/test_pack_kernel.py now isolates the call in
# a child process). Prints what decides how a C++ exception crosses into Python (the host
# compiler that built the extension, torch's C++ ABI and pybind11 build ABI), builds it (or
# reuses the build of tests_kernels, same TORCH_EXTENSIONS_DIR), makes the bad call in plain
# children with Python's faulthandler, and only if one crashed, its native backtrace under
# cuda-gdb (which debugs host-only programs on the device image), cut at GDB_LIMIT seconds.
# Each child first loads one library the crashed session had loaded (or none).
# Run by tools/gpu_check.sh (part diag_glue).
set -uo pipefail
PY=${PY:-python3}
echo "host compiler: $(c++ --version 2>&1 | head -1)"
$PY - <<'PYEOF'
import re
from pathlib import Path

import torch

head = Path(torch.__file__).parent / "include/pybind11/detail/common.h"
ver = ".".join(re.findall(r"#define PYBIND11_VERSION_(?:MAJOR|MINOR|MICRO) (\d+)",
                          head.read_text())) if head.exists() else "?"
try:
    import pybind11
    own = pybind11.__version__
except ImportError:
    own = "not installed"
print("torch", torch.__version__, "| C++11 ABI", torch.compiled_with_cxx11_abi(),
      "| torch's pybind11 headers", ver, "| pip pybind11", own)
PYEOF
# Build first, alone (H100 run 5: building and loading torch under cuda-gdb printed nothing in
# the part's 90 s), then the bad call in a plain child; the debugger only if that child crashed.
$PY - <<'PYEOF'
import sys, time
sys.path.insert(0, ".")
from tests.test_pack_kernel import _load_cpu_glue
t0 = time.perf_counter()
ext = _load_cpu_glue()
print(f"extension: {ext.__file__} (built or loaded in {time.perf_counter() - t0:.1f} s)")
PYEOF
# The bad call in plain children, first with nothing else loaded, then after each library the
# test session had loaded when it crashed (run 4: DALI, Triton, the CUDA pack extension built by
# the same compiler, megatron-core; TE since run 5): a library that brings its own C++ runtime or
# unwinder can break exceptions thrown by code loaded after it. One line each; the first
# crashing child under the debugger.
CALL='from tests.test_pack_kernel import _load_cpu_glue
ext = _load_cpu_glue()
index = torch.tensor([0, 4, -1, 2, 5, 5])
try:
    ext.pack_tokens(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, 5), index, 4, False)
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0])'
PRELUDES=("nothing else|" "DALI|import nvidia.dali.fn" "Triton|import triton, triton.language"
  "TE|import transformer_engine.pytorch"
  "the CUDA pack extension|from kernels import cuda_pack; assert cuda_pack.load_extension()"
  "megatron-core|import megatron.core.parallel_state")
crashed=""
for item in "${PRELUDES[@]}"; do
  lib=${item%%|*} prelude=${item#*|}
  if [ -n "$prelude" ] && ! $PY -c "import sys; sys.path.insert(0, '.'); $prelude" \
      > /dev/null 2>&1; then
    echo "after $lib: not loadable here, skipped"
    continue
  fi
  CODE="import sys, torch; sys.path.insert(0, '.')
$prelude
$CALL"
  res=$($PY -X faulthandler -c "$CODE" 2>&1)
  rc=$?
  echo "after $lib: child exit $rc, $(echo "$res" | grep -m1 '^raised:' || echo 'no RuntimeError')"
  if [ "$rc" != 0 ]; then
    echo "$res" | tail -n 25
    [ -z "$crashed" ] && crashed=$CODE
  fi
done
echo "child exit: ${crashed:+crashed}${crashed:-0}"
if [ -n "$crashed" ] && command -v cuda-gdb > /dev/null; then
  timeout "${GDB_LIMIT:-50}" cuda-gdb -q -batch -ex run -ex bt --args $PY -c "$crashed" 2>&1 |
    grep -v "^\[New Thread\|^\[Thread .* exited\|^Using host libthread" | head -80
fi
