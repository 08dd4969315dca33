"""A deterministic synthetic batch source (random dialogs and images) for tests and benchmarks.

It produces exactly what the real loader produces (:class:`PackedBatch` micro-batches per
data-parallel rank) without a store or image decoding, so parallel-layout tests depend on the model
and the training step only. Global batch ``g`` is a pure function of ``(seed, g)``; data-parallel
rank ``r`` of ``D`` takes rows ``r * G/D ... (r + 1) * G/D - 1`` of it.

With ``prefetch`` (as the training command builds it on GPUs) one background thread makes the
next global batch while the current one trains, as the real loader's workers do: drawing ~100
views of random pixels and pinning them takes ~0.1 s, which would otherwise stall every step.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.layout import PackedBatch, Sample, build_packed_batch

ASPECTS = [(1, 1), (1, 2), (2, 1), (3, 4), (1, 3), (3, 1), (2, 3)]


class SyntheticLoader:
    """Random packed micro-batches, reproducible and independent of the data-parallel size.

    Args:
        vocab_size: Token ids are drawn from ``[3, vocab_size)``.
        seq_length: Positions per packed row.
        image_size: Padded-square side.
        grid: Sub-images per side.
        global_batch_size: Rows per optimizer step over all DP ranks.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size.
        seed: Seed of the whole stream.
        image_fraction: Fraction of samples with an image.
        packing: Pack several samples per row (False: one sample per row).
        skip_padded: Skip fully padded sub-images (False: encode every sub-image).
        micro_batch_size: Rows per micro-batch (each row drawn as with one row per micro-batch,
            so the stream of rows does not depend on it).
        prefetch: Make the next global batch in a background thread (the batches are the
            same either way).
    """

    def __init__(self, vocab_size: int, seq_length: int, image_size: int, grid: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 image_fraction: float = 0.5, packing: bool = True, skip_padded: bool = True,
                 micro_batch_size: int = 1, prefetch: bool = False):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.image_size, self.grid = image_size, grid
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.seed, self.image_fraction, self.packing = seed, image_fraction, packing
        self.skip_padded = skip_padded
        if (global_batch_size // dp_size) % micro_batch_size:
            raise ValueError(f"{global_batch_size // dp_size} rows per data-parallel rank do not "
                             f"split into micro-batches of {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.step = 0
        self.prefetch = prefetch
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future] | None = None  # (step, its batches being made)

    def _sample(self, rng: np.random.Generator, room: int) -> Sample | None:
        n_text = int(rng.integers(8, 96))
        hw = None
        if rng.random() < self.image_fraction:
            a, b = ASPECTS[rng.integers(len(ASPECTS))]
            hw = (int(100 * a), int(100 * b))
            geo = image_geometry(*hw, self.image_size, self.grid, self.skip_padded)
            if geo.num_positions() + n_text > room:
                hw = None
        n_text = min(n_text, room)
        if n_text < 4:
            return None
        ids = rng.integers(3, self.vocab_size, n_text).astype(np.int32)
        ids[0] = 1  # BOS
        target = np.zeros(n_text, dtype=bool)
        target[n_text // 2:] = True
        return Sample(ids, target, hw)

    def _row(self, rng: np.random.Generator) -> list[Sample]:
        row, used = [], 0
        while True:
            smp = self._sample(rng, self.seq_length - used)
            if smp is None:
                return row
            row.append(smp)
            used += smp.length(self.image_size, self.grid, self.skip_padded)
            if not self.packing or self.seq_length - used < 16:
                return row

    def _views(self, rng: np.random.Generator, rows: list[list[Sample]]) -> torch.Tensor:
        v = self.image_size // self.grid
        n = sum(image_geometry(*s.image_hw, self.image_size, self.grid,
                               self.skip_padded).num_encoded()
                for row in rows for s in row if s.image_hw is not None)
        return torch.from_numpy(rng.random((n, 3, v, v), dtype=np.float32))

    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches (``micro_batch_size`` rows each) of the next global batch."""
        step = self.step
        if not self.prefetch:
            out = self._make(step)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="synthetic-data")
            if self._ahead is not None and self._ahead[0] == step:
                out = self._ahead[1].result()
            else:  # first call, or the position was moved (load_state_dict)
                out = self._make(step)
            self._ahead = (step + 1, self._pool.submit(self._make, step + 1))
        self.step = step + 1
        return out

    def close(self) -> None:
        """Stops the background thread (a later :meth:`next_step` starts it again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._ahead = None, None

    def _make(self, step: int) -> list[PackedBatch]:
        """The micro-batches of global batch ``step`` (a pure function of seed and step)."""
        per_rank = self.global_batch_size // self.dp_size
        out = []
        for first in range(0, per_rank, self.micro_batch_size):
            rows, views = [], []
            for i in range(first, first + self.micro_batch_size):
                row_id = self.dp_rank * per_rank + i
                rng = np.random.default_rng([self.seed, step, row_id])
                rows.append(self._row(rng))
                views.append(self._views(rng, rows[-1:]))
            out.append(build_packed_batch(rows, self.seq_length, self.image_size, self.grid,
                                          torch.cat(views), self.skip_padded).pin_memory())
        return out

    def state_dict(self) -> dict:
        """Position in the stream (global, independent of the data-parallel layout)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`."""
        self.step = int(state["step"])
