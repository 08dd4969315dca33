"""What the packed loader reads: the :class:`SampleSource` protocol (a preprocessed store's
:class:`~.store.StoreReader` has it) and :class:`InMemorySource`, one over Python lists."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from megatron_sphinx.data.layout import Sample


@runtime_checkable
class SampleSource(Protocol):
    """What the loader reads: :class:`~.store.StoreReader` and :class:`InMemorySource` have it.

    Attributes:
        lengths: int ``[N]`` sample lengths after image expansion (for the loader's geometry).
        source_ids: int ``[N]`` mix source of every sample.
    """

    lengths: np.ndarray
    source_ids: np.ndarray

    @property
    def source_names(self) -> list[str]:
        """Mix source names; ``source_ids`` index this list."""

    def __len__(self) -> int:
        """Number of samples."""

    def get(self, i: int) -> tuple[Sample, bytes | None]:
        """Sample ``i`` and its encoded image (None for text-only)."""


class InMemorySource:
    """A :class:`SampleSource` over lists (tests, benchmarks).

    Args:
        samples: The samples; ``sample.source_id`` gives the mix source.
        images: Encoded image bytes per sample (None for text-only), same length as ``samples``.
        image_size: Padded-square side the lengths are computed for.
        grid: Sub-images per side.
        source_names: Names of the sources (default ``"0"``, ``"1"``...).
    """

    def __init__(self, samples: Sequence[Sample], images: Sequence[bytes | None],
                 image_size: int = 448, grid: int = 2,
                 source_names: Sequence[str] | None = None):
        if len(samples) != len(images):
            raise ValueError("samples and images must have the same length")
        for s, im in zip(samples, images):
            if (s.image_hw is None) != (im is None):
                raise ValueError("a sample has image bytes exactly when it has image_hw")
        self.samples, self.images = list(samples), list(images)
        self.image_size, self.grid = image_size, grid
        self.lengths = np.array([s.length(image_size, grid) for s in samples], dtype=np.int64)
        self.source_ids = np.array([s.source_id for s in samples], dtype=np.int64)
        self.image_hw = np.array([s.image_hw or (0, 0) for s in samples],
                                 dtype=np.int64).reshape(-1, 2)
        n_src = int(self.source_ids.max()) + 1 if len(samples) else 0
        self._names = list(source_names) if source_names else [str(j) for j in range(n_src)]

    @property
    def source_names(self) -> list[str]:
        """Mix source names."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int) -> tuple[Sample, bytes | None]:
        """Sample ``i`` and its encoded image."""
        return self.samples[i], self.images[i]
