"""File-system helpers shared by the tests of bad input (nothing may be lost or overwritten)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


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
