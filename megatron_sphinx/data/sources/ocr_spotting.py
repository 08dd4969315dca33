"""OCR text spotting (``format: ocr_spotting``): an image and its words with boxes.

Input: a JSON list (``.json``) or JSON lines (``.jsonl``) of records::

    {"image": "signs/0001.jpg", "height": 480, "width": 640,     # size optional (read from file)
     "words": [{"text": "STOP", "bbox": [120, 40, 260, 90]},      # [x1, y1, x2, y2] pixels
               {"text": "EXIT", "points": [[10, 5], [80, 5], [80, 30], [10, 30]]}]}  # polygon

Polygons become their enclosing box. Illegible words (text ``###`` or ``"illegible": true``) are
left out. One dialog per image: the human asks to spot the text, the assistant lists
``text [x1, y1, x2, y2]`` one per line in reading order. An image with no legible word is dropped
(``no_words``).
"""
from __future__ import annotations

from megatron_sphinx.data.conversation import Dialog
from megatron_sphinx.data.sources import Dropped, box_text, choose, image_hw, load_records

PROMPTS = (
    "Spot all the text in the image with its bounding box.",
    "Read every word in the image and give the box of each.",
    "Detect and recognise the text in this image. Answer with each word and its box.",
)


def load(spec):
    """Records of the file, in order."""
    return load_records(spec.path)


def convert(rec, spec, k: int) -> Dialog | Dropped:
    """One image's words to a spotting dialog."""
    if not isinstance(rec, dict) or not rec.get("image"):
        return Dropped("malformed_record", "no 'image'")
    path = spec.image_path(str(rec["image"]))
    words = []
    for wd in rec.get("words", []):
        text = str(wd.get("text", "")).strip()
        if not text or text == "###" or wd.get("illegible"):
            continue
        if wd.get("bbox") is not None:
            x1, y1, x2, y2 = (float(v) for v in wd["bbox"][:4])
        else:
            xs = [float(p[0]) for p in wd["points"]]
            ys = [float(p[1]) for p in wd["points"]]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        words.append((y1, x1, text, (x1, y1, x2, y2)))
    if not words:
        return Dropped("no_words", f"image {rec['image']}")
    if rec.get("height") and rec.get("width"):
        h, w = int(rec["height"]), int(rec["width"])
    else:
        h, w = image_hw(path)
    words.sort(key=lambda t: (round(t[0]), round(t[1])))
    answer = "\n".join(f"{t} {box_text(b, h, w)}" for _, _, t, b in words)
    prompt = choose(PROMPTS, spec.name, rec.get("id", k))
    return Dialog([("human", "<image>\n" + prompt), ("assistant", answer)], path, spec.name,
                  str(rec.get("id", k)))
