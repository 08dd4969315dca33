"""The store loader's reference-implementation switches: packing=False and skip_padded=False.

A small in-memory source of wide images (whose bottom sub-images lie in the padding) and text-only
samples; every check compares against the geometry or against the same loader with the switch on.
"""
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_sphinx.config import CLIP_MEAN
from megatron_sphinx.data.geometry import POSITIONS_PER_VIEW, image_geometry
from megatron_sphinx.data.images import ImageConfig, ImageProcessor, reference_views
from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.loader import LoaderConfig, PackedLoader
from megatron_sphinx.data.mix import BlendedMix
from megatron_sphinx.data.sample_source import InMemorySource
from tests.files import TEST_IMAGES

WIDE_JPEG = TEST_IMAGES / "adversarial" / "wide_4000x60.jpg"
SEQ = 2048


def _wide_png(h: int, w: int, seed: int) -> bytes:
    """A wide RGB gradient with noise (PNG, lossless)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_source(n: int = 24, seed: int = 0) -> InMemorySource:
    rng = np.random.default_rng(seed)
    images = [(_wide_png(100, 400, 1), (100, 400)), (_wide_png(90, 300, 2), (90, 300))]
    if WIDE_JPEG.exists():
        images.append((WIDE_JPEG.read_bytes(), (60, 4000)))
    samples, datas = [], []
    for i in range(n):
        k = int(rng.integers(20, 300))
        ids = rng.integers(3, 500, k).astype(np.int32)
        ids[0] = 1
        mask = np.zeros(k, bool)
        mask[k // 2:] = True
        if i % 4 != 3:
            data, hw = images[i % len(images)]
            samples.append(Sample(ids, mask, hw, 1, i % 2))
            datas.append(data)
        else:
            samples.append(Sample(ids, mask, None, 1, i % 2))
            datas.append(None)
    return InMemorySource(samples, datas, 448, 2)


def cfg(**kw) -> LoaderConfig:
    base = dict(seq_length=SEQ, image_size=448, grid=2, global_batch_size=4, micro_batch_size=2,
                seed=3, weights=[1.0, 1.0], num_workers=0, image_device="cpu",
                image_interp="linear")
    base.update(kw)
    return LoaderConfig(**base)


@pytest.fixture(scope="module")
def source():
    return make_source()


def run(loader, steps):
    return [pb for _ in range(steps) for pb in loader.next_step()]


def same(a, b):
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if not (torch.equal(x, y) if torch.is_tensor(x) else x == y):
            return False
    return True


def test_the_source_has_padded_sub_images(source):
    skipped = [image_geometry(*s.image_hw).num_skipped() for s in source.samples if s.image_hw]
    assert skipped and all(k == 2 for k in skipped)  # wide: the bottom row is padding


def test_no_packing_puts_one_sample_per_row_in_mix_order(source):
    with PackedLoader(source, cfg(packing=False)) as ld:
        micro = run(ld, 3)
    assert len(micro) == 6
    order = BlendedMix(source.source_ids, [1.0, 1.0], 3).take(12).tolist()
    for k, pb in enumerate(micro):
        assert pb.shape == (2, SEQ) and pb.num_samples == 2
        # one sample then one padding segment per row
        assert len(pb.cu_seqlens) == 5 and pb.segment_ids.max() == 1
        lengths = (pb.cu_seqlens[1:] - pb.cu_seqlens[:-1]).tolist()
        want = [source.samples[i] for i in order[2 * k:2 * k + 2]]
        assert lengths[0] == want[0].length(448, 2) and lengths[2] == want[1].length(448, 2)
        assert torch.equal(pb.text_ids, torch.from_numpy(
            np.concatenate([s.input_ids for s in want]).astype(np.int64)))
    assert ld.packing_efficiency() < 0.5
    with PackedLoader(source, cfg()) as ld:  # packing on: rows hold several samples
        packed = run(ld, 3)
    assert max(pb.num_samples for pb in packed) > 2


@pytest.mark.parametrize("skip", [True, False])
def test_no_packing_rows_trimmed_with_pad_to_multiple(source, skip):
    with PackedLoader(source, cfg(packing=False, pad_to_multiple=64, skip_padded=skip)) as ld:
        micro = run(ld, 2)
    for pb in micro:
        longest = int((pb.cu_seqlens[1:] - pb.cu_seqlens[:-1]).max())
        s = pb.shape[1]
        assert pb.num_samples == 2 and s % 64 == 0 and longest <= s < longest + 64
        assert pb.num_skipped == (0 if not skip else 2 * len(pb.view_counts))


def test_no_skip_encodes_every_view_and_matches_the_skipping_batches(source):
    # packing=False makes both loaders read the same samples into the same rows
    with PackedLoader(source, cfg(packing=False, skip_padded=False)) as ld:
        full = run(ld, 2)
        lengths = ld.lengths
    with PackedLoader(source, cfg(packing=False)) as ld:
        skip = run(ld, 2)
    assert all(ld.lengths == source.lengths)
    for i, s in enumerate(source.samples):
        assert lengths[i] == s.length(448, 2, skip_padded=False)
        if s.image_hw:
            assert lengths[i] == source.lengths[i] + 2 * (POSITIONS_PER_VIEW - 1)
    pad = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    n_images = 0
    for a, b in zip(full, skip):
        assert a.num_skipped == 0 and b.num_skipped == 2 * len(b.view_counts) > 0
        assert a.views.shape[0] == int(a.view_counts.sum()) == 5 * len(a.view_counts)
        assert torch.equal(a.text_ids, b.text_ids)
        assert a.num_tokens == b.num_tokens + a.views.shape[0] // 5 * 2 * (POSITIONS_PER_VIEW - 1)
        per_image = a.views.view(-1, 5, 3, 224, 224)  # [images, global + 2x2, 3, v, v]
        n_images += per_image.shape[0]
        # the bottom sub-images lie in the padding: exactly the pad colour
        assert torch.equal(per_image[:, 3:], pad.expand_as(per_image[:, 3:]))
        assert not torch.equal(per_image[:, 1], pad.expand_as(per_image[:, 1]))
        # the encoded views are the skipping loader's, padded ones left out
        assert torch.equal(per_image[:, :3].reshape(-1, 3, 224, 224), b.views)
    assert n_images > 0


def test_image_processor_without_skipping_matches_the_reference(source):
    data = source.images[0]
    batch = ImageProcessor(ImageConfig(448, 2, device="cpu", skip_padded=False))([data])
    ref, hw = reference_views(data, 448, 2, skip_padded=False)
    assert batch.view_counts.tolist() == [5] and ref.shape == (5, 3, 224, 224)
    assert float((batch.views - torch.from_numpy(ref)).abs().max()) <= 2 / 255
    ref_skip, _ = reference_views(data, 448, 2)
    assert np.array_equal(ref_skip, ref[:3])


def test_no_packing_resume_and_switches_recorded_in_state(source):
    c = cfg(packing=False, skip_padded=False, num_workers=1)
    with PackedLoader(source, c) as ld:
        ref = run(ld, 4)
    with PackedLoader(source, c) as ld:
        run(ld, 2)
        state = ld.state_dict()
    assert state["packing"] is False and state["skip_padded"] is False
    with PackedLoader(source, dataclasses.replace(c, num_workers=0)) as ld:
        ld.load_state_dict(state)
        resumed = run(ld, 2)
    assert all(same(x, y) for x, y in zip(ref[4:], resumed))
    for key, flag in (("packing", "--no-packing"), ("skip_padded", "--no-skip")):
        other = dataclasses.replace(c, **{key: True})
        with pytest.raises(ValueError, match=f"trained with {flag}: resume with {flag} given"):
            PackedLoader(source, other).load_state_dict(state)
    # a state saved before the switches existed means both on
    with PackedLoader(source, cfg()) as ld:
        run(ld, 1)
        old = {k: v for k, v in ld.state_dict().items() if k not in ("packing", "skip_padded")}
        ld.load_state_dict(old)
    with pytest.raises(ValueError, match="packing"):
        PackedLoader(source, cfg(packing=False)).load_state_dict(old)


def test_no_packing_overlong_samples_truncated_or_dropped():
    src = make_source(n=12, seed=1)
    long_ids = np.full(SEQ + 100, 7, np.int32)
    long_ids[0] = 1
    for i in (0, 4, 8):  # overlong text-only samples
        src.samples[i] = Sample(long_ids, np.ones(len(long_ids), bool), None, 1, i % 2)
        src.images[i] = None
        src.image_hw[i] = 0
        src.lengths[i] = len(long_ids)
    n_long = sum(i in (0, 4, 8) for i in BlendedMix(src.source_ids, [1.0, 1.0], 3).take(12))
    assert n_long > 0
    with PackedLoader(src, cfg(packing=False, global_batch_size=12, micro_batch_size=1)) as ld:
        micro = run(ld, 1)
    assert ld._packer.stats["truncated"] == n_long and ld.stats["truncated"] == n_long
    assert all(pb.num_samples == 1 and pb.num_tokens <= SEQ for pb in micro)
    assert sum(pb.num_tokens == SEQ for pb in micro) == n_long
    with PackedLoader(src, cfg(packing=False, global_batch_size=12, micro_batch_size=1,
                               overlong="drop")) as ld:
        micro = run(ld, 1)
    assert ld._packer.stats["dropped_overlong"] >= n_long and len(micro) == 12
    assert all(pb.num_samples == 1 and pb.num_tokens < SEQ for pb in micro)


def test_no_skip_needs_image_sizes(source):
    class NoSizes:
        lengths, source_ids, source_names = source.lengths, source.source_ids, ["0", "1"]

        def __len__(self):
            return len(source)

        def get(self, i):
            return source.get(i)

    PackedLoader(NoSizes(), cfg())  # fine with skipping
    with pytest.raises(ValueError, match="image_hw"):
        PackedLoader(NoSizes(), cfg(skip_padded=False))


def test_truncated_image_sample_keeps_its_image_and_the_first_text():
    """An overlong sample with an image keeps BOS, the image and the text that fits; one whose
    text would end at the image (no token after it) is left out."""
    src = make_source(n=12, seed=1)
    image = image_geometry(100, 400).num_positions()  # the wide PNG: 3 views + 2 skips
    rng = np.random.default_rng(5)
    longs = {}
    for i in (0, 4, 8):
        ids = rng.integers(3, 500, SEQ + 100).astype(np.int32)
        ids[0] = 1
        src.samples[i] = Sample(ids, np.ones(len(ids), bool), (100, 400), 1, i % 2)
        src.images[i] = _wide_png(100, 400, 1)
        src.image_hw[i] = (100, 400)
        src.lengths[i] = src.samples[i].length(448, 2)
        longs[i] = ids
    one_step = dict(packing=False, global_batch_size=12, micro_batch_size=1)
    with PackedLoader(src, cfg(**one_step)) as ld:
        micro = run(ld, 1)
    seen = 0
    for pb in micro:
        text = pb.text_ids.numpy()
        for i, ids in longs.items():
            if len(text) > 100 and np.array_equal(text[:100], ids[:100]):
                seen += 1
                assert pb.num_tokens == SEQ and len(pb.view_counts) == 1
                assert np.array_equal(text, ids[:SEQ - image])
    assert seen > 0 and ld.stats["truncated"] >= seen and ld.stats["skipped"] == 0
    # seq_length = image + 1: only BOS fits before the image, nothing after it: left out
    with PackedLoader(src, cfg(seq_length=image + 1, **one_step)) as ld:
        micro = run(ld, 1)
    assert ld.stats["skipped:overlong_image"] >= 3
    assert all(len(pb.view_counts) == 0 for pb in micro)  # no image sample was kept
