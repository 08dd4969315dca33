"""The benchmark scripts that tools/gpu_check.sh runs still run (small sizes, this CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_bench_packed_layers_table():
    proc = _run(["tools/bench_packed_layers.py", "--tokens", "256", "--segments", "8",
                 "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[1]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("rope:", "attention:"))}
    assert set(rows) >= {"megatron", "one", "sdpa"}, proc.stdout
    assert int(rows["one"][3]) < int(rows["megatron"][3])  # fewer ops than the per-segment loop
    assert int(rows["tables"][3]) < int(rows["one"][3])  # the kept tables: fewer again


def test_bench_train_rows_per_variant(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run(["tools/bench_train.py", "--recipe", "debug", "--layouts", "tp1", "--variants",
                 "packed", "packed-sdpa", "--steps", "2", "--global-batch-size", "1",
                 "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["packed", "packed-sdpa"]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows)


def test_audit_host_syncs_lists_call_sites():
    proc = _run(["tools/audit_host_syncs.py", "--recipe", "debug"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("by call site:")[-1]
    # the step's own loss read, attributed to its line in the project
    assert "megatron_sphinx/train/step.py:" in table, table
