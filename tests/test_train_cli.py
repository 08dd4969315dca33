"""Bad input to the training command: one clear line, exit code 2, nothing overwritten."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sphinx.train.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if "Warning" not in line and not line.startswith("  ")]  # library import warnings
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_unknown_recipe(capsys):
    assert "choose one of" in _err(capsys, ["--recipe", "sphinx-huge"])


@pytest.mark.parametrize("argv,needle", [
    (["--tp", "3"], "tp"),
    (["--recipe", "debug-moe", "--ep", "3"], "ep"),
    (["--pp", "3"], "pp"),
    (["--global-batch-size", "3", "--micro-batch-size", "2"], "--micro-batch-size"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1"),
])
def test_parallel_sizes_that_do_not_divide(capsys, argv, needle):
    # checked before any process group exists: the layout is compared with the launcher's
    # world size (1 here) and with the model's heads, layers and experts
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


def test_load_of_a_directory_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "no complete checkpoint" in _err(capsys, ["--load", str(tmp_path)])


def _fake_checkpoint(root: Path, recipe: str) -> Path:
    ckpt = root / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({
        "step": 2, "recipe": recipe, "layout": {}, "code_version": "x", "consumed": {}}))
    return root


def test_load_of_another_recipe(capsys, tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "moe", "debug-moe")
    assert "recipe 'debug-moe'" in _err(capsys, ["--recipe", "debug", "--load", str(ckpt)])


def test_save_onto_a_foreign_directory_is_refused_and_untouched(capsys, tmp_path):
    (tmp_path / "precious.bin").write_bytes(b"x" * 10)
    assert "not empty" in _err(capsys, ["--save", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.bin"]


def test_save_onto_a_run_of_another_recipe(capsys, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "debug-moe"}))
    assert "belongs to a run" in _err(capsys, ["--save", str(tmp_path)])


def test_command_line_exit_code_and_single_line():
    proc = subprocess.run([sys.executable, "-m", "megatron_sphinx.train", "--recipe", "nope"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown recipe 'nope'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("argv,needle", [
    (["--fp8"], "drop --fp8"),
    (["--fp8", "--backend", "local"], "drop --backend local"),
])
def test_fp8_where_it_cannot_run(capsys, argv, needle):
    assert needle in _err(capsys, ["--recipe", "debug", *argv])


def test_kernel_choices_logged_and_no_final_save(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_sphinx.train", "--recipe", "debug",
                           "--steps", "1", "--global-batch-size", "1", "--no-final-save",
                           "--save", str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # --no-final-save: the step's metrics, no checkpoint
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list((tmp_path / "run").glob("iter_*"))
    lines = [line for line in proc.stderr.splitlines() if " INFO kernels: " in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    if not torch.cuda.is_available():
        assert lines[0].endswith("kernels: layers local | attention sdpa | pack_tokens torch | "
                                 "images DALI cpu | adam torch AdamW | communication gloo")
