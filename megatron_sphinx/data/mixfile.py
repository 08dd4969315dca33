"""The mix file: a YAML list of sources with formats, paths and weights.

Example (paths are relative to the YAML file's folder)::

    sources:
      - name: llava_instruct
        format: llava          # llava | sharegpt | coco_detection | refcoco | coco_keypoints
                               #   | ocr_spotting | som
        path: annotations/llava.json
        image_root: images/    # optional; default: the YAML's folder
        weight: 1.0            # optional, > 0; default 1.0
      - name: refcoco
        format: refcoco
        path: annotations/refs.json
        instances: annotations/instances.json   # refcoco only: join boxes by ann_id
        split: train                            # refcoco only: keep refs of this split

A source's id is its position in the list; the store keeps the names in that order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FORMATS = ("llava", "sharegpt", "coco_detection", "refcoco", "coco_keypoints", "ocr_spotting",
           "som")
_KEYS = {"name", "format", "path", "image_root", "weight", "instances", "split"}
_PATH_OPTIONS = {"instances"}


class MixError(ValueError):
    """A mix file that cannot be used; the message says what to change."""


@dataclass
class SourceSpec:
    """One source of the mix."""

    name: str
    """Unique source name (reported in summaries, stored in the store)."""
    format: str
    """Converter name, one of :data:`FORMATS`."""
    path: Path
    """Annotation file (absolute)."""
    weight: float = 1.0
    """Relative sampling weight in the blended mix (> 0)."""
    image_root: Path | None = None
    """Folder image paths are relative to; :func:`load_mix` defaults it to the YAML's folder
    (None: the annotation file's folder)."""
    options: dict = field(default_factory=dict)
    """Format-specific options (``instances``, ``split``), paths made absolute."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise MixError(f"source {self.name!r}: unknown format {self.format!r}; use one of "
                           f"{', '.join(FORMATS)}")
        if not self.weight > 0:
            raise MixError(f"source {self.name!r}: weight must be > 0, got {self.weight}")

    def image_path(self, rel: str) -> str:
        """Absolute path of an image named ``rel`` in the annotations."""
        root = self.image_root if self.image_root is not None else self.path.parent
        return str((root / rel) if not os.path.isabs(rel) else Path(rel))


@dataclass
class Mix:
    """A parsed mix file."""

    path: Path
    """The YAML file."""
    sources: list[SourceSpec]
    """Sources in id order."""

    @property
    def names(self) -> list[str]:
        """Source names in id order."""
        return [s.name for s in self.sources]

    @property
    def weights(self) -> list[float]:
        """Source weights in id order."""
        return [s.weight for s in self.sources]


def load_mix(path: str | os.PathLike, check_files: bool = True) -> Mix:
    """Parses and validates a mix YAML.

    Args:
        path: The YAML file.
        check_files: Also require every annotation file (and ``instances``) to exist.

    Raises:
        MixError: With the source and field to fix.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise MixError(f"mix file {path} does not exist: pass --mix an existing YAML file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MixError(f"{path} is not valid YAML ({e}): fix the file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list) or not doc["sources"]:
        raise MixError(f"{path} needs a non-empty 'sources:' list")
    base = path.parent
    sources: list[SourceSpec] = []
    for i, s in enumerate(doc["sources"]):
        where = f"{path.name}: source #{i}"
        if not isinstance(s, dict):
            raise MixError(f"{where} must be a mapping with name/format/path")
        unknown = set(s) - _KEYS
        if unknown:
            raise MixError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        for key in ("name", "format", "path"):
            if not s.get(key):
                raise MixError(f"{where} has no '{key}'")
        name = str(s["name"])
        if name in (x.name for x in sources):
            raise MixError(f"{where}: duplicate source name {name!r}; names must be unique")
        try:
            weight = float(s.get("weight", 1.0))
        except (TypeError, ValueError):
            raise MixError(f"{where}: weight {s.get('weight')!r} is not a number") from None
        options = {k: s[k] for k in ("instances", "split") if k in s}
        for k in _PATH_OPTIONS & set(options):
            options[k] = (base / str(options[k])).resolve()
        spec = SourceSpec(
            name=name, format=str(s["format"]), path=(base / str(s["path"])).resolve(),
            weight=weight,
            image_root=(base / str(s["image_root"])).resolve() if s.get("image_root") else base,
            options=options)
        if check_files:
            for p in [spec.path] + [options[k] for k in _PATH_OPTIONS & set(options)]:
                if not Path(p).is_file():
                    raise MixError(f"source {name!r}: file {p} does not exist; fix its path "
                                   f"(relative paths resolve against {base})")
            if spec.image_root is not None and not spec.image_root.is_dir():
                raise MixError(f"source {name!r}: image_root {spec.image_root} does not exist")
        sources.append(spec)
    return Mix(path=path, sources=sources)
