"""The benchmark scripts that tools/gpu_check.sh runs still run (small sizes, this CPU)."""
from __future__ import annotations

import json
import os
import re
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
        # the training process's start-up (from its start to step 1) is part of what the run
        # spent outside its steps
        assert 0 < r["startup_s"] < r["launch_overhead_s"], r
        # its split and the kernels chosen, from the training log, also on the progress lines
        said = re.fullmatch(r"start-up ([\d.]+) s: imports [\d.]+ \| .*", r["startup"])
        assert said and abs(float(said[1]) - r["startup_s"]) <= 0.051, r
        assert r["kernels"].startswith("kernels: layers local"), r
        assert f"    {r['startup']}\n    {r['kernels']}\n" in proc.stderr


def test_bench_train_keeps_finished_rows_when_cut(monkeypatch, tmp_path):
    """A time limit that cuts the benchmark (gpu_check.sh's per part) keeps the variants done."""
    sys.path.insert(0, str(REPO))
    from tools import bench_train

    def run_layout(recipe, name, variant, *args):
        if variant == "packed-sdpa":
            raise KeyboardInterrupt  # stands for the time limit's kill
        return {"layout": name, "variant": variant, "error": "exit 1"}

    monkeypatch.setattr(bench_train, "run_layout", run_layout)
    out = tmp_path / "rows.json"
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--recipe", "debug", "--layouts", "tp1", "--variants", "packed",
                          "packed-sdpa", "--json", str(out)])
    assert [r["variant"] for r in json.loads(out.read_text())] == ["packed"]


def test_audit_host_syncs_lists_call_sites():
    proc = _run(["tools/audit_host_syncs.py", "--recipe", "debug"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.split("by call site:")[-1]
    # the step's own loss read, attributed to its line in the project
    assert "megatron_sphinx/train/step.py:" in table, table


def test_gpu_check_names_existing_tests():
    """Every test file and ``--deselect`` of tools/gpu_check.sh exists (a rename must not turn
    a deselected CPU-only test back on, or drop a GPU test, on the next lent machine)."""

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

    defaults = re.findall(r'TRAIN_DEFAULT="([^"]*)"', script)  # without and with TE
    assert len(defaults) == 2 and "fp8" not in defaults[1]  # FP8 needs TE (the first)
    for default in defaults:
        names = default.split()
        assert "packed" in names and "reference" in names
        assert set(names) <= set(VARIANTS), set(names) - set(VARIANTS)
    for path in re.findall(r"tools/\w+\.(?:py|sh)", script):
        assert (REPO / path).exists(), path


class _Parsed(Exception):
    """Raised in place of running a tool once its arguments are parsed."""


def test_gpu_check_commands_parse_with_their_tools(monkeypatch, tmp_path):
    """Every ``$PY tools/X.py ...`` line of tools/gpu_check.sh, as the script would expand it,
    parses with that tool's own parser (a bad variant, tile or flag name there would otherwise
    cost a lent GPU machine's minutes; bench_train also checks each variant's training
    arguments and layout, as it does before its first run, for its default variants without and
    with Transformer Engine). (``bash -n`` of the scripts: tests/test_slurm.py.)"""
    import argparse
    import importlib
    import shlex

    text = (REPO / "tools" / "gpu_check.sh").read_text().replace("\\\n", " ")
    with_te, without_te = re.findall(r'TRAIN_DEFAULT="([^"]*)"', text)
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    def stop(*args, **kwargs):
        raise _Parsed()

    sys.path.insert(0, str(REPO))
    commands = re.findall(r"\$PY (tools/\w+)\.py([^\n]*)", text)
    assert len(commands) >= 10 and ("tools/bench_train", ) in [c[:1] for c in commands]
    # bench_train twice: its default variants without and with Transformer Engine
    runs = [(tool, args, te) for tool, args in commands
            for te in ((False, True) if tool == "tools/bench_train" else (False,))]
    for tool, args, te in runs:
        args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", args)
        for var, value in {"$TRAIN_VARIANTS": with_te if te else without_te,
                           "$OUT": str(tmp_path)}.items():
            args = args.replace(var, value)
        assert "$" not in args, f"{tool}{args}: a variable this test does not expand"
        argv = shlex.split(args.split("2>")[0].split("|")[0])
        module = importlib.import_module(tool.replace("/", "."))
        with monkeypatch.context() as m:
            if tool == "tools/bench_train":  # stops before the first training run
                from megatron_sphinx.model import specs

                m.setattr(module, "run_layout", stop)
                m.setattr(torch.cuda, "is_available", lambda: True)  # the GPU-only flags
                m.setattr(torch.cuda, "device_count", lambda: 1)
                m.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))  # an H100
                m.setattr(specs, "transformer_engine_available", lambda: te)
            else:
                m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
            with pytest.raises(_Parsed):  # an argparse error (SystemExit) fails the test here
                assert module.main(argv) == 0, f"{tool}{args}"  # bench_train's fail() path


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
    assert "fused, 1 row(s): rope Megatron's per-sample loop | swiglu torch ops | loss " \
           "Megatron's | wgrad fused False" in proc.stderr


def test_bench_optimizer_table():
    """The optimizer benchmark: the fused AdamW takes fewer ops than the multi-tensor form, both
    move the parameters, and they end up within fp32 rounding of each other."""
    proc = _run(["tools/bench_optimizer.py", "--layers", "2", "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("foreach ", "fused "))}
    assert set(rows) == {"foreach", "fused"}, proc.stdout
    assert 0 < int(rows["fused"][2]) < int(rows["foreach"][2]), proc.stdout
    assert float(rows["fused"][4]) > 1e-4 and float(rows["foreach"][4]) > 1e-4, proc.stdout
    assert float(rows["fused"][5]) < 1e-6, proc.stdout
    assert "fused: torch AdamW, fused (one kernel)" in proc.stderr


def test_bench_vision_table():
    names = ["timm", "fused", "fused-tanh", "fused-dwconv", "fused-cudnn"]
    proc = _run(["tools/bench_vision.py", "--views", "2", "--repeats", "1", "--variants",
                 *names, "--dwconv-tiles", "8192,4"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    names.append("dwconv-8192x4")
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.startswith(tuple(n + " " for n in names))]
    assert [r[0] for r in rows] == names, proc.stdout
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    # fp32 (and on CPUs the epilogue's GELU is exact, the depthwise convolution torch's, no
    # cuDNN): the same tokens
    assert all(float(r[-1]) < 1e-5 for r in rows), proc.stdout
    # each encoder alone: its time and share of the two
    alone = [line.split() for line in proc.stdout.splitlines()
             if line.startswith(("convnext_xxlarge ", "vit_giant_patch14_dinov2 "))]
    assert len(alone) == 2 and all(float(r[1]) > 0 for r in alone), proc.stdout
    assert abs(sum(float(r[2].rstrip("%")) for r in alone) - 100) <= 1, proc.stdout
    if not torch.cuda.is_available():
        proc = _run(["tools/bench_vision.py", "--variants", "fused-graph"])
        assert proc.returncode == 2 and "has no GPU: drop it" in proc.stderr, proc.stderr
    proc = _run(["tools/bench_vision.py", "--dwconv-tiles", "1000,4"])
    assert proc.returncode == 2 and "--dwconv-tiles='1000,4': ELEMENTS must be a power of " \
        "two" in proc.stderr, proc.stderr


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
    assert list(rows) == ["DALI cpu 1x1 workers", "DALI cpu 1x1 threads", "DALI cpu 1x1 ahead",
                          "DALI cpu 1x1 runs only", "Pillow plain uint8",
                          "Pillow reference (exact)"]
    # "-": the rows that make no views (DALI's runs alone, Pillow)
    assert [r[-1] for r in rows.values()] == ["100%", "100%", "100%", "-", "-", "-"]
    # the GPU's rows of one setting changed each, here on the CPU pipeline
    rows = {r[0]: r for r in bench_images(datas, threads=1, batch=2, seconds=0.01,
                                          settings=True)}
    changed = ["nvJPEG upsample", "hw decoder 1.0", "uint8 resize", "batch 4"]
    assert list(rows)[4:-2] == [f"DALI cpu 1x1 {label}" for label in changed]
    assert all(rows[f"DALI cpu 1x1 {label}"][-1] == "100%" for label in changed)
    assert all(r[1] > 0 for r in rows.values())


def test_gpu_summary_table(tmp_path):
    """The GPU check's goals table: H100 run 4's recorded train.json, a pack and an images
    file in the benchmarks' formats (one goal met, one not), then an empty folder."""
    sys.path.insert(0, str(REPO))
    from tools.gpu_summary import summary

    (tmp_path / "train.json").write_text(
        (REPO / "docs" / "gpu" / "h100" / "run4" / "train.json").read_text())
    case = {"impls": {"torch": {"pct_copy": 9.0}, "cuda": {"pct_copy": 106.0}}}
    (tmp_path / "pack.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3",
         "cases": [case, {"impls": {"cuda": {"pct_copy": 129.0}}}]}))
    rows = [{"pipeline": "DALI gpu 1x16 threads", "best_per_s": 2400.0, "by_dali": "100%"},
            {"pipeline": "DALI gpu 1x16 runs only", "best_per_s": 4000.0, "by_dali": "-"},
            {"pipeline": "DALI gpu 16x1 workers", "best_per_s": 900.0, "by_dali": "100%"},
            {"pipeline": "Pillow plain uint8", "best_per_s": 287.4, "by_dali": "-"}]
    (tmp_path / "images.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3",
                                                       "threads": 16, "rows": rows}))
    lines = summary(tmp_path).splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0]
    goals = {ln[:44].strip(): ln[44:].split(None, 2) for ln in lines[2:7]}
    assert goals["sphinx-tiny MFU, one GPU, bf16"] == ["45%", "no", "34.0% (packed)"]
    assert goals["packed vs --no-packing --no-skip, tokens/s"][:3] == [
        "1.5x", "yes", "3.81x (25,093 vs 6,594)"]
    assert goals["pack kernel bandwidth, % of a d2d copy"] == [
        "80%", "yes", "106-129% (cuda, 2 shapes)"]
    assert goals["DALI mixed images/s, 448 px"] == [
        "3,000", "no", "2,400 (DALI gpu 1x16 threads, by DALI 100%); DALI's runs alone 4,000; "
        "Pillow 287 on 16 threads"]
    assert goals["TE layer spec vs local spec; FP8"] == ["pass", "-", "not measured (no log.txt)"]
    assert [ln.split()[0] for ln in lines[9:-1]] == ["packed", "packed-unfused", "packed-mbs4",
                                                   "packed-mbs1", "reference"]
    # H100 run 5's: the goal is bf16's, so FP8 rows do not count (given the best MFU here); the
    # median step's MFU beside each row (packed: one slow step of seven, 39.4% over all)
    run5 = json.loads((REPO / "docs" / "gpu" / "h100" / "run5" / "train.json").read_text())
    next(r for r in run5 if r["variant"] == "packed-fp8")["mfu"] = 0.5
    (tmp_path / "train.json").write_text(json.dumps(run5))
    lines = summary(tmp_path).splitlines()
    goals = {ln[:44].strip(): ln[44:].split(None, 2) for ln in lines[2:7]}
    assert goals["sphinx-tiny MFU, one GPU, bf16"] == [
        "45%", "no", "41.7% (packed-graphs-overlap); default packed 39.4%"]
    packed = next(ln.split() for ln in lines[9:] if ln.startswith("packed "))
    assert packed[4:6] == ["39.4%", "42.5%"], lines
    # the TE tests' outcomes from the log's pytest -rA lines: skipped (run 4), then run
    log = tmp_path / "log.txt"
    log.write_text("SKIPPED [1] tests/test_gpu.py:55: Transformer Engine is not importable on "
                   "this machine\nPASSED tests/test_gpu.py::test_gpu_bf16_training_tracks_cpu_fp32\n")
    te = [ln for ln in summary(tmp_path).splitlines() if ln.startswith("TE layer spec")][0]
    assert te.endswith("-    not run (Transformer Engine is not importable on this machine)"), te
    log.write_text("PASSED tests/test_gpu.py::test_te_spec_matches_local_spec\nFAILED "
                   "tests/test_gpu.py::test_te_fp8_tracks_te_bf16 - AssertionError: (1.0, 2.0)\n")
    te = [ln for ln in summary(tmp_path).splitlines() if ln.startswith("TE layer spec")][0]
    assert te.endswith("no   TE vs local passed; MoE grouped GEMM not run; FP8 failed"), te
    log.write_text("PASSED tests/test_gpu.py::test_te_spec_matches_local_spec\nPASSED "
                   "tests/test_gpu.py::test_te_fp8_tracks_te_bf16\nPASSED tests/test_gpu.py::"
                   "test_te_grouped_experts_match_local_experts\n")
    te = [ln for ln in summary(tmp_path).splitlines() if ln.startswith("TE layer spec")][0]
    assert te.endswith("yes  TE vs local passed; MoE grouped GEMM passed; FP8 passed"), te
    empty = tmp_path / "empty"
    empty.mkdir()
    text = summary(empty)
    assert text.count("not measured") == 5 and "training variant" not in text


def test_benchmarks_write_what_the_gpu_summary_reads(tmp_path):
    """bench_pack_kernel and bench_data write the JSON files gpu_check.sh hands to
    tools/gpu_summary.py (here on the CPU: no kernel or DALI GPU row, which it says)."""
    proc = _run(["tools/bench_pack_kernel.py", "--quick", "--repeat", "1", "--skip", "0.4",
                 "--json", str(tmp_path / "pack.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tests.files import TEST_IMAGES

    proc = _run(["tools/bench_data.py", "--threads", "1", "--batch", "4", "--interp", "linear",
                 "--seconds", "0.1", "--images-only", "--json", str(tmp_path / "images.json")],
                env={"MEGATRON_SPHINX_TESTDATA": str(TEST_IMAGES)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## loader" not in proc.stdout  # --images-only
    pack = json.loads((tmp_path / "pack.json").read_text())
    assert [c["batch"] for c in pack["cases"]] == [1, 2]
    assert all(c["impls"]["torch"]["pct_copy"] > 0 for c in pack["cases"])
    images = json.loads((tmp_path / "images.json").read_text())
    assert {r["pipeline"] for r in images["rows"]} >= {"DALI cpu 1x1 threads",
                                                       "Pillow plain uint8"}
    assert all(r["best_per_s"] > 0 for r in images["rows"])
    assert images["probe_us"] > 0 and images["probe_pillow_us"] > 0
    assert "header probe per image" in proc.stdout
    proc = _run(["tools/gpu_summary.py", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not measured (no CUDA or Triton kernel ran)" in proc.stdout
    assert "not measured (DALI ran on the CPU); Pillow" in proc.stdout
    assert "not measured (no train.json)" in proc.stdout
    proc = _run(["tools/gpu_summary.py", str(tmp_path / "nope")])
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
