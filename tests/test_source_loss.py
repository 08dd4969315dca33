"""The loss of every mix source, beside the global one: the per-source numbers are the same
tokens' losses regrouped, so their token-weighted mean is the loss, and every layout gives
the same numbers."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_sphinx.data.layout import Sample, build_packed_batch
from megatron_sphinx.data.sample_source import InMemorySource
from megatron_sphinx.train.step import loss_func
from tests.dist_harness import run_ranks
from tests.stores import write_source_store

NAMES = ["chat", "ocr", "unused"]


def _two_source_store(path: Path, n: int = 48) -> Path:
    """Text-only dialogs of two sources (the second with longer answers: a different loss);
    the third source has no sample."""
    rng = np.random.default_rng(3)
    samples = []
    for k in range(n):
        source = k % 2
        ids = rng.integers(3, 500, int(rng.integers(40, 200 + 200 * source))).astype(np.int32)
        ids[0] = 1
        samples.append(Sample(ids, np.arange(len(ids)) > len(ids) // 3, None, 1, source))
    write_source_store(path, InMemorySource(samples, [None] * n), NAMES, seq_length=2048)
    return path


def test_loss_func_regroups_the_same_token_losses_by_source():
    rows = [[Sample(np.arange(1, 9, dtype=np.int32), np.arange(8) > 2, None, 1, 2),
             Sample(np.arange(1, 6, dtype=np.int32), np.arange(5) > 0, None, 1, 0)]]
    pb = build_packed_batch(rows, 16, 448, 2)
    assert pb.loss_sources.tolist() == [[2] * 8 + [0] * 5 + [-1] * 3]
    losses = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    total, tokens, report = loss_func(pb.loss_mask, pb.loss_sources, 3, losses)
    per = report["source loss"]
    mask = pb.loss_mask.reshape(-1)
    for source in range(3):
        where = (pb.loss_sources.reshape(-1) == source).float() * mask
        assert per[0, source] == pytest.approx(float((losses.reshape(-1) * where).sum()))
        assert per[1, source] == float(where.sum())
    assert float(per[0].sum()) == pytest.approx(float(total)) and float(per[1].sum()) == tokens
    assert per[1, 1] == 0  # no sample of source 1
    _, _, one = loss_func(pb.loss_mask, pb.loss_sources, 1, losses)
    assert "source loss" not in one  # one source: nothing to regroup


def _train(rank, world_size, save, store, **kw):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    run(RunConfig(recipe="debug", data=store, steps=2, global_batch_size=4, seq_length=1400,
                  save=save, eval_split=0.25, eval_batches=1, **kw))
    return 0


def _records(save) -> list[dict]:
    return [json.loads(line) for line in Path(save, "metrics.jsonl").read_text().splitlines()]


def test_every_step_reports_each_source_and_every_layout_agrees(tmp_path):
    store = str(_two_source_store(tmp_path / "mix.zarr"))
    one, dp2 = str(tmp_path / "one"), str(tmp_path / "dp2")
    assert run_ranks(_train, 1, one, store, timeout=300) == [0]
    assert run_ranks(_train, 2, dp2, store, timeout=300) == [0, 0]
    ref, got = _records(one), _records(dp2)
    for r in ref:
        assert set(r["source_loss"]) == {"chat", "ocr"}  # "unused" has no token
        tokens = r["source_loss_tokens"]
        assert tokens["unused"] == 0 and tokens["chat"] + tokens["ocr"] == r["loss_tokens"]
        mean = sum(r["source_loss"][n] * tokens[n] for n in r["source_loss"]) / r["loss_tokens"]
        assert mean == pytest.approx(r["loss"], rel=1e-6)
        assert r["source_loss"]["chat"] != pytest.approx(r["source_loss"]["ocr"], rel=1e-3)
    last = ref[-1]
    assert set(last["eval_source_loss"]) <= {"chat", "ocr"} and last["eval_source_loss"]
    values = list(last["eval_source_loss"].values())
    assert min(values) - 1e-9 <= last["eval_loss"] <= max(values) + 1e-9
    pp2 = str(tmp_path / "pp2")  # reported by the last stage, shared over the pipeline
    assert run_ranks(partial(_train, pp=2), 2, pp2, store, timeout=300) == [0, 0]
    for a, r in zip(ref, _records(pp2)):  # (its own initial weights: other loss values)
        tokens = r["source_loss_tokens"]
        assert tokens == a["source_loss_tokens"]  # the same batches
        mean = sum(r["source_loss"][n] * tokens[n] for n in r["source_loss"]) / r["loss_tokens"]
        assert mean == pytest.approx(r["loss"], rel=1e-6)
    for a, b in zip(ref, got):  # the same tokens, split over two data-parallel ranks
        assert b["source_loss_tokens"] == a["source_loss_tokens"]
        for name, value in a["source_loss"].items():
            assert b["source_loss"][name] == pytest.approx(value, rel=1e-5), name
        for name, value in a.get("eval_source_loss", {}).items():
            assert b["eval_source_loss"][name] == pytest.approx(value, rel=1e-5), name


def test_tensorboard_gets_a_curve_per_source(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = str(_two_source_store(tmp_path / "mix.zarr"))
    save, tb = str(tmp_path / "run"), str(tmp_path / "tb")
    assert run_ranks(partial(_train, tensorboard_dir=tb), 1, save, store, timeout=300) == [0]
    events = EventAccumulator(tb)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_by_source/chat", "train/loss_by_source/ocr"} <= tags
    rec = _records(save)
    assert [(e.step, e.value) for e in events.Scalars("train/loss_by_source/ocr")] == [
        (r["step"], pytest.approx(r["source_loss"]["ocr"], rel=1e-6)) for r in rec]
    assert any(t.startswith("eval/loss_by_source/") for t in tags)
