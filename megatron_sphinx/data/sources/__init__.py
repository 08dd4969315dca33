"""Converters from dataset formats to :class:`~megatron_sphinx.data.conversation.Dialog`.

One module per format; each documents its input in its docstring and has two functions:

- ``load(spec) -> Iterable``: the source's records in file order (a malformed JSON line becomes a
  :class:`Dropped` record; an unreadable annotation file raises :class:`SourceError`);
- ``convert(record, spec, k) -> Dialog | Dropped``: one record (number ``k``) to one dialog.

:func:`convert_source` drives them: it yields ``(k, Dialog | Dropped)`` for exactly the records of
one rank's share (``k % world == rank``), and turns an exception on one bad record into a
``Dropped("malformed_record")`` so a converter never dies on one sample.

Coordinates become text normalised to [0, 1] of the *padded square* (the image is placed top-left
in a square of its longer side, :mod:`megatron_sphinx.data.geometry`): ``x / max(h, w)``, two
decimals: a box is ``[x1, y1, x2, y2]``, a point ``[x, y]``.
"""
from __future__ import annotations

import importlib
import json
import logging
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from megatron_sphinx.data.conversation import Dialog

logger = logging.getLogger(__name__)


class SourceError(ValueError):
    """A whole source that cannot be read (missing or unparseable annotation file)."""


@dataclass(frozen=True)
class Dropped:
    """A record that yields no dialog, with the counted reason and a detail for the log."""

    reason: str
    detail: str = ""


def _num(v: float, side: float) -> str:
    return f"{min(max(float(v) / side, 0.0), 1.0):.2f}"


def box_text(box: Sequence[float], height: int, width: int) -> str:
    """``[x1, y1, x2, y2]`` of a pixel box ``(x1, y1, x2, y2)`` in the padded square."""
    side = max(height, width)
    return "[" + ", ".join(_num(v, side) for v in box[:4]) + "]"


def point_text(x: float, y: float, height: int, width: int) -> str:
    """``[x, y]`` of a pixel point in the padded square."""
    side = max(height, width)
    return f"[{_num(x, side)}, {_num(y, side)}]"


def xywh_to_xyxy(b: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in b[:4])
    return x, y, x + w, y + h


def choose(options: Sequence[str], source: str, key: object, salt: str = "") -> str:
    """A deterministic pick from ``options`` for record ``key`` of ``source`` (stable across runs,
    processes and rank counts: seeded by a CRC of the names, not Python's salted ``hash``)."""
    seed = zlib.crc32(f"{source}|{key}|{salt}".encode())
    return options[random.Random(seed).randrange(len(options))]


def load_json(path) -> object:
    """A whole JSON file.

    Raises:
        SourceError: Missing or unparseable file.
    """
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SourceError(f"annotation file {path} does not exist: fix its path in the mix") \
            from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{path} is not valid JSON ({e}): fix or replace the file") from None


def iter_jsonl(path) -> Iterator[object]:
    """Objects of a JSON-lines file; a malformed line is yielded as ``Dropped("malformed_json")``.

    Raises:
        SourceError: Missing file.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SourceError(f"annotation file {path} does not exist: fix its path in the mix") \
            from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                yield Dropped("malformed_json", f"line {n}: {e}")


def load_records(path) -> Iterable[object]:
    """A JSON list (``.json``) or JSON-lines (``.jsonl``) file's records."""
    if str(path).endswith(".jsonl"):
        return iter_jsonl(path)
    data = load_json(path)
    if not isinstance(data, list):
        raise SourceError(f"{path} must hold a JSON list of records")
    return data


def image_hw(path: str) -> tuple[int, int]:
    """``(height, width)`` of an image file after EXIF orientation, from its header only.

    Raises:
        FileNotFoundError, OSError: Missing or unreadable file.
    """
    from megatron_sphinx.data.preprocess import probe_image

    with open(path, "rb") as f:
        info = probe_image(f, check=False)  # reads the header (and PNG chunk headers) only
    return info.height, info.width


def get_module(fmt: str):
    """The converter module of format ``fmt``."""
    from megatron_sphinx.data.mixfile import FORMATS

    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return importlib.import_module(f"megatron_sphinx.data.sources.{fmt}")


def convert_source(spec, rank: int = 0, world: int = 1,
                   on_load: Callable[[int | None], None] | None = None,
                   ) -> Iterator[tuple[int, Dialog | Dropped]]:
    """``(record number, Dialog | Dropped)`` for rank ``rank``'s share of the source ``spec``.

    Args:
        spec: A :class:`~megatron_sphinx.data.mixfile.SourceSpec`.
        rank: This worker's rank.
        world: Number of workers; record ``k`` belongs to rank ``k % world``.
        on_load: Called once the annotation file is open, with this rank's number of records
            (None for a streamed ``.jsonl`` file, whose length is not known in advance).

    Raises:
        SourceError: The annotation file cannot be read at all.
    """
    mod = get_module(spec.format)
    records = mod.load(spec)
    if on_load is not None:
        on_load(len(range(rank, len(records), world)) if hasattr(records, "__len__") else None)
    for k, rec in enumerate(records):
        if k % world != rank:
            continue
        if isinstance(rec, Dropped):
            yield k, rec
            continue
        try:
            out = mod.convert(rec, spec, k)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            out = Dropped("malformed_record", f"{type(e).__name__}: {e}")
        except FileNotFoundError as e:
            out = Dropped("image_missing", str(e))
        except OSError as e:
            out = Dropped("image_unreadable", f"{type(e).__name__}: {e}")
        yield k, out
