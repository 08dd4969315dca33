"""Set-of-Mark prompting (``format: som``): numbered marks given as coordinates in the prompt.

Input: a JSON list (``.json``) or JSON lines (``.jsonl``) of records::

    {"image": "som/0001.jpg", "height": 400, "width": 800,          # size optional
     "marks": [{"id": 1, "point": [120, 80], "label": "red circle"},     # a point mark, or
               {"id": 2, "bbox": [300, 50, 420, 170], "label": "blue square"}],  # a box mark
     "conversations": [{"from": "human", "value": "<image>\\nWhat is at mark 2?"},   # optional
                       {"from": "gpt", "value": "A blue square."}]}

The first human turn gets the marks spelled out after ``<image>``: "The image has numbered marks:
1 at [x, y]; 2 at [x1, y1, x2, y2]." (normalised to the padded square). Without
``conversations``, the marks' labels make the task: the human asks what each mark shows and the
assistant answers ``1: red circle`` per line. A record with no marks is dropped (``no_marks``).
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import IMAGE_TOKEN, Dialog
from megatron_sphinx.data.sources import (
    Dropped, box_text, choose, image_hw, load_records, point_text)

PROMPTS = (
    "What does each mark point at?",
    "Name the object at every mark.",
    "For each numbered mark, say what is there.",
)


def load(spec):
    """Records of the file, in order."""
    return load_records(spec.path)


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One image with marks to a dialog."""
    if not isinstance(rec, dict) or not rec.get("image"):
        return Dropped("malformed_record", "no 'image'")
    marks = rec.get("marks") or []
    if not marks:
        return Dropped("no_marks", f"image {rec['image']}")
    path = spec.image_path(str(rec["image"]))
    if rec.get("height") and rec.get("width"):
        h, w = int(rec["height"]), int(rec["width"])
    else:
        h, w = image_hw(path)
    where = []
    for m in marks:
        loc = (box_text(m["bbox"], h, w) if m.get("bbox") is not None
               else point_text(m["point"][0], m["point"][1], h, w))
        where.append(f"{m['id']} at {loc}")
    preamble = "The image has numbered marks: " + "; ".join(where) + "."
    if isinstance(rec.get("conversations"), list) and rec["conversations"]:
        turns = [(t["from"], t["value"]) for t in rec["conversations"]]
    else:
        labelled = [m for m in marks if m.get("label")]
        if not labelled:
            return Dropped("no_marks", "marks have no labels and there are no conversations")
        turns = [("human", IMAGE_TOKEN + "\n" + choose(PROMPTS, spec.name, rec.get("id", k))),
                 ("assistant", "\n".join(f"{m['id']}: {m['label']}" for m in labelled))]
    role, text = turns[0]
    if IMAGE_TOKEN in text:
        text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN + "\n" + preamble, 1)
    else:
        text = preamble + "\n" + text
    turns[0] = (role, text)
    return Dialog(turns, path, spec.name, str(rec.get("id", k)))
