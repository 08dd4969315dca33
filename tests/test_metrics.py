"""metrics.jsonl (rank 0 only, appended across resumes) and the console line of a step."""
from __future__ import annotations

import json
import logging

from megatron_sphinx.train.metrics import MetricsWriter


def _record(step: int, **kw) -> dict:
    return {"step": step, "total_steps": 10, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.75,
            "tokens": 128, "tokens_per_s": 640.0, "step_time_s": 0.2, "tflops_per_gpu": 1.5,
            **kw}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_appended_across_writers(tmp_path):
    """A resumed run opens a new writer on the same directory: earlier steps stay."""
    run = tmp_path / "run"
    MetricsWriter(run, enabled=True).write(_record(1), console=False)
    w = MetricsWriter(run, enabled=True)
    w.write(_record(2), console=False)
    w.write(_record(3, loss=1.0), console=False)
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2, 3]
    assert _lines(run / "metrics.jsonl")[2] == _record(3, loss=1.0)


def test_other_ranks_write_and_log_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megatron_sphinx.train")
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write(_record(1))
    assert not (tmp_path / "run").exists()
    assert caplog.records == []


def test_console_line_only_when_asked(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megatron_sphinx.train")
    w = MetricsWriter(tmp_path, enabled=True)
    w.write(_record(1), console=False)
    assert caplog.records == []
    w.write(_record(2))
    assert [r.getMessage() for r in caplog.records] == [
        "step     2/10 | loss 2.5000 | lr 1.000e-04 | grad_norm 0.750 | tokens 128 | 640 tok/s | "
        "0.200 s/step | 1.50 TFLOP/s/gpu"]
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_without_a_save_directory_only_the_console_line(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="megatron_sphinx.train")
    record = _record(1)
    del record["tflops_per_gpu"]  # records without a FLOP count show 0
    MetricsWriter(None, enabled=True).write(record)
    assert list(tmp_path.iterdir()) == []
    assert caplog.records[0].getMessage().endswith("| 0.00 TFLOP/s/gpu")


def test_a_step_without_gradient_norm(tmp_path, caplog):
    """Megatron reports no norm for a step it skips (non-finite gradients): null in the file,
    '-' on the console (it was logged as 0.0)."""
    caplog.set_level(logging.INFO, logger="megatron_sphinx.train")
    MetricsWriter(tmp_path, enabled=True).write(_record(1, grad_norm=None))
    assert "| grad_norm - |" in caplog.records[0].getMessage()
    assert _lines(tmp_path / "metrics.jsonl")[0]["grad_norm"] is None
