"""Converters (one example per format, as in each module's docstring) and the mix file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.mixfile import MixError, SourceSpec, load_mix
from megatron_sphinx.data.sources import (
    Dropped, SourceError, box_text, choose, convert_source, point_text)
from megatron_sphinx.data.sources import coco_detection, refcoco


def _spec(tmp_path: Path, fmt: str, data, name: str = "src", ext: str = ".json", **options):
    path = tmp_path / f"{name}{ext}"
    if ext == ".jsonl":
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                                for x in data))
    else:
        path.write_text(json.dumps(data))
    return SourceSpec(name, fmt, path, image_root=tmp_path, options=options)


def _all(spec, world: int = 1):
    out = {}
    for r in range(world):
        out.update(dict(convert_source(spec, r, world)))
    return [out[k] for k in sorted(out)]


def test_box_and_point_text_normalise_by_the_padded_square():
    # 640 x 480 (w x h): the padded square has side 640.
    assert box_text((64, 48, 320, 240), 480, 640) == "[0.10, 0.07, 0.50, 0.38]"
    # A tall 300 x 900 image: the side is 900 for x too.
    assert box_text((0, 450, 300, 900), 900, 300) == "[0.00, 0.50, 0.33, 1.00]"
    assert point_text(700, -5, 480, 640) == "[1.00, 0.00]"  # clipped to [0, 1]


def test_llava(tmp_path):
    rec = {"id": "000000033471", "image": "coco/33471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."}]}
    (d,) = _all(_spec(tmp_path, "llava", [rec]))
    assert d == Dialog([("human", "<image>\nWhat are the colors of the bus in the image?"),
                        ("gpt", "The bus in the image is white and red.")],
                       str(tmp_path / "coco/33471.jpg"), "src", "000000033471")
    text = {"id": "t", "conversations": [{"from": "human", "value": "hi"},
                                         {"from": "gpt", "value": "hello"}]}
    (d,) = _all(_spec(tmp_path, "llava", [text]))
    assert d.image is None
    (d,) = _all(_spec(tmp_path, "llava", [{"id": "bad"}]))
    assert d == Dropped("malformed_record", "no 'conversations' list")


def test_sharegpt_three_styles_and_malformed_line(tmp_path):
    lines = [
        {"id": "x1", "conversations": [{"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello!"}]},
        {"id": "7", "data": ["q1", "a1", "q2", "a2"]},
        '{"messages": [{"role": "user", "content": "Hi"}',  # malformed JSON
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        [1, 2],
    ]
    out = _all(_spec(tmp_path, "sharegpt", lines, ext=".jsonl"))
    assert out[0].turns == [("human", "Hi"), ("gpt", "Hello!")] and out[0].id == "x1"
    assert out[1].turns == [("human", "q1"), ("assistant", "a1"), ("human", "q2"),
                            ("assistant", "a2")]
    assert isinstance(out[2], Dropped) and out[2].reason == "malformed_json"
    assert "line 3" in out[2].detail
    assert out[3].turns == [("user", "Hi"), ("assistant", "Yo")] and out[3].image is None
    assert out[4] == Dropped("malformed_record", "a line is not a JSON object")


COCO = {
    "images": [{"id": 9, "file_name": "9.jpg", "height": 480, "width": 640},
               {"id": 10, "file_name": "10.jpg", "height": 100, "width": 100}],
    "annotations": [
        {"id": 1, "image_id": 9, "category_id": 51, "iscrowd": 0, "bbox": [320, 240, 64, 48]},
        {"id": 2, "image_id": 9, "category_id": 1, "iscrowd": 0, "bbox": [64, 48, 256, 192]},
        {"id": 3, "image_id": 9, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 10, 10]},
        {"id": 4, "image_id": 10, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 10, 10]}],
    "categories": [{"id": 1, "name": "person"}, {"id": 51, "name": "bowl"}],
}


def test_coco_detection(tmp_path):
    spec = _spec(tmp_path, "coco_detection", COCO)
    d, dropped = _all(spec)
    assert d.image == str(tmp_path / "9.jpg") and d.id == "9"
    q = d.turns[0][1]
    assert q.startswith("<image>\n") and q[len("<image>\n"):] in coco_detection.PROMPTS
    assert d.turns[1] == ("assistant", "person [0.10, 0.07, 0.50, 0.38]\n"
                                       "bowl [0.50, 0.38, 0.60, 0.45]")
    assert dropped == Dropped("no_annotations", "image 10")


def test_refcoco_inline_and_joined_boxes(tmp_path):
    inst = _spec(tmp_path, "coco_detection", COCO, name="instances").path
    refs = [
        {"ref_id": 0, "ann_id": 2, "image_id": 9, "split": "train", "file_name": "ignored.jpg",
         "sentences": [{"sent": "the person"}, {"sent": "the person"}, {"sent": "left guy"}]},
        {"ref_id": 1, "ann_id": 99, "image_id": 9, "split": "train", "file_name": "9.jpg",
         "bbox": [320, 240, 64, 48], "sentences": [{"sent": "the bowl"}]},
        {"ref_id": 2, "ann_id": 98, "image_id": 77, "split": "train", "file_name": "x.jpg",
         "sentences": [{"sent": "nothing"}]},
        {"ref_id": 3, "ann_id": 1, "image_id": 9, "split": "val", "sentences": [{"sent": "v"}]},
        {"ref_id": 4, "ann_id": 1, "image_id": 9, "split": "train", "sentences": []},
    ]
    spec = _spec(tmp_path, "refcoco", refs, instances=inst, split="train")
    a, b, c, e = _all(spec)
    assert a.image == str(tmp_path / "9.jpg")  # the instances file's name wins
    assert [t for r, t in a.turns if r == "assistant"] == ["[0.10, 0.07, 0.50, 0.38]"] * 2
    assert "the person" in a.turns[0][1] and a.turns[0][1].startswith("<image>\n")
    assert "left guy" in a.turns[2][1] and "<image>" not in a.turns[2][1]
    assert a.turns[0][1][len("<image>\n"):] in [p.format("the person") for p in refcoco.PROMPTS]
    assert b.turns[1] == ("assistant", "[0.50, 0.38, 0.60, 0.45]")
    assert c.reason == "box_missing"
    assert e == Dropped("no_sentences", "ref 4")
    # Without an instances file: the inline box, and the size read from the image header.
    Image.new("RGB", (200, 100)).save(tmp_path / "w.png")
    spec = _spec(tmp_path, "refcoco", [{"ref_id": 5, "file_name": "w.png", "bbox": [0, 0, 100, 50],
                                        "sentences": [{"sent": "top left"}]}], name="r2")
    (d,) = _all(spec)
    assert d.turns[1] == ("assistant", "[0.00, 0.00, 0.50, 0.25]")


def test_coco_keypoints(tmp_path):
    doc = {"images": [{"id": 785, "file_name": "785.jpg", "height": 400, "width": 800},
                      {"id": 786, "file_name": "786.jpg", "height": 400, "width": 800}],
           "annotations": [
               {"image_id": 785, "category_id": 1, "iscrowd": 0, "bbox": [80, 40, 160, 320],
                "keypoints": [400, 200, 2, 0, 0, 0, 80, 400, 1]},
               {"image_id": 786, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1],
                "keypoints": [0, 0, 0, 0, 0, 0, 0, 0, 0]}],
           "categories": [{"id": 1, "name": "person",
                           "keypoints": ["nose", "left_eye", "left_ear"]}]}
    d, dropped = _all(_spec(tmp_path, "coco_keypoints", doc))
    assert "[0.10, 0.05, 0.30, 0.45]" in d.turns[0][1] and d.turns[0][1].startswith("<image>\n")
    assert d.turns[1] == ("assistant", "nose [0.50, 0.25], left ear [0.10, 0.50]")
    assert dropped.reason == "no_keypoints"


def test_ocr_spotting(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "sign.jpg")
    recs = [{"image": "sign.jpg", "words": [
        {"text": "EXIT", "points": [[64, 240], [128, 240], [128, 288], [64, 288]]},
        {"text": "STOP", "bbox": [320, 48, 640, 96]},
        {"text": "###", "bbox": [0, 0, 5, 5]},
        {"text": "blur", "bbox": [0, 0, 5, 5], "illegible": True}]},
        {"image": "sign.jpg", "height": 480, "width": 640, "words": [{"text": "###",
                                                                      "bbox": [0, 0, 1, 1]}]},
        {"image": "missing.jpg", "words": [{"text": "A", "bbox": [0, 0, 1, 1]}]}]
    d, no_words, missing = _all(_spec(tmp_path, "ocr_spotting", recs))
    assert d.turns[1] == ("assistant", "STOP [0.50, 0.07, 1.00, 0.15]\n"
                                       "EXIT [0.10, 0.38, 0.20, 0.45]")
    assert no_words.reason == "no_words"
    assert missing.reason == "image_missing"


def test_som_marks_in_prompt(tmp_path):
    recs = [
        {"image": "s.jpg", "height": 400, "width": 800, "marks": [
            {"id": 1, "point": [120, 80], "label": "red circle"},
            {"id": 2, "bbox": [400, 0, 800, 400], "label": "blue square"}]},
        {"image": "s.jpg", "height": 400, "width": 800, "marks": [{"id": 1, "point": [0, 0]}],
         "conversations": [{"from": "human", "value": "<image>\nWhat is at mark 1?"},
                           {"from": "gpt", "value": "A dot."}]},
        {"image": "s.jpg", "height": 400, "width": 800, "marks": []},
    ]
    a, b, c = _all(_spec(tmp_path, "som", recs))
    marks = "The image has numbered marks: 1 at [0.15, 0.10]; 2 at [0.50, 0.00, 1.00, 0.50]."
    assert a.turns[0][1].startswith("<image>\n" + marks + "\n")
    assert a.turns[1] == ("assistant", "1: red circle\n2: blue square")
    assert b.turns == [("human", "<image>\nThe image has numbered marks: 1 at [0.00, 0.00].\n"
                                 "What is at mark 1?"), ("gpt", "A dot.")]
    assert c.reason == "no_marks"


def test_rank_split_is_a_partition_and_deterministic(tmp_path):
    recs = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"},
                                        {"from": "gpt", "value": f"a{i}"}]} for i in range(11)]
    spec = _spec(tmp_path, "llava", recs)
    shares = [[k for k, _ in convert_source(spec, r, 3)] for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(11))
    assert all(k % 3 == r for r, ks in enumerate(shares) for k in ks)
    assert _all(spec, 3) == _all(spec, 1)


def test_prompts_vary_but_are_stable():
    picks = [choose(coco_detection.PROMPTS, "src", k) for k in range(40)]
    assert len(set(picks)) > 1
    assert picks == [choose(coco_detection.PROMPTS, "src", k) for k in range(40)]
    # the salt (a turn number) varies the pick within one record, too
    assert len({choose(coco_detection.PROMPTS, "src", 7, str(i)) for i in range(20)}) > 1


def test_unreadable_source_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    spec = SourceSpec("b", "llava", tmp_path / "broken.json")
    with pytest.raises(SourceError, match="not valid JSON"):
        list(convert_source(spec))


def test_load_mix_resolves_paths_and_validates(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "a.json").write_text("[]")
    (tmp_path / "imgs").mkdir()
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n"
                   "  - {name: a, format: llava, path: ann/a.json, image_root: imgs, weight: 2}\n"
                   "  - {name: b, format: refcoco, path: ann/a.json, instances: ann/a.json}\n")
    m = load_mix(mix)
    assert m.names == ["a", "b"] and m.weights == [2.0, 1.0]
    assert m.sources[0].path == tmp_path / "ann" / "a.json"
    assert m.sources[0].image_path("x.jpg") == str(tmp_path / "imgs" / "x.jpg")
    assert m.sources[1].image_path("x.jpg") == str(tmp_path / "x.jpg")  # the YAML's folder
    assert m.sources[1].options["instances"] == tmp_path / "ann" / "a.json"
    bad = {
        "format: nope": "unknown format",
        "format: llava, weight: 0": "weight must be > 0",
        "format: llava, colour: red": "unknown key",
        "format: llava, path: ann/missing.json": "does not exist",
        "format: refcoco, path: ann/a.json, instances: ann/none.json": "none.json does not exist",
        "format: llava, path: ann/a.json, image_root: no_images": "image_root .* does not exist",
    }
    for body, msg in bad.items():
        body = body if "path:" in body else body + ", path: ann/a.json"
        mix.write_text(f"sources:\n  - {{name: a, {body}}}\n")
        with pytest.raises(MixError, match=msg):
            load_mix(mix)
    mix.write_text("sources:\n  - {name: a, format: llava, path: ann/a.json}\n"
                   "  - {name: a, format: llava, path: ann/a.json}\n")
    with pytest.raises(MixError, match="duplicate"):
        load_mix(mix)
    with pytest.raises(MixError, match="does not exist"):
        load_mix(tmp_path / "nope.yaml")


def test_detection_and_spotting_list_top_to_bottom_then_left_to_right(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 60, 10, 10]},   # low left
               {"id": 2, "image_id": 1, "category_id": 2, "bbox": [70, 10, 10, 10]},   # top right
               {"id": 3, "image_id": 1, "category_id": 3, "bbox": [20, 10, 10, 10]}],  # top left
           "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    (d,) = _all(_spec(tmp_path, "coco_detection", doc))
    assert [line.split()[0] for line in d.turns[1][1].splitlines()] == ["c", "b", "a"]
    recs = [{"image": "x.jpg", "height": 100, "width": 100, "words": [
        {"text": "low", "bbox": [10, 60, 20, 70]}, {"text": "right", "bbox": [70, 10, 80, 20]},
        {"text": "left", "bbox": [20, 10, 30, 20]}]}]
    (d,) = _all(_spec(tmp_path, "ocr_spotting", recs, name="ocr"))
    assert [line.split()[0] for line in d.turns[1][1].splitlines()] == ["left", "right", "low"]


def test_ocr_polygon_in_any_corner_order_becomes_its_enclosing_box(tmp_path):
    quad = [[128, 288], [64, 240], [70, 300], [120, 230]]  # a tilted quad, no corner first
    recs = [{"image": "x.jpg", "height": 480, "width": 640,
             "words": [{"text": "TILT", "points": quad}]}]
    (d,) = _all(_spec(tmp_path, "ocr_spotting", recs))
    assert d.turns[1] == ("assistant", "TILT " + box_text((64, 230, 128, 300), 480, 640))
    assert d.turns[1][1] == "TILT [0.10, 0.36, 0.20, 0.47]"


def test_refcoco_size_from_the_instances_file_wins(tmp_path):
    inst = _spec(tmp_path, "coco_detection", COCO, name="instances").path
    refs = [{"ref_id": 0, "ann_id": 2, "image_id": 9, "height": 100, "width": 100,
             "sentences": [{"sent": "the person"}]}]
    (d,) = _all(_spec(tmp_path, "refcoco", refs, instances=inst))
    assert d.turns[1] == ("assistant", "[0.10, 0.07, 0.50, 0.38]")  # 640 x 480, not 100 x 100


def test_coco_keypoints_people_in_left_to_right_order(tmp_path):
    person = lambda x, y: {"image_id": 1, "category_id": 1, "iscrowd": 0,  # noqa: E731
                           "bbox": [x, y, 10, 10], "keypoints": [x + 5, y + 5, 2]}
    doc = {"images": [{"id": 1, "file_name": "1.jpg", "height": 100, "width": 100}],
           "annotations": [person(60, 0), person(20, 50), person(20, 10)],
           "categories": [{"id": 1, "name": "person", "keypoints": ["nose"]}]}
    (d,) = _all(_spec(tmp_path, "coco_keypoints", doc))
    assert [t for r, t in d.turns if r == "assistant"] == [
        "nose [0.25, 0.15]", "nose [0.25, 0.55]", "nose [0.65, 0.05]"]
