"""The blended mix order: proportions, per-source epochs, determinism, restart."""
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sphinx.data.mix import BlendedMix, normalize_weights


def _ids(sizes):
    ids = np.concatenate([np.full(n, j) for j, n in enumerate(sizes)])
    return np.random.default_rng(1).permutation(ids)  # sources interleaved in the store


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.05, 10.0), min_size=1, max_size=6), st.integers(1, 3000))
def test_counts_follow_the_weights(weights, n):
    mix = BlendedMix(_ids([7] * len(weights)), weights, seed=3)
    mix.take(n)
    w = np.asarray(weights) / sum(weights)
    assert mix.counts.sum() == n == mix.position
    assert np.all(np.abs(mix.counts - w * n) <= 1.0 + 1e-9)


def test_each_source_epoch_is_a_permutation_and_epochs_differ():
    sizes = [5, 11, 3]
    ids = _ids(sizes)
    mix = BlendedMix(ids, [1, 1, 1], seed=0)
    order = mix.take(3 * 33)  # 33 draws per source: several epochs of each
    for j, n in enumerate(sizes):
        mine = [int(i) for i in order if ids[i] == j]
        assert len(mine) == 33
        members = set(np.flatnonzero(ids == j).tolist())
        epochs = [mine[a:a + n] for a in range(0, 33 - n + 1, n)]
        for e in epochs:
            assert sorted(e) == sorted(members)  # no duplicate, nothing missing
        if n > 3:
            assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch


def test_deterministic_and_seeded():
    ids = _ids([50, 20, 30])
    a = BlendedMix(ids, [2, 1, 1], seed=5).take(400)
    b = BlendedMix(ids, [2, 1, 1], seed=5).take(400)
    c = BlendedMix(ids, [2, 1, 1], seed=6).take(400)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # same source pattern whatever the seed (the blend is seed-free, the shuffles are not)
    assert np.array_equal(ids[a], ids[c])


def test_chunking_peek_seek_and_resume_give_the_same_stream():
    ids = _ids([40, 9, 25])
    ref = BlendedMix(ids, {"a": 1.0, "b": 3.0, "c": 0.5}, seed=9, names=["a", "b", "c"]).take(500)
    m = BlendedMix(ids, {"a": 1.0, "b": 3.0, "c": 0.5}, seed=9, names=["a", "b", "c"])
    parts = [m.take(k) for k in (1, 7, 100, 92, 300)]
    assert np.array_equal(np.concatenate(parts), ref)
    assert np.array_equal(m.peek(123, 77), ref[123:200])
    assert m.position == 500  # peek does not move
    m.seek(250)
    assert np.array_equal(m.take(50), ref[250:300])
    m.seek(10)
    assert np.array_equal(m.take(5), ref[10:15])
    fresh = BlendedMix(ids, {"a": 1.0, "b": 3.0, "c": 0.5}, seed=9, names=["a", "b", "c"])
    saved = BlendedMix(ids, {"a": 1.0, "b": 3.0, "c": 0.5}, seed=9, names=["a", "b", "c"])
    saved.take(321)
    fresh.load_state_dict(saved.state_dict())
    assert np.array_equal(fresh.take(179), ref[321:])


def test_zero_weight_and_empty_sources(caplog):
    ids = _ids([10, 10])
    order = BlendedMix(ids, [1.0, 0.0], seed=0).take(50)
    assert set(ids[order].tolist()) == {0}
    with caplog.at_level(logging.WARNING):
        m = BlendedMix(ids, [1.0, 1.0, 2.0], seed=0, names=["a", "b", "empty"])
    assert "empty" in caplog.text and m.weights[2] == 0
    assert m.weights.tolist() == [0.5, 0.5, 0.0]


def test_bad_weights_and_mismatched_state_are_refused():
    ids = _ids([4, 4])
    with pytest.raises(ValueError, match="one weight per source"):
        BlendedMix(ids, [1.0], seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        BlendedMix(ids, [1.0, -1.0], seed=0)
    with pytest.raises(ValueError, match="unknown sources"):
        BlendedMix(ids, {"x": 1.0}, seed=0, names=["a", "b"])
    with pytest.raises(ValueError, match="positive weight"):
        normalize_weights([0.0, 0.0], [4, 4])
    m = BlendedMix(ids, [1, 1], seed=0)
    m.take(10)
    with pytest.raises(ValueError, match="seed"):
        BlendedMix(ids, [1, 1], seed=1).load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="weights"):
        BlendedMix(ids, [1, 2], seed=0).load_state_dict(m.state_dict())


def _documented_sources(weights, n):
    """The documented rule, written out plainly: position i takes the source with the largest
    ``w_j * (i + 1) - count_j``, ties to the lower id."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(w))
    out = []
    for i in range(n):
        deficit = w * (i + 1) - counts
        j = int(np.flatnonzero(deficit == deficit.max())[0])
        counts[j] += 1
        out.append(j)
    return out


@pytest.mark.parametrize("weights", [[1, 1], [1, 3], [1, 1, 2], [2, 1, 1, 4]])
def test_source_pattern_is_the_documented_largest_deficit_rule(weights):
    ids = _ids([16] * len(weights))
    order = BlendedMix(ids, weights, seed=0).take(64)
    assert ids[order].tolist() == _documented_sources(weights, 64)
    if weights == [1, 3]:
        assert ids[order[:4]].tolist() == [1, 0, 1, 1]  # heavier source first


def test_default_weights_are_proportional_to_source_sizes():
    ids = _ids([10, 30, 20])
    mix = BlendedMix(ids, None, seed=0)
    assert mix.weights.tolist() == [10 / 60, 30 / 60, 20 / 60]
    mix.take(60)
    assert mix.counts.tolist() == [10, 30, 20]


def test_weights_by_name_in_any_order():
    ids = _ids([40, 9, 25])
    names = ["a", "b", "c"]
    a = BlendedMix(ids, {"a": 1.0, "b": 3.0, "c": 0.5}, seed=9, names=names)
    b = BlendedMix(ids, {"c": 0.5, "a": 1.0, "b": 3.0}, seed=9, names=names)
    assert np.array_equal(a.take(200), b.take(200))
    assert a.weights[1] == pytest.approx(3.0 / 4.5)


def test_peek_leaves_the_stream_untouched():
    ids = _ids([30, 12])
    ref = BlendedMix(ids, [1, 2], seed=4).take(300)
    m = BlendedMix(ids, [1, 2], seed=4)
    assert np.array_equal(m.take(100), ref[:100])
    assert np.array_equal(m.peek(10, 5), ref[10:15])  # behind the position
    assert np.array_equal(m.peek(150, 20), ref[150:170])  # ahead of it
    assert m.position == 100 and m.counts.sum() == 100
    assert np.array_equal(m.take(200), ref[100:])


def test_equal_sized_sources_are_shuffled_independently():
    ids = _ids([20, 20])
    order = BlendedMix(ids, [1, 1], seed=0).take(40)
    ranks = []
    for j in range(2):
        members = np.flatnonzero(ids == j)
        ranks.append(np.searchsorted(members, [i for i in order if ids[i] == j]).tolist())
    assert sorted(ranks[0]) == sorted(ranks[1]) == list(range(20))
    assert ranks[0] != ranks[1]


def test_corrupt_state_is_refused():
    ids = _ids([4, 4])
    m = BlendedMix(ids, [1, 1], seed=0)
    m.take(10)
    state = m.state_dict()
    bad = dict(state, counts=[state["counts"][0] + 1, state["counts"][1]])  # sum != position
    with pytest.raises(ValueError, match="corrupt mix state"):
        BlendedMix(ids, [1, 1], seed=0).load_state_dict(bad)
    skewed = dict(state, counts=[10, 0])  # adds up, but no largest-deficit run gives it
    with pytest.raises(ValueError, match="does not match"):
        BlendedMix(ids, [1, 1], seed=0).load_state_dict(skewed)
