"""The zarr store: shard writers, the rank-0 index, and the reader."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.store import (
    ShardWriter, StoreError, StoreMeta, StoreReader, create_store, is_store, read_meta,
    write_index)
from megatron_sphinx.data import store as store_mod


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        L = int(rng.integers(2, 300))
        ids = rng.integers(0, 512, L).astype(np.int32)
        mask = rng.random(L) < 0.5
        if k % 3:
            hw = (int(rng.integers(1, 2000)), int(rng.integers(1, 2000)))
            img = rng.bytes(int(rng.integers(1, 5000)))
        else:
            hw, img = None, None
        out.append((Sample(ids, mask, hw, 1, k % 2), img, (k % 2, k)))
    return out


def _write(path, items, world, meta=None):
    meta = meta or StoreMeta(448, 2, 8192, ["even", "odd"])
    create_store(path, meta)
    for r in range(world):
        w = ShardWriter(path, r, meta.image_size, meta.grid)
        for i, (s, img, key) in enumerate(items):
            if i % world == r:
                w.add(s, img, key)
        assert w.close({"summary": {"rank": r}}) == len(range(r, len(items), world))
    return write_index(path, meta)


def _same(a: Sample, b: Sample) -> bool:
    return (np.array_equal(a.input_ids, b.input_ids) and a.input_ids.dtype == b.input_ids.dtype
            and np.array_equal(a.target_mask, b.target_mask) and a.image_hw == b.image_hw
            and a.image_slot == b.image_slot and a.source_id == b.source_id)


@pytest.mark.parametrize("world", [1, 3])
def test_roundtrip_in_key_order(tmp_path, world, monkeypatch):
    monkeypatch.setattr(store_mod, "FLUSH_BYTES", 20_000)  # several appends per shard
    items = _samples(120)
    meta = _write(tmp_path / "s.zarr", items, world)
    assert meta.num_samples == 120 and meta.num_shards == world
    r = StoreReader(tmp_path / "s.zarr", image_size=448, grid=2)
    order = sorted(range(120), key=lambda i: items[i][2])  # (source id, record)
    assert len(r) == 120 and r.source_names == ["even", "odd"]
    for i, j in enumerate(order):
        s, img = r.get(i)
        assert _same(s, items[j][0]) and img == items[j][1]
        assert r.lengths[i] == items[j][0].length(448, 2)
        assert r.source_ids[i] == items[j][0].source_id
        assert r.has_image[i] == (items[j][1] is not None)
    assert r.lengths.dtype == np.int64 and r.image_hw.shape == (120, 2)
    r2 = pickle.loads(pickle.dumps(r))
    assert _same(r2.get_sample(7), r.get_sample(7)) and r2.get_image(7) == r.get_image(7)
    assert _same(r.get(-1)[0], r.get(119)[0])
    with pytest.raises(IndexError):
        r.get(120)


def test_same_store_whatever_the_shard_count(tmp_path):
    items = _samples(50, seed=1)
    _write(tmp_path / "a.zarr", items, 1)
    _write(tmp_path / "b.zarr", items, 4)
    a, b = StoreReader(tmp_path / "a.zarr"), StoreReader(tmp_path / "b.zarr")
    assert np.array_equal(a.lengths, b.lengths)
    for i in range(50):
        assert _same(a.get_sample(i), b.get_sample(i)) and a.get_image(i) == b.get_image(i)


def test_reader_refuses_other_geometry_and_short_sequences(tmp_path):
    _write(tmp_path / "s.zarr", _samples(10), 1)
    with pytest.raises(StoreError, match="image_size 448 grid 2.*--image-size 672 --grid 3"):
        StoreReader(tmp_path / "s.zarr", image_size=672, grid=3)
    with pytest.raises(StoreError, match="grid 3"):
        StoreReader(tmp_path / "s.zarr", image_size=448, grid=3)
    longest = int(StoreReader(tmp_path / "s.zarr").lengths.max())
    with pytest.raises(StoreError, match="--seq-length"):
        StoreReader(tmp_path / "s.zarr", seq_length=longest - 1)
    assert len(StoreReader(tmp_path / "s.zarr", seq_length=longest)) == 10


def test_incomplete_and_foreign_directories_are_refused(tmp_path):
    with pytest.raises(StoreError, match="not a megatron_sphinx store"):
        StoreReader(tmp_path)
    create_store(tmp_path / "s.zarr", StoreMeta(448, 2, 4096, ["a"]))
    assert is_store(tmp_path / "s.zarr") and read_meta(tmp_path / "s.zarr")[1] is False
    with pytest.raises(StoreError, match="incomplete"):
        StoreReader(tmp_path / "s.zarr")


def test_empty_store_and_writer_checks(tmp_path):
    meta = _write(tmp_path / "e.zarr", [], 2)
    assert meta.num_samples == 0 and len(StoreReader(tmp_path / "e.zarr")) == 0
    create_store(tmp_path / "w.zarr", StoreMeta(448, 2, 4096, ["a"]))
    w = ShardWriter(tmp_path / "w.zarr", 0, 448, 2)
    with pytest.raises(ValueError, match="image_bytes"):
        w.add(Sample(np.zeros(3, np.int32), np.zeros(3, bool), (10, 10)), None, (0, 0))
    with pytest.raises(ValueError, match="grid"):
        StoreMeta(448, 3, 4096, ["a"])


def test_direct_chunk_reads_equal_zarr_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "TEXT_CHUNK", 64)  # samples straddle chunk files
    monkeypatch.setattr(store_mod, "IMAGE_CHUNK", 1000)
    items = _samples(40, seed=2)
    _write(tmp_path / "s.zarr", items, 2)
    fast = StoreReader(tmp_path / "s.zarr")
    slow = StoreReader(tmp_path / "s.zarr")
    for s in range(2):
        sh = fast._shard(s)
        assert sh.ids.root and sh.mask.root and sh.image.root  # the direct path is in use
        for flat in vars(slow._shard(s)).values():
            if isinstance(flat, store_mod._Flat):
                flat.root = None  # force zarr reads
    for s in range(2):  # the fast reader never falls back to zarr on a normal store
        for flat in (fast._shard(s).ids, fast._shard(s).mask, fast._shard(s).image):
            flat.arr = None
    for i in range(40):
        assert _same(fast.get_sample(i), slow.get_sample(i))
        assert fast.get_image(i) == slow.get_image(i)


def test_missing_all_zero_chunks_read_back_as_zeros(tmp_path, monkeypatch):
    """zarr leaves out chunk files that hold only the fill value (an all-zero stretch of the
    target mask): the direct reader must fall back to zarr there, not return short arrays."""
    monkeypatch.setattr(store_mod, "TEXT_CHUNK", 64)
    items = []
    for k in range(6):
        ids = np.arange(1, 201, dtype=np.int32) + k
        mask = np.zeros(200, bool)
        mask[-3:] = True  # ~3 whole mask chunks of zeros per sample
        items.append((Sample(ids, mask, None, 1, k % 2), None, (k % 2, k)))
    _write(tmp_path / "z.zarr", items, 1)
    chunks = tmp_path / "z.zarr" / "shards" / "r00000" / "target_mask" / "c"
    n_chunks = -(-6 * 200 // 64)
    assert len(list(chunks.iterdir())) < n_chunks  # some chunk files are absent
    r = StoreReader(tmp_path / "z.zarr")
    assert r._shard(0).mask.root  # the direct path is in use
    order = sorted(range(6), key=lambda i: items[i][2])
    for i, j in enumerate(order):
        assert _same(r.get_sample(i), items[j][0])


def test_two_shards_with_the_same_key_are_refused(tmp_path):
    meta = StoreMeta(448, 2, 4096, ["a"])
    create_store(tmp_path / "d.zarr", meta)
    s = Sample(np.array([1, 5, 6], np.int32), np.array([0, 1, 1], bool), None, 1, 0)
    for r in range(2):
        w = ShardWriter(tmp_path / "d.zarr", r, 448, 2)
        w.add(s, None, (0, 7))
        w.close()
    with pytest.raises(StoreError, match="same sample key"):
        write_index(tmp_path / "d.zarr", meta)
    assert read_meta(tmp_path / "d.zarr")[1] is False  # not marked complete


def test_other_store_format_is_refused(tmp_path):
    _write(tmp_path / "o.zarr", _samples(4), 1,
           meta=StoreMeta(448, 2, 4096, ["even", "odd"], format="megatron_sphinx.store/1"))
    with pytest.raises(StoreError, match="store format.*preprocess the data again"):
        StoreReader(tmp_path / "o.zarr")


def test_tokenizer_inside_the_store_wins_over_the_recorded_path(tmp_path):
    elsewhere = tmp_path / "tok_elsewhere"
    elsewhere.mkdir()
    meta = StoreMeta(448, 2, 4096, ["even", "odd"], tokenizer_path=str(elsewhere))
    _write(tmp_path / "t.zarr", _samples(4), 1, meta=meta)
    assert StoreReader(tmp_path / "t.zarr").tokenizer_dir() == elsewhere
    (tmp_path / "t.zarr" / "tokenizer").mkdir()
    assert StoreReader(tmp_path / "t.zarr").tokenizer_dir() == tmp_path / "t.zarr" / "tokenizer"
    elsewhere.rmdir()
    (tmp_path / "t.zarr" / "tokenizer").rmdir()
    assert StoreReader(tmp_path / "t.zarr").tokenizer_dir() is None
