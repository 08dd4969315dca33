#!/usr/bin/env bash
# Why the pack op's C++ glue extension crashed (segfault) on the H100 image instead of raising
# its input error as a RuntimeError (run 4; tests/test_pack_kernel.py now isolates the call in
# a child process). Prints what decides how a C++ exception crosses into Python (the host
# compiler that built the extension, torch's C++ ABI and pybind11 build ABI), then the crash's
# native backtrace under cuda-gdb (which debugs host-only programs on the device image; without
# it, Python's faulthandler). Run by tools/gpu_check.sh (part diag_glue); builds the extension
# (or reuses the build of tests_kernels, same TORCH_EXTENSIONS_DIR).
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
CODE='import sys, torch; sys.path.insert(0, ".")
from tests.test_pack_kernel import _load_cpu_glue
ext = _load_cpu_glue()
print("extension:", ext.__file__, flush=True)
index = torch.tensor([0, 4, -1, 2, 5, 5])
try:
    ext.pack_tokens(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, 5), index, 4, False)
except RuntimeError as exc:
    print("raised:", str(exc).splitlines()[0])'
if command -v cuda-gdb > /dev/null; then
  cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY -c "$CODE" 2>&1 |
    grep -v "^\[New Thread\|^\[Thread .* exited\|^Using host libthread" |
    grep -E -v "^0x[0-9a-f]+ +0x[0-9a-f]+ +(Yes|No) .*(python3|site-packages/(numpy|PIL|yaml))" |
    head -120
  c++filt --version > /dev/null 2>&1 && echo "(c++filt available)"
else
  $PY -X faulthandler -c "$CODE"
fi
echo "child exit: $($PY -c "$CODE" > /dev/null 2>&1; echo $?)"
