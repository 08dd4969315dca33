"""EXIF orientation of an encoded image, read from its header without decoding pixels.

Preprocessing (:func:`megatron_sphinx.data.preprocess.probe_image`), the source converters
(:func:`megatron_sphinx.data.sources.image_hw`) and the loader
(:func:`megatron_sphinx.data.images.probe_image`) must agree on an image's size after orientation,
so they share this one reader.

A PNG may carry its EXIF in an ``eXIf`` chunk after the pixel data. Pillow only finds that chunk
by decoding the whole image (``getexif()`` calls ``load()``); here the chunk headers are walked
instead, skipping the pixel data, which costs microseconds whatever the image size.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

from PIL import Image

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
