"""COCO person keypoints as pose dialogs (``format: coco_keypoints``).

Input: a COCO keypoints JSON (``person_keypoints_train2017.json``)::

    {"images": [{"id": 785, "file_name": "000000000785.jpg", "height": 425, "width": 640}],
     "annotations": [{"image_id": 785, "category_id": 1, "iscrowd": 0, "num_keypoints": 2,
                      "bbox": [280.79, 44.73, 218.7, 346.68],
                      "keypoints": [367, 81, 2, 0, 0, 0, 361, 75, 1, ...]}],   # x, y, v per point
     "categories": [{"id": 1, "name": "person", "keypoints": ["nose", "left_eye", ...]}]}

One dialog per image, one turn per person with at least one labelled point (``v > 0``): the human
gives the person's box and asks for its key points; the assistant lists ``name [x, y]`` for the
labelled points, normalised to the padded square. An image with no such person is dropped
(``no_keypoints``).
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.sources import Dropped, box_text, choose, point_text, xywh_to_xyxy
from megatron_sphinx.data.sources.coco_detection import load_coco

PROMPTS = (
    "Give the key points of the person in {}.",
    "Detect the key points of the person at {}.",
    "Where are the body key points of the person in the region {}?",
)


def load(spec):
    """One record per image: ``(image, annotations, keypoint names)``."""
    images, anns, _, kp_names = load_coco(spec.path)
    return [(im, anns.get(im.get("id"), []), kp_names) for im in images]


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One image's people to a pose dialog."""
    im, anns, names = rec
    h, w = int(im["height"]), int(im["width"])
    turns = []
    people = sorted((a for a in anns if not a.get("iscrowd") and a.get("keypoints")),
                    key=lambda a: (a["bbox"][0], a["bbox"][1]))
    for i, a in enumerate(people):
        kp = a["keypoints"]
        pts = []
        for j in range(len(kp) // 3):
            if kp[3 * j + 2] > 0:
                name = names[j].replace("_", " ") if j < len(names) else f"point {j}"
                pts.append(f"{name} {point_text(kp[3 * j], kp[3 * j + 1], h, w)}")
        if not pts:
            continue
        q = choose(PROMPTS, spec.name, im.get("id", k), str(i)).format(
            box_text(xywh_to_xyxy(a["bbox"]), h, w))
        turns += [("human", ("<image>\n" if not turns else "") + q), ("assistant", ", ".join(pts))]
    if not turns:
        return Dropped("no_keypoints", f"image {im.get('id')}")
    return Dialog(turns, spec.image_path(im["file_name"]), spec.name, str(im.get("id", k)))
