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
# Only an extension already built (by tests_kernels on this machine): building it takes minutes.
CUDA_EXT="import glob, os; from kernels import cuda_pack; from torch.utils import cpp_extension
    assert glob.glob(os.path.join(cpp_extension._get_build_directory(cuda_pack.EXT_NAME, False),
                                  '*.so')), 'not built on this machine yet'
    assert cuda_pack.load_extension(), 'does not load'"
PRELUDES=("nothing else|" "DALI|import nvidia.dali.fn" "Triton|import triton, triton.language"
  "TE|import transformer_engine.pytorch"
  "the CUDA pack extension|$CUDA_EXT"
  "megatron-core|import megatron.core.parallel_state")
crashed=""
for item in "${PRELUDES[@]}"; do
  lib=${item%%|*} prelude=${item#*|}
  # A library that does not load here ends its child with exit 3, before the call.
  CODE="import sys, torch; sys.path.insert(0, '.')
try:
    ${prelude:-pass}
except Exception as exc:
    print('not loadable:', type(exc).__name__, exc); sys.exit(3)
$CALL"
  res=$($PY -X faulthandler -c "$CODE" 2>&1)
  rc=$?
  if [ "$rc" = 3 ] && grep -q "^not loadable:" <<< "$res"; then
    echo "after $lib: $(grep -m1 '^not loadable:' <<< "$res"), skipped"
    continue
  fi
  echo "after $lib: child exit $rc, $(grep -m1 '^raised:' <<< "$res" || echo 'no RuntimeError')"
  if [ "$rc" != 0 ]; then
    tail -n 25 <<< "$res"
    [ -z "$crashed" ] && crashed=$CODE crashed_after=$lib
  fi
done
if [ -n "$crashed" ]; then
  echo "child exit: crashed, first after $crashed_after"
else
  echo "child exit: 0 in every child"
fi
if [ -n "$crashed" ] && command -v cuda-gdb > /dev/null; then
  timeout "${GDB_LIMIT:-50}" cuda-gdb -q -batch -ex run -ex bt --args $PY -c "$crashed" 2>&1 |
    grep -v "^\[New Thread\|^\[Thread .* exited\|^Using host libthread" | head -80
fi
