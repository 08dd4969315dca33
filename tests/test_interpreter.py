"""The Triton kernels' interpreter cases, all in one child process.

Triton reads ``TRITON_INTERPRET`` when it is imported, so the kernels' CPU runs (Triton's
interpreter) need a process that sets it first; one child for every kernel file saves a start-up
of torch, triton and Megatron per file. Each file marks those cases ``interpreted`` and names
them ``test_interpreted_*`` (:mod:`tests.interpreted`); they skip in this process.
"""
from __future__ import annotations

import pytest

from tests.interpreted import INTERPRETED, run_interpreted

#: Kernel test file -> how many interpreter cases it holds (all must run and pass).
CASES = {"tests/test_pack_kernel.py": 4, "tests/test_rope_kernel.py": 1,
         "tests/test_swiglu_kernel.py": 6, "tests/test_cross_entropy_kernel.py": 3,
         "tests/test_dwconv_norm_kernel.py": 3}


@pytest.mark.skipif(INTERPRETED, reason="this process already is the interpreter run")
def test_kernels_under_the_interpreter():
    run_interpreted(list(CASES), "test_interpreted", sum(CASES.values()))
