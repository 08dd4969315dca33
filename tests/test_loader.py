"""The training loader: resume equality, data-parallel invariance, bad images skipped."""
import dataclasses
import logging

import numpy as np
import pytest
import torch

from megatron_sphinx.data.images import probe_image
from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader, views_per_sample
from megatron_sphinx.data.sample_source import InMemorySource, SampleSource
from megatron_sphinx.data.geometry import image_geometry
from tests.files import TEST_IMAGES

IMAGES = TEST_IMAGES
GOOD = sorted(IMAGES.glob("*.jpg")) + [IMAGES / "adversarial" / f for f in
                                       ("wide_4000x60.jpg", "rgba_alpha.png", "gray16.png")]
BAD_TOKEN = 2  # marks the text of samples with a bad image (other tokens are >= 3)


def _text(rng, n):
    ids = rng.integers(3, 500, n).astype(np.int32)
    ids[0] = 1
    mask = np.zeros(n, bool)
    mask[n // 3:] = True
    return ids, mask


def make_source(n=80, bad=(), seed=0, n_src=3, long_text=()):
    rng = np.random.default_rng(seed)
    datas = [p.read_bytes() for p in GOOD]
    hws = [probe_image(d).hw for d in datas]
    samples, images = [], []
    for i in range(n):
        ids, mask = _text(rng, 6000 if i in long_text else int(rng.integers(20, 600)))
        src = i % n_src
        if i in bad:
            ids[1:] = BAD_TOKEN
            samples.append(Sample(ids, mask, (100, 100), 1, src))
            images.append((IMAGES / "adversarial" / "truncated_40pct.jpg").read_bytes())
        elif rng.random() < 0.6:
            k = int(rng.integers(len(datas)))
            samples.append(Sample(ids, mask, hws[k], 1, src))
            images.append(datas[k])
        else:
            samples.append(Sample(ids, mask, None, 1, src))
            images.append(None)
    return InMemorySource(samples, images, 448, 2, [f"s{j}" for j in range(n_src)])


def cfg(**kw):
    base = dict(seq_length=4096, image_size=448, grid=2, global_batch_size=4, micro_batch_size=1,
                seed=7, weights=[1.0, 2.0, 1.0], num_workers=2, prefetch_steps=2)
    base.update(kw)
    return LoaderConfig(**base)


def same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        ok = torch.equal(x, y) if torch.is_tensor(x) else x == y
        if not ok:
            return False
    return True


def run(loader, steps):
    return [loader.next_step() for _ in range(steps)]


@pytest.fixture(scope="module")
def source():
    return make_source()


def test_source_protocol_and_views_per_sample(source):
    assert isinstance(source, SampleSource)
    expect = [int(image_geometry(*s.image_hw, 448, 2).view_valid().sum()) if s.image_hw else 0
              for s in source.samples]
    assert views_per_sample(source.image_hw, 448, 2).tolist() == expect
    odd = np.array([[60, 4000], [4000, 60], [1, 1], [301, 451], [0, 0], [225, 449]])
    assert views_per_sample(odd, 448, 2).tolist() == [
        int(image_geometry(h, w).view_valid().sum()) if h else 0 for h, w in odd]


def test_batches_layout_and_counts(source):
    with PackedLoader(source, cfg()) as ld:
        steps = run(ld, 3)
    for micro in steps:
        assert len(micro) == 4
        for pb in micro:
            assert pb.shape == (1, 4096)
            assert pb.views.shape[0] == int(pb.view_counts.sum())
            assert pb.views.dtype == torch.float32 and pb.views.shape[1:] == (3, 224, 224)
            assert 0 < pb.num_tokens <= 4096
    assert ld.stats["micro_batches"] >= 12 and ld.stats["skipped"] == 0
    assert 0 < ld.packing_efficiency() <= 1


def test_resume_sees_the_same_batches(source):
    c = cfg(image_interp="linear")
    with PackedLoader(source, c) as ld:
        ref = run(ld, 5)
    with PackedLoader(source, c) as ld:
        run(ld, 2)
        state = ld.state_dict()
    assert state["step"] == 2
    sync = dataclasses.replace(c, num_workers=0)  # also: synchronous == threaded
    with PackedLoader(source, sync) as ld:
        ld.load_state_dict(state)
        resumed = run(ld, 3)
    for a, b in zip(ref[2:], resumed):
        assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    # load_state_dict on a loader that already ran ahead (prefetching) rewinds it
    with PackedLoader(source, c) as ld:
        run(ld, 3)
        ld.load_state_dict(state)
        again = run(ld, 3)
    assert all(same(x, y) for a, b in zip(ref[2:], again) for x, y in zip(a, b))
    # close() discards the prefetched steps; the loader goes on from the consumed position
    with PackedLoader(source, c) as ld:
        run(ld, 2)
        ld.close()
        assert all(same(x, y) for x, y in zip(ref[2], ld.next_step()))
        assert ld.step == 3
        state = ld.state_dict()
    with PackedLoader(source, sync) as ld:
        ld.load_state_dict(state)
        assert ld.step == 3  # the step counter comes back with the state
        assert all(same(x, y) for x, y in zip(ref[3], ld.next_step()))
        assert ld.step == 4 and ld.state_dict()["step"] == 4


def test_global_batches_do_not_depend_on_dp_size(source):
    c = cfg(global_batch_size=8, micro_batch_size=2, image_interp="linear")
    with PackedLoader(source, c) as ld:
        one = run(ld, 2)
    ranks = [PackedLoader(source, c, dp_rank=r, dp_size=2) for r in range(2)]
    two = [run(ld, 2) for ld in ranks]
    for ld in ranks:
        ld.close()
    for s in range(2):
        joined = two[0][s] + two[1][s]
        assert len(joined) == len(one[s]) == 4
        assert all(same(x, y) for x, y in zip(one[s], joined))
    # a dp=1 checkpoint resumes on dp=4 with the same global batches
    with PackedLoader(source, c) as ld:
        run(ld, 1)
        state = ld.state_dict()
    four = []
    for r in range(4):
        with PackedLoader(source, c, dp_rank=r, dp_size=4) as ld:
            ld.load_state_dict(state)
            four += ld.next_step()
    assert all(same(x, y) for x, y in zip(one[1], four))


def test_bad_image_is_skipped_logged_and_counted(caplog):
    src = make_source(n=40, bad=set(range(0, 40, 5)), seed=1)
    with caplog.at_level(logging.WARNING, logger="megatron_sphinx.data.loader"):
        with PackedLoader(src, cfg(num_workers=1)) as ld:
            steps = run(ld, 4)
    n_bad = ld.stats["skipped:image_decode"]
    assert n_bad > 0 and ld.stats["skipped"] == n_bad
    assert "image_decode" in caplog.text and "truncated" in caplog.text
    texts = torch.cat([pb.text_ids for micro in steps for pb in micro])
    assert texts.numel() > 0
    assert not (texts == BAD_TOKEN).any()  # a skipped sample's text never reaches a batch
    assert sum(pb.num_samples for micro in steps for pb in micro) > 0


def test_overlong_samples_truncated_or_dropped():
    src = make_source(n=30, seed=2, long_text={0, 1, 2, 3, 4, 5})
    with PackedLoader(src, cfg(num_workers=0)) as ld:
        micro = run(ld, 3)
    assert ld.stats["truncated"] > 0
    assert all(pb.num_tokens <= 4096 for m in micro for pb in m)
    with PackedLoader(src, cfg(num_workers=0, overlong="drop")) as ld:
        run(ld, 3)
    assert ld._packer.stats["dropped_overlong"] > 0 and ld.stats["truncated"] == 0


def test_stored_size_mismatch_is_skipped():
    src = make_source(n=20, seed=3)
    i = next(k for k, s in enumerate(src.samples) if s.image_hw is not None)
    s = src.samples[i]
    h, w = s.image_hw
    src.samples[i] = Sample(s.input_ids, s.target_mask, (h + 1, w), 1, s.source_id)
    src.lengths[i] = src.samples[i].length(448, 2)
    with PackedLoader(src, cfg(num_workers=0, global_batch_size=4)) as ld:
        run(ld, 8)  # the packer places every sample within max_wait_steps + 1 steps
    assert ld.stats["skipped:image_size"] >= 1


def test_pad_to_multiple_trims_micro_batches(source):
    with PackedLoader(source, cfg(num_workers=0, pad_to_multiple=128)) as ld:
        micro = run(ld, 2)
    for m in micro:
        for pb in m:
            s = pb.shape[1]
            assert s % 128 == 0 and s <= 4096 and pb.num_tokens > s - 128


def test_bad_settings_are_refused(source):
    from megatron_sphinx.data.loader import check_resume

    with pytest.raises(ValueError, match="data-parallel"):
        PackedLoader(source, cfg(global_batch_size=6, micro_batch_size=1), dp_rank=0, dp_size=4)
    # 8 rows in micro-batches of 4 = 2 micro-batches: they do not split over 4 ranks
    with pytest.raises(ValueError, match="data-parallel"):
        PackedLoader(source, cfg(global_batch_size=8, micro_batch_size=4), dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="image_size"):
        PackedLoader(source, cfg(image_size=672, grid=3))
    with pytest.raises(ValueError, match="grid 2.*grid 4"):  # same image_size, other grid
        PackedLoader(source, cfg(image_size=448, grid=4))
    with PackedLoader(source, cfg(num_workers=0)) as ld:
        run(ld, 1)
        state = ld.state_dict()
    with pytest.raises(ValueError, match="--micro-batch-size 1, this run uses 2"):
        PackedLoader(source, cfg(micro_batch_size=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="--seq-length 4096, this run uses 2048"):
        PackedLoader(source, cfg(seq_length=2048)).load_state_dict(state)
    with pytest.raises(ValueError, match="--global-batch-size 4, this run uses 8"):
        PackedLoader(source, cfg(global_batch_size=8)).load_state_dict(state)
    with pytest.raises(ValueError, match="trained without --no-skip: resume with --no-skip left out"):
        PackedLoader(source, cfg(skip_padded=False)).load_state_dict(state)
    with pytest.raises(ValueError, match="other data"):
        PackedLoader(make_source(n=50), cfg()).load_state_dict(state)
    same_run = dict(global_batch_size=4, micro_batch_size=1, seq_length=4096, packing=True,
                    skip_padded=True)
    saved = dict(state, fingerprint="aaaa")  # same sample count, other contents
    check_resume(saved, num_samples=len(source), fingerprint="aaaa", **same_run)
    with pytest.raises(ValueError, match="other data"):
        check_resume(saved, num_samples=len(source), fingerprint="bbbb", **same_run)


def test_store_reader_feeds_the_loader(tmp_path):
    store = pytest.importorskip("megatron_sphinx.data.store")
    from tests.stores import write_source_store

    src = make_source(n=24, seed=4)
    path = tmp_path / "s.zarr"
    write_source_store(path, src, src.source_names)
    reader = store.StoreReader(path, image_size=448, grid=2)
    assert isinstance(reader, SampleSource)
    # the store orders by (source, record): compare against the same order in memory
    order = sorted(range(len(src)), key=lambda k: (src.samples[k].source_id, k))
    mem = InMemorySource([src.samples[k] for k in order], [src.images[k] for k in order],
                         448, 2, src.source_names)
    with PackedLoader(reader, cfg(num_workers=0)) as a, PackedLoader(mem, cfg(num_workers=0)) as b:
        for _ in range(2):
            assert all(same(x, y) for x, y in zip(a.next_step(), b.next_step()))


def _split_samples(pb, src):
    """The source indices of a micro-batch's samples, in packed order (texts start with BOS 1
    and are otherwise >= 3, so each sample's text is found by its BOS and matched by prefix)."""
    ids = pb.text_ids.tolist()
    starts = [k for k, t in enumerate(ids) if t == 1] + [len(ids)]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        chunk = ids[a:b]
        hits = [i for i, s in enumerate(src.samples)
                if s.input_ids[:len(chunk)].tolist() == chunk]
        assert len(hits) == 1, "sample texts are unique"
        out.append(hits[0])
    return out


def test_views_belong_to_their_samples_when_a_sample_is_skipped():
    """A sample dropped for a decoded/stored size mismatch takes its views with it: every other
    image's views in the micro-batch are its own (decoded alone for comparison)."""
    from megatron_sphinx.data.images import ImageConfig, ImageProcessor

    src = make_source(n=20, seed=3)
    with_img = [k for k, s in enumerate(src.samples) if s.image_hw is not None]
    for i in with_img[::2]:  # several mismatches, so one sits before other images in its row
        s = src.samples[i]
        h, w = s.image_hw
        src.samples[i] = Sample(s.input_ids, s.target_mask, (h + 1, w), 1, s.source_id)
        src.lengths[i] = src.samples[i].length(448, 2)
    proc = ImageProcessor(ImageConfig(448, 2, device="cpu", interp="linear"))
    with PackedLoader(src, cfg(num_workers=0, image_interp="linear", image_device="cpu")) as ld:
        micro = [pb for step in run(ld, 6) for pb in step]
    assert ld.stats["skipped:image_size"] >= 2
    checked = 0
    for pb in micro:
        order = [i for i in _split_samples(pb, src) if src.images[i] is not None]
        assert not set(order) & set(with_img[::2])  # the mismatched ones are left out
        if not order:
            continue
        want = torch.cat([proc([src.images[i]]).views for i in order])
        assert pb.view_counts.tolist() == [int(proc([src.images[i]]).view_counts[0])
                                           for i in order]
        assert torch.equal(pb.views, want)
        checked += len(order)
    assert checked > 0


def test_a_sample_whose_length_disagrees_with_the_source_is_skipped(caplog):
    src = make_source(n=20, seed=5)
    i = next(k for k, s in enumerate(src.samples) if s.image_hw is None)
    src.lengths[i] -= 5  # the source's recorded length is not the sample's
    with caplog.at_level(logging.WARNING, logger="megatron_sphinx.data.loader"):
        with PackedLoader(src, cfg(num_workers=0)) as ld:
            micro = [pb for step in run(ld, 8) for pb in step]
    assert ld.stats["skipped:length_mismatch"] >= 1 and "length_mismatch" in caplog.text
    assert all(i not in _split_samples(pb, src) for pb in micro)


def test_trimmed_rows_never_exceed_seq_length(source):
    """pad_to_multiple rounds up, but never past a seq_length that is not a multiple of it."""
    with PackedLoader(source, cfg(num_workers=0, seq_length=4000, pad_to_multiple=128)) as ld:
        micro = [pb for step in run(ld, 3) for pb in step]
    assert all(pb.shape[1] <= 4000 for pb in micro)
    assert any(pb.shape[1] == 4000 for pb in micro)  # a row longer than 3968: capped


def test_store_recorded_weights_are_the_default(tmp_path):
    from megatron_sphinx.data import store

    src = make_source(n=24, seed=4)
    path = tmp_path / "w.zarr"
    meta = store.StoreMeta(448, 2, 4096, src.source_names,
                           extra={"weights": {"s2": 6.0, "s0": 1.0, "s1": 3.0}})
    store.create_store(path, meta)
    w = store.ShardWriter(path, 0, 448, 2)
    for k, (smp, img) in enumerate(zip(src.samples, src.images)):
        w.add(smp, img, (smp.source_id, k))
    w.close()
    store.write_index(path, meta)
    reader = store.StoreReader(path, image_size=448, grid=2)
    with PackedLoader(reader, cfg(num_workers=0, weights=None)) as ld:
        got = ld.state_dict()["mix"]["weights"]
    assert np.allclose(got, np.array([1.0, 3.0, 6.0]) / 10.0)
    with PackedLoader(reader, cfg(num_workers=0, weights=[1.0, 1.0, 1.0])) as ld:
        assert np.allclose(ld.state_dict()["mix"]["weights"], [1 / 3] * 3)  # the config wins
