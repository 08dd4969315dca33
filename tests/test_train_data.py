"""The training loop's data: the store loader built for a run, and the step summary counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sphinx.config import get_recipe
from megatron_sphinx.data.geometry import POSITIONS_PER_SKIP, POSITIONS_PER_VIEW
from megatron_sphinx.data.layout import Sample, build_packed_batch
from megatron_sphinx.data.sample_source import InMemorySource
from megatron_sphinx.train.data import TRIM_MULTIPLE, build_loader, loader_summary
from megatron_sphinx.train.run_config import RunConfig
from tests.stores import write_source_store


def _text_store(path, n=12):
    rng = np.random.default_rng(0)
    samples = []
    for k in range(n):
        ids = rng.integers(3, 500, int(rng.integers(20, 200))).astype(np.int32)
        ids[0] = 1
        samples.append(Sample(ids, np.arange(len(ids)) > 3, None, 1, 0))
    write_source_store(path, InMemorySource(samples, [None] * n), ["text"], seq_length=2048)
    return path


@pytest.mark.parametrize("pp,multiple", [(1, TRIM_MULTIPLE), (2, None)])
def test_rows_trimmed_only_without_pipelining(tmp_path, pp, multiple):
    """Pipeline stages exchange fixed [seq_length, b, h] tensors: no trimming with pp > 1."""
    cfg = get_recipe("debug")
    store = _text_store(tmp_path / "s.zarr")
    loader = build_loader(RunConfig(data=str(store), pp=pp), cfg, dp_rank=0, dp_size=1)
    with loader:
        assert loader.cfg.pad_to_multiple == multiple
        shapes = {pb.shape[1] for pb in loader.next_step()}
    if multiple is None:
        assert shapes == {cfg.train.seq_length}
    else:
        assert all(s % multiple == 0 and s <= cfg.train.seq_length for s in shapes)


def test_loader_summary_counts(tmp_path):
    wide = Sample(np.arange(1, 40), np.ones(39, bool), (60, 400), 1)  # 2 of 4 sub-images padded
    text = Sample(np.arange(1, 30), np.ones(29, bool))
    length = wide.length(448, 2) + text.length(448, 2)
    views = torch.zeros(3, 3, 224, 224)
    pb = build_packed_batch([[wide, text]], length + 10, 448, 2, views)
    assert pb.num_skipped == 2 and int(pb.view_counts.sum()) == 3
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                         world_size=1)
    try:
        got = loader_summary([pb, pb], None, torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
    assert got["tokens"] == 2 * pb.num_tokens and got["samples"] == 4
    assert got["positions"] == 2 * (length + 10) and got["positions"] > got["tokens"]
    assert got["skipped"] == 4 and got["views"] == 6
    assert got["visual_tokens_saved"] == 4 * (POSITIONS_PER_VIEW - POSITIONS_PER_SKIP)


def test_synthetic_prefetch_gives_the_same_batches():
    """The training command's synthetic loader makes the next global batch in a background
    thread on GPUs; its batches are those of the loader without it, also after a rewind and a
    close."""
    from dataclasses import fields

    from megatron_sphinx.data.synthetic import SyntheticLoader

    cfg = get_recipe("debug")
    built = build_loader(RunConfig(data="synthetic"), cfg, dp_rank=0, dp_size=1)
    assert isinstance(built, SyntheticLoader) and built.prefetch == torch.cuda.is_available()
    args = (cfg.llm.vocab_size, cfg.train.seq_length, cfg.vision.image_size, cfg.vision.grid,
            cfg.train.global_batch_size)
    loader = SyntheticLoader(*args, seed=cfg.train.seed, prefetch=True)
    plain = SyntheticLoader(*args, seed=cfg.train.seed)

    def same(a, b):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for f in fields(x):
                u, v = getattr(x, f.name), getattr(y, f.name)
                assert torch.equal(u, v) if torch.is_tensor(u) else u == v, f.name

    got = [loader.next_step() for _ in range(3)]
    want = [plain.next_step() for _ in range(3)]
    for a, b in zip(got, want):
        same(a, b)
    assert not torch.equal(got[0][0].views, got[1][0].views)  # steps differ
    loader.load_state_dict({"step": 1})  # rewind: the batch made ahead (step 3) is not used
    same(loader.next_step(), want[1])
    loader.close()
    assert loader.state_dict() == {"step": 2}
    same(loader.next_step(), want[2])  # starts its thread again
    loader.close()
