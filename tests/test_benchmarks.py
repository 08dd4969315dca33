"""The benchmark scripts that tools/gpu_check.sh runs still run (small sizes, this CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_bench_packed_layers_table():
    proc = _run(["tools/bench_packed_layers.py", "--tokens", "256", "--segments", "8",
                 "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line[:22].strip(): line[22:].split() for line in proc.stdout.splitlines()
            if line.startswith(("rope:", "attention:", "swiglu:")) and "not run" not in line}
    assert set(rows) == {"rope: megatron loop", "rope: one gather", "rope: tables kept",
                         "attention: sdpa", "swiglu: megatron"}, proc.stdout
    ops = {name: int(row[0]) for name, row in rows.items()}
    # fewer ops than the per-segment loop; the kept tables: fewer again
    assert ops["rope: tables kept"] < ops["rope: one gather"] < ops["rope: megatron loop"]
    # Megatron's unfused SwiGLU: silu and a product forward, 11 more backward (+ 2: the sum
    # and its gradient), which the fused kernel makes one launch each way on a GPU
    assert (ops["swiglu: megatron"], int(rows["swiglu: megatron"][2])) == (2, 15), proc.stdout


def test_bench_train_rows_per_variant(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run(["tools/bench_train.py", "--recipe", "debug", "--layouts", "tp1", "--variants",
                 "packed", "packed-sdpa", "--steps", "3", "--warmup", "2",
                 "--global-batch-size", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["packed", "packed-sdpa"]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows)
    for r in rows:  # the figures are the last step's alone
        assert len(r["step_times_s"]) == len(r["step_tflops"]) == 3 and r["warmup_steps"] == 2
        assert r["step_s"] == r["step_times_s"][2]
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_times_s"][2])
        assert r["max_memory_gib"] is None  # GPU only


def test_audit_host_syncs_lists_call_sites():
    proc = _run(["tools/audit_host_syncs.py", "--recipe", "debug"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("by call site:")[-1]
    # the step's own loss read, attributed to its line in the project
    assert "megatron_sphinx/train/step.py:" in table, table


def test_gpu_check_names_existing_tests():
    """Every test file and ``--deselect`` of tools/gpu_check.sh exists (a rename must not turn
    a deselected CPU-only test back on, or drop a GPU test, on the next lent machine)."""
    import re

    script = (REPO / "tools" / "gpu_check.sh").read_text()
    files = set(re.findall(r"tests/test_\w+\.py", script))
    assert "tests/test_swiglu_kernel.py" in files and "tests/test_gpu.py" in files
    for path in files:
        assert (REPO / path).exists(), path
    deselected = re.findall(r"--deselect (tests/test_\w+\.py)::(\w+)", script)
    assert len(deselected) >= 5
    for path, name in deselected:
        assert f"def {name}(" in (REPO / path).read_text(), f"{path}::{name}"
    # the training variants it times are bench_train's, the scripts it calls exist
    sys.path.insert(0, str(REPO))
    from tools.bench_train import VARIANTS

    default = re.search(r"TRAIN_VARIANTS=\$\{TRAIN_VARIANTS:-([^}]*)\}", script).group(1)
    names = default.replace("\\\n", " ").split()
    assert "packed" in names and "reference" in names
    assert set(names) <= set(VARIANTS), set(names) - set(VARIANTS)
    for path in re.findall(r"tools/\w+\.(?:py|sh)", script):
        assert (REPO / path).exists(), path


def test_bench_llm_layers_table():
    """The LLM-only benchmark runs both variants; on a CPU nothing is fused by default (the
    kernels need a GPU, the weight-gradient fusion runs on GPUs), so both run the same ops."""
    proc = _run(["tools/bench_llm_layers.py", "--layers", "2", "--tokens", "128",
                 "--segments", "4", "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("unfused ", "fused "))}
    assert set(rows) == {"unfused", "fused"}, proc.stdout
    assert rows["unfused"][2] == rows["fused"][2] and float(rows["fused"][2]) > 0, proc.stdout
    assert "fused, 1 row(s): rope Megatron's per-sample loop | swiglu torch ops | wgrad fused " \
           "False" in proc.stderr


def test_bench_vision_table():
    proc = _run(["tools/bench_vision.py", "--views", "2", "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.startswith(("timm ", "fused "))]
    assert [r[0] for r in rows] == ["timm", "fused"], proc.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert all(float(r[-1]) < 1e-5 for r in rows), proc.stdout  # fp32: the same tokens
    if not torch.cuda.is_available():
        proc = _run(["tools/bench_vision.py", "--variants", "fused-graph"])
        assert proc.returncode == 2 and "has no GPU: drop it" in proc.stderr, proc.stderr


def test_bench_vision_compiled_encoders():
    """The torch.compile'd encoders (opt-in row, for the GPU check) give the eager tokens."""
    proc = _run(["tools/bench_vision.py", "--views", "2", "--repeats", "1", "--variants",
                 "compiled"], env={"TORCH_COMPILE_DISABLE": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("compiled"))
    assert float(row[1]) > 0 and float(row[-1]) < 1e-4, proc.stdout
    proc = _run(["tools/bench_vision.py", "--variants", "compiled"],
                env={"TORCH_COMPILE_DISABLE": "1"})
    assert proc.returncode == 2 and "unset it for this run" in proc.stderr, proc.stderr


def test_bench_images_says_what_share_dali_decoded():
    """The image benchmark's rows, with the share of images DALI decoded (H100 run 4 could not
    tell whether its slow DALI rows had decoded anything)."""
    sys.path.insert(0, str(REPO))
    from tests.files import TEST_IMAGES
    from tools.bench_data import bench_images

    datas = [p.read_bytes() for p in sorted(TEST_IMAGES.glob("*.jpg"))][:4]
    rows = {r[0]: r for r in bench_images(datas, threads=1, batch=2, seconds=0.01)}
    assert list(rows) == ["DALI cpu 1x1 workers", "DALI cpu 1x1 threads", "Pillow plain uint8",
                          "Pillow reference (exact)"]
    assert [r[-1] for r in rows.values()] == ["100%", "100%", "-", "-"]
    assert all(r[1] > 0 for r in rows.values())
