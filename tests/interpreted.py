"""Running Triton kernel tests under Triton's CPU interpreter, in a subprocess.

Triton reads ``TRITON_INTERPRET`` when it is imported, so the kernel test files' interpreter
cases (named ``test_interpreted_*``, marked :data:`interpreted`) run in one child pytest that
sets it first (``tests/test_interpreter.py``); in the parent they skip."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: This process is the interpreter run.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


#: Skip marker of the cases that run under the interpreter (in the child of
#: ``tests/test_interpreter.py``).
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 "
                                 "subprocess of tests/test_interpreter.py (triton reads it at "
                                 "import)")


def run_interpreted(test_files: list[str], keyword: str, expected: int) -> None:
    """Runs the cases of ``test_files`` matching ``keyword`` in one child pytest with
    ``TRITON_INTERPRET=1`` and asserts that all ``expected`` of them passed (none skipped)."""
    res = subprocess.run(
        # addopts emptied: the parent's own limit applies, and pytest.ini's --timeout needs a
        # plugin that GPU images without plugin autoload (tools/gpu_check.sh) do not load
        [sys.executable, "-m", "pytest", *test_files, "-q", "-rs", "-p", "no:cacheprovider",
         "-o", "addopts=", "-k", keyword],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"})
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert f"{expected} passed" in res.stdout and "skipped" not in res.stdout, tail
