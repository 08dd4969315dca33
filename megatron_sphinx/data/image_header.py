"""What an encoded image's header says (size, EXIF orientation), read without decoding pixels.

Preprocessing (:func:`megatron_sphinx.data.preprocess.probe_image`), the source converters
(:func:`megatron_sphinx.data.sources.image_hw`) and the loader
(:func:`megatron_sphinx.data.images.probe_image`) must agree on an image's size after orientation,
so they share this one reader.

A PNG may carry its EXIF in an ``eXIf`` chunk after the pixel data. Pillow only finds that chunk
by decoding the whole image (``getexif()`` calls ``load()``); here the chunk headers are walked
instead, skipping the pixel data, which costs microseconds whatever the image size.

:func:`jpeg_header` reads a plain JPEG's header in a few microseconds, where opening it with
Pillow costs ~40 (the loader probes every image of every batch, on the path of its images/s). It
answers only for headers it reads exactly as Pillow does, and None for anything else (several
frames, multi-picture files, markers or segments out of the ordinary), which Pillow then reads.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

#: Images with more pixels are refused: preprocessing drops them (``image_too_large``), the
#: loader reports them as failed (decoding one would take gigabytes).
MAX_PIXELS = 100_000_000

_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_PREFIX = b"Exif\x00\x00"
#: Formats whose EXIF Pillow reads at open time, from the header.
_HEADER_EXIF_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "TIFF"})


def _orientation_of(raw: bytes) -> int:
    exif = Image.Exif()
    exif.load(raw[len(_EXIF_PREFIX):] if raw.startswith(_EXIF_PREFIX) else raw)
    return int(exif.get(_ORIENTATION_TAG, 1) or 1)


def png_orientation(fp: BinaryIO) -> int:
    """EXIF orientation of the PNG in ``fp`` (1 if it has none), from its ``eXIf`` chunk wherever
    that chunk is; ``fp``'s position is kept.

    Raises:
        SyntaxError, ValueError: If the EXIF data is malformed (as Pillow raises).
    """
    pos = fp.tell()
    try:
        fp.seek(0)
        if fp.read(8) != _PNG_SIGNATURE:
            return 1
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return 1  # truncated: no eXIf chunk was found before the end
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return _orientation_of(fp.read(length))
            if kind == b"IEND":
                return 1
            fp.seek(length + 4, 1)  # the chunk's data and CRC
    finally:
        fp.seek(pos)


def exif_orientation(im: Image.Image, fp: BinaryIO) -> int:
    """EXIF orientation (1 = none; 5-8 swap height and width) of ``im``, opened by Pillow from
    ``fp``, without decoding its pixels. Formats without EXIF give 1."""
    if im.format == "PNG":
        return png_orientation(fp)
    if im.format in _HEADER_EXIF_FORMATS:
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    return 1


@dataclass(frozen=True)
class JpegHeader:
    """A JPEG's frame as stored (before EXIF orientation) and its EXIF orientation."""

    height: int
    width: int
    mode: str
    """Pillow's mode for the frame's components: ``L``, ``RGB`` or ``CMYK``."""
    orientation: int


#: Frames read here (Huffman-coded baseline, extended sequential, progressive: what cameras and
#: encoders write); any other frame type goes to Pillow.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
#: Segments passed over: Huffman tables, restart interval, comments, application data.
_PASSED_MARKERS = frozenset({0xC4, 0xDD, 0xFE, *range(0xE0, 0xF0)})
_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


def _quant_tables_ok(seg: bytes) -> bool:
    """Whether a DQT segment's tables fill it exactly (each 1 + 64 or 1 + 128 bytes), as
    Pillow requires (it refuses a table cut short)."""
    i = 0
    while i < len(seg):
        i += 1 + (64 if seg[i] < 16 else 128)
    return i == len(seg)


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a plain JPEG, or None where Pillow must read it.

    Walks the segments from the start of the image to the start of the scan, as Pillow's
    ``JpegImageFile._open`` does, and gives the same size, mode and EXIF orientation (Pillow's
    ``getexif()``, which also reads an orientation from XMP when EXIF has none). None for
    anything it does not read exactly as Pillow does: not a JPEG, a segment or table cut short,
    fill bytes or junk between segments, a marker other than the usual ones, a frame other than
    ``SOF0``-``SOF2``, more than one frame, a sample precision other than 8 bits, components
    other than 1, 3 or 4, an empty frame, several EXIF segments (Pillow joins them), a
    multi-picture index (Pillow opens those as MPO), an EXIF block Pillow cannot parse, or JFIF
    and Adobe segments shorter than Pillow reads.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    n, pos = len(data), 2
    frame = exif = xmp = None
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end < pos + 4 or end > n:
            return None
        body = pos + 4
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _SOF_MARKERS:
            layers = data[body + 5] if end - body >= 6 else 0
            if (layers not in _MODES or end - body != 6 + 3 * layers or frame is not None
                    or data[body] != 8):
                return None
            frame = ((data[body + 1] << 8) | data[body + 2],
                     (data[body + 3] << 8) | data[body + 4], _MODES[layers])
        elif marker == 0xDB:
            if not _quant_tables_ok(data[body:end]):
                return None
        elif marker == 0xE1 and data.startswith(b"Exif\x00\x00", body):
            if exif is not None:
                return None
            exif = data[body:end]
        elif marker == 0xE1 and data.startswith(_XMP_PREFIX, body):
            xmp = data[body + len(_XMP_PREFIX):end]
        elif marker == 0xE2 and data.startswith(b"MPF\x00", body):
            return None
        elif ((marker == 0xE0 and data.startswith(b"JFIF", body) and end - body < 7)
              or (marker == 0xEE and data.startswith(b"Adobe", body) and end - body < 7)):
            return None  # shorter than the fields Pillow reads from them
        elif marker not in _PASSED_MARKERS:
            return None
        pos = end
    if frame is None or not frame[0] or not frame[1]:
        return None
    orientation = None
    if exif is not None:
        try:
            tags = Image.Exif()
            tags.load(exif)
            if _ORIENTATION_TAG in tags:
                orientation = int(tags[_ORIENTATION_TAG] or 1)
        except Exception:  # noqa: BLE001 - whatever Pillow makes of it, it decides
            return None
    if orientation is None:
        match = _XMP_ORIENTATION.search(xmp) if xmp else None
        orientation = (int(match[2]) or 1) if match else 1
    return JpegHeader(frame[0], frame[1], frame[2], orientation)
