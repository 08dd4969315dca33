"""The packed-batch layout: positions, labels, loss masks, segment boundaries and source rows."""
import numpy as np
import pytest
import torch

from megatron_sphinx.data.geometry import TOKENS_PER_VIEW, image_geometry
from megatron_sphinx.data.layout import PAD_INDEX, Sample, build_packed_batch


def _sample(n, target_from, hw=None):
    ids = np.arange(10, 10 + n, dtype=np.int32)
    ids[0] = 1
    mask = np.zeros(n, bool)
    mask[target_from:] = True
    return Sample(ids, mask, hw)


def test_text_only_rows_labels_and_mask():
    a, b = _sample(5, 3), _sample(4, 2)
    pb = build_packed_batch([[a, b]], 12, 448, 2)
    assert pb.cu_seqlens.tolist() == [0, 5, 9, 12]
    assert pb.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]
    # position t predicts token t+1 of the same sample, trained iff that token is a target
    assert pb.labels[0, :4].tolist() == [11, 12, 13, 14]
    assert pb.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert pb.pack_index.tolist()[:9] == list(range(9))
    assert pb.pack_index.tolist()[9:] == [PAD_INDEX] * 3
    assert pb.num_tokens == 9 and pb.num_samples == 2


def test_image_views_start_end_and_skip_rows():
    smp = _sample(6, 4, hw=(100, 200))  # 2:1 -> 3 encoded views, 2 skips
    geo = image_geometry(100, 200, 448, 2)
    n = smp.length(448, 2)
    assert n == 6 + geo.num_positions()
    pb = build_packed_batch([[smp]], n + 3, 448, 2)
    T, R = 6, 3 * TOKENS_PER_VIEW
    idx = pb.pack_index.tolist()
    start, end, skip = T + R, T + R + 1, T + R + 2
    assert idx[0] == 0  # BOS
    assert idx[1] == start and idx[2:2 + TOKENS_PER_VIEW] == list(range(T, T + TOKENS_PER_VIEW))
    assert idx[2 + TOKENS_PER_VIEW] == end
    # global view, sub (0,0), sub (0,1), then the two skipped sub-images of the bottom row
    p = 1 + 3 * (TOKENS_PER_VIEW + 2)
    assert idx[p:p + 2] == [skip, skip]
    assert idx[p + 2:p + 7] == [1, 2, 3, 4, 5]
    assert pb.num_skipped == 2 and pb.view_counts.tolist() == [3]
    assert pb.loss_mask[0, :p + 2].sum() == 0  # no loss on image positions


def test_sequence_first_order_for_several_rows():
    rows = [[_sample(3, 1)], [_sample(2, 1)]]
    pb = build_packed_batch(rows, 4, 448, 2)
    idx = pb.pack_index.view(4, 2)  # [s, b]
    assert idx[:, 0].tolist() == [0, 1, 2, PAD_INDEX]
    assert idx[:, 1].tolist() == [3, 4, PAD_INDEX, PAD_INDEX]


def test_overlong_row_raises():
    with pytest.raises(ValueError, match="seq_length"):
        build_packed_batch([[_sample(10, 1)]], 8, 448, 2)


def test_pinned_batch_is_equal_and_pinned():
    rows = [[Sample(np.arange(5, dtype=np.int32), np.ones(5, dtype=bool))]]
    pb = build_packed_batch(rows, 16, 448, 2)
    pinned = pb.pin_memory()
    if not torch.cuda.is_available():  # nothing to copy to: the batch itself
        assert pinned is pb
        return
    for name, value in vars(pb).items():
        if torch.is_tensor(value):
            assert getattr(pinned, name).is_pinned()
            assert torch.equal(getattr(pinned, name), value)


def test_exactly_full_row_has_no_padding_segment():
    a, b = _sample(5, 3), _sample(4, 2)
    pb = build_packed_batch([[a, b]], 9, 448, 2)  # 5 + 4 positions fill the row exactly
    assert pb.cu_seqlens.tolist() == [0, 5, 9]
    assert pb.segment_ids[0].tolist() == [0] * 5 + [1] * 4
    assert pb.max_seqlen == 5 and pb.num_tokens == 9
    assert PAD_INDEX not in pb.pack_index.tolist()


def test_row_padding_is_a_segment_of_its_own():
    rows = [[_sample(3, 1)], [_sample(2, 1), _sample(3, 1)]]
    pb = build_packed_batch(rows, 8, 448, 2)
    assert pb.segment_ids[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert pb.segment_ids[1].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    # boundaries over the flattened [b * s], row after row; every padding run is a segment
    assert pb.cu_seqlens.tolist() == [0, 3, 8, 10, 13, 16]
    assert pb.max_seqlen == 5  # the first row's padding is the longest segment
    assert build_packed_batch([[_sample(2, 1)]], 8, 448, 2).max_seqlen == 6  # padding last
    # nothing trained at a sample's last position (it would predict the next sample), or padding
    assert pb.loss_mask[0, 2:].sum() == 0 and pb.loss_mask[1, [1, 4, 5, 6, 7]].sum() == 0


def test_image_slot_inside_the_text():
    """Views go before text index ``image_slot``: the text rows around them stay in order, the
    position before the image predicts nothing, the image's last position predicts the text."""
    ids = np.arange(20, 26, dtype=np.int32)
    mask = np.array([0, 0, 0, 1, 1, 1], bool)
    smp = Sample(ids, mask, image_hw=(100, 200), image_slot=3)  # 3 encoded views, 2 skips
    n = smp.length(448, 2)
    pb = build_packed_batch([[smp]], n, 448, 2)
    idx = pb.pack_index.tolist()
    img = image_geometry(100, 200, 448, 2).num_positions()
    T = 6
    assert idx[:3] == [0, 1, 2]
    assert idx[3] == T + 3 * TOKENS_PER_VIEW  # start_img
    assert idx[3 + img:] == [3, 4, 5]
    labels, loss = pb.labels[0].tolist(), pb.loss_mask[0].tolist()
    assert labels[:2] == [21, 22] and loss[:3] == [0, 0, 0]
    assert labels[2 + img] == 23 and loss[2 + img] == 1  # the skip before text predicts ids[3]
    assert labels[3 + img:] == [24, 25, 0] and loss[3 + img:] == [1, 1, 0]
    assert sum(loss) == 3


def test_image_slot_bounds():
    ids, mask = np.arange(4, dtype=np.int32), np.ones(4, bool)
    assert Sample(ids, mask, image_hw=(10, 10), image_slot=4).image_slot == 4  # image last
    with pytest.raises(ValueError, match="image_slot"):
        Sample(ids, mask, image_hw=(10, 10), image_slot=5)
    with pytest.raises(ValueError, match="image_slot"):
        Sample(ids, mask, image_hw=(10, 10), image_slot=-1)
    with pytest.raises(ValueError, match="same length"):
        Sample(ids, mask[:3])


def test_no_skip_layout_counts_every_view():
    smp = _sample(6, 4, hw=(100, 200))
    n = smp.length(448, 2, skip_padded=False)
    assert n == 6 + 5 * (TOKENS_PER_VIEW + 2)
    pb = build_packed_batch([[smp]], n, 448, 2, skip_padded=False)
    assert pb.num_tokens == n and pb.num_skipped == 0
    assert pb.view_counts.tolist() == [5]
    assert PAD_INDEX not in pb.pack_index.tolist()


def test_packed_rows_equal_each_sample_alone():
    """Invariance: a sample's labels, loss mask, positions and source rows (up to its text and
    visual row offsets) are the same packed with others as laid out alone."""
    rng = np.random.default_rng(0)
    hws = [None, (300, 900), None, (700, 350), (500, 500), None]
    samples = []
    for k, hw in enumerate(hws):
        n = int(rng.integers(3, 12))
        ids = rng.integers(3, 500, n).astype(np.int32)
        samples.append(Sample(ids, rng.random(n) < 0.5, hw, image_slot=1 + k % 2))
    rows = [samples[:3], samples[3:]]
    seq = max(sum(s.length(448, 2) for s in r) for r in rows) + 5
    pb = build_packed_batch(rows, seq, 448, 2)
    b = len(rows)
    index = pb.pack_index.view(seq, b).t()  # [b, s]
    T = len(pb.text_ids)
    V = int(pb.view_counts.sum())
    text_off, view_off = 0, 0
    for r, row in enumerate(rows):
        pos = 0
        for smp in row:
            n = smp.length(448, 2)
            alone = build_packed_batch([[smp]], n, 448, 2)
            t1, v1 = len(alone.text_ids), int(alone.view_counts.sum())
            sl = slice(pos, pos + n)
            assert torch.equal(pb.labels[r, sl], alone.labels[0])
            assert torch.equal(pb.loss_mask[r, sl], alone.loss_mask[0])
            assert torch.equal(pb.position_ids[r, sl], alone.position_ids[0])
            got, ref = index[r, sl], alone.pack_index.clone()
            text, vis = ref < t1, (ref >= t1) & (ref < t1 + v1 * TOKENS_PER_VIEW)
            ref[text] += text_off
            ref[vis] += T - t1 + view_off * TOKENS_PER_VIEW
            ref[~text & ~vis] += T + V * TOKENS_PER_VIEW - (t1 + v1 * TOKENS_PER_VIEW)
            assert torch.equal(got, ref)
            assert torch.equal(pb.text_ids[text_off:text_off + t1], alone.text_ids)
            pos, text_off, view_off = pos + n, text_off + t1, view_off + v1
    assert text_off == T and view_off == V


def test_later_pipeline_stages_copy_no_pixels():
    """Only the chunk that builds the LLM input (the first stage's first chunk) gets the views,
    text ids and pack index on its device; the others leave them on the host (a "meta" device
    stands in for the GPU here)."""
    from torch import nn

    from megatron_sphinx.model.sphinx import SphinxModel
    from megatron_sphinx.train.step import FIRST_STAGE_ONLY, forward_step

    class Stage(SphinxModel):
        def __init__(self, pre_process):
            nn.Module.__init__(self)
            self.pre_process = pre_process

        def forward(self, batch):
            return batch

    rows = [[_sample(40, 30, hw=(300, 500))]]
    views = torch.rand(image_geometry(300, 500, 448, 2).num_views, 3, 224, 224)
    pb = build_packed_batch(rows, 2048, 448, 2, views)
    meta = torch.device("meta")
    for pre_process in (True, False):
        got, _ = forward_step(meta, 1, iter([pb]), Stage(pre_process))
        devices = {name: v.device.type for name, v in vars(got).items() if torch.is_tensor(v)}
        for name, device in devices.items():
            stays = name in FIRST_STAGE_ONLY and not pre_process
            assert device == ("cpu" if stays else "meta"), (pre_process, name)
    assert {"views", "text_ids", "pack_index", "cu_seqlens", "labels"} <= set(devices)
