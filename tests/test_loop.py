"""The training loop's schedule: learning rate, save cadence, console lines, stops, resume step.

The loop's bookkeeping runs here with its collaborators replaced (no model, no process group):
what is checked is which steps run, which are saved and logged, and the learning rate each step
gets. Real training runs are in ``tests/test_resume.py`` and ``tests/test_train_cli.py``.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from megatron_sphinx.config import get_recipe
from megatron_sphinx.train import build, loop
from megatron_sphinx.train.run_config import RunConfig
from megatron_sphinx.train.step import StepResult


def _schedule(monkeypatch, steps: int, lr: float = 1e-3) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps (what step k runs with)."""
    groups = [{"params": []}]
    fake = types.SimpleNamespace(param_groups=groups, scale_loss=None)
    monkeypatch.setattr(build, "get_megatron_optimizer", lambda *a, **k: fake)
    cfg = get_recipe("debug")
    cfg.train.lr, cfg.train.min_lr, cfg.train.warmup_fraction = lr, 0.0, 0.01
    _, scheduler = build.build_optimizer(cfg, [], None, dtype=torch.float32, total_steps=steps)
    out = []
    for _ in range(steps):
        out.append(groups[0]["lr"])
        scheduler.step(increment=1)
    out.append(groups[0]["lr"])  # after the last step
    return out


def test_warmup_is_one_percent_rounded_up_then_cosine_to_zero(monkeypatch):
    lr = 1e-3
    got = _schedule(monkeypatch, 300, lr)  # warm-up ceil(0.01 * 300) = 3 steps
    warm = 3
    for k in range(warm + 1):
        assert got[k] == pytest.approx(lr * k / warm, rel=1e-9), k
    for k in (warm + 1, 100, 151, 299):
        want = 0.5 * lr * (1 + math.cos(math.pi * (k - warm) / (300 - warm)))
        assert got[k] == pytest.approx(want, rel=1e-9, abs=1e-15), k
    assert got[300] == 0.0  # the cosine ends at min_lr = 0 with the run
    short = _schedule(monkeypatch, 20, lr)  # 0.2 steps of warm-up: rounded up to one
    assert short[0] == 0.0 and short[1] == pytest.approx(lr)
    assert short[20] == 0.0


class _Loader:
    def __init__(self):
        self.steps = 0

    def next_step(self):
        self.steps += 1
        return [object()]

    def state_dict(self):
        return {"steps": self.steps}


def _run(monkeypatch, tmp_path, start: int = 0, records: list | None = None, **kw):
    """Runs ``loop._run_steps``; returns (steps trained, steps saved, steps on the console,
    exit code). The stand-in scheduler adds 1 to the learning rate per step; ``records`` gets
    every metrics record, each with ``lr_seen``, the rate the optimizer had in its step."""
    trained, saved, logged = [], [], []
    groups = [{"lr": 0.0}]
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: trained.append(groups[0]["lr"]) or
                        StepResult(1.0, 1.0, 10, True))
    monkeypatch.setattr(loop, "loader_summary", lambda *a: dict(
        tokens=10, attention_pairs=10, views=0, samples=1, skipped=0, positions=20))
    monkeypatch.setattr(loop, "step_flops", lambda *a: {"total": 1.0})
    monkeypatch.setattr(loop.MetricsWriter, "write", lambda self, rec, console=True: (
        (records.append(dict(rec, lr_seen=trained[-1])) if records is not None else None,
         logged.append(rec["step"]) if console else None)))
    monkeypatch.setattr(loop.ckpt_lib, "save_checkpoint",
                        lambda save_dir, step, *a, **k: saved.append(step))
    monkeypatch.setattr(loop.ckpt_lib, "load_checkpoint", lambda *a, **k: {"step": start})
    rc = RunConfig(save=str(tmp_path / "run"), **kw)
    cfg = get_recipe("debug")
    pgs = types.SimpleNamespace(dp=None)
    code = 0
    try:
        loop._run_steps(rc, cfg, types.SimpleNamespace(tp=1, pp=1, ep=1, dp=1), pgs, None,
                        types.SimpleNamespace(param_groups=groups),
                        types.SimpleNamespace(step=lambda increment: groups[0].update(
                            lr=groups[0]["lr"] + increment)), _Loader(),
                        torch.device("cpu"), False, tmp_path / "ckpt" if start else None,
                        types.SimpleNamespace(agreed=lambda device: False))
    except SystemExit as exc:
        code = exc.code
    return len(trained), saved, logged, code


def test_save_interval_and_final_save(monkeypatch, tmp_path):
    n, saved, _, code = _run(monkeypatch, tmp_path, steps=10, save_interval=4)
    assert (n, saved, code) == (10, [4, 8, 10], 0)
    n, saved, _, _ = _run(monkeypatch, tmp_path, steps=8, save_interval=4, final_save=False)
    assert (n, saved) == (8, [4])  # the interval never saves the last step: the final save does


def test_console_lines_every_log_interval_and_the_last_step(monkeypatch, tmp_path):
    _, _, console, _ = _run(monkeypatch, tmp_path, steps=7, log_interval=3)
    assert console == [3, 6, 7]


def test_exit_interval_saves_and_requeues_except_at_the_end(monkeypatch, tmp_path):
    n, saved, _, code = _run(monkeypatch, tmp_path, steps=10, exit_interval=4)
    assert (n, saved, code) == (4, [4], loop.EXIT_REQUEUE)
    n, saved, _, code = _run(monkeypatch, tmp_path, steps=8, exit_interval=4, start=4)
    assert (n, saved, code) == (4, [8], 0)  # steps 5..8; the last step finishes the run


def test_resume_continues_after_the_checkpoints_step(monkeypatch, tmp_path):
    n, saved, console, code = _run(monkeypatch, tmp_path, steps=6, start=3)
    assert (n, console, saved, code) == (3, [4, 5, 6], [6], 0)
    n, saved, _, _ = _run(monkeypatch, tmp_path, steps=6, start=6)  # already done
    assert (n, saved) == (0, [])


def test_metrics_lr_is_the_rate_the_step_used(monkeypatch, tmp_path):
    records = []
    _run(monkeypatch, tmp_path, steps=4, records=records)
    assert [(r["step"], r["lr"]) for r in records] == [(1, 0.0), (2, 1.0), (3, 2.0), (4, 3.0)]
    assert all(r["lr"] == r["lr_seen"] for r in records)


def test_stop_request_covers_start_up(monkeypatch):
    """``--exit-after-minutes`` counts the job's start-up (process groups, model, checkpoint
    load) and a stop signal then is a graceful stop: the handlers are in place before it."""
    from megatron_sphinx import distributed

    order = []
    monkeypatch.setattr(loop, "StopRequest", lambda minutes: order.append(("stop", minutes)))

    def init_distributed(*a, **k):
        order.append("process groups")
        raise RuntimeError("start-up reached")

    monkeypatch.setattr(distributed, "init_distributed", init_distributed)
    with pytest.raises(RuntimeError, match="start-up reached"):
        loop.run(RunConfig(recipe="debug", data="synthetic", steps=2, exit_after_minutes=5))
    assert order == [("stop", 5), "process groups"]


def test_schedule_flags_reach_the_optimizer_and_the_schedule(monkeypatch):
    """--lr, --min-lr, --warmup-fraction, --weight-decay and --clip-grad override the recipe."""
    seen = {}
    groups = [{"params": []}]

    def fake_optimizer(ocfg, *a, **k):
        seen["ocfg"] = ocfg
        return types.SimpleNamespace(param_groups=groups, scale_loss=None)

    monkeypatch.setattr(build, "get_megatron_optimizer", fake_optimizer)
    cfg = loop.resolve_recipe(RunConfig(recipe="debug", lr=1e-3, min_lr=1e-4, warmup_fraction=0.0,
                                        weight_decay=0.1, clip_grad=0.0))
    _, scheduler = build.build_optimizer(cfg, [], None, dtype=torch.float32, total_steps=10)
    ocfg = seen["ocfg"]
    assert (ocfg.lr, ocfg.min_lr, ocfg.weight_decay, ocfg.clip_grad) == (1e-3, 1e-4, 0.1, 0.0)
    lrs = []
    for _ in range(10):
        lrs.append(groups[0]["lr"])
        scheduler.step(increment=1)
    assert lrs[0] == pytest.approx(1e-3)  # no warm-up: step 1 runs at the peak
    assert groups[0]["lr"] == pytest.approx(1e-4)  # the cosine ends at --min-lr
    assert groups[0]["weight_decay"] == pytest.approx(0.1)
    default = loop.resolve_recipe(RunConfig(recipe="debug")).train
    assert (default.min_lr, default.warmup_fraction, default.weight_decay, default.clip_grad) == (
        0.0, 0.01, 0.0, 1.0)
