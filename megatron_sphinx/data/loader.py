"""The training loader of one data-parallel rank: mix -> packing -> samples + views -> PackedBatch.

Every step, every rank plans the same *global* batch (``global_batch_size`` packed rows; the
blended mix order and the packer are deterministic and cheap, see :mod:`~.mix` and
:mod:`~.packing`), then loads and decodes only its own rows: rank ``r`` of ``D`` takes rows
``[r * G/D, (r + 1) * G/D)`` and cuts them into micro-batches of ``micro_batch_size`` rows. The
global batches therefore do not depend on the data-parallel size.

Background work: one planner thread runs ``prefetch_steps`` steps ahead and hands each step to a
pool of ``num_workers`` threads that read samples from the source, decode images with DALI (one
:class:`~.images.ImageProcessor` per thread; DALI has its own decode threads) and build the
:class:`~.layout.PackedBatch` micro-batches. Steps come out in order.

Two switches reproduce the reference implementation's batches for comparisons
(``LoaderConfig``): ``packing=False`` puts exactly one sample, the next of the mix order, in each
row (padded to ``seq_length``, or trimmed with ``pad_to_multiple``); ``skip_padded=False`` encodes
every sub-image, fully padded ones included (lengths are recomputed from the stored image sizes,
each skipped sub-image costing ``POSITIONS_PER_VIEW`` positions instead of one).

A sample whose image fails to decode (or whose decoded size differs from the stored one) is left
out of its row with a logged, counted reason; the row keeps its other samples and the run goes on.
:attr:`PackedLoader.stats` counts the work of the steps :meth:`PackedLoader.next_step` returned
(each step's counts are added when it is returned), never that of prefetched steps dropped by
:meth:`PackedLoader.pause` or a rewind.

:meth:`PackedLoader.state_dict` is the planner state after the last step returned by
:meth:`PackedLoader.next_step` (not the prefetched ones): the mix position and counts, and the
packing window. It holds no rank-specific data, so a run resumed from it, with any data-parallel
size, sees exactly the batches an uninterrupted run would. :meth:`PackedLoader.load_state_dict`
(a rewind, as each held-out evaluation does) and :meth:`PackedLoader.pause` keep the worker pool
and its image processors (DALI pipelines, GPU memory on a GPU); :meth:`PackedLoader.close` frees
them.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from megatron_sphinx.data.geometry import POSITIONS_PER_SKIP, POSITIONS_PER_VIEW
from megatron_sphinx.data.images import ImageConfig, ImageProcessor
from megatron_sphinx.data.layout import PackedBatch, Sample, build_packed_batch
from megatron_sphinx.data.mix import BlendedMix
from megatron_sphinx.data.packing import Item, PackingConfig, SequencePacker
from megatron_sphinx.data.sample_source import SampleSource

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_LOG_FIRST = 20  # skipped samples logged at WARNING; later ones at DEBUG (all counted)


@dataclass
class LoaderConfig:
    """The training loader (one instance per data-parallel rank, same config on all)."""

    seq_length: int = 4096
    """Positions per packed row."""
    image_size: int = 448
    """Padded-square side (must match the source's lengths)."""
    grid: int = 2
    """Sub-images per side."""
    global_batch_size: int = 256
    """Packed rows per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Packed rows per micro-batch."""
    seed: int = 1234
    """Seed of the mix order."""
    weights: Sequence[float] | Mapping[str, float] | None = None
    """Mix weights per source (list or ``{name: weight}``); None: the store's recorded weights
    (``meta.extra["weights"]``) if any, else proportional to the sources' sizes."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Samples longer than ``seq_length``: truncate (cut part's loss dropped) or drop; counted."""
    lookahead: float = 2.0
    """Packing window, in steps' worth of tokens."""
    packing_algorithm: Literal["best", "bfd", "subset"] = "best"
    """Packing planner (:class:`~.packing.PackingConfig`); ``best`` keeps the fuller plan."""
    max_wait_steps: int = 4
    """A sample the packer left out this many steps is placed first."""
    num_workers: int = 2
    """Threads loading and decoding steps; 0 = everything in the caller's thread."""
    prefetch_steps: int = 2
    """Steps planned and loaded ahead of the training loop (with ``num_workers > 0``)."""
    image_threads: int = 2
    """DALI decode threads per worker."""
    image_interp: Literal["cubic", "linear"] = "cubic"
    """Antialiased resampling kernel of the image resize and global view."""
    image_device: Literal["auto", "cpu", "gpu"] = "auto"
    """DALI decoding device; ``auto``: ``mixed`` on a GPU when CUDA is available, else CPU."""
    pad_to_multiple: int | None = None
    """None: every micro-batch is ``seq_length`` long. An int: pad each micro-batch only to its
    longest row rounded up to this multiple (variable shapes; for the THD / varlen path)."""
    packing: bool = True
    """Pack several samples per row; False: exactly one sample per row, in mix order."""
    skip_padded: bool = True
    """Replace fully padded sub-images by one skip token; False encodes every sub-image."""

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not divisible by grid {self.grid}")
        if self.num_workers < 0 or self.prefetch_steps < 1:
            raise ValueError("num_workers must be >= 0 and prefetch_steps >= 1")
        if self.pad_to_multiple is not None and self.pad_to_multiple < 1:
            raise ValueError("pad_to_multiple must be None or >= 1")
        self.packing_config()  # validates the rest

    def packing_config(self) -> PackingConfig:
        """The packer's settings."""
        return PackingConfig(self.seq_length, self.global_batch_size, self.micro_batch_size,
                             self.lookahead, self.max_wait_steps, self.overlong,
                             self.packing_algorithm)


def views_per_sample(image_hw: np.ndarray, image_size: int, grid: int,
                     skip_padded: bool = True) -> np.ndarray:
    """Encoded views per sample (0 for text-only) from ``(h, w)`` pairs, vectorised geometry
    (with ``skip_padded=False`` every image has ``1 + grid**2``)."""
    hw = np.asarray(image_hw, dtype=np.float64).reshape(-1, 2)
    has = hw[:, 0] > 0
    if not skip_padded:
        return np.where(has, 1 + grid * grid, 0).astype(np.int64)
    longer = np.maximum(hw.max(axis=1), 1.0)
    scale = image_size / longer
    rh = np.clip(np.round(hw[:, 0] * scale), 1, image_size)
    rw = np.clip(np.round(hw[:, 1] * scale), 1, image_size)
    v = image_size // grid
    n = 1 + np.ceil(rh / v) * np.ceil(rw / v)
    return np.where(has, n, 0).astype(np.int64)


def unskipped_lengths(lengths: np.ndarray, image_hw: np.ndarray, image_size: int,
                      grid: int) -> np.ndarray:
    """Sample lengths with every sub-image encoded, from lengths computed with skipping."""
    skipped = (views_per_sample(image_hw, image_size, grid, skip_padded=False)
               - views_per_sample(image_hw, image_size, grid))  # [N]
    extra = POSITIONS_PER_VIEW - POSITIONS_PER_SKIP  # per sub-image encoded instead of skipped
    return np.asarray(lengths, dtype=np.int64) + skipped * extra


class OneSamplePerRow:
    """The planner of ``packing=False``: each row holds the next sample of the mix order alone.

    Same interface as :class:`~.packing.SequencePacker` (``pack_step``, ``stats``, state); the mix
    position is its whole state, so it keeps no window. Overlong samples are truncated or dropped
    (``PackingConfig.overlong``), counted and logged, as the packer does.

    Args:
        cfg: Packing settings (``seq_length``, ``rows_per_step``, ``overlong``).
        lengths: int ``[N]`` every sample's length after image expansion.
    """

    def __init__(self, cfg: PackingConfig, lengths: np.ndarray):
        self.cfg = cfg
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.stats = {"samples": 0, "tokens": 0, "rows": 0, "steps": 0, "truncated": 0,
                      "dropped_overlong": 0}

    def pack_step(self, feed) -> list[list[Item]]:
        """``rows_per_step`` rows of one ``(sample index, positions)`` item each.

        Args:
            feed: ``feed(n)`` returns the next ``n`` sample indices of the mix order.
        """
        g, s = self.cfg.rows_per_step, self.cfg.seq_length
        rows: list[list[Item]] = []
        dropped_in_a_row = 0
        while len(rows) < g:
            for i in np.asarray(feed(g - len(rows)), dtype=np.int64).tolist():
                n = int(self.lengths[i])
                if n > s:
                    drop = self.cfg.overlong == "drop"
                    key = "dropped_overlong" if drop else "truncated"
                    self.stats[key] += 1
                    if self.stats[key] <= 10:
                        logger.warning("sample %d (%d positions) is longer than seq_length %d: "
                                       "%s", i, n, s, "dropped (overlong='drop')" if drop
                                       else "truncated, the cut part's loss dropped")
                    if drop:
                        dropped_in_a_row += 1
                        if dropped_in_a_row > len(self.lengths):
                            raise ValueError(f"no sample fits seq_length {s} with overlong="
                                             "'drop': raise the sequence length")
                        continue
                    n = s
                dropped_in_a_row = 0
                rows.append([(i, n)])
        self.stats["samples"] += g
        self.stats["tokens"] += sum(n for r in rows for _, n in r)
        self.stats["rows"] += g
        self.stats["steps"] += 1
        return rows

    def state_dict(self) -> dict:
        """The counters (the window is always empty)."""
        return {"index": [], "length": [], "wait": [], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`."""
        if state["index"]:
            raise ValueError("the loader state holds a packing window: it was saved with "
                             "packing on; resume with packing on")
        self.stats = {k: int(v) for k, v in state["stats"].items()}


@dataclass
class _StepPlan:
    step: int
    rows: list[list[Item]]  # this rank's rows
    state_after: dict


class PackedLoader:
    """Packed micro-batches for one data-parallel rank (see the module docstring).

    Args:
        source: The samples (:class:`~.store.StoreReader` or any :class:`SampleSource`).
        cfg: Loader settings (identical on every rank).
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size; must divide ``global_batch_size / micro_batch_size``.

    Raises:
        ValueError: On a layout that does not divide, or a source made for another geometry.
    """

    def __init__(self, source: SampleSource, cfg: LoaderConfig, dp_rank: int = 0,
                 dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        micro = cfg.global_batch_size // cfg.micro_batch_size
        if micro % dp_size:
            raise ValueError(
                f"global_batch_size {cfg.global_batch_size} / micro_batch_size "
                f"{cfg.micro_batch_size} = {micro} micro-batches do not split over {dp_size} "
                "data-parallel ranks: change --global-batch-size")
        meta = getattr(source, "meta", None)
        src_geo = (getattr(meta, "image_size", None) or getattr(source, "image_size", None),
                   getattr(meta, "grid", None) or getattr(source, "grid", None))
        if src_geo[0] is not None and src_geo != (cfg.image_size, cfg.grid):
            raise ValueError(f"the data was prepared for image_size {src_geo[0]} grid "
                             f"{src_geo[1]}, the loader uses {cfg.image_size} grid {cfg.grid}: "
                             "preprocess again or change the recipe's image settings")
        if len(source) == 0:
            raise ValueError("the data source has no samples")
        self.source, self.cfg = source, cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.rows_per_rank = cfg.global_batch_size // dp_size
        hw = getattr(source, "image_hw", None)
        self.lengths = np.asarray(source.lengths, dtype=np.int64)
        """int ``[N]`` sample lengths under this loader's geometry (``skip_padded``)."""
        if not cfg.skip_padded:
            if hw is None:
                raise ValueError("skip_padded=False needs the source's image sizes (image_hw), "
                                 "which this source lacks: use a store or an InMemorySource")
            self.lengths = unskipped_lengths(self.lengths, hw, cfg.image_size, cfg.grid)
        costs = (None if hw is None
                 else views_per_sample(hw, cfg.image_size, cfg.grid, cfg.skip_padded))
        weights = cfg.weights
        if weights is None and meta is not None:  # the mix weights recorded in the store
            weights = (getattr(meta, "extra", None) or {}).get("weights")
        self._mix = BlendedMix(source.source_ids, weights, cfg.seed, names=source.source_names)
        logger.info("mix over %d sources, weights %s", len(self._mix.names),
                    dict(zip(self._mix.names, np.round(self._mix.weights, 4).tolist())))
        self._packer = (SequencePacker(cfg.packing_config(), self.lengths, costs) if cfg.packing
                        else OneSamplePerRow(cfg.packing_config(), self.lengths))
        self._planned = 0
        self._fingerprint = str(getattr(meta, "fingerprint", "") or "")
        self._consumed = self._planner_state()
        # Worker threads do not inherit the CUDA device: pin the one current now (the rank's).
        self._gpu_index = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.stats: Counter = Counter()
        """Counts of the steps returned so far (samples, tokens, positions, micro_batches,
        truncated, skipped..., decode paths)."""
        self._stats_lock = threading.Lock()
        self._skips_seen = 0  # every skip seen by a worker (rations the warnings)
        self._local = threading.local()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._submitted: set[Future] = set()  # submitted steps not yet returned
        self._stop = threading.Event()

    # ------------------------------------------------------------------ planning (global)
    def _planner_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._planned,
                "num_samples": len(self.source), "fingerprint": self._fingerprint,
                "global_batch_size": self.cfg.global_batch_size,
                "micro_batch_size": self.cfg.micro_batch_size,
                "seq_length": self.cfg.seq_length, "packing": self.cfg.packing,
                "skip_padded": self.cfg.skip_padded, "mix": self._mix.state_dict(),
                "packer": self._packer.state_dict()}

    def _plan_next(self) -> _StepPlan:
        rows = self._packer.pack_step(self._mix.take)
        self._planned += 1
        a = self.dp_rank * self.rows_per_rank
        return _StepPlan(self._planned, rows[a:a + self.rows_per_rank], self._planner_state())

    # ------------------------------------------------------------------ loading (this rank)
    def _processor(self) -> ImageProcessor:
        p = getattr(self._local, "proc", None)
        if p is None:
            p = self._local.proc = ImageProcessor(ImageConfig(
                self.cfg.image_size, self.cfg.grid, device=self.cfg.image_device,
                interp=self.cfg.image_interp, device_id=self._gpu_index,
                num_threads=self.cfg.image_threads, skip_padded=self.cfg.skip_padded))
        return p

    def _skip(self, stats: Counter, step: int, index: int, reason: str) -> None:
        stats["skipped"] += 1
        stats[f"skipped:{reason.split(':')[0]}"] += 1
        with self._stats_lock:
            self._skips_seen += 1
            n = self._skips_seen
        logger.log(logging.WARNING if n <= _LOG_FIRST else logging.DEBUG,
                   "step %d: sample %d skipped (%s)", step, index, reason)

    def _prepare(self, stats: Counter, step: int, index: int,
                 n: int) -> tuple[Sample, bytes | None] | None:
        """Reads sample ``index``; truncates it to ``n`` positions when the plan says so."""
        cfg = self.cfg
        smp, img = self.source.get(index)
        full = smp.length(cfg.image_size, cfg.grid, cfg.skip_padded)
        if full != int(self.lengths[index]):
            self._skip(stats, step, index, f"length_mismatch: source says {self.lengths[index]}"
                       f", sample has {full}")
            return None
        if n < full:  # truncated by the packer: keep the first n positions
            keep = n - smp.image_positions(cfg.image_size, cfg.grid, cfg.skip_padded)
            if smp.image_hw is not None and keep <= smp.image_slot:
                self._skip(stats, step, index, "overlong_image: the image alone needs more "
                           f"than seq_length {cfg.seq_length}")
                return None
            smp = Sample(smp.input_ids[:keep], smp.target_mask[:keep], smp.image_hw,
                         smp.image_slot, smp.source_id)
            stats["truncated"] += 1
        return smp, img

    def _micro_batch(self, stats: Counter, step: int, rows: list[list[Item]]) -> PackedBatch:
        cfg = self.cfg
        got: list[list[tuple[int, Sample, bytes | None]]] = []
        for row in rows:
            out = []
            for index, n in row:
                r = self._prepare(stats, step, index, n)
                if r is not None:
                    out.append((index, r[0], r[1]))
            got.append(out)
        with_img = [(ri, k) for ri, row in enumerate(got) for k, x in enumerate(row)
                    if x[2] is not None]
        views = None
        if with_img:
            batch = self._processor()([got[ri][k][2] for ri, k in with_img])
            keep_views, offset, drop = [], 0, set()
            for (ri, k), cnt, err, hw in zip(with_img, batch.view_counts.tolist(), batch.errors,
                                             batch.sizes):
                index, smp, _ = got[ri][k]
                if err is not None:
                    self._skip(stats, step, index, f"image_decode: {err}")
                    drop.add((ri, k))
                elif tuple(hw) != tuple(smp.image_hw):
                    self._skip(stats, step, index,
                               f"image_size: decoded {hw}, stored {smp.image_hw}")
                    drop.add((ri, k))
                else:
                    keep_views.append(batch.views[offset:offset + cnt])
                offset += cnt
            got = [[x for k, x in enumerate(row) if (ri, k) not in drop]
                   for ri, row in enumerate(got)]
            views = torch.cat(keep_views) if keep_views else None
            stats.update(batch_paths(batch.paths))
        sample_rows = [[x[1] for x in row] for row in got]
        s = cfg.seq_length
        if cfg.pad_to_multiple:
            longest = max([sum(x.length(cfg.image_size, cfg.grid, cfg.skip_padded) for x in r)
                           for r in sample_rows] + [1])
            m = cfg.pad_to_multiple
            s = min(s, -(-longest // m) * m)
        pb = build_packed_batch(sample_rows, s, cfg.image_size, cfg.grid, views,
                                skip_padded=cfg.skip_padded)
        pb = pb.pin_memory()  # in a worker, off the training loop's path (no-op without CUDA)
        stats.update(samples=pb.num_samples, tokens=pb.num_tokens, positions=pb.labels.numel(),
                     micro_batches=1)
        return pb

    def _materialize(self, plan: _StepPlan) -> tuple[list[PackedBatch], Counter]:
        """The step's micro-batches and their counts (added to ``stats`` once returned)."""
        m, stats = self.cfg.micro_batch_size, Counter()
        return [self._micro_batch(stats, plan.step, plan.rows[a:a + m])
                for a in range(0, len(plan.rows), m)], stats

    def _returned(self, out: tuple[list[PackedBatch], Counter], state: dict) -> list[PackedBatch]:
        with self._stats_lock:
            self.stats.update(out[1])
        self._consumed = state
        return out[0]

    # ------------------------------------------------------------------ background
    def _producer(self) -> None:
        try:
            while not self._stop.is_set():
                plan = self._plan_next()
                fut = self._pool.submit(self._materialize, plan)
                self._submitted.add(fut)  # before it can reach the consumer, who discards it
                item = (fut, plan.state_after)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            f: Future = Future()
            f.set_exception(e)
            self._queue.put((f, None))

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch_steps)
        if self._pool is None:  # kept over pauses and rewinds, with its threads' processors
            self._pool = ThreadPoolExecutor(self.cfg.num_workers, thread_name_prefix="loader")
        self._thread = threading.Thread(target=self._producer, name="loader-plan", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def pause(self) -> None:
        """Stops planning and loading ahead; the prefetched steps are dropped (queued ones
        cancelled, running ones waited for), the worker pool and its image processors kept.

        The state stays the last returned step's: the next :meth:`next_step` restarts the
        background work from there and returns the step that would have come next.
        """
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():  # a producer blocked on a full queue needs room to stop
            self._drain()
            self._thread.join(timeout=0.05)
        self._drain()
        dropped, self._submitted = self._submitted, set()
        for fut in dropped:
            fut.cancel()
        wait(dropped)  # nothing dropped runs on while the planner is restored or after
        self._thread = self._queue = None
        self._restore_planner(self._consumed)

    def close(self) -> None:
        """:meth:`pause`, then stops the worker threads, freeing their image processors (the
        state is kept; a later :meth:`next_step` starts new workers). Safe to call again."""
        self.pause()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None  # the threads' processors go with them

    def __enter__(self) -> "PackedLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ public API
    def next_step(self) -> list[PackedBatch]:
        """This rank's micro-batches (``global_batch_size / dp_size / micro_batch_size`` of
        them, ``micro_batch_size`` rows each) for the next optimizer step."""
        if self.cfg.num_workers == 0:
            plan = self._plan_next()
            return self._returned(self._materialize(plan), plan.state_after)
        if self._thread is None:
            self._start()
        fut, state = self._queue.get()
        self._submitted.discard(fut)
        return self._returned(fut.result(), state)

    def __iter__(self):
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """The loader position after the last step returned (plain Python types, rank-free).

        Keys: ``version``, ``step`` (steps consumed), ``num_samples`` and ``fingerprint`` (of the
        data), ``global_batch_size``, ``micro_batch_size``, ``seq_length``, ``packing``,
        ``skip_padded``, ``mix`` (position,
        per-source counts, seed,
        weights) and ``packer`` (the packing window: sample index, positions, steps waited; and
        the packer's counters).
        """
        return dict(self._consumed)

    def _restore_planner(self, state: dict) -> None:
        self._mix.load_state_dict(state["mix"])
        self._packer.load_state_dict(state["packer"])
        self._planned = int(state["step"])
        self._consumed = state

    def load_state_dict(self, state: dict) -> None:
        """Resumes from :meth:`state_dict` (of a run with any data-parallel size).

        Raises:
            ValueError: If the state was saved over other data, with another global batch,
                micro-batch size, sequence length, packing or skip switch (those change the
                batches), or another seed or mix.
        """
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not "
                             f"{STATE_VERSION}: it was saved by other code")
        check_resume(state, num_samples=len(self.source), fingerprint=self._fingerprint,
                     global_batch_size=self.cfg.global_batch_size,
                     micro_batch_size=self.cfg.micro_batch_size,
                     seq_length=self.cfg.seq_length, packing=self.cfg.packing,
                     skip_padded=self.cfg.skip_padded)
        self.pause()  # the workers and their image processors stay
        self._restore_planner(state)

    @property
    def step(self) -> int:
        """Steps returned so far (including those before a resume)."""
        return int(self._consumed["step"])

    def packing_efficiency(self) -> float:
        """Real tokens / all positions over the micro-batches this rank built."""
        pos = self.stats["positions"]
        return self.stats["tokens"] / pos if pos else 0.0


def check_resume(state: Mapping, *, num_samples: int | None, fingerprint: str | None = None,
                 **settings) -> None:
    """Whether a saved loader position (:meth:`StoreLoader.state_dict`) can continue here.

    The training command calls this before building anything, and the loader again on load.

    Args:
        state: The saved position.
        num_samples: Samples in this run's data (None: not known yet, not compared).
        fingerprint: This data's fingerprint (None: not compared).
        **settings: This run's ``global_batch_size``, ``micro_batch_size``, ``seq_length``,
            ``packing`` and ``skip_padded`` (those change the batches).

    Raises:
        ValueError: One line naming the flag or data to use to resume.
    """
    if num_samples is not None and (int(state["num_samples"]) != num_samples or (
            state.get("fingerprint") and fingerprint and state["fingerprint"] != fingerprint)):
        raise ValueError("the checkpoint's data position was saved over other data "
                         f"({state['num_samples']} samples, fingerprint "
                         f"{state.get('fingerprint') or '-'}; this data has {num_samples}, "
                         f"{fingerprint or '-'}): resume with the same store and --eval-split")
    for key in ("global_batch_size", "micro_batch_size", "seq_length"):
        flag = "--" + key.replace("_", "-")
        if int(state[key]) != settings[key]:
            raise ValueError(f"the checkpoint was trained with {flag} {state[key]}, this run "
                             f"uses {settings[key]}: pass {flag} {state[key]} to resume it (or "
                             "start a new --save)")
    for key, flag in (("packing", "--no-packing"), ("skip_padded", "--no-skip")):
        saved = bool(state.get(key, True))  # states from before the switches: both on
        if saved != settings[key]:
            raise ValueError(f"the checkpoint was trained {'with' if not saved else 'without'} "
                             f"{flag}: resume with {flag} {'given' if not saved else 'left out'}")


def batch_paths(paths: Sequence[str]) -> dict[str, int]:
    """Counts of an :class:`~.images.ImageBatch`'s decode paths, keyed ``decode:<path>``."""
    c: Counter = Counter()
    for p in paths:
        c[f"decode:{p.split(':')[0] if p.startswith('failed') else p}"] += 1
    return dict(c)
