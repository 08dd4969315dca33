"""The embedded sample mix: deterministic, self-contained, and its answers true for its images."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_sphinx.data.conversation import check_dialog
from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.mixfile import load_mix
from megatron_sphinx.data.sample_data import COLOURS, main, write_sources
from megatron_sphinx.data.sources import Dropped, convert_source


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd") / "data"
    assert main(["--out", str(out)]) == 0
    return out


def _box_px(box_text: str, h: int, w: int):
    side = max(h, w)
    return [float(v) * side for v in re.findall(r"[\d.]+", box_text)]


def _colour_at(path: Path, x: float, y: float) -> np.ndarray:
    im = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    return im[int(y), int(x)]


def _near(rgb, name: str, tol: int = 40) -> bool:
    return int(np.abs(rgb - np.asarray(COLOURS[name])).max()) <= tol


def test_deterministic_and_small(data, tmp_path):
    again = tmp_path / "again"
    write_sources(again)
    a = {k: v for k, v in _digest(data).items() if not k.startswith("tokenizer")}
    assert a == _digest(again)
    size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert size < 10 * 2**20
    assert main(["--out", str(data)]) == 2  # never over a non-empty directory


def test_mix_has_every_format_and_a_few_hundred_samples(data):
    mix = load_mix(data / "mix.yaml")
    assert {s.format for s in mix.sources} == {"llava", "sharegpt", "coco_detection", "refcoco",
                                               "coco_keypoints", "ocr_spotting", "som"}
    n, text_only, dropped = 0, 0, []
    for spec in mix.sources:
        for _, d in convert_source(spec):
            if isinstance(d, Dropped):
                dropped.append(d)
                continue
            check_dialog(d)
            n += 1
            text_only += d.image is None
    assert dropped == [] and 300 <= n <= 1000 and text_only >= 100
    assert (data / "tokenizer" / "tokenizer.json").is_file()


def test_aspect_ratios_formats_and_skip_tokens(data):
    skipped, formats, ratios = 0, set(), set()
    for p in (data / "images").iterdir():
        im = Image.open(p)
        formats.add(im.format)
        w, h = im.size
        ratios.add(round(w / h, 2))
        skipped += image_geometry(h, w, 448, 2).num_skipped()
    assert formats == {"JPEG", "PNG"}
    assert {2.0, 3.0, 0.5, 0.33, 1.0} <= ratios
    assert skipped > 50


def test_llava_answers_are_true(data):
    recs = json.loads((data / "annotations" / "llava.json").read_text())
    checked = 0
    for r in recs:
        if "image" not in r:
            continue
        path = data / r["image"]
        w, h = Image.open(path).size
        conv = [t["value"] for t in r["conversations"]]
        caption = conv[1]
        shapes = re.findall(r"an? (\w+) (circle|square|triangle)", caption)
        total = int(["zero", "one", "two", "three", "four", "five"].index(
            re.search(r"(\w+) shapes?\.$", conv[-1]).group(1)))
        assert total == len(shapes)
        for q, a in zip(conv[2::2], conv[3::2]):
            m = re.match(r"What colour is the (\w+)\?", q)
            if m:
                colour = re.match(r"The \w+ is (\w+)\.", a).group(1)
                assert (colour, m.group(1)) in shapes
            if q.startswith("Where is the"):
                x1, y1, x2, y2 = _box_px(a, h, w)
                assert _near(_colour_at(path, (x1 + x2) / 2, (y1 + y2) / 2), colour)
                checked += 1
    assert checked > 20


def test_detection_and_refs_boxes_are_true(data):
    inst = json.loads((data / "annotations" / "instances.json").read_text())
    refs = json.loads((data / "annotations" / "refs.json").read_text())
    images = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    n = 0
    for ref in refs:
        sent = ref["sentences"][0]["sent"]
        m = re.match(r"the (\w+) (circle|square|triangle)$", sent)
        if not m:
            continue
        a = anns[ref["ann_id"]]
        x, y, bw, bh = a["bbox"]
        path = data / "images" / images[a["image_id"]]["file_name"]
        assert _near(_colour_at(path, x + bw / 2, y + bh / 2), m.group(1))
        if "bbox" in ref:
            assert ref["bbox"] == a["bbox"]
        n += 1
    assert n > 20


def test_ocr_and_pose_annotations_hit_ink(data):
    for r in json.loads((data / "annotations" / "ocr.json").read_text()):
        im = np.asarray(Image.open(data / r["image"]).convert("L"))
        for wd in r["words"]:
            x1, y1, x2, y2 = wd["bbox"]
            assert im[y1:y2, x1:x2].min() < 80  # dark text inside the box
    kp = json.loads((data / "annotations" / "keypoints.json").read_text())
    files = {im["id"]: im["file_name"] for im in kp["images"]}
    for a in kp["annotations"]:
        im = np.asarray(Image.open(data / "images" / files[a["image_id"]]).convert("RGB"),
                        dtype=np.int32)
        hx, hy = a["keypoints"][0], a["keypoints"][1]  # head: the centre of a filled disc
        assert any(_near(im[int(hy), int(hx)], c) for c in COLOURS)
