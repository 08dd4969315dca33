"""File-system helpers shared by the tests: the test images, and snapshots for the tests of bad
input (nothing may be lost or overwritten)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def _test_images() -> Path:
    """``$MEGATRON_SPHINX_TESTDATA`` (the GPU check carries them), else ``shared/testdata/images``
    beside the checkout, else the development machine's copy."""
    for candidate in (os.environ.get("MEGATRON_SPHINX_TESTDATA"),
                      Path(__file__).resolve().parents[2] / "shared" / "testdata" / "images"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return Path("/work/shared/testdata/images")


#: The real photos and hard image files (``adversarial/``) of ``shared/testdata``.
TEST_IMAGES = _test_images()


def photos(limit: int | None = None) -> tuple[list[bytes], list[tuple[int, int]]]:
    """The bytes and ``(height, width)`` of the test photos (sorted by name, the first
    ``limit``); fails the test when there are none."""
    from megatron_sphinx.data.images import probe_image

    datas = [p.read_bytes() for p in sorted(TEST_IMAGES.glob("*.jpg"))][:limit]
    assert datas, f"no test images in {TEST_IMAGES}"
    return datas, [probe_image(d).hw for d in datas]


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (hidden ones too): size, mtime and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_only_dir() -> Path:
    """A directory nothing can be created in, even as root (sysfs), or skip the test."""
    probe = Path("/sys/megatron_sphinx_probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("/sys is writable here: no read-only location to test with")


def unreadable_mix(folder: Path) -> Path:
    """A mix whose one llava source's annotation file is not JSON (the whole source fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llava.json").write_text("garbage{")
    (folder / "mix.yaml").write_text(
        "sources:\n  - {name: broken, format: llava, path: llava.json}\n")
    return folder / "mix.yaml"
