"""The direct JPEG header reader gives Pillow's answer, or none (then Pillow reads the header).

The loader probes every image of every batch; ``jpeg_header`` is its fast path. Whatever it
answers must be what opening the file with Pillow says (size, mode, EXIF orientation, XMP's
orientation where EXIF has none); what it cannot read exactly it leaves to Pillow.
"""
from __future__ import annotations

import io
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron_sphinx.data.image_header import MAX_PIXELS, jpeg_header
from megatron_sphinx.data.images import (ImageConfig, ImageDecodeError, ImageProcessor,
                                         _probe_with_pillow, probe_image)
from tests.files import TEST_IMAGES


def _pillow(data: bytes):
    """Pillow's ``(h, w, mode, orientation)``, or the exception type it raises."""
    try:
        fmt, mode, hw, orient, _ = _probe_with_pillow(data)
    except ImageDecodeError:
        return "refused"
    return (*hw, mode, orient) if fmt == "JPEG" else fmt


def _fast(data: bytes):
    head = jpeg_header(data)
    return None if head is None else (head.height, head.width, head.mode, head.orientation)


def _agrees(data: bytes) -> bool:
    """No answer, or Pillow's; above MAX_PIXELS (where Pillow may refuse the file outright as a
    decompression bomb) the probe refuses it whichever path read the header."""
    fast = _fast(data)
    if fast is None:
        return True
    if fast[0] * fast[1] > MAX_PIXELS:
        with pytest.raises(ImageDecodeError, match="image too large"):
            probe_image(data)
        return True
    return fast == _pillow(data)


def _jpeg(size=(160, 90), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, "JPEG", **save)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def _xmp(orientation: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description '
            b'tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % orientation)


def _files() -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(TEST_IMAGES.glob("*.jpg"))}
    files |= {p.name: p.read_bytes() for p in sorted((TEST_IMAGES / "adversarial").glob("*"))}
    assert len(files) >= 10, f"test images missing in {TEST_IMAGES}"
    return files


def _made() -> dict[str, bytes]:
    made = {"progressive": _jpeg(progressive=True), "gray": _jpeg(mode="L"),
            "cmyk": _jpeg(mode="CMYK"), "one pixel": _jpeg((1, 1)),
            "wide": _jpeg((4000, 3)), "restart intervals": _jpeg(restart_marker_blocks=1),
            "comment": _jpeg(comment=b"a comment"), "dpi": _jpeg(dpi=(300, 300)),
            "icc": _jpeg(icc_profile=b"\0" * 300)}
    for o in range(0, 10):
        made[f"exif {o}"] = _jpeg(exif=_exif(o))
        made[f"xmp {o}"] = _jpeg(xmp=_xmp(o))
        made[f"exif 3, xmp {o}"] = _jpeg(exif=_exif(3), xmp=_xmp(o))  # EXIF's wins
    made["exif without orientation, xmp 6"] = _jpeg(exif=Image.Exif().tobytes(), xmp=_xmp(6))
    return made


@pytest.mark.parametrize("name,data", list(_files().items()) + list(_made().items()))
def test_same_answer_as_pillow(name, data):
    """Every test photo, hard file and made JPEG (progressive, gray, CMYK, restart markers,
    comments, ICC profiles, each EXIF and XMP orientation): the plain JPEGs get an answer, and
    it is Pillow's; the others (PNGs, random bytes) are left to Pillow."""
    fast = _fast(data)
    if not name.endswith(".png") and name != "random_bytes.jpg":
        assert fast is not None, f"{name}: a plain JPEG left to Pillow"
        assert fast == _pillow(data), name
    else:
        assert fast is None, name


def test_orientations_as_pillow_reads_them():
    """EXIF's orientation, else XMP's (Pillow's getexif), 0 read as 1; 5-8 swap h and w."""
    assert _fast(_jpeg(exif=_exif(6)))[3] == 6
    assert _fast(_jpeg(xmp=_xmp(8)))[3] == 8
    assert _fast(_jpeg(exif=_exif(3), xmp=_xmp(6)))[3] == 3
    assert _fast(_jpeg(xmp=_xmp(0)))[3] == 1
    assert probe_image(_jpeg((160, 90), xmp=_xmp(6))).hw == (160, 90)
    assert probe_image(_jpeg((160, 90), exif=_exif(2))).hw == (90, 160)


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


def test_what_it_leaves_to_pillow():
    plain = _jpeg()
    assert _fast(plain) is not None
    mpo = io.BytesIO()
    Image.new("RGB", (16, 8)).save(mpo, "MPO", save_all=True,
                                    append_images=[Image.new("RGB", (16, 8))])
    exif = _segment(0xE1, _exif(6))
    cases = {
        "multi-picture (Pillow: MPO)": mpo.getvalue(),
        "two EXIF segments (Pillow joins them)": plain[:2] + exif + exif + plain[2:],
        "fill bytes between segments": plain[:2] + b"\xff" + plain[2:],
        "an unusual marker": plain[:2] + _segment(0xDF, b"\0\0\0") + plain[2:],
        "a quantisation table cut short": plain[:2] + _segment(0xDB, b"\0" * 30) + plain[2:],
        "a short JFIF segment": plain[:2] + _segment(0xE0, b"JFIF\0") + plain[2:],
        "no start of scan": plain[:plain.index(b"\xff\xda")],
        "not a JPEG": b"\x89PNG\r\n\x1a\n" + plain,
        "EXIF Pillow cannot parse": plain[:2] + _segment(0xE1, b"Exif\0\0XX\0*\0\0\0\x08")
        + plain[2:],
    }
    for name, data in cases.items():
        assert _fast(data) is None, name
    # a second frame header before the scan
    sof = plain.index(b"\xff\xc0")
    n = struct.unpack(">H", plain[sof + 2:sof + 4])[0]
    assert _fast(plain[:sof] + plain[sof:sof + 2 + n] + plain[sof:]) is None


def test_every_cut_of_a_header_is_pillow_or_none():
    """A file cut anywhere in its header: no answer, or Pillow's (cut after the scan header)."""
    data = _jpeg(exif=_exif(6), xmp=_xmp(3), progressive=True)
    scan = data.index(b"\xff\xda") + 16
    for cut in range(scan):
        assert _agrees(data[:cut]), cut


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_headers_get_pillow_answer_or_none(data):
    """A real photo's header damaged at random (bytes overwritten, dropped, inserted): whenever
    the reader answers, Pillow answers the same (it never accepts what Pillow refuses, nor reads
    it otherwise). A longer run of the same, 30,000 damaged headers of which ~9,400 answered,
    found no difference beyond sizes over MAX_PIXELS."""
    photos = sorted(TEST_IMAGES.glob("*.jpg"))
    src = bytearray(photos[data.draw(st.integers(0, len(photos) - 1))].read_bytes())
    end = src.index(b"\xff\xda") + 14
    for _ in range(data.draw(st.integers(1, 4))):
        at, kind = data.draw(st.integers(2, end)), data.draw(st.sampled_from("set drop add"))
        if kind == "drop":
            del src[at]
        else:
            byte = data.draw(st.sampled_from([0, 0xFF]) | st.integers(0, 255))
            src[at:at + (kind == "set")] = bytes([byte])
    assert _agrees(bytes(src))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_large_images_are_refused_per_image():
    """A header claiming more than MAX_PIXELS (or Pillow's own bomb limit) is one image's error,
    never an exception out of the batch (decoding it would take gigabytes)."""
    good = _jpeg((64, 48))
    sof = good.index(b"\xff\xc0")

    def claiming(h: int, w: int) -> bytes:
        return good[:sof + 5] + struct.pack(">HH", h, w) + good[sof + 9:]

    assert 12000 * 10000 > MAX_PIXELS
    for h, w in [(12000, 10000), (60000, 60000)]:  # under and over Pillow's bomb limit
        data = claiming(h, w)
        assert _fast(data) == (h, w, "RGB", 1)
        for read in (data, data[:2] + b"\xff" + data[2:]):  # the fast path, then Pillow's
            with pytest.raises(ImageDecodeError, match="image too large"):
                probe_image(read)
    batch = ImageProcessor(ImageConfig(device="cpu"))([claiming(60000, 60000), good])
    assert batch.errors[0].startswith("image too large") and batch.errors[1] is None
    assert batch.view_counts.tolist() == [0, 5] and batch.paths[1] == "dali"
