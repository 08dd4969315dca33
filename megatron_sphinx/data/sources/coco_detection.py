"""COCO instances as detection dialogs (``format: coco_detection``).

Input: a COCO instances JSON (``instances_train2017.json``)::

    {"images": [{"id": 9, "file_name": "000000000009.jpg", "height": 480, "width": 640}],
     "annotations": [{"id": 1038967, "image_id": 9, "category_id": 51, "iscrowd": 0,
                      "bbox": [1.08, 187.69, 611.59, 285.84]}],          # [x, y, w, h] pixels
     "categories": [{"id": 51, "name": "bowl"}]}

One dialog per image (in ``images`` order): the human asks for every object (a prompt varied from
a small set, fixed per image), the assistant lists ``name [x1, y1, x2, y2]`` one per line, top to
bottom then left to right, boxes normalised to the padded square. Crowd boxes are left out; an
image without boxes is dropped (``no_annotations``).
"""
from __future__ import annotations

from collections import defaultdict

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.sources import Dropped, box_text, choose, load_json, xywh_to_xyxy

PROMPTS = (
    "Detect all objects in the image and give their bounding boxes.",
    "List every object you can see with its bounding box.",
    "Locate the objects in this image. Answer with each object's name and box.",
    "Give the category and bounding box coordinates of each object in the image.",
)


def load_coco(path):
    """``(images in file order, {image id: annotations}, {category id: name}, keypoint names)``."""
    doc = load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        from megatron_sphinx.data.sources import SourceError

        raise SourceError(f"{path} is not a COCO file (no 'images' list)")
    anns = defaultdict(list)
    for a in doc.get("annotations", []):
        anns[a.get("image_id")].append(a)
    cats = {c["id"]: c.get("name", str(c["id"])) for c in doc.get("categories", [])}
    kp_names = next((c["keypoints"] for c in doc.get("categories", []) if c.get("keypoints")), [])
    return doc["images"], anns, cats, kp_names


def load(spec):
    """One record per image: ``(image, annotations, categories)``."""
    images, anns, cats, _ = load_coco(spec.path)
    return [(im, anns.get(im.get("id"), []), cats) for im in images]


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One image's boxes to a detection dialog."""
    im, anns, cats = rec
    h, w = int(im["height"]), int(im["width"])
    objs = []
    for a in anns:
        if a.get("iscrowd"):
            continue
        x1, y1, x2, y2 = xywh_to_xyxy(a["bbox"])
        objs.append((y1, x1, cats.get(a["category_id"], str(a["category_id"])), (x1, y1, x2, y2)))
    if not objs:
        return Dropped("no_annotations", f"image {im.get('id')}")
    objs.sort(key=lambda o: (round(o[0]), round(o[1])))
    answer = "\n".join(f"{name} {box_text(box, h, w)}" for _, _, name, box in objs)
    prompt = choose(PROMPTS, spec.name, im.get("id", k))
    return Dialog([("human", "<image>\n" + prompt), ("assistant", answer)],
                  spec.image_path(im["file_name"]), spec.name, str(im.get("id", k)))
