"""The packed-batch layout: positions, labels, loss masks, segment boundaries and source rows."""
import numpy as np
import pytest

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
    import torch

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
