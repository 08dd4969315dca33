"""The packed micro-batch: the contract between the data pipeline, the pack kernel and the model.

A tokenized :class:`Sample` holds only text tokens plus the size of its image (if any). Its LLM
sequence is ``[BOS] [image views...] [dialog text...]``: the image's views are inserted before text
index ``image_slot`` (1, right after BOS). Every encoded view expands to ``start_img``, 257 visual
tokens and ``end_img``; every skipped sub-image to one ``skip`` position
(:mod:`megatron_sphinx.data.geometry`).

:func:`build_packed_batch` lays rows of samples (each row fits ``seq_length``) into one
:class:`PackedBatch`. The LLM input is then assembled by the pack op
(:func:`kernels.pack_tokens`) from three sources viewed as one virtual row table::

    rows [0, T)                      text-token embeddings, in packed order     (text_ids)
    rows [T, T + V * 257)            visual tokens, view after view             (encoded views)
    rows [T + V * 257, ... + 3)      learned start_img, end_img, skip embeddings (SPECIAL_*)
    -1                               padding: zeros

``pack_index[i]`` names the source row of output position ``i`` of the ``[s, b]`` output
(flattened sequence-first: ``i = s_i * b + b_i``), exactly Megatron's embedding layout.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from megatron_sphinx.data.geometry import TOKENS_PER_VIEW, image_geometry

SPECIAL_START, SPECIAL_END, SPECIAL_SKIP = 0, 1, 2
NUM_SPECIAL = 3
PAD_INDEX = -1


@dataclass
class Sample:
    """One tokenized dialog, ready for packing.

    Attributes:
        input_ids: int32 ``[n_text]`` text tokens, BOS first.
        target_mask: bool ``[n_text]``; True where the token is trained on (assistant turns).
        image_hw: ``(height, width)`` of the image after EXIF orientation, or None (text only).
        image_slot: Text index before which the image's views are inserted (1 = after BOS).
        source_id: Index of the mix source the sample came from.
    """

    input_ids: np.ndarray
    target_mask: np.ndarray
    image_hw: tuple[int, int] | None = None
    image_slot: int = 1
    source_id: int = 0

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError("input_ids and target_mask must have the same length")
        if self.image_hw is not None and not 0 <= self.image_slot <= len(self.input_ids):
            raise ValueError(f"image_slot {self.image_slot} outside the text")

    def image_positions(self, image_size: int, grid: int, skip_padded: bool = True) -> int:
        """LLM positions the image takes (0 for text-only)."""
        if self.image_hw is None:
            return 0
        return image_geometry(*self.image_hw, image_size, grid, skip_padded).num_positions()

    def length(self, image_size: int, grid: int, skip_padded: bool = True) -> int:
        """Sequence length after image expansion."""
        return len(self.input_ids) + self.image_positions(image_size, grid, skip_padded)


@dataclass
class PackedBatch:
    """One packed micro-batch of ``b`` rows of ``s`` positions (torch tensors).

    Attributes:
        text_ids: int64 ``[T]`` text tokens in packed order (the pack op's text rows).
        views: float ``[V, 3, view, view]`` encoded views in packed order, pixels in [0, 1]
            (global view first, then valid sub-images row-major, image after image).
        pack_index: int64 ``[s * b]`` source row per output position, sequence-first.
        labels: int64 ``[b, s]`` next-token targets (0 where not trained).
        loss_mask: float32 ``[b, s]`` 1.0 where the target is an assistant token.
        position_ids: int64 ``[b, s]`` positions restarting at 0 for every sample.
        segment_ids: int32 ``[b, s]`` sample number within the row; padding has its own number.
        cu_seqlens: int32 ``[n_segments + 1]`` segment boundaries over the flattened ``[b * s]``
            (row-major); padding at a row's end is a segment of its own.
        max_seqlen: Longest segment.
        num_samples: Real samples in the batch.
        num_tokens: Real (non-padding) positions.
        num_skipped: Skipped sub-images (each saved ``TOKENS_PER_VIEW + 1`` positions).
        view_counts: int64 ``[n_images]`` encoded views per image, in packed order.
        sample_lengths: Positions of each real sample, in packed order (padding segments are
            not samples: attention FLOPs are counted from these).
        loss_sources: int64 ``[b, s]`` mix source of the sample at each position, -1 on
            padding (the loss is reported per source with it).
        features: ``[V, 257, C]`` the views already encoded, when the training step encoded
            the step's views as one stream (``--vision-batch``); None: the model encodes them.
    """

    text_ids: torch.Tensor
    views: torch.Tensor
    pack_index: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_samples: int
    num_tokens: int
    num_skipped: int
    view_counts: torch.Tensor
    sample_lengths: tuple[int, ...] = ()
    loss_sources: torch.Tensor | None = None
    features: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(b, s)``."""
        return tuple(self.labels.shape)

    def to(self, device: torch.device | str, non_blocking: bool = False,
           skip: tuple[str, ...] = ()) -> "PackedBatch":
        """A copy with every tensor on ``device``, except those named in ``skip`` (left where
        they are: a later pipeline stage never reads the pixels or the pack op's inputs)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            move = torch.is_tensor(v) and f.name not in skip
            out[f.name] = v.to(device, non_blocking=non_blocking) if move else v
        return PackedBatch(**out)

    def pin_memory(self) -> "PackedBatch":
        """A copy whose CPU tensors are in page-locked memory (tensors elsewhere are kept), so
        that ``to(cuda, non_blocking=True)`` neither blocks the host nor waits for the GPU; the
        batch itself where there is no CUDA (nothing to copy to)."""
        if not torch.cuda.is_available():
            return self
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            pin = torch.is_tensor(v) and v.device.type == "cpu" and not v.is_pinned()
            out[f.name] = v.pin_memory() if pin else v
        return PackedBatch(**out)


def build_packed_batch(rows: list[list[Sample]], seq_length: int, image_size: int, grid: int,
                       views: torch.Tensor | None = None,
                       skip_padded: bool = True) -> PackedBatch:
    """Lays rows of samples into one packed micro-batch.

    Args:
        rows: ``b`` rows; the samples of each row must fit in ``seq_length`` positions.
        seq_length: Positions per row ``s``.
        image_size: Padded-square side (448 / 672).
        grid: Sub-images per side.
        views: Encoded views in packed order ``[V, 3, v, v]``; None builds the layout only, with an
            empty ``[0, 3, v, v]`` tensor (text-only batches, or when views come later).
        skip_padded: Skip fully padded sub-images (False encodes every sub-image).

    Raises:
        ValueError: If a row is longer than ``seq_length`` or ``views`` has the wrong count.
    """
    b, s = len(rows), seq_length
    vsz = image_size // grid
    index = np.full((b, s), PAD_INDEX, dtype=np.int64)  # [b, s], transposed at the end
    labels = np.zeros((b, s), dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    position_ids = np.zeros((b, s), dtype=np.int64)
    segment_ids = np.zeros((b, s), dtype=np.int32)
    sources = np.full((b, s), -1, dtype=np.int64)
    seg_lengths: list[int] = []
    sample_lengths: list[int] = []
    text_chunks: list[np.ndarray] = []
    view_counts: list[int] = []
    n_text = 0
    n_views = 0
    n_skipped = 0
    n_samples = 0
    # Visual/special rows are numbered after all text rows; T is known only at the end, so collect
    # (kind, value) and resolve: kind 0 = text row, 1 = visual row, 2 = special row.
    kinds = np.zeros((b, s), dtype=np.int8)
    for r, row in enumerate(rows):
        pos = 0
        for seg, smp in enumerate(row):
            ids = np.asarray(smp.input_ids, dtype=np.int64)
            tmask = np.asarray(smp.target_mask, dtype=bool)
            n = smp.length(image_size, grid, skip_padded)
            if pos + n > s:
                raise ValueError(f"row {r} needs more than seq_length={s} positions")
            src = np.empty(n, dtype=np.int64)  # source row per position
            kind = np.empty(n, dtype=np.int8)
            tok = np.zeros(n, dtype=np.int64)  # token id per position (0 for image positions)
            trg = np.zeros(n, dtype=bool)  # whether the token at this position is trained on
            k = smp.image_slot if smp.image_hw is not None else len(ids)
            src[:k], kind[:k], tok[:k], trg[:k] = n_text + np.arange(k), 0, ids[:k], tmask[:k]
            p = k
            if smp.image_hw is not None:
                valid = image_geometry(*smp.image_hw, image_size, grid,
                                       skip_padded).view_valid()
                for ok in valid:
                    if ok:
                        src[p] = SPECIAL_START
                        src[p + 1:p + 1 + TOKENS_PER_VIEW] = (
                            n_views * TOKENS_PER_VIEW + np.arange(TOKENS_PER_VIEW))
                        src[p + 1 + TOKENS_PER_VIEW] = SPECIAL_END
                        kind[p] = kind[p + 1 + TOKENS_PER_VIEW] = 2
                        kind[p + 1:p + 1 + TOKENS_PER_VIEW] = 1
                        p += TOKENS_PER_VIEW + 2
                        n_views += 1
                    else:
                        src[p], kind[p] = SPECIAL_SKIP, 2
                        p += 1
                        n_skipped += 1
                view_counts.append(int(valid.sum()))
            rest = len(ids) - k
            src[p:], kind[p:] = n_text + k + np.arange(rest), 0
            tok[p:], trg[p:] = ids[k:], tmask[k:]
            n_text += len(ids)
            text_chunks.append(ids)
            index[r, pos:pos + n], kinds[r, pos:pos + n] = src, kind
            # Position t predicts the token at t + 1 when that token is trained on.
            labels[r, pos:pos + n - 1] = tok[1:]
            loss_mask[r, pos:pos + n - 1] = trg[1:]
            position_ids[r, pos:pos + n] = np.arange(n)
            segment_ids[r, pos:pos + n] = seg
            sources[r, pos:pos + n] = smp.source_id
            seg_lengths.append(n)
            sample_lengths.append(n)
            pos += n
            n_samples += 1
        if pos < s:
            segment_ids[r, pos:] = len(row)
            seg_lengths.append(s - pos)
    n_vis = n_views * TOKENS_PER_VIEW
    index = np.where(kinds == 1, index + n_text, index)
    index = np.where(kinds == 2, index + n_text + n_vis, index)
    if views is None:
        views = torch.zeros(0, 3, vsz, vsz)
    elif views.shape[0] != n_views:
        raise ValueError(f"the batch layout has {n_views} encoded views, got {views.shape[0]}")
    cu = np.concatenate([[0], np.cumsum(seg_lengths)]).astype(np.int32)
    text = np.concatenate(text_chunks) if text_chunks else np.zeros(0, dtype=np.int64)
    return PackedBatch(
        text_ids=torch.from_numpy(text.astype(np.int64)),
        views=views,
        pack_index=torch.from_numpy(np.ascontiguousarray(index.T).reshape(-1)),  # [s * b]
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        position_ids=torch.from_numpy(position_ids),
        segment_ids=torch.from_numpy(segment_ids),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(max(seg_lengths)) if seg_lengths else 0,
        num_samples=n_samples,
        num_tokens=int(sum(sample_lengths)),
        num_skipped=n_skipped,
        view_counts=torch.tensor(view_counts, dtype=torch.int64),
        sample_lengths=tuple(sample_lengths),
        loss_sources=torch.from_numpy(sources),
    )
