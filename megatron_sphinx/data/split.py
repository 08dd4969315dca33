"""A fixed held-out part of a store, for evaluation (like Megatron's ``--split``, as a fraction).

Sample ``i`` of a store with ``N`` samples is held out when the ``i``-th draw of a fixed-seed
uniform stream is below the fraction. The choice depends only on ``N`` and the fraction (not on
``--seed``, the parallel layout or the mix weights), so training never sees a held-out sample,
every source keeps about the same share, and a resumed run splits the same way.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megatron_sphinx.data.layout import Sample

#: Seed of the split's uniform stream (fixed: changing ``--seed`` does not move samples).
SPLIT_SEED = 20240201


def held_out(num_samples: int, fraction: float) -> np.ndarray:
    """bool ``[num_samples]``: which samples the split holds out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    return np.random.default_rng(SPLIT_SEED).random(num_samples) < fraction


def subset_fingerprint(fingerprint: str | None, tag: str) -> str:
    """The data fingerprint of a part of a store (a resume checks it against the saved one)."""
    return f"{fingerprint or ''}|{tag}"


def part_tags(fraction: float) -> tuple[str, str]:
    """``(training tag, held-out tag)`` of the split at ``fraction``."""
    return f"train {fraction}", f"held-out {fraction}"


class SubsetSource:
    """The samples of ``base`` at ``indices``, with the same sample-source interface.

    Args:
        base: A :class:`~.store.StoreReader` (or anything with ``lengths``, ``source_ids``,
            ``source_names``, ``get`` and optionally ``image_hw`` and ``meta``).
        indices: int ``[M]`` the base's sample indices, in order.
        tag: Appended to the base's data fingerprint (a resume checks it), e.g. ``train 0.01``.
    """

    def __init__(self, base, indices: np.ndarray, tag: str):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(base.lengths)[self.indices]
        self.source_ids = np.asarray(base.source_ids)[self.indices]
        hw = getattr(base, "image_hw", None)
        self.image_hw = None if hw is None else np.asarray(hw)[self.indices]
        meta = getattr(base, "meta", None)
        self.meta = None if meta is None else dataclasses.replace(
            meta, num_samples=len(self.indices),
            fingerprint=subset_fingerprint(meta.fingerprint, tag))

    @property
    def source_names(self) -> list[str]:
        """The base's source names (``source_ids`` index this list)."""
        return list(self.base.source_names)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int) -> tuple[Sample, bytes | None]:
        """Sample ``i`` of the subset and its image bytes (None for text-only samples)."""
        return self.base.get(int(self.indices[i]))


def checked_mask(num_samples: int, fraction: float) -> np.ndarray:
    """:func:`held_out`, refusing a split that leaves either part empty.

    Raises:
        ValueError: When either part would be empty, with what to change.
    """
    mask = held_out(num_samples, fraction)
    n_out = int(mask.sum())
    if n_out == 0 or n_out == num_samples:
        raise ValueError(f"--eval-split {fraction} holds out {n_out} of the {num_samples} "
                         "samples: choose a fraction that leaves samples on both sides")
    return mask


def split_source(base, fraction: float) -> tuple[SubsetSource, SubsetSource]:
    """``(training part, held-out part)`` of ``base``.

    Raises:
        ValueError: When either part would be empty, with what to change.
    """
    mask = checked_mask(len(base), fraction)
    train_tag, held_tag = part_tags(fraction)
    return (SubsetSource(base, np.flatnonzero(~mask), train_tag),
            SubsetSource(base, np.flatnonzero(mask), held_tag))
