"""Look inside a preprocessed store: what it holds per mix source, and chosen samples as text.

    python tools/inspect_store.py STORE.zarr [--sample I [I ...]] [--json] \\
        [--save-images DIR] [--marks OPEN CLOSE] [--ids] [--no-mask] [--progress]

The summary gives the store's metadata (format, sequence length, image size and grid, chat
template, where the tokenizer is, shards), then one row per mix source and a total: samples,
samples with an image, tokens (the sequence length after image expansion: sum, mean, max), text
tokens and the share of them trained on (``target_mask`` 1), and the views the loader encodes
versus the sub-images it skips (from each image's size, with the loader's own geometry). It is
computed from the index and the flat arrays with numpy; only the trained share reads
``target_mask``, shard by shard in chunks (a progress bar on a terminal; ``--no-mask`` skips it).

``--sample`` renders samples in the global order (the index the loader uses): the dialog decoded
with the store's tokenizer (special tokens kept), each trained span wrapped in ``[[`` ... ``]]``
(``--marks``), and the image as one ``[IMAGE ...]`` line at its place in the sequence, giving its
original size, where it lands in the padded square and which views are encoded or skipped.
The store format is described in :mod:`megatron_sphinx.data.store`.

Bad input (not a store, an incomplete store, an index out of range, an image that would overwrite
a file...) ends with one ``error:`` line and exit code 2 before anything is printed or written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

#: Tokens of ``target_mask`` read at a time by the summary (4 MiB of uint8).
MASK_CHUNK = 1 << 22
DEFAULT_MARKS = ("[[", "]]")
_STORE_WHAT = "store directory (the --out of tools/preprocess_data.py)"
#: (magic prefix, offset, extension) of the image formats a store may hold.
_MAGIC = ((b"\xff\xd8\xff", 0, ".jpg"), (b"\x89PNG\r\n\x1a\n", 0, ".png"),
          (b"GIF87a", 0, ".gif"), (b"GIF89a", 0, ".gif"), (b"WEBP", 8, ".webp"),
          (b"BM", 0, ".bmp"), (b"II*\x00", 0, ".tif"), (b"MM\x00*", 0, ".tif"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description="Summarize a preprocessed store and render chosen samples.")
    p.add_argument("store", metavar="STORE", help="store directory (the --out of "
                   "tools/preprocess_data.py)")
    p.add_argument("--sample", type=int, nargs="+", default=None, metavar="I",
                   help="also render these samples (global index, 0-based, the loader's order): "
                   "decoded dialog with trained spans marked, the image as one [IMAGE ...] line; "
                   "default: none")
    p.add_argument("--marks", nargs=2, default=list(DEFAULT_MARKS), metavar=("OPEN", "CLOSE"),
                   help="strings put around every trained span (target_mask 1) of a rendered "
                   "sample; default: [[ ]]")
    p.add_argument("--ids", action="store_true",
                   help="render token ids instead of decoded text (the default without a "
                   "tokenizer); default: decode when the store has a tokenizer")
    p.add_argument("--json", action="store_true",
                   help="print the summary (and rendered samples) as one JSON object instead of "
                   "tables; default: tables")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="with --sample: write each sampled image's original bytes to "
                   "DIR/sample_I.EXT (extension from the file's magic bytes); an existing file "
                   "is never overwritten (error); default: write nothing")
    p.add_argument("--no-mask", action="store_true",
                   help="do not read target_mask (the only pass over all tokens): the trained "
                   "share is left out; default: read it")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar while reading target_mask (default: only on a terminal)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checks

def open_store(args: argparse.Namespace):
    """Checks the arguments against the store and opens it (nothing is written).

    Returns:
        The :class:`~megatron_sphinx.data.store.StoreReader`.

    Raises:
        UsageError: One line saying what to change.
    """
    from megatron_sphinx.cli import (UsageError, check_input_dir, check_output_dir, one_line)

    if args.save_images is not None and not args.sample:
        raise UsageError("--save-images needs --sample I [I ...]: name the samples whose "
                         "images to write")
    if not all(args.marks):
        raise UsageError(f"--marks {args.marks[0]!r} {args.marks[1]!r}: give two non-empty "
                         "strings")
    path = check_input_dir(args.store, "store", _STORE_WHAT)
    if not (path / "zarr.json").is_file():  # before importing the reader (and torch)
        raise UsageError(f"store {path} is not a megatron_sphinx store (no zarr.json): pass the "
                         "--out directory of tools/preprocess_data.py")
    if args.save_images is not None:
        check_output_dir(args.save_images, "--save-images")
    from megatron_sphinx.data.store import StoreReader

    try:
        reader = StoreReader(path)
    except ValueError as exc:  # StoreError: says what to change
        raise UsageError(f"store {one_line(exc)}") from None
    except (KeyError, OSError, IndexError) as exc:  # a complete store with parts missing
        raise _unreadable(path, exc) from None
    n = len(reader)
    for i in args.sample or ():
        if not 0 <= i < n:
            span = f"indices 0 to {n - 1}" if n else "no index at all"
            raise UsageError(f"--sample {i}: store {path} holds {n} samples ({span}): pick an "
                             "index in that range")
    return reader


def _unreadable(path, exc: BaseException) -> Exception:
    from megatron_sphinx.cli import UsageError, one_line

    return UsageError(f"store {path} cannot be read ({type(exc).__name__}: {one_line(exc)}): "
                      "it is damaged; preprocess it again with --overwrite")


# ----------------------------------------------------------------------------- summary

def tokenizer_info(reader) -> dict:
    """Where the store's tokenizer is, and whether it is still the one the store was made with.

    Returns:
        ``{"status", "path", "recorded_path", "matches"}``: status ``"in store"``, ``"at recorded
        path"`` or ``"none"``; ``matches`` False when its files' hash differs from the store's.
    """
    from megatron_sphinx.data.tokenizer import TokenizerNotFound, tokenizer_hash

    meta = reader.meta
    found = reader.tokenizer_dir()
    info = {"status": "none", "path": None, "recorded_path": meta.tokenizer_path or None,
            "matches": None}
    if found is None:
        return info
    inner = Path(reader.path) / "tokenizer"
    info["status"] = "in store" if found == inner else "at recorded path"
    info["path"] = str(found)
    if meta.tokenizer_hash:
        try:
            info["matches"] = tokenizer_hash(found) == meta.tokenizer_hash
        except (TokenizerNotFound, OSError):
            info["matches"] = False
    return info


def trained_per_sample(mask, offsets: np.ndarray, chunk: int = MASK_CHUNK, bar=None):
    """Trained tokens of every sample of one shard, reading ``mask`` in chunks.

    Args:
        mask: The shard's flat ``target_mask`` (anything sliceable to uint8 arrays).
        offsets: int64 ``[n + 1]`` the shard's ``text_offsets``.
        chunk: Tokens read at a time.
        bar: Optional tqdm bar, advanced by the tokens read.

    Returns:
        int64 ``[n]``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    total = int(offsets[-1]) if len(offsets) else 0
    prefix = np.zeros(len(offsets), dtype=np.int64)  # ones in mask[:offsets[k]]
    base = 0
    for a in range(0, total, chunk):
        b = min(total, a + chunk)
        cs = np.cumsum(np.asarray(mask[a:b], dtype=np.uint8), dtype=np.int64)  # [b - a]
        lo, hi = np.searchsorted(offsets, [a, b], side="right")
        prefix[lo:hi] = base + cs[offsets[lo:hi] - a - 1]
        base += int(cs[-1])
        if bar is not None:
            bar.update(b - a)
    return np.diff(prefix)


def _per_shard_text(reader, read_mask: bool, progress: bool | None):
    """Text tokens and trained tokens per sample, in the global order (trained None if not
    read)."""
    import zarr

    root = zarr.open_group(reader.path, mode="r")
    index = root["index"]
    shard_of = index["shard"][...].astype(np.int64)
    local = index["local"][...].astype(np.int64)
    groups = {int(name[1:]): root["shards"][name] for name in root["shards"].group_keys()}
    offs = {s: g["text_offsets"][...].astype(np.int64) for s, g in groups.items()}
    base, start = {}, 0
    for s in sorted(offs):
        base[s] = start
        start += len(offs[s]) - 1
    missing = set(np.unique(shard_of).tolist()) - set(base)
    if missing:
        raise KeyError(f"the index names shard(s) {sorted(missing)} that the store lacks")
    where = np.array([base[s] for s in sorted(base)], dtype=np.int64)
    pos = where[np.searchsorted(sorted(base), shard_of)] + local if len(shard_of) else local
    text = np.concatenate([np.diff(offs[s]) for s in sorted(offs)] or [np.zeros(0, np.int64)])
    trained = None
    if read_mask:
        from tqdm import tqdm

        total = sum(int(o[-1]) for o in offs.values())
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=total, unit="tok", unit_scale=True, desc="reading target_mask",
                  disable=not show, delay=0.5, leave=False) as bar:
            parts = [trained_per_sample(groups[s]["target_mask"], offs[s], MASK_CHUNK, bar)
                     for s in sorted(offs)]
        trained = np.concatenate(parts or [np.zeros(0, np.int64)])[pos]
    return text[pos], trained


def _row(n: int, images: int, tokens: int, longest: int, text: int, trained: int | None,
         views: int, skipped: int) -> dict:
    row = {"samples": n, "images": images, "tokens": tokens,
           "tokens_mean": tokens / n if n else None, "tokens_max": longest if n else None,
           "text_tokens": text, "trained_tokens": trained, "trained_fraction": None,
           "trained_fraction_of_tokens": None, "views_encoded": views,
           "subimages_skipped": skipped}
    if trained is not None:
        row.update(trained_fraction=trained / text if text else None,
                   trained_fraction_of_tokens=trained / tokens if tokens else None)
    return row


def summarize(reader, read_mask: bool = True, progress: bool | None = None) -> dict:
    """The store's metadata and per-source statistics as plain data (see the module docstring).

    Views follow the loader's default geometry (fully padded sub-images skipped,
    :func:`megatron_sphinx.data.loader.views_per_sample`).
    """
    from megatron_sphinx.data.geometry import POSITIONS_PER_SKIP, POSITIONS_PER_VIEW
    from megatron_sphinx.data.loader import views_per_sample

    meta = reader.meta
    g = meta.grid
    lengths = np.asarray(reader.lengths, dtype=np.int64)  # [N]
    src = np.asarray(reader.source_ids, dtype=np.int64)  # [N]
    has = np.asarray(reader.has_image, dtype=bool)  # [N]
    views = views_per_sample(reader.image_hw, meta.image_size, g)  # [N]
    skipped = np.where(has, 1 + g * g, 0) - views  # [N]
    text, trained = _per_shard_text(reader, read_mask, progress)  # [N], [N] or None
    expect = text + views * POSITIONS_PER_VIEW + skipped * POSITIONS_PER_SKIP
    names = list(meta.source_names)
    for extra in range(len(names), int(src.max()) + 1 if len(src) else 0):
        names.append(f"<unnamed source {extra}>")
    S = len(names)

    def per_source(x: np.ndarray) -> np.ndarray:  # [N] -> [S] sums, exact in int64
        out = np.zeros(S, dtype=np.int64)
        np.add.at(out, src, x.astype(np.int64))
        return out

    longest = np.zeros(S, dtype=np.int64)
    np.maximum.at(longest, src, lengths)
    cols = [np.bincount(src, minlength=S), per_source(has), per_source(lengths), longest,
            per_source(text), per_source(trained) if trained is not None else [None] * S,
            per_source(views), per_source(skipped)]
    rows = [{"source": name, "source_id": sid,
             **_row(*[None if c[sid] is None else int(c[sid]) for c in cols])}
            for sid, name in enumerate(names)]
    total = _row(len(lengths), int(has.sum()), int(lengths.sum()),
                 int(lengths.max()) if len(lengths) else 0, int(text.sum()),
                 int(trained.sum()) if trained is not None else None, int(views.sum()),
                 int(skipped.sum()))
    prep = (meta.extra or {}).get("summary", {}).get("total", {})
    return {
        "store": reader.path,
        "format": meta.format, "num_samples": len(reader), "num_shards": meta.num_shards,
        "seq_length": meta.seq_length, "image_size": meta.image_size, "grid": g,
        "view_size": meta.image_size // g, "template": meta.template,
        "tokenizer": tokenizer_info(reader), "fingerprint": meta.fingerprint,
        "overlong": (meta.extra or {}).get("overlong"),
        "preprocess_dropped": prep.get("dropped"), "preprocess_truncated": prep.get("truncated"),
        "length_mismatches": int((expect != lengths).sum()),
        "sources": rows, "total": total,
    }


def _num(v, fmt: str = ",d") -> str:
    return "-" if v is None else format(v, fmt)


def format_summary(s: dict) -> str:
    """The summary as text: metadata lines, the per-source table and its legend."""
    tok = s["tokenizer"]
    if tok["status"] == "none":
        where = ("none (recorded path " + tok["recorded_path"] + " not found)"
                 if tok["recorded_path"] else "none")
    else:
        where = f"{tok['status']}: {tok['path']}"
        if tok["matches"] is False:
            where += " (CHANGED since preprocessing: its files' hash differs)"
    lines = [
        f"store {s['store']}",
        f"  format {s['format']}, {s['num_samples']:,} samples in {s['num_shards']} shard(s)",
        f"  seq length {s['seq_length']}, image size {s['image_size']} (grid {s['grid']}x"
        f"{s['grid']} of {s['view_size']} px views), template {s['template']}",
        f"  tokenizer {where}",
    ]
    if s["fingerprint"]:
        lines.append(f"  fingerprint {s['fingerprint']}")
    dropped = s["preprocess_dropped"]
    if dropped is not None:
        n_drop = sum(dropped.values())
        why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        lines.append(f"  preprocessing dropped {n_drop} record(s){': ' + why if why else ''}, "
                     f"truncated {_num(s['preprocess_truncated'])} (--overlong "
                     f"{s['overlong'] or '?'})")
    if s["length_mismatches"]:
        lines.append(f"  WARNING: {s['length_mismatches']} stored length(s) differ from text "
                     "tokens + image positions (store made by other code?)")
    head = (f"{'source':<24} {'samples':>9} {'images':>8} {'tokens':>13} {'mean':>8} "
            f"{'max':>6} {'text tok':>12} {'trained':>7} {'views':>9} {'skipped':>8}")
    lines += ["", head, "-" * len(head)]
    for r in s["sources"] + [dict(s["total"], source="TOTAL")]:
        frac = "-" if r["trained_fraction"] is None else f"{100 * r['trained_fraction']:.1f}%"
        lines.append(
            f"{r['source'][:24]:<24} {r['samples']:>9,} {r['images']:>8,} {r['tokens']:>13,} "
            f"{_num(r['tokens_mean'], ',.1f'):>8} {_num(r['tokens_max']):>6} "
            f"{r['text_tokens']:>12,} {frac:>7} {r['views_encoded']:>9,} "
            f"{r['subimages_skipped']:>8,}")
    lines += ["",
              "tokens: sequence length after image expansion (sum, mean, max per sample)",
              "trained: share of the text tokens with target_mask 1",
              "views: views encoded (global + sub-images); skipped: sub-images lying wholly in "
              "the padding,",
              "  one skip position each (training with --no-skip encodes them)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- samples

def load_decoder(reader, info: dict, want_ids: bool):
    """``(tokenizer or None, note or None)``: the note says once why ids are shown."""
    if want_ids:
        return None, None
    if info["status"] == "none":
        rec = info["recorded_path"]
        return None, ("the store has no tokenizer (none inside it"
                      + (f", recorded path {rec} not found" if rec else "")
                      + "): token ids are shown instead of text")
    from megatron_sphinx.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(info["path"])
    except (OSError, ValueError) as exc:
        from megatron_sphinx.cli import one_line

        return None, (f"the tokenizer at {info['path']} cannot be loaded ({one_line(exc)}): "
                      "token ids are shown instead of text")
    if info["matches"] is False:
        return tok, (f"the tokenizer at {info['path']} differs from the one the store was made "
                     "with: the text may be wrong (--ids shows the ids)")
    return tok, None


def _cuts(mask: np.ndarray, slot: int | None) -> list[tuple[int, int, bool]]:
    """``(start, stop, trained)`` runs of equal mask, also cut at the image slot."""
    n = len(mask)
    cuts = {0, n, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist()}
    if slot is not None:
        cuts.add(slot)
    cuts = sorted(cuts)
    return [(a, b, bool(mask[a])) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _decode_runs(tok, ids: np.ndarray, runs) -> list[str]:
    """Each run's text, as its part of the whole decoded prefix (keeps word-leading spaces that
    decoding a piece alone would drop)."""
    out, prev = [], ""
    for a, b, _ in runs:
        cur = tok.decode(ids[:b].tolist(), skip_special_tokens=False,
                         clean_up_tokenization_spaces=False)
        if cur.startswith(prev):
            out.append(cur[len(prev):])
        else:
            out.append(tok.decode(ids[a:b].tolist(), skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False))
        prev = cur
    return out


def image_extension(data: bytes) -> str:
    """File extension (``.jpg``, ``.png``, ...) from an encoded image's magic bytes; ``.bin``
    when unknown."""
    for magic, at, ext in _MAGIC:
        if data[at:at + len(magic)] == magic and (ext != ".webp" or data[:4] == b"RIFF"):
            return ext
    return ".bin"


def image_record(hw: tuple[int, int], data: bytes, image_size: int, grid: int) -> dict:
    """Geometry of one stored image as the loader lays it out (plain data)."""
    from megatron_sphinx.data.geometry import image_geometry

    geo = image_geometry(hw[0], hw[1], image_size, grid)
    valid = geo.view_valid()  # [1 + grid**2]
    rows = ["".join("X" if v else "." for v in valid[1 + r * grid:1 + (r + 1) * grid])
            for r in range(grid)]
    return {"height": hw[0], "width": hw[1], "bytes": len(data),
            "format": image_extension(data)[1:], "resized_height": geo.resized_height,
            "resized_width": geo.resized_width, "square": image_size, "grid": grid,
            "views_encoded": int(valid.sum()), "subimages_skipped": geo.num_skipped(),
            "subimage_map": "/".join(rows), "positions": geo.num_positions()}


def image_line(im: dict) -> str:
    """The one placeholder line standing for an image in a rendered sample."""
    g = im["grid"]
    return (f"[IMAGE {im['width']}x{im['height']} (w x h) {im['format']} {im['bytes']:,} bytes"
            f" -> {im['resized_width']}x{im['resized_height']} at the top-left of the "
            f"{im['square']}x{im['square']} square; {g}x{g} grid: {im['views_encoded']} of "
            f"{1 + g * g} views encoded (global + {im['views_encoded'] - 1} sub-images), "
            f"{im['subimages_skipped']} skipped (map {im['subimage_map']}); "
            f"{im['positions']} positions]")


def render_sample(reader, i: int, tok, marks: tuple[str, str]) -> dict:
    """Sample ``i`` as plain data: source, lengths, image geometry, runs and the rendered text.

    The text is the decoded dialog (token ids when ``tok`` is None) with every trained run
    wrapped in ``marks`` and the image as ``"\\n" + image_line + "\\n"`` before text index
    ``image_slot``.
    """
    smp, data = reader.get(i)
    meta = reader.meta
    ids, mask = smp.input_ids, np.asarray(smp.target_mask, dtype=bool)
    im = (image_record(smp.image_hw, data, meta.image_size, meta.grid)
          if smp.image_hw is not None else None)
    runs = _cuts(mask, smp.image_slot if im is not None else None)
    if tok is not None:
        pieces = _decode_runs(tok, ids, runs)
    else:
        pieces = [" ".join(map(str, ids[a:b].tolist())) for a, b, _ in runs]
    sep = "" if tok is not None else " "
    text, segments = [], []
    for (a, b, trained), piece in zip(runs, pieces):
        if im is not None and a == smp.image_slot:
            text.append("\n" + image_line(im) + "\n")
            segments.append({"image": True})
        elif text and sep:
            text.append(sep)
        text.append(f"{marks[0]}{piece}{marks[1]}" if trained else piece)
        segments.append({"start": a, "stop": b, "trained": trained, "text": piece})
    if im is not None and smp.image_slot == len(ids):
        text.append("\n" + image_line(im) + "\n")
        segments.append({"image": True})
    names = meta.source_names
    return {"index": i, "source": names[smp.source_id] if smp.source_id < len(names) else
            f"<unnamed source {smp.source_id}>", "source_id": smp.source_id,
            "length": int(reader.lengths[i]), "text_tokens": len(ids),
            "trained_tokens": int(mask.sum()), "image_slot": smp.image_slot if im else None,
            "image": im, "decoded": tok is not None, "segments": segments,
            "input_ids": ids.tolist(), "text": "".join(text)}


def format_sample(r: dict) -> str:
    """A rendered sample as text: a header line, then the dialog."""
    image = r["image"]["positions"] if r["image"] else 0
    head = (f"=== sample {r['index']}: source {r['source']}, sequence length {r['length']} "
            f"({r['text_tokens']} text tokens + {image} image positions), "
            f"{r['trained_tokens']} trained")
    if "saved_to" in r:
        head += f"; image saved to {r['saved_to']}"
    return head + "\n" + r["text"]


def plan_images(reader, indices: list[int], folder: str) -> list[tuple[Path, bytes, int]]:
    """``(file, bytes, index)`` of every sampled image to write; none may exist yet.

    Raises:
        UsageError: A file that would be overwritten.
    """
    from megatron_sphinx.cli import UsageError

    plan = []
    for i in indices:
        data = reader.get_image(i)
        if data is None:
            continue
        f = Path(folder) / f"sample_{i}{image_extension(data)}"
        if f.exists() or f.is_symlink():
            raise UsageError(f"--save-images {folder}: {f} already exists and is never "
                             "overwritten: choose an empty directory or remove the file")
        plan.append((f, data, i))
    return plan


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one ``error:`` line on stderr and exit code 2."""
    from megatron_sphinx.cli import fail, quiet_import_notices

    args = parse_args(argv)
    quiet_import_notices()
    try:
        reader = open_store(args)
        indices = list(dict.fromkeys(args.sample or ()))
        plan = plan_images(reader, indices, args.save_images) if args.save_images else []
        try:
            summary = summarize(reader, read_mask=not args.no_mask, progress=args.progress)
            tok, note = load_decoder(reader, summary["tokenizer"], args.ids) if indices else (
                None, None)
            samples = [render_sample(reader, i, tok, tuple(args.marks)) for i in indices]
        except (KeyError, OSError, IndexError) as exc:
            raise _unreadable(args.store, exc) from None
    except ValueError as exc:  # UsageError, StoreError
        return fail(exc)
    if plan:
        Path(args.save_images).mkdir(parents=True, exist_ok=True)
        saved = {}
        for f, data, i in plan:
            with open(f, "xb") as out:  # exclusive: never replaces a file
                out.write(data)
            saved[i] = str(f)
        for r in samples:
            if r["index"] in saved:
                r["saved_to"] = saved[r["index"]]
    if args.json:
        out = dict(summary)
        if indices:
            out["samples"] = samples
            out["note"] = note
        print(json.dumps(out, indent=1))
        return 0
    print(format_summary(summary))
    if note:
        print(f"\nnote: {note}")
    for r in samples:
        print()
        print(format_sample(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
