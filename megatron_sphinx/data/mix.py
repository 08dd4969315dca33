"""The blended mix order: a deterministic, seeded, infinite stream of sample indices over sources.

Like Megatron's ``BlendedDataset``: position ``i`` (0, 1, 2, ...) of the global stream takes the
source whose count lags its weight the most (largest ``w_j * (i + 1) - count_j``, ties to the
lower source id), then the next sample of that source. Within source ``j``, its ``k``-th draw is
``members_j[perm_{j,e}[k mod N_j]]`` with epoch ``e = k // N_j`` and ``perm_{j,e}`` a permutation
seeded by ``(seed, j, e)``: every epoch of a source is a fresh shuffle, and a small source is
repeated (up-sampled) as its weight demands.

The order is a function of the global position only (and of ``seed``, the weights and the sources'
members), never of the number of data-parallel ranks: ranks split each global batch, not the
stream. The state (position and per-source counts) is a few integers, and :meth:`BlendedMix.seek`
recomputes it from any position, so a restart reproduces the stream exactly.

Permutations come from numpy's ``default_rng`` (PCG64). numpy keeps its ``Generator`` streams
stable across releases in practice, but does not promise it: pin numpy for bit-exact resumes
across upgrades.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def normalize_weights(weights: Sequence[float] | Mapping[str, float] | None,
                      sizes: Sequence[int], names: Sequence[str] | None = None) -> np.ndarray:
    """Mix weights as a float64 array summing to 1 over the sources that have samples.

    Args:
        weights: Per-source weights (a sequence aligned with source ids, or ``{name: weight}``),
            or None for weights proportional to the sources' sizes.
        sizes: Samples per source.
        names: Source names (needed when ``weights`` is a mapping).

    Raises:
        ValueError: On negative weights, a mapping naming an unknown source, or no sample with a
            positive weight.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    if weights is None:
        w = sizes.astype(np.float64)
    elif isinstance(weights, Mapping):
        if names is None:
            raise ValueError("weights given by name need the source names")
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"mix weights name unknown sources {sorted(unknown)}; "
                             f"the store has {list(names)}")
        w = np.array([float(weights.get(nm, 0.0)) for nm in names], dtype=np.float64)
    else:
        w = np.asarray(list(weights), dtype=np.float64)
        if len(w) != n:
            raise ValueError(f"{len(w)} mix weights for {n} sources: give one weight per source")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"mix weights must be finite and >= 0, got {w.tolist()}")
    empty = (sizes == 0) & (w > 0)
    for j in np.flatnonzero(empty):
        label = names[j] if names is not None else str(j)
        logger.warning("mix source %s has weight %g but no samples: it is left out", label, w[j])
    w = np.where(sizes > 0, w, 0.0)
    if w.sum() <= 0:
        raise ValueError("no mix source has both samples and a positive weight: check the mix")
    return w / w.sum()


class BlendedMix:
    """Infinite deterministic blended order over sources.

    Args:
        source_ids: int ``[N]`` source id of every sample (e.g. ``StoreReader.source_ids``).
        weights: Per-source weights (sequence or ``{name: weight}``), or None for proportional to
            size.
        seed: Shuffle seed.
        names: Source names (for weights by name and messages); defaults to ``"0"``, ``"1"``...
        num_sources: Number of sources (default: ``len(names)`` or ``max(source_ids) + 1``).
    """

    def __init__(self, source_ids: np.ndarray, weights: Sequence[float] | Mapping[str, float]
                 | None = None, seed: int = 0, names: Sequence[str] | None = None,
                 num_sources: int | None = None):
        source_ids = np.asarray(source_ids, dtype=np.int64)
        if num_sources is None:
            num_sources = len(names) if names is not None else (
                int(source_ids.max()) + 1 if len(source_ids) else 0)
        if len(source_ids) and (source_ids.min() < 0 or source_ids.max() >= num_sources):
            raise ValueError(f"source ids must be in [0, {num_sources})")
        order = np.argsort(source_ids, kind="stable")
        bounds = np.searchsorted(source_ids[order], np.arange(num_sources + 1))
        self.members = [order[bounds[j]:bounds[j + 1]] for j in range(num_sources)]
        self.sizes = np.array([len(m) for m in self.members], dtype=np.int64)
        self.names = list(names) if names is not None else [str(j) for j in range(num_sources)]
        self.weights = normalize_weights(weights, self.sizes, self.names)
        self.seed = int(seed)
        self._active = [j for j in range(num_sources) if self.weights[j] > 0]
        self._w = [float(x) for x in self.weights]
        self.position = 0
        self.counts = np.zeros(num_sources, dtype=np.int64)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------ order
    def _choose(self, start: int, n: int, counts: np.ndarray) -> np.ndarray:
        """Source of positions ``[start, start + n)``; advances ``counts`` in place."""
        out = np.empty(n, dtype=np.int64)
        c = [int(x) for x in counts]
        w, active = self._w, self._active
        for k in range(n):
            t = start + k + 1
            best, bj = -np.inf, active[0]
            for j in active:
                d = w[j] * t - c[j]
                if d > best:
                    best, bj = d, j
            c[bj] += 1
            out[k] = bj
        counts[:] = c
        return out

    def _perm(self, j: int, epoch: int) -> np.ndarray:
        key = (j, epoch)
        p = self._perm_cache.get(key)
        if p is None:
            if len(self._perm_cache) > 4 * len(self.members):
                self._perm_cache.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, j, epoch]))
            p = self._perm_cache[key] = rng.permutation(int(self.sizes[j]))
        return p

    def _draws(self, j: int, k0: int, k1: int) -> np.ndarray:
        """Sample indices of source ``j``'s draws ``k0 .. k1 - 1``."""
        n = int(self.sizes[j])
        ks = np.arange(k0, k1, dtype=np.int64)
        out = np.empty(len(ks), dtype=np.int64)
        epochs = ks // n
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.members[j][self._perm(j, int(e))[ks[sel] % n]]
        return out

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` sample indices (int64), advancing the position."""
        start_counts = self.counts.copy()
        src = self._choose(self.position, n, self.counts)
        out = np.empty(n, dtype=np.int64)
        for j in np.unique(src):
            sel = src == j
            k0 = int(start_counts[j])
            out[sel] = self._draws(int(j), k0, k0 + int(sel.sum()))
        self.position += n
        return out

    def peek(self, start: int, n: int) -> np.ndarray:
        """Sample indices at global positions ``[start, start + n)`` without moving (pure)."""
        other = BlendedMix.__new__(BlendedMix)
        other.__dict__.update(self.__dict__)
        other.counts = self.counts.copy()
        other.seek(start)
        return other.take(n)

    def seek(self, position: int) -> None:
        """Moves to global ``position`` (recomputes the per-source counts: O(position))."""
        if position < 0:
            raise ValueError("position must be >= 0")
        if position >= self.position:
            self._choose(self.position, position - self.position, self.counts)
        else:
            self.counts[:] = 0
            self._choose(0, position, self.counts)
        self.position = position

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """``{"position", "counts", "seed", "weights"}`` (plain Python types)."""
        return {"position": int(self.position), "counts": [int(c) for c in self.counts],
                "seed": self.seed, "weights": [float(w) for w in self.weights]}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (the counts are checked for consistency with the weights).

        Raises:
            ValueError: If the saved seed or weights differ from this mix's (a different mix
                cannot reproduce the saved stream).
        """
        if int(state["seed"]) != self.seed:
            raise ValueError(f"the checkpoint's data seed is {state['seed']}, this run's is "
                             f"{self.seed}: use the same seed to resume")
        if not np.allclose(state["weights"], self.weights, rtol=0, atol=1e-12):
            raise ValueError(f"the checkpoint's mix weights {state['weights']} differ from this "
                             f"run's {self.weights.tolist()}: use the same mix to resume")
        counts = np.asarray(state["counts"], dtype=np.int64)
        pos = int(state["position"])
        if len(counts) != len(self.counts) or counts.sum() != pos:
            raise ValueError("corrupt mix state: counts do not add up to the position")
        # The largest-deficit rule keeps every count within a few draws of weight * position.
        if np.any(np.abs(counts - self.weights * pos) > len(counts) + 1):
            raise ValueError("the mix state does not match this mix's weights: use the same mix "
                             "to resume")
        self.position = int(state["position"])
        self.counts = counts.copy()
