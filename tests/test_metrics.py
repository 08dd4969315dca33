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


def test_a_resume_drops_the_records_it_repeats(tmp_path, caplog):
    """A run stopped at step 5 whose last checkpoint is step 3 resumes at step 4: its records of
    steps 4 and 5 go (this run writes them again), the rest stays."""
    run = tmp_path / "run"
    w = MetricsWriter(run, enabled=True, first_step=1)
    for step in range(1, 6):
        w.write(_record(step), console=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "total_st')  # killed while writing step 6
    caplog.set_level(logging.INFO)
    w = MetricsWriter(run, enabled=True, first_step=4)
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2, 3]
    assert "dropped 3 records of steps from 4 on" in caplog.text
    w.write(_record(4, loss=1.0), console=False)
    assert [(r["step"], r["loss"]) for r in _lines(run / "metrics.jsonl")] == [
        (1, 2.5), (2, 2.5), (3, 2.5), (4, 1.0)]


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_follow_the_records(tmp_path):
    """Every number of a record becomes a scalar at its step (``eval_*`` under ``eval/``); a
    missing gradient norm (a skipped step) is no scalar; a resume purges the repeated steps."""
    tb = tmp_path / "tb"
    w = MetricsWriter(tmp_path / "run", enabled=True, tensorboard_dir=tb, first_step=1)
    w.write(_record(1, loss=3.0), console=False)
    w.write(_record(2, loss=2.0, grad_norm=None, eval_loss=2.25, eval_time_s=0.5,
                    eval_loss_tokens=99), console=False)
    w.write(_record(3, loss=1.5), console=False)
    w.close()
    got = _scalars(tb)
    assert got["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert got["train/grad_norm"] == [(1, 0.75), (3, 0.75)]
    assert got["eval/loss"] == [(2, 2.25)] and got["eval/time_s"] == [(2, 0.5)]
    assert got["train/tokens_per_s"][0] == (1, 640.0)
    w = MetricsWriter(tmp_path / "run", enabled=True, tensorboard_dir=tb, first_step=3)
    w.write(_record(3, loss=1.25), console=False)
    w.close()
    assert _scalars(tb)["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.25)]


def test_other_ranks_write_no_tensorboard_events(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False, tensorboard_dir=tmp_path / "tb")
    w.write(_record(1), console=False)
    w.close()
    assert not (tmp_path / "tb").exists()
