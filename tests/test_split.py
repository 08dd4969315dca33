"""The held-out split of a store: fixed, disjoint, and the same sample interface."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader
from megatron_sphinx.data.sample_source import InMemorySource
from megatron_sphinx.data.split import SubsetSource, held_out, split_source
from megatron_sphinx.data.store import StoreReader
from tests.stores import write_source_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """60 text samples over 3 sources; record k's tokens are all k + 3 (after BOS)."""
    samples = []
    for k in range(60):
        ids = np.full(20 + k, k + 3, dtype=np.int32)
        ids[0] = 1
        samples.append(Sample(ids, np.arange(len(ids)) > 5, None, 1, k % 3))
    path = tmp_path_factory.mktemp("split") / "s.zarr"
    write_source_store(path, InMemorySource(samples, [None] * 60), ["a", "b", "c"],
                       seq_length=2048)
    return StoreReader(path)


def test_the_split_is_fixed_and_about_its_fraction():
    a = held_out(20000, 0.05)
    assert np.array_equal(a, held_out(20000, 0.05))  # no seed, no state: always the same
    assert 0.045 < a.mean() < 0.055
    assert held_out(20000, 0.10)[a].all()  # a larger fraction only adds samples
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        held_out(10, 1.0)


def test_the_two_parts_partition_the_store(store):
    train, evaluation = split_source(store, 0.25)
    both = np.concatenate([train.indices, evaluation.indices])
    assert np.array_equal(np.sort(both), np.arange(len(store)))
    assert len(train) + len(evaluation) == len(store) and len(evaluation) > 0
    for part in (train, evaluation):
        assert np.array_equal(part.lengths, store.lengths[part.indices])
        assert np.array_equal(part.source_ids, store.source_ids[part.indices])
        assert np.array_equal(part.image_hw, store.image_hw[part.indices])
        assert part.source_names == ["a", "b", "c"] and part.meta.num_samples == len(part)
        i = len(part) - 1
        assert np.array_equal(part.get(i)[0].input_ids,
                              store.get(int(part.indices[i]))[0].input_ids)
    prints = {store.meta.fingerprint, train.meta.fingerprint, evaluation.meta.fingerprint}
    assert len(prints) == 3  # a resume tells the parts and the whole store apart


def test_training_never_reads_a_held_out_sample(store):
    train, evaluation = split_source(store, 0.25)
    cfg = LoaderConfig(seq_length=2048, image_size=448, grid=2, global_batch_size=2,
                       micro_batch_size=1, seed=3, num_workers=0)
    loader, seen = PackedLoader(train, cfg), set()
    for _ in range(15):  # well over one pass of the training part
        for mb in loader.next_step():
            seen |= set(np.unique(mb.text_ids.numpy()).tolist()) - {0, 1}
    def token(i):  # the store orders samples by (source, record): read each one's token back
        return int(store.get(int(i))[0].input_ids[1])

    held = {token(i) for i in evaluation.indices}
    assert seen and not seen & held
    assert seen == {token(i) for i in train.indices}  # and every training sample


def test_a_split_that_leaves_a_side_empty_is_refused(store):
    with pytest.raises(ValueError, match="leaves samples on both sides"):
        split_source(SubsetSource(store, np.arange(2), "tiny"), 0.01)


def test_the_held_out_part_is_the_fraction_and_training_gets_the_rest(store, tmp_path):
    """The evaluation reads the samples ``held_out`` picks and training the others, through
    the loaders the training command builds (mutation audit: the parts were interchangeable)."""
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.data import build_loader
    from megatron_sphinx.train.run_config import RunConfig

    mask = held_out(len(store), 0.25)
    train, evaluation = split_source(store, 0.25)
    assert np.array_equal(evaluation.indices, np.flatnonzero(mask))
    assert np.array_equal(train.indices, np.flatnonzero(~mask)) and len(evaluation) < len(train)
    cfg = get_recipe("debug")
    rc = RunConfig(recipe="debug", data=store.path, eval_split=0.25)
    for evaluation_, want in ((False, ~mask), (True, mask)):
        loader = build_loader(rc, cfg, dp_rank=0, dp_size=1, evaluation=evaluation_)
        try:
            assert np.array_equal(loader.source.indices, np.flatnonzero(want)), evaluation_
        finally:
            loader.close()


def test_a_split_that_holds_out_everything_is_refused(store):
    tiny = SubsetSource(store, np.arange(2), "tiny")
    assert held_out(2, 0.99).all()
    with pytest.raises(ValueError, match="holds out 2 of the 2 samples"):
        split_source(tiny, 0.99)
