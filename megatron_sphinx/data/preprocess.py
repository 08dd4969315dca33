"""Preprocessing: mix sources -> dialogs -> tokenized samples + image bytes -> one store shard.

:func:`preprocess_rank` is what each MPI rank runs on its share (record ``k`` of every source goes
to rank ``k % world``); :mod:`megatron_sphinx.data.build_store` wraps it with the output directory
checks, the index and the roll-back of a failed build. Every record that is not written is counted
under a reason and logged (the first few per reason with details): the run never dies on one bad
sample. :class:`PreprocessSettings` checks the lengths and the image layout; importing this module
is cheap (the tokenizer and converter modules, which bring torch, are imported where used), so a
tool can check its settings before its heavy imports.

Images are not decoded here beyond a cheap validity check (:func:`probe_image`): the header gives
the size and EXIF orientation; JPEGs get a 1/8-scale draft decode (catches truncated and corrupt
scans for ~0.5 ms), PNGs a ``verify()`` (chunk CRCs, truncation). Other formats Pillow reads (BMP,
GIF, WebP, TIFF...) are re-encoded once to PNG, orientation applied, so that the training loader
sees only JPEG and PNG. The original bytes of JPEG / PNG files are stored unchanged.
"""
from __future__ import annotations

import io
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from megatron_sphinx.config import VisionConfig
from megatron_sphinx.data.geometry import (
    POSITIONS_PER_SKIP, POSITIONS_PER_VIEW, full_image_positions, image_geometry)
from megatron_sphinx.data.image_header import MAX_PIXELS, exif_orientation

if TYPE_CHECKING:  # imported where used: they bring torch, and the settings checks come first
    from megatron_sphinx.data.conversation import DialogEncoder

logger = logging.getLogger(__name__)

STORED_FORMATS = ("JPEG", "PNG")
BATCH = 256  # dialogs tokenized per tokenizer call
LOG_FIRST = 3  # drops logged with details per (source, reason); the rest are only counted
PROGRESS_LINES = 10  # progress lines per source and rank when no bar is shown
PROGRESS_SECONDS = 30.0  # ... or one line per this many seconds for a streamed (.jsonl) source
PROGRESS_QUIET_SECONDS = 5.0  # a source done sooner logs only its start and done lines
#: Encoder input side: the padded square is ``grid x grid`` views of this many pixels.
VIEW_SIZE = VisionConfig.view_size


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is the counted drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an encoded image."""

    height: int
    """Height after EXIF orientation."""
    width: int
    """Width after EXIF orientation."""
    format: str
    """Pillow format name (``JPEG``, ``PNG``...)."""
    orientation: int = 1
    """EXIF orientation tag (1 = none; 5-8 swap height and width)."""


def probe_image(data: bytes | BinaryIO, check: bool = True) -> ImageInfo:
    """Size (after EXIF orientation) and format of an encoded image, without a full decode.

    Args:
        data: The encoded file, or a binary file object open on it (read from its start).
        check: Also run the cheap validity check (JPEG draft decode, PNG ``verify``).

    Raises:
        BadImage: ``image_not_an_image``, ``image_corrupt`` (truncated / bad data),
            ``image_too_large``.
    """
    from PIL import Image, UnidentifiedImageError

    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        im = Image.open(fp)
        fmt = im.format or "?"
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise BadImage("image_too_large", f"{w}x{h}")
        orientation = exif_orientation(im, fp)
        if check:
            if fmt == "JPEG":
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
            elif fmt == "PNG":
                fp.seek(0)
                Image.open(fp).verify()
            else:
                im.load()
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage("image_not_an_image", str(e)) from None
    except Image.DecompressionBombError as e:
        raise BadImage("image_too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("image_corrupt", f"{type(e).__name__}: {e}") from None
    if w < 1 or h < 1:
        raise BadImage("image_corrupt", f"size {w}x{h}")
    if orientation in (5, 6, 7, 8):
        h, w = w, h
    return ImageInfo(h, w, fmt, orientation)


def reencode_png(data: bytes) -> bytes:
    """A non-JPEG/PNG image decoded once, EXIF orientation applied, re-encoded as PNG."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16", "I"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def load_image(image: str | bytes) -> tuple[bytes, ImageInfo, bool]:
    """``(bytes to store, info, re-encoded?)`` of a dialog's image (a path or bytes).

    Raises:
        BadImage: ``image_missing`` or one of :func:`probe_image`'s reasons.
    """
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        try:
            with open(image, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadImage("image_missing", str(image)) from None
        except OSError as e:
            raise BadImage("image_unreadable", f"{image}: {e}") from None
    if not data:
        raise BadImage("image_not_an_image", "empty file")
    info = probe_image(data)
    if info.format in STORED_FORMATS:
        return data, info, False
    try:
        data = reencode_png(data)
    except (OSError, ValueError) as e:
        raise BadImage("image_corrupt", f"{type(e).__name__}: {e}") from None
    return data, ImageInfo(info.height, info.width, "PNG"), True


@dataclass
class SourceStats:
    """Counts of one source on one rank (summed over ranks for the summary)."""

    read: int = 0
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    truncated: int = 0
    text_tokens: int = 0
    target_tokens: int = 0
    images: int = 0
    image_positions: int = 0
    skipped_subimages: int = 0
    visual_tokens_saved: int = 0
    total_length: int = 0

    def to_json(self) -> dict:
        """A JSON-able dict (counters as plain dicts)."""
        d = dict(self.__dict__)
        d["dropped"], d["notes"] = dict(self.dropped), dict(self.notes)
        return d

    @classmethod
    def merge(cls, items: list[dict]) -> dict:
        """Sums :meth:`to_json` dicts of several ranks."""
        out: dict = {}
        for d in items:
            for k, v in d.items():
                if isinstance(v, dict):
                    c = out.setdefault(k, Counter())
                    c.update(v)
                else:
                    out[k] = out.get(k, 0) + v
        return {k: dict(sorted(v.items())) if isinstance(v, Counter) else v
                for k, v in out.items()}


@dataclass
class PreprocessSettings:
    """What the per-rank preprocessing needs besides the mix and the tokenizer.

    Raises:
        ValueError: In ``__post_init__``, one line naming the flag and what to use.
    """

    seq_length: int = 4096
    """Longest sample after image expansion (must hold one full image and its text)."""
    image_size: int = 448
    """Padded-square side, a multiple of the 224-pixel view (448 / 672)."""
    grid: int | None = None
    """Sub-images per side; None: ``image_size // 224`` (the only value that fits)."""
    overlong: str = "truncate"
    """``truncate`` (cut, the cut part's loss dropped) or ``drop`` samples over ``seq_length``."""

    def __post_init__(self) -> None:
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"--overlong {self.overlong}: choose truncate or drop")
        if self.image_size < VIEW_SIZE or self.image_size % VIEW_SIZE:
            raise ValueError(f"--image-size {self.image_size}: give a multiple of {VIEW_SIZE} "
                             "(448 for the 2x2 recipes, 672 for -2K)")
        grid = self.image_size // VIEW_SIZE
        if self.grid is None:
            self.grid = grid
        elif self.grid != grid:
            raise ValueError(f"--grid {self.grid} does not fit --image-size {self.image_size} "
                             f"(views of {VIEW_SIZE} pixels): pass --grid {grid} or leave it out")
        image = full_image_positions(self.image_size, self.grid)
        if self.seq_length <= image:
            raise ValueError(f"--seq-length {self.seq_length} cannot hold one image ({image} "
                             f"positions at --image-size {self.image_size}) and its text: use "
                             f"a --seq-length above {image}")


class _Dropper:
    """Counts and logs drops (the first few per reason with details)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.logged: Counter = Counter()

    def __call__(self, stats: SourceStats, source: str, k: int, reason: str, detail: str = ""):
        stats.dropped[reason] += 1
        key = (source, reason)
        self.logged[key] += 1
        level = logging.WARNING if self.logged[key] <= LOG_FIRST else logging.DEBUG
        logger.log(level, "rank %d: dropped %s record %d: %s%s", self.rank, source, k, reason,
                   f" ({detail})" if detail else "")


def preprocess_rank(mix, encoder: DialogEncoder, writer, settings: PreprocessSettings,
                    rank: int = 0, world: int = 1, progress: bool | None = None) -> dict:
    """Converts, validates, tokenizes and writes rank ``rank``'s share of every source.

    Progress: a tqdm bar, or (without a bar, e.g. in a batch job's log) INFO lines per source:
    one when it starts (its records on this rank), about :data:`PROGRESS_LINES` while it runs,
    and the final counts.

    Args:
        mix: A :class:`~megatron_sphinx.data.mixfile.Mix`.
        encoder: Tokenizes validated dialogs.
        writer: A :class:`~megatron_sphinx.data.store.ShardWriter` (closed by the caller).
        settings: Lengths and the overlong policy.
        rank: This rank; record ``k`` of a source is processed by rank ``k % world``.
        world: Number of ranks.
        progress: Show a tqdm bar (None: only on a terminal).

    Returns:
        ``{source name: SourceStats.to_json()}`` for this rank.

    Raises:
        SourceError: A whole annotation file cannot be read (alike on every rank).
    """
    from tqdm import tqdm

    from megatron_sphinx.data.conversation import DialogError, check_dialog
    from megatron_sphinx.data.sources import Dropped, convert_source

    drop = _Dropper(rank)
    stats_by = defaultdict(SourceStats)
    bar = tqdm(desc=f"rank {rank}", unit="rec", position=rank, leave=True, dynamic_ncols=True,
               disable=None if progress is None else not progress)
    for sid, spec in enumerate(mix.sources):
        stats = stats_by[spec.name]
        log = None if not bar.disable else _ProgressLog(spec.name, rank)
        pending: list[tuple[int, object, bytes | None, tuple[int, int] | None]] = []
        for k, item in convert_source(spec, rank, world, on_load=log and log.loaded):
            stats.read += 1
            bar.update(1)
            if log is not None:
                log.update(stats)
            if isinstance(item, Dropped):
                drop(stats, spec.name, k, item.reason, item.detail)
                continue
            try:
                dialog, notes = check_dialog(item)
            except DialogError as e:
                drop(stats, spec.name, k, e.reason, e.detail)
                continue
            data = hw = None
            if dialog.image is not None:
                try:
                    data, info, reencoded = load_image(dialog.image)
                except BadImage as e:
                    drop(stats, spec.name, k, e.reason, e.detail)
                    continue
                hw = (info.height, info.width)
                if reencoded:
                    notes.append("image_reencoded_png")
                if info.orientation != 1:
                    notes.append("image_exif_oriented")
            stats.notes.update(notes)
            pending.append((k, dialog, data, hw))
            if len(pending) >= BATCH:
                _flush(pending, sid, spec.name, stats, encoder, writer, settings, drop)
        _flush(pending, sid, spec.name, stats, encoder, writer, settings, drop)
        if log is not None:
            log.done(stats)
    bar.close()
    return {name: s.to_json() for name, s in stats_by.items()}


class _ProgressLog:
    """A source's progress on one rank as INFO lines, for logs without a terminal (Slurm):
    about :data:`PROGRESS_LINES` lines when the record count is known, else one per
    :data:`PROGRESS_SECONDS`; none in a source's first :data:`PROGRESS_QUIET_SECONDS`."""

    def __init__(self, name: str, rank: int):
        self.name, self.rank, self.t0 = name, rank, timer()
        self.total: int | None = None
        self.every, self.next_time = 0, self.t0 + PROGRESS_SECONDS

    def loaded(self, total: int | None) -> None:
        """The annotation file is open: ``total`` records on this rank (None: streamed)."""
        self.total = total
        self.every = max(1, math.ceil(total / PROGRESS_LINES)) if total else 0
        logger.info("rank %d: source %s: %s records on this rank", self.rank, self.name,
                    "streaming" if total is None else total)

    def update(self, stats: SourceStats) -> None:
        now = timer()
        if now - self.t0 < PROGRESS_QUIET_SECONDS:
            return
        if self.every:
            if stats.read % self.every or stats.read >= self.total:
                return
        elif now < self.next_time:
            return
        self.next_time = now + PROGRESS_SECONDS
        rate = stats.read / (now - self.t0) if now > self.t0 else 0.0
        done = (f"{stats.read}/{self.total} records ({100 * stats.read // self.total}%)"
                if self.total else f"{stats.read} records")
        logger.info("rank %d: source %s: %s, %.1f records/s", self.rank, self.name, done, rate)

    def done(self, stats: SourceStats) -> None:
        logger.info("rank %d: source %s: done, %d records read, %d written, %d dropped in %.1f s",
                    self.rank, self.name, stats.read, stats.written,
                    sum(stats.dropped.values()), timer() - self.t0)


def _encode_robust(encoder: DialogEncoder, dialogs) -> list:
    from megatron_sphinx.data.conversation import DialogError

    try:
        return encoder.encode(dialogs)
    except DialogError:
        out = []
        for d in dialogs:
            try:
                out.extend(encoder.encode([d]))
            except DialogError as e:
                out.append(e)
        return out


def _flush(pending, sid, name, stats, encoder, writer, settings, drop) -> None:
    from megatron_sphinx.data.conversation import DialogError
    from megatron_sphinx.data.layout import Sample

    if not pending:
        return
    encoded = _encode_robust(encoder, [d for _, d, _, _ in pending])
    for (k, _, data, hw), enc in zip(pending, encoded):
        if isinstance(enc, DialogError):
            drop(stats, name, k, enc.reason, enc.detail)
            continue
        ids, mask = enc
        img_pos = skipped = 0
        cut = False
        if hw is not None:
            geo = image_geometry(hw[0], hw[1], settings.image_size, settings.grid)
            img_pos, skipped = geo.num_positions(), geo.num_skipped()
        if len(ids) + img_pos > settings.seq_length:
            if settings.overlong == "drop":
                drop(stats, name, k, "longer_than_seq_length",
                     f"{len(ids) + img_pos} > {settings.seq_length}")
                continue
            keep = settings.seq_length - img_pos
            if keep < 2:
                drop(stats, name, k, "image_longer_than_seq_length",
                     f"image takes {img_pos} of {settings.seq_length} positions")
                continue
            ids, mask, cut = ids[:keep], mask[:keep], True
        if not mask.any():
            drop(stats, name, k, "no_target_after_truncation" if cut else "no_target_tokens")
            continue
        stats.truncated += cut
        sample = Sample(ids, mask, image_hw=hw, image_slot=1, source_id=sid)
        writer.add(sample, data, (sid, k))
        stats.written += 1
        stats.text_tokens += int(len(ids))
        stats.target_tokens += int(mask.sum())
        stats.total_length += int(len(ids) + img_pos)
        if hw is not None:
            stats.images += 1
            stats.image_positions += img_pos
            stats.skipped_subimages += skipped
            stats.visual_tokens_saved += skipped * (POSITIONS_PER_VIEW - POSITIONS_PER_SKIP)
    pending.clear()


def summarize(per_rank: list[dict], source_names: list[str], seconds: float, world: int) -> dict:
    """The run summary: per source (in mix order) and totals, summed over the ranks."""
    sources = {}
    for name in source_names:
        sources[name] = SourceStats.merge([r[name] for r in per_rank if name in r])
    total = SourceStats.merge(list(sources.values()))
    return {"sources": sources, "total": total, "world_size": world,
            "seconds": round(seconds, 3),
            "samples_per_s": round(total.get("read", 0) / seconds, 1) if seconds > 0 else None}


def format_summary(summary: dict) -> str:
    """A readable table of :func:`summarize`'s result."""
    head = (f"{'source':<22}{'read':>8}{'written':>9}{'dropped':>9}{'trunc':>7}{'text tok':>11}"
            f"{'images':>8}{'skipped':>9}{'vis.saved':>11}")
    lines = [head, "-" * len(head)]
    rows = list(summary["sources"].items()) + [("TOTAL", summary["total"])]
    for name, s in rows:
        lines.append(
            f"{name:<22}{s.get('read', 0):>8}{s.get('written', 0):>9}"
            f"{sum(s.get('dropped', {}).values()):>9}{s.get('truncated', 0):>7}"
            f"{s.get('text_tokens', 0):>11}{s.get('images', 0):>8}"
            f"{s.get('skipped_subimages', 0):>9}{s.get('visual_tokens_saved', 0):>11}")
    for name, s in rows[:-1]:
        for reason, n in s.get("dropped", {}).items():
            lines.append(f"  {name}: dropped {n} x {reason}")
        for note, n in s.get("notes", {}).items():
            lines.append(f"  {name}: {n} x {note}")
    lines.append(f"{summary['world_size']} rank(s), {summary['seconds']} s, "
                 f"{summary['samples_per_s']} records/s")
    return "\n".join(lines)


def timer() -> float:
    """Monotonic seconds (a seam for tests)."""
    return time.perf_counter()

