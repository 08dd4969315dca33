"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions as grounding dialogs (``format: refcoco``).

Input: the REFER ``refs`` as JSON (a list; the original ``refs(unc).p`` pickle converted with
``json.dump``)::

    [{"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "split": "train",
      "file_name": "COCO_train2014_000000581857.jpg",        # used when no instances file
      "sentences": [{"sent": "the lady with the blue shirt"}, {"sent": "lady in blue"}],
      "bbox": [103.93, 299.99, 134.22, 177.42],              # optional [x, y, w, h] inline
      "height": 640, "width": 427}]                           # optional image size

The box is taken inline from ``bbox`` or joined from a COCO instances file (mix option
``instances:``) by ``ann_id``; the image file name and size come from that file's ``images`` when
given, else from the ref (size read from the image header when absent). Mix option ``split:`` keeps
refs of one split. One dialog per ref: one human/assistant turn per distinct sentence ("where is
<sentence>?" varied from a small set), each answered with the same ``[x1, y1, x2, y2]``.
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.sources import (
    Dropped, SourceError, box_text, choose, image_hw, load_json, xywh_to_xyxy)

PROMPTS = (
    "Please provide the bounding box coordinate of the region this sentence describes: {}",
    "Where is {}? Answer with a bounding box.",
    "Locate {} in the image.",
    "Give the bounding box of: {}",
)


def load(spec):
    """One record per ref (of the chosen split): ``(ref, anns by id, images by id)``."""
    refs = load_json(spec.path)
    if isinstance(refs, dict) and isinstance(refs.get("refs"), list):
        refs = refs["refs"]
    if not isinstance(refs, list):
        raise SourceError(f"{spec.path} must hold a JSON list of REFER refs")
    anns, images = {}, {}
    if spec.options.get("instances"):
        doc = load_json(spec.options["instances"])
        anns = {a["id"]: a for a in doc.get("annotations", [])}
        images = {im["id"]: im for im in doc.get("images", [])}
    split = spec.options.get("split")
    return [(r, anns, images) for r in refs
            if split is None or not isinstance(r, dict) or r.get("split") == split]


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One ref to a multi-turn grounding dialog."""
    ref, anns, images = rec
    if ref.get("bbox") is not None:
        box = xywh_to_xyxy(ref["bbox"])
    elif ref.get("ann_id") in anns:
        box = xywh_to_xyxy(anns[ref["ann_id"]]["bbox"])
    else:
        return Dropped("box_missing", f"ref {ref.get('ref_id', k)}: no bbox and ann_id "
                       f"{ref.get('ann_id')} not in the instances file")
    im = images.get(ref.get("image_id"), {})
    fname = im.get("file_name") or ref.get("file_name") or ref.get("image")
    if not fname:
        return Dropped("malformed_record", "no image file name")
    path = spec.image_path(fname)
    if im.get("height") and im.get("width"):
        h, w = int(im["height"]), int(im["width"])
    elif ref.get("height") and ref.get("width"):
        h, w = int(ref["height"]), int(ref["width"])
    else:
        h, w = image_hw(path)
    sents = []
    for s in ref.get("sentences", []):
        t = (s.get("sent") or s.get("raw") or "") if isinstance(s, dict) else str(s)
        t = t.strip()
        if t and t not in sents:
            sents.append(t)
    if not sents:
        return Dropped("no_sentences", f"ref {ref.get('ref_id', k)}")
    answer = box_text(box, h, w)
    turns = []
    for i, s in enumerate(sents):
        q = choose(PROMPTS, spec.name, ref.get("ref_id", k), str(i)).format(s)
        turns += [("human", ("<image>\n" if i == 0 else "") + q), ("assistant", answer)]
    return Dialog(turns, path, spec.name, str(ref.get("ref_id", k)))
