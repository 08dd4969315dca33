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
from megatron_sphinx.train.startup import StartupClock
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

    def load_state_dict(self, state):
        self.restored = state


def _run(monkeypatch, tmp_path, start: int = 0, records: list | None = None, evaluator=None,
         loads: list | None = None, loader_state: dict | None = None,
         data_loader: _Loader | None = None, **kw):
    """Runs ``loop._run_steps``; returns (steps trained, steps saved, steps on the console,
    exit code). The stand-in scheduler adds 1 to the learning rate per step; ``records`` gets
    every metrics record, each with ``lr_seen``, the rate the optimizer had in its step;
    ``loads`` gets the keyword arguments of each checkpoint load, whose state holds
    ``loader_state`` as the position of ``data_loader``; ``evaluator`` is passed on."""
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
    monkeypatch.setattr(loop.ckpt_lib, "load_checkpoint", lambda *a, **k: (
        loads.append(k) if loads is not None else None,
        {"step": start, "common": {"loader": loader_state}})[1])
    rc = RunConfig(save=str(tmp_path / "run"), **kw)
    cfg = get_recipe("debug")
    pgs = types.SimpleNamespace(dp=None)
    code = 0
    try:
        dims = types.SimpleNamespace(tp=1, pp=1, vpp=None, ep=1, dp=1)
        loop._run_steps(rc, cfg, dims, pgs, None,
                        types.SimpleNamespace(param_groups=groups),
                        types.SimpleNamespace(step=lambda increment: groups[0].update(
                            lr=groups[0]["lr"] + increment)), data_loader or _Loader(),
                        torch.device("cpu"), False, tmp_path / "ckpt" if start else None,
                        types.SimpleNamespace(agreed=lambda device: False), StartupClock(),
                        evaluator)
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


def test_the_first_record_of_a_process_holds_its_start_up(monkeypatch, tmp_path, caplog):
    """The first step this process runs (also after a resume) records ``startup_s``, the
    process's seconds before it; later steps do not; the phases are logged in one line."""
    for start in (0, 3):
        records = []
        with caplog.at_level("INFO", logger="megatron_sphinx.train"):
            _run(monkeypatch, tmp_path, steps=6, start=start, records=records)
        assert [r["step"] for r in records if "startup_s" in r] == [start + 1]
        assert records[0]["startup_s"] > 0
        line = [r.message for r in caplog.records if r.message.startswith("start-up ")][-1]
        assert "metrics files" in line and ("checkpoint load" in line) == bool(start), line


def test_startup_clock_adds_up_its_phases(monkeypatch):
    from megatron_sphinx.train import startup

    now = iter([10.0, 11.5, 14.0, 14.25])
    monkeypatch.setattr(startup.time, "perf_counter", lambda: next(now))
    monkeypatch.setattr(startup, "process_age_s", lambda: 4.0)
    clock = startup.StartupClock()  # at 10.0, the process 4 s old
    clock.lap("model")
    clock.lap("data")
    clock.lap("model")  # a second lap of a phase adds to it, in its first place
    assert clock.phases == [("model", 1.75), ("data", 2.5)]
    assert clock.total_s() == 8.25
    assert clock.summary() == "start-up 8.2 s: imports 4.0 | model 1.8 | data 2.5"
    monkeypatch.setattr(startup, "process_age_s", lambda: None)  # no /proc: from the clock
    now = iter([0.0, 2.0])
    clock = startup.StartupClock()
    clock.lap("model")
    assert clock.summary() == "start-up 2.0 s: model 2.0"


def test_process_age_is_read_from_proc():
    """A process that slept 1 s before asking is 1 s old (plus its interpreter's start)."""
    import os
    import subprocess
    import sys

    from megatron_sphinx.train.startup import process_age_s

    if not os.path.exists("/proc/self/stat"):
        assert process_age_s() is None
        return
    code = ("import time; time.sleep(1.0); "
            "from megatron_sphinx.train.startup import process_age_s as a; print(a())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert 0.95 <= age < 30, age


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


# ------------------------------------------------------- evaluation in the loop (mutation audit)

class _Evaluator:
    """Stand-in evaluator: its loss is the number of the call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model):
        from megatron_sphinx.train.evaluate import EvalResult

        self.calls += 1
        return EvalResult(loss=float(self.calls), num_loss_tokens=7, time_s=0.5)


def test_evaluations_every_interval_and_at_the_last_step_in_the_records(monkeypatch, tmp_path):
    records, evaluator = [], _Evaluator()
    _run(monkeypatch, tmp_path, steps=5, records=records, evaluator=evaluator,
         eval_data="synthetic", eval_interval=2)
    evaluated = [(r["step"], r["eval_loss"], r["eval_loss_tokens"], r["eval_time_s"])
                 for r in records if "eval_loss" in r]
    assert evaluated == [(2, 1.0, 7, 0.5), (4, 2.0, 7, 0.5), (5, 3.0, 7, 0.5)]


def test_eval_only_loads_the_weights_only_and_trains_nothing(monkeypatch, tmp_path):
    loads, evaluator, data = [], _Evaluator(), _Loader()
    n, saved, console, code = _run(monkeypatch, tmp_path, start=3, steps=6, loads=loads,
                                   evaluator=evaluator, loader_state={"steps": 9},
                                   data_loader=data, eval_data="synthetic", eval_only=True)
    assert (n, saved, console, code, evaluator.calls) == (0, [], [], 0, 1)
    assert loads == [{"weights_only": True}]
    assert not hasattr(data, "restored")  # the training position is not this run's business
    assert not (tmp_path / "run").exists()  # nothing written
    loads, data = [], _Loader()  # a training resume restores the optimizer and the position
    _run(monkeypatch, tmp_path, start=3, steps=4, loads=loads, loader_state={"steps": 9},
         data_loader=data)
    assert loads == [{"weights_only": False}] and data.restored == {"steps": 9}


def _wiring(monkeypatch, **kw) -> dict:
    """What ``loop._train`` hands to the model build and the evaluator (both stand-ins)."""
    from megatron.core import tensor_parallel

    from megatron_sphinx.model import specs

    seen = {}

    class Stop(Exception):
        pass

    def evaluator(loader, batches, **k):
        seen["evaluator"] = dict(k, batches=batches)
        raise Stop

    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", lambda seed: None)
    monkeypatch.setattr(specs, "choose_backend", lambda backend: "local")
    monkeypatch.setattr(loop, "build_model", lambda *a, **k: seen.update(model=k) or ["chunk"])
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: (None, None))
    monkeypatch.setattr(loop, "build_loader", lambda *a, **k: _Loader())
    monkeypatch.setattr(loop, "kernel_choices", lambda *a, **k: {})
    monkeypatch.setattr(loop, "Evaluator", evaluator)
    monkeypatch.setattr(loop, "_run_steps", lambda *a, **k: seen.update(steps=True) or [])
    rc = RunConfig(recipe="debug", **kw)
    cfg = loop.resolve_recipe(rc)
    pgs = types.SimpleNamespace(dp=types.SimpleNamespace(rank=lambda: 0, size=lambda: 1))
    dims = types.SimpleNamespace(tp=1, pp=1, vpp=None, ep=1, dp=1,
                                 sequence_parallel=False)
    try:
        loop._train(rc, cfg, dims, pgs, torch.float32, False, None, None, StartupClock())
    except Stop:
        pass
    return seen


def test_train_passes_the_overlap_switch_and_the_evaluation_shapes(monkeypatch):
    seen = _wiring(monkeypatch, data="synthetic", eval_data="synthetic", eval_batches=3,
                   seq_length=1400, micro_batch_size=2, global_batch_size=4)
    assert seen["model"]["overlap_grad_reduce"] is seen["model"]["overlap_param_gather"] is True
    # an evaluation micro-batch is micro_batch_size rows of seq_length (pipeline p2p shapes)
    assert (seen["evaluator"]["batches"], seen["evaluator"]["seq_length"]) == (3, 2800)
    seen = _wiring(monkeypatch, data="synthetic", overlap_grad_reduce=False)
    assert seen["model"]["overlap_grad_reduce"] is False and "evaluator" not in seen
    seen = _wiring(monkeypatch, data="synthetic", overlap_param_gather=False)
    assert seen["model"]["overlap_param_gather"] is False


def test_a_step_megatron_skips_reports_no_gradient_norm(monkeypatch):
    """Megatron's optimizer returns no norm for a step it skips (non-finite gradients): the
    step result keeps None (it was 0.0, a real-looking norm)."""
    from megatron_sphinx.train import step

    monkeypatch.setattr(step, "run_schedule", lambda *a, **k: [])
    monkeypatch.setattr(step, "global_loss", lambda reports, **k: step.LossTotals(12.0, 4))
    chunk = types.SimpleNamespace(zero_grad_buffer=lambda: None)
    for reported, want in ((None, None), (0.25, 0.25)):
        opt = types.SimpleNamespace(zero_grad=lambda: None,
                                    step=lambda r=reported: (r is not None, r, None))
        res = step.train_step([chunk], opt, [], num_microbatches=1, seq_length=8,
                              pg_collection=None, device=torch.device("cpu"), dp_group=None)
        assert (res.loss, res.grad_norm, res.num_loss_tokens) == (3.0, want, 4)
        assert res.update_successful is (reported is not None)


def test_a_layout_error_is_a_value_error_marked_same_on_every_rank():
    """Callers of ``run`` catch ValueError for bad input; the CLI prints this kind once."""
    from megatron_sphinx.cli import SameOnEveryRank

    with pytest.raises(ValueError, match="tp") as info:
        loop.run(RunConfig(recipe="debug", data="synthetic", tp=3))
    assert isinstance(info.value, SameOnEveryRank)
