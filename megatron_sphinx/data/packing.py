"""Sequence packing: samples (by their lengths after image expansion) into rows of ``seq_length``.

:class:`SequencePacker` is an online, deterministic packer over a window of upcoming samples in
mix order. Each optimizer step it fills exactly ``rows_per_step`` rows (the global batch):

1. The window is topped up from the mix until it holds at least ``lookahead * rows * seq_length``
   tokens (a deterministic amount: it depends only on the packer's state).
2. Two plans are made from the window and the fuller one is kept (``algorithm="best"``):

   * **best-fit decreasing**: samples that have waited ``max_wait_steps`` steps first (no sample
     starves), then by decreasing length (ties: arrival order), each into the row whose free
     space is the smallest that still holds it;
   * **subset fill**: row by row, the waited-too-long samples, then the longest sample left,
     then the sub-multiset of the window's lengths that fills the rest best (an exact subset sum
     on Python-int bit sets). It finds the exact fills best-fit misses when lengths cluster
     (e.g. 1450 + 3 x 880 = 4090).

   Samples a plan leaves out stay in the window for the next step.
3. Rows are dealt to micro-batch slots in snake order of their cost (e.g. encoded views, the
   vision encoders' load) so every micro-batch, hence every data-parallel rank, gets a similar load.

The plan is a function of the mix order and the packer state only, so every data-parallel rank
computes the same global plan and takes its own slice of rows; the global batches do not depend on
the number of ranks.

Overlong samples (longer than ``seq_length``) are never silent: ``overlong="truncate"`` keeps the
first ``seq_length`` positions (the cut part, and with it its loss, is dropped) and counts it;
``overlong="drop"`` leaves the sample out and counts it. Both are logged.

Efficiency = real tokens / all tokens (``rows * seq_length``). :func:`padded_efficiency` gives the
reference implementation's approach on the same samples: every sample padded to the longest one of
its batch, batches formed by length bucketing (shuffle, sort megabatches of ``50 * batch`` by
length, cut into batches, as ``transformers``' ``LengthGroupedSampler`` does).
:func:`offline_efficiency` (best-fit decreasing over the whole set at once) is a practical ceiling
for fixed-length rows, and :func:`trimmed_efficiency` scores variable-length micro-batches (each
padded only to its longest row, rounded up to a multiple).

What limits fixed-length packing is the length distribution, not the packer. At 448 px / 2x2 an
image sample takes 5 x 259 = 1295 positions plus its text, so three fit in 4096 only when their
texts total <= 211 tokens; on a mix of mostly image samples of 1365-2048 positions a row holds
two (~2900) and the ~1200 left need a sample that short, which only text-only and wide/tall-image
samples are. On the synthetic paper-like mix (:func:`synthetic_paper_lengths`) the online packer
matches the offline best-fit ceiling (~0.86 at 4096, ~0.995 at 8192); on the embedded sample mix
it reaches ~0.97 at 4096 (best-fit alone: ~0.935); trimmed micro-batches reach ~0.99 at any
length (``tools/bench_data.py`` prints the table).
"""
from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from megatron_sphinx.data.geometry import image_geometry

logger = logging.getLogger(__name__)


@dataclass
class PackingConfig:
    """How samples are packed into rows."""

    seq_length: int = 4096
    """Positions per packed row."""
    rows_per_step: int = 256
    """Rows per optimizer step (the global batch size)."""
    micro_batch_size: int = 1
    """Rows per micro-batch (rows are balanced over micro-batch slots)."""
    lookahead: float = 2.0
    """Window size before each step, in units of the step's capacity (rows x seq_length)."""
    max_wait_steps: int = 4
    """A sample left out this many steps goes before the younger ones (the aged go longest first,
    so an aged short sample may wait a few steps more behind other aged ones; the window bounds
    that wait, so none starves)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with a sample longer than ``seq_length`` (never silent: counted and logged)."""
    algorithm: Literal["best", "bfd", "subset"] = "best"
    """``bfd``: best-fit decreasing; ``subset``: row by row, longest sample then the best-filling
    subset of the window; ``best``: plan both each step, keep the fuller."""

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {self.seq_length}")
        if self.rows_per_step < 1 or self.micro_batch_size < 1:
            raise ValueError("rows_per_step and micro_batch_size must be >= 1")
        if self.rows_per_step % self.micro_batch_size:
            raise ValueError(f"rows_per_step {self.rows_per_step} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}: change one of them")
        if self.lookahead < 1.0:
            raise ValueError(f"lookahead must be >= 1.0 (a window smaller than one step cannot "
                             f"fill it), got {self.lookahead}")
        if self.max_wait_steps < 1:
            raise ValueError("max_wait_steps must be >= 1")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.algorithm not in ("best", "bfd", "subset"):
            raise ValueError(f"algorithm must be best, bfd or subset, got {self.algorithm!r}")


#: One placed sample: ``(sample index, positions used)``; ``positions < lengths[index]`` means
#: the sample was truncated to fit.
Item = tuple[int, int]


class SequencePacker:
    """Online deterministic packer (see the module docstring).

    Args:
        cfg: Packing settings.
        lengths: int ``[N]`` every sample's length after image expansion.
        costs: Optional ``[N]`` per-sample load used to balance micro-batches (e.g. encoded
            views); default: none (rows keep the packer's order).
    """

    def __init__(self, cfg: PackingConfig, lengths: np.ndarray, costs: np.ndarray | None = None):
        self.cfg = cfg
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and self.lengths.min() < 1:
            raise ValueError("every sample must have a positive length")
        self.costs = None if costs is None else np.asarray(costs, dtype=np.float64)
        mean = float(np.minimum(self.lengths, cfg.seq_length).mean()) if len(self.lengths) else 1
        self._chunk = max(16, int(cfg.rows_per_step * cfg.seq_length / max(mean, 1.0) / 4))
        # Window, in arrival order: sample index, positions, steps waited.
        self._idx: list[int] = []
        self._len: list[int] = []
        self._wait: list[int] = []
        self.stats = {"samples": 0, "tokens": 0, "rows": 0, "steps": 0, "truncated": 0,
                      "dropped_overlong": 0}

    @property
    def window_tokens(self) -> int:
        """Tokens waiting in the window."""
        return int(sum(self._len))

    def _intake(self, indices: np.ndarray) -> None:
        s = self.cfg.seq_length
        for i in indices.tolist():
            n = int(self.lengths[i])
            if n > s:
                if self.cfg.overlong == "drop":
                    self.stats["dropped_overlong"] += 1
                    if self.stats["dropped_overlong"] <= 10:
                        logger.warning("sample %d (%d positions) is longer than seq_length %d: "
                                       "dropped (overlong='drop')", i, n, s)
                    continue
                self.stats["truncated"] += 1
                if self.stats["truncated"] <= 10:
                    logger.warning("sample %d (%d positions) is longer than seq_length %d: "
                                   "truncated, the cut part's loss dropped", i, n, s)
                n = s
            self._idx.append(i)
            self._len.append(n)
            self._wait.append(0)

    def pack_step(self, feed: Callable[[int], np.ndarray]) -> list[list[Item]]:
        """Plans one step: ``rows_per_step`` rows of ``(sample index, positions)`` items.

        Args:
            feed: ``feed(n)`` returns the next ``n`` sample indices of the mix order.
        """
        cfg = self.cfg
        g, s = cfg.rows_per_step, cfg.seq_length
        target = int(math.ceil(cfg.lookahead * g * s))
        have = self.window_tokens
        while have < target:
            before = len(self._idx)
            self._intake(np.asarray(feed(self._chunk), dtype=np.int64))
            have += sum(self._len[before:])
        plans = []
        if cfg.algorithm in ("best", "bfd"):
            plans.append(self._plan_bfd())
        if cfg.algorithm in ("best", "subset"):
            plans.append(self._plan_subset())
        # The fuller plan (ties: the first, BFD); both are deterministic.
        plan = max(plans, key=lambda rows: sum(self._len[k] for r in rows for k in r))
        return self._commit(plan)

    def _plan_bfd(self) -> list[list[int]]:
        """Best-fit decreasing: rows of window positions."""
        cfg = self.cfg
        g, s = cfg.rows_per_step, cfg.seq_length
        order = sorted(range(len(self._idx)),
                       key=lambda k: (self._wait[k] < cfg.max_wait_steps, -self._len[k], k))
        free = [(s, b) for b in range(g)]  # sorted (free positions, row)
        rows: list[list[int]] = [[] for _ in range(g)]
        for k in order:
            n = self._len[k]
            if not free or free[-1][0] < n:
                continue
            pos = bisect.bisect_left(free, (n, -1))
            room, b = free.pop(pos)
            rows[b].append(k)
            if room - n > 0:
                bisect.insort(free, (room - n, b))
        return rows

    def _plan_subset(self) -> list[list[int]]:
        """Row by row: waited-too-long samples, the longest sample left, then the subset of the
        window that fills the rest best (exact subset sum over bit sets)."""
        cfg = self.cfg
        g, s = cfg.rows_per_step, cfg.seq_length
        buckets: dict[int, list[int]] = {}  # length -> window positions, arrival order
        for k in range(len(self._idx)):
            buckets.setdefault(self._len[k], []).append(k)
        used = [False] * len(self._idx)
        aged = sorted((k for k in range(len(self._idx)) if self._wait[k] >= cfg.max_wait_steps),
                      key=lambda k: (-self._len[k], k))

        def take(n: int) -> int:
            b = buckets[n]
            while used[b[0]]:
                b.pop(0)
            k = b.pop(0)
            used[k] = True
            if not b:
                del buckets[n]
            return k

        rows: list[list[int]] = []
        for _ in range(g):
            row, room = [], s
            for k in aged:
                if not used[k] and self._len[k] <= room:
                    buckets[self._len[k]].remove(k)
                    if not buckets[self._len[k]]:
                        del buckets[self._len[k]]
                    used[k] = True
                    row.append(k)
                    room -= self._len[k]
            if not row and buckets:
                n = max(buckets)
                row.append(take(n))
                room -= n
            cand = [n for n in sorted((n for n in buckets if n <= room), reverse=True)
                    for _ in range(min(len(buckets[n]), room // n))]
            for n in _best_subset(cand, room):
                row.append(take(n))
                room -= n
            rows.append(row)
        return rows

    def _commit(self, plan: list[list[int]]) -> list[list[Item]]:
        placed = {k for r in plan for k in r}
        rows = [[(self._idx[k], self._len[k]) for k in r] for r in plan]
        keep = [k for k in range(len(self._idx)) if k not in placed]
        self._idx = [self._idx[k] for k in keep]
        self._len = [self._len[k] for k in keep]
        self._wait = [self._wait[k] + 1 for k in keep]
        self.stats["samples"] += len(placed)
        self.stats["tokens"] += sum(n for r in rows for _, n in r)
        self.stats["rows"] += self.cfg.rows_per_step
        self.stats["steps"] += 1
        return self._balance(rows)

    def _balance(self, rows: list[list[Item]]) -> list[list[Item]]:
        """Deals rows to micro-batch slots in snake order of decreasing cost."""
        if self.costs is None:
            return rows
        m = self.cfg.rows_per_step // self.cfg.micro_batch_size
        cost = [sum(self.costs[i] for i, _ in r) for r in rows]
        ranked = sorted(range(len(rows)), key=lambda b: (-cost[b], b))
        slots: list[list[list[Item]]] = [[] for _ in range(m)]
        for k, b in enumerate(ranked):
            rnd, j = divmod(k, m)
            slots[j if rnd % 2 == 0 else m - 1 - j].append(rows[b])
        return [r for slot in slots for r in slot]

    def efficiency(self) -> float:
        """Real tokens / all tokens over every step planned so far."""
        total = self.stats["rows"] * self.cfg.seq_length
        return self.stats["tokens"] / total if total else 0.0

    def state_dict(self) -> dict:
        """The window (sample index, positions, steps waited, in arrival order) and counters."""
        return {"index": list(self._idx), "length": list(self._len), "wait": list(self._wait),
                "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`."""
        if not len(state["index"]) == len(state["length"]) == len(state["wait"]):
            raise ValueError("corrupt packer state: window arrays differ in length")
        self._idx = [int(x) for x in state["index"]]
        self._len = [int(x) for x in state["length"]]
        self._wait = [int(x) for x in state["wait"]]
        self.stats = {k: int(v) for k, v in state["stats"].items()}


def _best_subset(lengths: list[int], room: int) -> list[int]:
    """The sub-multiset of ``lengths`` with the largest sum <= ``room`` (exact subset sum on
    Python-int bit sets; ties resolved deterministically)."""
    if room <= 0 or not lengths:
        return []
    mask = (1 << (room + 1)) - 1
    hist = [1]  # hist[i]: sums reachable with the first i lengths (bit t = sum t)
    for n in lengths:
        hist.append((hist[-1] | (hist[-1] << n)) & mask)
        if hist[-1] >> room & 1:
            break
    t = hist[-1].bit_length() - 1
    out = []
    for i in range(len(hist) - 1, 0, -1):
        if not hist[i - 1] >> t & 1:  # t needs length i-1
            n = lengths[i - 1]
            out.append(n)
            t -= n
    return out


# ----------------------------------------------------------------------------- efficiencies

def packing_efficiency(rows: Sequence[Sequence[Item]], seq_length: int) -> float:
    """Real tokens / all tokens of packed rows."""
    if not rows:
        return 0.0
    return sum(n for r in rows for _, n in r) / (len(rows) * seq_length)


def padded_efficiency(lengths: np.ndarray, batch_size: int, seq_length: int | None = None,
                      bucketed: bool = True, megabatch_mult: int = 50, seed: int = 0) -> float:
    """Efficiency of padding each sample to the longest of its batch (the reference approach).

    Args:
        lengths: Sample lengths, in any order.
        batch_size: Samples per batch.
        seq_length: If given, lengths are first truncated to it.
        bucketed: Form batches by length bucketing (sort megabatches of ``megabatch_mult *
            batch_size`` shuffled samples by length); False: random batches.
        megabatch_mult: Megabatch size in batches.
        seed: Shuffle seed.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    if seq_length is not None:
        lens = np.minimum(lens, seq_length)
    if not len(lens):
        return 0.0
    lens = lens[np.random.default_rng(seed).permutation(len(lens))]
    if bucketed:
        mb = batch_size * megabatch_mult
        lens = np.concatenate([np.sort(lens[a:a + mb])[::-1] for a in range(0, len(lens), mb)])
    padded = 0
    for a in range(0, len(lens), batch_size):
        b = lens[a:a + batch_size]
        padded += len(b) * int(b.max())
    return float(lens.sum()) / padded


def offline_efficiency(lengths: np.ndarray, seq_length: int) -> float:
    """Best-fit decreasing over the whole set at once (no window, no order): a practical ceiling
    for any online packer of fixed-length rows on that length distribution."""
    lens = sorted(np.minimum(np.asarray(lengths, dtype=np.int64), seq_length).tolist(),
                  reverse=True)
    free: list[tuple[int, int]] = []
    rows = 0
    for n in lens:
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows += 1
            if seq_length - n:
                bisect.insort(free, (seq_length - n, rows))
        else:
            room, b = free.pop(pos)
            if room - n:
                bisect.insort(free, (room - n, b))
    return sum(lens) / (rows * seq_length) if rows else 0.0


def trimmed_efficiency(row_tokens: Sequence[int], micro_batch_size: int, multiple: int,
                       seq_length: int) -> float:
    """Efficiency when each micro-batch is padded only to its longest row, rounded up to
    ``multiple`` (variable-length micro-batches, :attr:`LoaderConfig.pad_to_multiple`).

    Args:
        row_tokens: Real tokens of every row, in order (micro-batches are consecutive rows).
        micro_batch_size: Rows per micro-batch.
        multiple: Padding multiple of the micro-batch length.
        seq_length: Upper bound of the micro-batch length.
    """
    t = np.asarray(row_tokens, dtype=np.int64)
    total = 0
    for a in range(0, len(t), micro_batch_size):
        mb = t[a:a + micro_batch_size]
        total += len(mb) * min(seq_length, -(-max(int(mb.max()), 1) // multiple) * multiple)
    return float(t.sum()) / total if total else 0.0


def simulate_packing(lengths: np.ndarray, cfg: PackingConfig, steps: int,
                     order_seed: int = 0) -> dict:
    """Packs ``steps`` steps of samples drawn from ``lengths`` (shuffled, cycled).

    Returns:
        The packer's counters plus ``efficiency`` (real / ``rows * seq_length``),
        ``row_tokens`` (int64 per row, in order), ``consumed`` (samples drawn) and ``window``
        (samples still waiting).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    perm = np.random.default_rng(order_seed).permutation(len(lengths))
    cursor = [0]

    def feed(n: int) -> np.ndarray:
        idx = perm[(cursor[0] + np.arange(n)) % len(perm)]
        cursor[0] += n
        return idx

    packer = SequencePacker(cfg, lengths)
    row_tokens: list[int] = []
    for _ in range(steps):
        row_tokens += [sum(n for _, n in r) for r in packer.pack_step(feed)]
    return dict(packer.stats, efficiency=packer.efficiency(),
                row_tokens=np.asarray(row_tokens, dtype=np.int64), consumed=cursor[0],
                window=len(packer.state_dict()["index"]))


# ----------------------------------------------------------------------------- synthetic mix

#: The synthetic paper-like mix: (kind, share of samples, has image). See
#: :func:`synthetic_paper_lengths` for each kind's text-length model.
PAPER_MIX = (("vqa", 0.40, True), ("grounding", 0.25, True), ("caption_ocr", 0.15, True),
             ("long_dialog", 0.10, True), ("text_only", 0.10, False))


def synthetic_paper_lengths(n: int, seed: int = 0, image_size: int = 448, grid: int = 2,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Lengths (after image expansion) of a synthetic mix shaped like SPHINX-X's one-stage data.

    Text lengths include the template: ~40 tokens of system prompt and BOS, ~8 template tokens per
    turn. Kinds (share of samples):

    - ``vqa`` 40%: short-answer VQA merged per image into 1-12 turns (geometric, mean 3) of
      ~15-token questions and ~3-token answers.
    - ``grounding`` 25%: referring expressions / detection as 1-8 turns (mean 2.5) of a ~15-token
      prompt and box text (~25 tokens per box, 1-4 boxes; 10% are detection dumps of 5-40 boxes).
    - ``caption_ocr`` 15%: one turn, answer lognormal (median 60 tokens, sigma 0.8, <= 1500).
    - ``long_dialog`` 10%: LLaVA-style conversations, lognormal (median 450, sigma 0.5, <= 3000).
    - ``text_only`` 10%: ShareGPT / math / code dialogs, lognormal (median 700, sigma 0.9,
      <= 8000; a few exceed 4096).

    Images: longer side ~ U(300, 1600) px; aspect (w/h) 10% square, 55% landscape U(1.2, 1.8), 25%
    portrait 1/U(1.2, 1.8), 10% extreme U(2, 6) either way (documents, panoramas: these get skipped
    sub-images). At 448 px / 2x2 a typical image takes 5 x 259 = 1295 positions; an extreme one
    3 x 259 + 2 = 779.

    Returns:
        ``(lengths int64 [n], kind int64 [n])`` with ``kind`` indexing :data:`PAPER_MIX`.
    """
    rng = np.random.default_rng(seed)
    shares = np.array([m[1] for m in PAPER_MIX])
    kind = rng.choice(len(PAPER_MIX), size=n, p=shares / shares.sum())
    text = np.zeros(n, dtype=np.int64)
    base = 40
    for k, (name, _, _) in enumerate(PAPER_MIX):
        sel = np.flatnonzero(kind == k)
        m = len(sel)
        if name == "vqa":
            turns = np.minimum(rng.geometric(1 / 3, m), 12)
            t = base + turns * (8 + 15 + 3) + rng.integers(-5, 6, m)
        elif name == "grounding":
            turns = np.minimum(rng.geometric(1 / 2.5, m), 8)
            boxes = rng.integers(1, 5, m)
            det = rng.random(m) < 0.10
            boxes = np.where(det, rng.integers(5, 41, m), boxes)
            turns = np.where(det, 1, turns)
            t = base + turns * (8 + 15 + 25 * boxes)
        elif name == "caption_ocr":
            t = base + 8 + 12 + np.minimum(rng.lognormal(np.log(60), 0.8, m), 1500)
        elif name == "long_dialog":
            t = base + np.minimum(rng.lognormal(np.log(450), 0.5, m), 3000)
        else:
            t = base + np.minimum(rng.lognormal(np.log(700), 0.9, m), 8000)
        text[sel] = np.maximum(np.round(t), base + 4).astype(np.int64)
    lengths = text.copy()
    has_img = np.array([PAPER_MIX[k][2] for k in kind])
    longer = rng.uniform(300, 1600, n)
    r = rng.random(n)
    aspect = np.where(r < 0.10, 1.0, np.where(
        r < 0.65, rng.uniform(1.2, 1.8, n), np.where(
            r < 0.90, 1 / rng.uniform(1.2, 1.8, n),
            np.where(rng.random(n) < 0.5, 1, -1) * rng.uniform(2, 6, n))))
    cache: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(has_img):
        a = aspect[i]
        a = a if a > 0 else 1 / -a  # negative marks a tall extreme image
        w, h = (longer[i], longer[i] / a) if a >= 1 else (longer[i] * a, longer[i])
        key = (max(1, int(h)), max(1, int(w)))
        if key not in cache:
            cache[key] = image_geometry(*key, image_size, grid).num_positions()
        lengths[i] += cache[key]
    return lengths, kind
