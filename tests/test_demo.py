"""A shortened demo: the debug recipe on the embedded sample data, TP=2 over two gloo ranks."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from tests.dist_harness import run_ranks


def _train(rank, world_size, save):
    from megatron_sphinx.train.loop import run
    from megatron_sphinx.train.run_config import RunConfig

    run(RunConfig(recipe="debug", tp=2, steps=16, save=save, global_batch_size=2,
                  eval_split=0.05, eval_interval=8, eval_batches=2))
    return 0


def test_short_demo_loss_falls_and_checkpoint_is_saved(tmp_path):
    save = tmp_path / "demo"
    assert run_ranks(partial(_train), 2, str(save), timeout=600) == [0, 0]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 17))
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 0.5, (first, last)  # a real fall, not noise
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert [s for s, _ in evals] == [8, 16] and evals[1][1] < evals[0][1], evals  # held out
    assert all(r["skipped_views"] >= 0 and r["tokens"] > 0 for r in rows)
    assert sum(r["skipped_views"] for r in rows) > 0  # wide images in the mix were skipped
    assert (save / "latest").read_text() == "iter_0000016"
    assert (save / "iter_0000016" / "meta.json").exists()
    assert Path(save / "run.json").exists()
