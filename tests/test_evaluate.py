"""Held-out evaluation: the same loss on every layout and after a resume, training untouched."""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sphinx import cpu_compat
from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.sample_source import InMemorySource
from megatron_sphinx.data.synthetic import SyntheticLoader
from megatron_sphinx.train import checkpoint as ckpt_lib
from megatron_sphinx.train.evaluate import Evaluator, evaluation_due
from megatron_sphinx.train.metrics import MetricsWriter
from megatron_sphinx.train.step import LossTotals
from tests.dist_harness import run_ranks
from tests.sphinx_runs import GLOBAL_BATCH, SEQ, save_initial_weights, setup
from tests.stores import write_source_store

COMMON = dict(recipe="debug", data="synthetic", steps=4, global_batch_size=2, seq_length=1400)


def test_evaluation_due_every_interval_and_at_the_last_step():
    assert [s for s in range(1, 8) if evaluation_due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if evaluation_due(s, 0, 7)] == [7]


def test_an_evaluation_is_logged_whatever_the_console_interval(tmp_path, caplog):
    rec = {"step": 3, "total_steps": 9, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens": 5,
           "tokens_per_s": 1.0, "step_time_s": 1.0, "eval_loss": 2.5, "eval_loss_tokens": 40,
           "eval_time_s": 0.5}
    with caplog.at_level(logging.INFO, logger="megatron_sphinx.train"):
        MetricsWriter(tmp_path, enabled=True).write(rec, console=False)
    assert [r.getMessage() for r in caplog.records] == [
        "step     3/9 | eval loss 2.5000 | 40 tokens | 0.50 s"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["eval_loss"] == 2.5


# --------------------------------------------------------------- every layout, the same loss

def _evaluate_layout(rank, world_size, recipe, layout, init_ckpt):
    """Two evaluations of the initial weights on ``layout``: (loss, loss again, tokens)."""
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, _ = setup(world_size, recipe, **layout)
        ckpt_lib.load_checkpoint(ckpt_lib.resolve_load(init_ckpt), model, opt, sched, pgs)
        loader = SyntheticLoader(cfg.llm.vocab_size, SEQ, cfg.vision.image_size,
                                 cfg.vision.grid, GLOBAL_BATCH, pgs.dp.rank(), pgs.dp.size(),
                                 seed=11)
        evaluate = Evaluator(loader, 2, seq_length=SEQ, pg_collection=pgs,
                             device=torch.device("cpu"))
        first, again = evaluate(model), evaluate(model)
        assert all(chunk.training for chunk in model)  # back in training mode
        grads = [p.main_grad for p in model[0].parameters() if hasattr(p, "main_grad")]
        assert grads and not any(g.any() for g in grads)  # forward only: no gradient
        return first.loss, again.loss, first.num_loss_tokens


@pytest.mark.parametrize("recipe,layouts", [
    ("debug", [(2, {}), (2, {"pp": 2}), (2, {"tp": 2}), (2, {"pp": 2, "vpp": 2})]),
    ("debug-moe", [(2, {"ep": 2})]),
], ids=["debug", "debug-moe"])
def test_evaluation_loss_is_the_same_on_every_layout(tmp_path, recipe, layouts):
    init = str(tmp_path / "init")
    run_ranks(save_initial_weights, 1, recipe, init, timeout=300)
    ref = run_ranks(_evaluate_layout, 1, recipe, {}, init, timeout=300)[0]
    assert ref[0] == ref[1] and np.isfinite(ref[0]) and ref[2] > 0  # the same batches again
    for world, layout in layouts:
        for rank_result in run_ranks(_evaluate_layout, world, recipe, layout, init, timeout=300):
            assert rank_result[2] == ref[2], layout  # the same tokens, split over the ranks
            assert rank_result[0] == pytest.approx(ref[0], rel=1e-5), layout
            assert rank_result[1] == rank_result[0], layout


# --------------------------------------------------------------- inside a training run

def _train(rank, world_size, save, **kw):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    try:
        run(RunConfig(save=save, **{**COMMON, **kw}))
    except SystemExit as exc:
        return exc.code
    return 0


def _records(save) -> dict[int, dict]:
    lines = Path(save, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def test_evaluation_leaves_training_untouched_and_resumes(tmp_path):
    plain, evald, stopped = (str(tmp_path / n) for n in ("plain", "eval", "stopped"))
    kw = dict(eval_data="synthetic", eval_interval=2, eval_batches=2)
    assert run_ranks(_train, 1, plain, timeout=300) == [0]
    assert run_ranks(partial(_train, **kw), 1, evald, timeout=300) == [0]
    base, full = _records(plain), _records(evald)
    assert [full[s]["loss"] for s in range(1, 5)] == [base[s]["loss"] for s in range(1, 5)]
    assert [s for s in full if "eval_loss" in full[s]] == [2, 4]
    assert full[2]["eval_loss"] != full[4]["eval_loss"]  # the model moved in between
    assert full[2]["eval_loss_tokens"] == full[4]["eval_loss_tokens"] > 0

    assert run_ranks(partial(_train, exit_interval=2, **kw), 1, stopped, timeout=300) == [3]
    assert run_ranks(partial(_train, **kw), 1, stopped, timeout=300) == [0]
    resumed = _records(stopped)
    for step in (2, 4):
        assert resumed[step]["eval_loss"] == full[step]["eval_loss"], step


def test_evaluation_between_interleaved_dp2_steps_leaves_training_untouched(tmp_path):
    """pp2 vpp2 dp2: the evaluation's forward passes gather the parameters bucket by bucket,
    while training's interleaved schedule starts each chunk's gather itself; the training
    losses stay those of a run without evaluation."""
    plain, evald = str(tmp_path / "plain"), str(tmp_path / "eval")
    kw = dict(pp=2, vpp=2, global_batch_size=4)
    assert run_ranks(partial(_train, **kw), 4, plain, timeout=300) == [0] * 4
    assert run_ranks(partial(_train, eval_data="synthetic", eval_interval=2, eval_batches=2,
                             **kw), 4, evald, timeout=300) == [0] * 4
    base, full = _records(plain), _records(evald)
    assert [full[s]["loss"] for s in range(1, 5)] == [base[s]["loss"] for s in range(1, 5)]
    assert [s for s in full if "eval_loss" in full[s]] == [2, 4]


def _text_store(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(n):
        ids = rng.integers(3, 500, int(rng.integers(30, 300))).astype(np.int32)
        ids[0] = 1
        samples.append(Sample(ids, np.arange(len(ids)) > len(ids) // 3, None, 1, 0))
    write_source_store(path, InMemorySource(samples, [None] * n), ["text"], seq_length=2048)
    return path


def test_a_store_is_evaluated_on_the_same_batches_every_time(tmp_path):
    store = _text_store(tmp_path / "held_out.zarr", 10)
    save = str(tmp_path / "run")
    # lr 0: the weights never move, so every evaluation must give the same number
    assert run_ranks(partial(_train, lr=0.0, steps=3, eval_data=str(store), eval_interval=1,
                             eval_batches=3), 1, save, timeout=300) == [0]
    losses = [r["eval_loss"] for r in _records(save).values()]
    assert len(losses) == 3 and np.isfinite(losses[0]) and len(set(losses)) == 1, losses


def test_a_split_run_resumes_only_with_its_split(tmp_path):
    import contextlib
    import io

    from megatron_sphinx.train.__main__ import main

    store = str(_text_store(tmp_path / "data.zarr", 40))
    save = str(tmp_path / "run")
    kw = dict(data=store, eval_split=0.2, eval_interval=2, eval_batches=2)
    assert run_ranks(partial(_train, exit_interval=2, **kw), 1, save, timeout=300) == [3]
    assert "eval_loss" in _records(save)[2]
    common = ["--recipe", "debug", "--global-batch-size", "2", "--seq-length", "1400",
              "--steps", "4", "--data", store, "--save", save]
    for other in ([], ["--eval-split", "0.3"]):  # held-out samples would join the training
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(common + other) == 2
        assert "resume with the same store and --eval-split" in err.getvalue(), other
    assert run_ranks(partial(_train, **kw), 1, save, timeout=300) == [0]
    assert sorted(_records(save)) == [1, 2, 3, 4] and "eval_loss" in _records(save)[4]


def _evaluate_only(rank, world_size, load, **kw):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    with_logs = []

    class Grab(logging.Handler):
        def emit(self, record):
            with_logs.append(record.getMessage())

    logging.getLogger("megatron_sphinx.train").addHandler(Grab())
    logging.getLogger("megatron_sphinx.train").setLevel(logging.INFO)
    assert run(RunConfig(load=load, eval_only=True, **{**COMMON, **kw})) == []
    return [m for m in with_logs if m.startswith("eval loss")]


def test_eval_only_evaluates_a_checkpoint_and_writes_nothing(tmp_path):
    from tests.files import snapshot

    save = str(tmp_path / "run")
    kw = dict(eval_data="synthetic", eval_batches=2)
    assert run_ranks(partial(_train, steps=2, **kw), 1, save, timeout=300) == [0]
    want = _records(save)[2]["eval_loss"]  # the run's own evaluation at its last step
    before = snapshot(tmp_path)
    line = run_ranks(partial(_evaluate_only, **kw), 1, save, timeout=300)[0]
    assert len(line) == 1 and line[0].startswith(f"eval loss {want:.4f} |"), (line, want)
    assert line[0].endswith("iter_0000002 at step 2"), line
    # another layout gives the same number (rank 0 logs it)
    lines = run_ranks(partial(_evaluate_only, tp=2, **kw), 2, save, timeout=300)
    assert lines[0][0].startswith(f"eval loss {want:.4f} |") and lines[1] == []
    assert snapshot(tmp_path) == before
    # the weights only: the optimizer and its schedule stay fresh, the step is the checkpoint's
    assert run_ranks(_load_weights_only, 1, save, timeout=300) == [(2, 0)]


def _load_weights_only(rank, world_size, save):
    """(step, scheduler steps) after a weights-only load of ``save``."""
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, _ = setup(world_size, "debug")
        state = ckpt_lib.load_checkpoint(ckpt_lib.resolve_load(save), model, opt, sched, pgs,
                                         weights_only=True)
        return int(state["step"]), sched.num_steps


# --------------------------------------------------------------- the evaluator's arithmetic
# (mutation audit: a fake loader and forward step, so each check is about one rule and cheap)

class _NumberedLoader:
    """Global batch ``k`` of the stream is the one micro-batch ``k`` (1, 2, ...)."""

    def __init__(self, position: int = 0):
        self.position, self.closed = position, 0

    def next_step(self):
        self.position += 1
        return [self.position]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def close(self):
        self.closed += 1


class _Chunk:
    def __init__(self):
        self.training = True

    def eval(self):
        self.training = False

    def train(self, mode: bool = True):
        self.training = mode


def _fake_eval_step(calls: list, tokens_of):
    """A forward step whose batch ``k`` has mean loss ``k`` over ``tokens_of(k)`` tokens."""
    def eval_step(model_chunks, micro, *, num_microbatches, seq_length, pg_collection, device,
                  dp_group, num_sources):
        k = micro[0]
        calls.append(dict(batch=k, training=[c.training for c in model_chunks],
                          num_microbatches=num_microbatches, seq_length=seq_length,
                          dp_group=dp_group))
        return LossTotals(float(k * tokens_of(k)), tokens_of(k))
    return eval_step


def test_evaluator_weights_every_batch_by_its_tokens_and_replays_them(monkeypatch):
    from megatron_sphinx.train import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "eval_step", _fake_eval_step(calls, lambda k: 10 * k))
    loader, chunks = _NumberedLoader(position=5), [_Chunk(), _Chunk()]
    pgs = type("Groups", (), {"dp": "dp-group"})()
    evaluate_ = Evaluator(loader, 3, seq_length=77, pg_collection=pgs,
                          device=torch.device("cpu"))
    first = evaluate_(chunks)
    loader.position = 40  # training moves the stream on; the evaluation does not follow it
    again = evaluate_(chunks)
    # batches 6, 7, 8 of 60, 70, 80 tokens: the token-weighted mean, not the mean of means (7)
    want = (6 * 60 + 7 * 70 + 8 * 80) / (60 + 70 + 80)
    assert (first.loss, first.num_loss_tokens) == (pytest.approx(want), 210)
    assert (again.loss, again.num_loss_tokens) == (first.loss, 210)
    assert [c["batch"] for c in calls] == [6, 7, 8, 6, 7, 8]
    assert all(c["training"] == [False, False] for c in calls)  # forward in eval mode
    assert all(chunk.training for chunk in chunks)  # and back in training mode after
    assert {(c["num_microbatches"], c["seq_length"], c["dp_group"]) for c in calls} == {
        (1, 77, "dp-group")}
    assert loader.closed == 2  # background workers stop between evaluations


def test_evaluation_without_trained_tokens_is_nan_and_says_so(monkeypatch, caplog):
    from megatron_sphinx.train import evaluate

    monkeypatch.setattr(evaluate, "eval_step", _fake_eval_step([], lambda k: 0))
    pgs = type("Groups", (), {"dp": None})()
    with caplog.at_level(logging.WARNING, logger="megatron_sphinx.train"):
        res = Evaluator(_NumberedLoader(), 2, seq_length=8, pg_collection=pgs,
                        device=torch.device("cpu"))([_Chunk()])
    assert np.isnan(res.loss) and res.num_loss_tokens == 0  # not a perfect 0.0
    assert any("no trained token" in r.getMessage() for r in caplog.records)


def test_eval_step_keeps_no_autograd_graph(monkeypatch):
    """Forward only under no_grad: a graph kept per micro-batch would cost the activation
    memory of training."""
    from megatron_sphinx.train import step

    seen = []
    monkeypatch.setattr(step, "run_schedule", lambda *a, **k: seen.append(
        (torch.is_grad_enabled(), k["forward_only"])) or [])
    monkeypatch.setattr(step, "global_loss", lambda reports, **k: (0.0, 0))
    assert step.eval_step([], [], num_microbatches=1, seq_length=8, pg_collection=None,
                          device=torch.device("cpu"), dp_group=None) == (0.0, 0)
    assert seen == [(False, True)]


def test_describe_names_the_evaluation_and_warns_when_it_is_not_held_out(tmp_path, caplog,
                                                                       monkeypatch):
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.evaluate import describe
    from megatron_sphinx.train.run_config import RunConfig

    cfg = get_recipe("debug")
    gbs = cfg.train.global_batch_size
    (tmp_path / "train.zarr").mkdir()
    (tmp_path / "held.zarr").mkdir()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megatron_sphinx.train"):
        line = describe(RunConfig(data="train.zarr", eval_split=0.05, eval_interval=10,
                                  eval_batches=3, steps=30), cfg)
        assert line == (f"evaluation: 3 global batches of {gbs} rows from the held-out 0.05 of "
                        "train.zarr, every 10 steps and at step 30")
        line = describe(RunConfig(data="train.zarr", eval_data=str(tmp_path / "held.zarr"),
                                  steps=30), cfg)
        assert line.endswith(f"from {tmp_path / 'held.zarr'}, at step 30")
        assert caplog.records == []  # another store: held out, no warning
        describe(RunConfig(data="train.zarr", eval_data=str(tmp_path / "train.zarr")), cfg)
    assert len(caplog.records) == 1 and "is not held out" in caplog.records[0].getMessage()


def test_evaluation_loader_reads_eval_data_and_training_reads_data(tmp_path):
    """--eval-data is the evaluation's only (training keeps --data), and the synthetic
    evaluation stream is not the training stream."""
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.data.loader import PackedLoader
    from megatron_sphinx.train.data import build_loader
    from megatron_sphinx.train.run_config import RunConfig

    cfg = get_recipe("debug")
    cfg.train.global_batch_size, cfg.train.seq_length = 2, SEQ
    store = _text_store(tmp_path / "held_out.zarr", 4)

    def loader(rc, evaluation):
        return build_loader(rc, cfg, dp_rank=0, dp_size=1, evaluation=evaluation)

    rc = RunConfig(data="synthetic", eval_data=str(store))
    train, held = loader(rc, False), loader(rc, True)
    assert isinstance(train, SyntheticLoader)
    assert isinstance(held, PackedLoader) and held.source.path == str(store)
    held.close()
    rc = RunConfig(data="synthetic", eval_data="synthetic")
    train_ids = loader(rc, False).next_step()[0].text_ids
    assert torch.equal(loader(rc, False).next_step()[0].text_ids, train_ids)
    assert not torch.equal(loader(rc, True).next_step()[0].text_ids, train_ids)
    with pytest.raises(FileNotFoundError, match=f"--eval-data {tmp_path / 'gone'} does not"):
        loader(RunConfig(data="synthetic", eval_data=str(tmp_path / "gone")), True)
