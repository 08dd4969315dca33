"""Running Triton kernel tests under Triton's CPU interpreter, in a subprocess.

Triton reads ``TRITON_INTERPRET`` when it is imported, so a test file runs its interpreter cases
in a child pytest that sets it first; in the parent those cases skip (``only_interpreted``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: This process is the interpreter run.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def only_interpreted(runner: str):
    """Skip marker of the cases that ``runner`` (a test name) runs under the interpreter."""
    return pytest.mark.skipif(not INTERPRETED, reason=f"runs in the TRITON_INTERPRET=1 "
                              f"subprocess of {runner} (triton reads it at import)")


def run_interpreted(test_file: str, keyword: str, expected: int) -> None:
    """Runs the cases of ``test_file`` matching ``keyword`` with ``TRITON_INTERPRET=1`` and
    asserts that all ``expected`` of them passed (none skipped)."""
    res = subprocess.run(
        # addopts emptied: the parent's own limit applies, and pytest.ini's --timeout needs a
        # plugin that GPU images without plugin autoload (tools/gpu_check.sh) do not load
        [sys.executable, "-m", "pytest", test_file, "-q", "-rs", "-p", "no:cacheprovider",
         "-o", "addopts=", "-k", keyword],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"})
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert f"{expected} passed" in res.stdout and "skipped" not in res.stdout, tail
