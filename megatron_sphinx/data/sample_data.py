"""The embedded sample mix, generated deterministically (no binaries in git).

``python -m megatron_sphinx.data.sample_data --out DIR`` writes, in a few seconds::

    DIR/images/*.jpg|png           synthetic scenes drawn with Pillow: coloured circles, squares and
                                   triangles on plain backgrounds, stick figures, words; aspect
                                   ratios 1:1, 4:3, 3:4, 2:1, 3:1, 1:2, 1:3 (wide and tall ones make
                                   skip tokens), JPEG and PNG
    DIR/annotations/llava.json     captions, colour VQA, counting, grounding (+ a few text-only)
    DIR/annotations/text.jsonl     text-only dialogs (arithmetic, small facts), ShareGPT/UltraChat
    DIR/annotations/instances.json COCO detection of the shapes
    DIR/annotations/refs.json      RefCOCO-style refs on the same images (ann_id join or inline box)
    DIR/annotations/keypoints.json COCO keypoints of stick figures
    DIR/annotations/ocr.json       text spotting (words with boxes)
    DIR/annotations/som.json       Set-of-Mark (numbered marks drawn on shapes)
    DIR/mix.yaml                   the mix over all of them, with weights
    DIR/tokenizer/                 the project tokenizer (BPE, vocabulary 512) trained on the text

Every answer is true for its image: the generator knows every shape's colour and exact box.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_sphinx.data.sources import box_text

logger = logging.getLogger(__name__)

SEED = 20240501
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (245, 245, 245), "black": (20, 20, 20),
               "light blue": (185, 215, 240), "beige": (235, 225, 200)}
SHAPES = ("circle", "square", "triangle")
#: (width, height): square, 4:3, 3:4, 2:1, 3:1, 1:2, 1:3.
SIZES = ((448, 448), (640, 480), (480, 640), (800, 400), (900, 300), (320, 640), (300, 900))
WORDS = ("STOP", "OPEN", "EXIT", "CAFE", "SALE", "PARK", "BUS", "HOTEL", "TAXI", "BOOKS", "MAP",
         "NORTH", "ZOO", "BANK", "GATE")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
FACTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("What is the boiling point of water at sea level in Celsius?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
)
KEYPOINTS = ("head", "neck", "left hand", "right hand", "hip", "left foot", "right foot")
COUNTS = {"llava": 100, "llava_text": 20, "detection": 50, "text": 120, "ocr": 30,
          "keypoints": 20, "som": 30}


@dataclass
class Shape:
    """One drawn shape and its exact pixel box ``(x1, y1, x2, y2)``."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        """``red circle``."""
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    """An image's content, known exactly."""

    width: int
    height: int
    background: str
    shapes: list[Shape]


def _plural(n: int, word: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {word}{'s' if n != 1 else ''}"


def make_scene(rng: random.Random, size: tuple[int, int] | None = None,
               max_shapes: int = 4) -> Scene:
    """A random scene of 1..``max_shapes`` non-overlapping shapes."""
    w, h = size or rng.choice(SIZES)
    bg = rng.choice(list(BACKGROUNDS))
    shapes: list[Shape] = []
    for _ in range(rng.randint(1, max_shapes)):
        for _try in range(50):
            s = int(min(w, h) * rng.uniform(0.25, 0.45))
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
            box = (x, y, x + s, y + s)
            if all(box[2] + 4 < o.box[0] or o.box[2] + 4 < box[0] or box[3] + 4 < o.box[1]
                   or o.box[3] + 4 < box[1] for o in shapes):
                shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), box))
                break
    return Scene(w, h, bg, shapes)


def draw_scene(scene: Scene):
    """The scene as a Pillow RGB image."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.box
        c = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse((x1, y1, x2 - 1, y2 - 1), fill=c)
        elif s.kind == "square":
            d.rectangle((x1, y1, x2 - 1, y2 - 1), fill=c)
        else:
            d.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=c)
    return im


def _save(im, path: Path, png: bool) -> str:
    path = path.with_suffix(".png" if png else ".jpg")
    if png:
        im.save(path, format="PNG", optimize=False)
    else:
        im.save(path, format="JPEG", quality=88)
    return path.name


def caption(scene: Scene) -> str:
    """A true one-sentence description."""
    names = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.name}" for s in scene.shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The image shows {listed} on a {scene.background} background."


def llava_record(scene: Scene, image: str, rng: random.Random, k: int) -> dict:
    """Caption, colour VQA, counting and grounding turns about one scene."""
    h, w = scene.height, scene.width
    turns = [("<image>\n" + rng.choice(("Describe the image briefly.", "What is in this picture?",
                                          "Give a short caption for the image.")),
              caption(scene))]
    kinds = [s.kind for s in scene.shapes]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]
    if unique:
        s = rng.choice(unique)
        turns.append((f"What colour is the {s.kind}?", f"The {s.kind} is {s.colour}."))
        turns.append((f"Where is the {s.kind}? Answer with a bounding box.",
                      box_text(s.box, h, w)))
    kind = rng.choice(SHAPES)
    n = kinds.count(kind)
    turns.append((f"How many {kind}s are there?",
                  f"There {'is' if n == 1 else 'are'} {_plural(n, kind)}."))
    turns.append(("How many shapes are there in total?",
                  f"There {'is' if len(kinds) == 1 else 'are'} {_plural(len(kinds), 'shape')}."))
    conv = []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": f"llava-{k}", "image": f"images/{image}", "conversations": conv}


def arithmetic_record(rng: random.Random, k: int) -> dict:
    """A multi-turn arithmetic dialog (ShareGPT format), answers computed."""
    conv = []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        conv += [{"from": "human", "value": f"What is {a} {op} {b}?"},
                 {"from": "gpt", "value": f"{a} {op} {b} = {val}."}]
    return {"id": f"math-{k}", "conversations": conv}


def _text_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for k in range(n):
        r = k % 4
        if r in (0, 1):
            out.append(arithmetic_record(rng, k))
        elif r == 2:
            q, a = FACTS[rng.randrange(len(FACTS))]
            out.append({"id": f"fact-{k}", "data": [q, a]})  # UltraChat style
        else:
            q1, a1 = FACTS[rng.randrange(len(FACTS))]
            q2, a2 = FACTS[rng.randrange(len(FACTS))]
            out.append({"id": f"facts-{k}", "messages": [
                {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]})
    return out


def _position_words(s: Shape, scene: Scene) -> str:
    cx = (s.box[0] + s.box[2]) / 2 / scene.width
    cy = (s.box[1] + s.box[3]) / 2 / scene.height
    v = "top" if cy < 0.5 else "bottom"
    hz = "left" if cx < 0.5 else "right"
    return f"the {s.kind} in the {v} {hz} part"


def _detection(rng: random.Random, img_dir: Path, n: int, start: int):
    images, anns, refs = [], [], []
    ann_id = 1
    for k in range(n):
        scene = make_scene(rng)
        name = _save(draw_scene(scene), img_dir / f"det_{k:04d}", png=k % 3 == 0)
        images.append({"id": start + k, "file_name": name, "height": scene.height,
                       "width": scene.width})
        names = [s.name for s in scene.shapes]
        for s in scene.shapes:
            x1, y1, x2, y2 = s.box
            anns.append({"id": ann_id, "image_id": start + k,
                         "category_id": SHAPES.index(s.kind) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
            sents = [{"sent": _position_words(s, scene)}]
            if names.count(s.name) == 1:
                sents.insert(0, {"sent": f"the {s.name}"})
            ref = {"ref_id": len(refs), "ann_id": ann_id, "image_id": start + k, "split": "train",
                   "file_name": name, "category_id": SHAPES.index(s.kind) + 1, "sentences": sents}
            if len(refs) % 2:  # half the refs carry the box inline, half join by ann_id
                ref["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            refs.append(ref)
            ann_id += 1
    cats = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(SHAPES)]
    return {"images": images, "annotations": anns, "categories": cats}, refs


def _keypoints(rng: random.Random, img_dir: Path, n: int):
    from PIL import Image, ImageDraw

    images, anns = [], []
    for k in range(n):
        w, h = rng.choice(SIZES)
        im = Image.new("RGB", (w, h), BACKGROUNDS[rng.choice(list(BACKGROUNDS)[:2] + ["beige"])])
        d = ImageDraw.Draw(im)
        people = rng.randint(1, 2)
        for p in range(people):
            sh = int(h * rng.uniform(0.5, 0.8))
            cx = int(w * (p + 0.5) / people + rng.randint(-w // 20, w // 20))
            top = rng.randint(0, h - sh)
            u = sh / 8
            pts = {"head": (cx, top + u), "neck": (cx, top + 2 * u),
                   "left hand": (cx + 1.6 * u, top + 4 * u),
                   "right hand": (cx - 1.6 * u, top + 4 * u),
                   "hip": (cx, top + 5 * u), "left foot": (cx + 1.2 * u, top + 7.8 * u),
                   "right foot": (cx - 1.2 * u, top + 7.8 * u)}
            pts = {key: (min(max(x, 0), w - 1), min(max(y, 0), h - 1))
                   for key, (x, y) in pts.items()}
            col = COLOURS[rng.choice(list(COLOURS))]
            lw = max(2, int(u / 4))
            for a, b in (("neck", "hip"), ("neck", "left hand"), ("neck", "right hand"),
                         ("hip", "left foot"), ("hip", "right foot")):
                d.line([pts[a], pts[b]], fill=col, width=lw)
            hx, hy = pts["head"]
            d.ellipse((hx - u * 0.8, hy - u * 0.8, hx + u * 0.8, hy + u * 0.8), fill=col)
            xs = [x for x, _ in pts.values()]
            ys = [y for _, y in pts.values()]
            x1, y1 = min(xs) - u, max(0, min(ys) - u)
            kp = []
            for key in KEYPOINTS:
                kp += [round(pts[key][0], 1), round(pts[key][1], 1), 2]
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": 1, "iscrowd": 0,
                         "num_keypoints": len(KEYPOINTS), "keypoints": kp,
                         "bbox": [round(x1, 1), round(y1, 1), round(max(xs) + u - x1, 1),
                                  round(min(h, max(ys) + u) - y1, 1)]})
        name = _save(im, img_dir / f"pose_{k:04d}", png=k % 2 == 1)
        images.append({"id": k, "file_name": name, "height": h, "width": w})
    cats = [{"id": 1, "name": "person", "keypoints": list(KEYPOINTS)}]
    return {"images": images, "annotations": anns, "categories": cats}


def _ocr(rng: random.Random, img_dir: Path, n: int) -> list[dict]:
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for k in range(n):
        w, h = rng.choice(SIZES)
        bg = rng.choice(["white", "beige", "light blue"])
        im = Image.new("RGB", (w, h), BACKGROUNDS[bg])
        d = ImageDraw.Draw(im)
        words, boxes = [], []
        for _ in range(rng.randint(1, 4)):
            word = rng.choice(WORDS)
            font = ImageFont.load_default(size=int(min(w, h) * rng.uniform(0.08, 0.16)))
            for _try in range(40):
                x, y = rng.randint(0, w - 10), rng.randint(0, h - 10)
                bb = d.textbbox((x, y), word, font=font)
                if bb[2] < w and bb[3] < h and all(
                        bb[2] + 3 < o[0] or o[2] + 3 < bb[0] or bb[3] + 3 < o[1] or o[3] + 3 < bb[1]
                        for o in boxes):
                    d.text((x, y), word, fill=(20, 20, 20), font=font)
                    boxes.append(bb)
                    words.append({"text": word, "bbox": list(bb)})
                    break
        name = _save(im, img_dir / f"ocr_{k:04d}", png=k % 2 == 0)
        rec = {"id": f"ocr-{k}", "image": f"images/{name}", "words": words}
        if k % 2:  # half give the size, half leave it to be read from the file
            rec.update(height=h, width=w)
        out.append(rec)
    return out


def _som(rng: random.Random, img_dir: Path, n: int) -> list[dict]:
    from PIL import ImageDraw, ImageFont

    out = []
    for k in range(n):
        scene = make_scene(rng)
        im = draw_scene(scene)
        d = ImageDraw.Draw(im)
        r = max(8, min(scene.width, scene.height) // 30)
        font = ImageFont.load_default(size=int(r * 1.4))
        marks = []
        for i, s in enumerate(scene.shapes, 1):
            cx, cy = (s.box[0] + s.box[2]) // 2, (s.box[1] + s.box[3]) // 2
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 255, 255), outline=(0, 0, 0))
            d.text((cx, cy), str(i), fill=(0, 0, 0), font=font, anchor="mm")
            mark = {"id": i, "label": s.name}
            mark.update({"point": [cx, cy]} if i % 2 else {"bbox": list(s.box)})
            marks.append(mark)
        name = _save(im, img_dir / f"som_{k:04d}", png=k % 2 == 1)
        rec = {"id": f"som-{k}", "image": f"images/{name}", "height": scene.height,
               "width": scene.width, "marks": marks}
        if k % 3 == 0:  # some records carry their own question about one mark
            m = rng.choice(marks)
            rec["conversations"] = [
                {"from": "human", "value": f"<image>\nWhat is at mark {m['id']}?"},
                {"from": "gpt", "value": f"Mark {m['id']} is on the {m['label']}."}]
        out.append(rec)
    return out


MIX_YAML = """\
# The embedded sample mix (made by python -m megatron_sphinx.data.sample_data).
sources:
  - {name: llava_shapes, format: llava, path: annotations/llava.json, weight: 2.0}
  - {name: text_dialogs, format: sharegpt, path: annotations/text.jsonl, weight: 1.0}
  - {name: shape_detection, format: coco_detection, path: annotations/instances.json,
     image_root: images, weight: 1.0}
  - {name: shape_refs, format: refcoco, path: annotations/refs.json,
     instances: annotations/instances.json, image_root: images, split: train, weight: 1.0}
  - {name: stick_pose, format: coco_keypoints, path: annotations/keypoints.json,
     image_root: images, weight: 0.5}
  - {name: word_spotting, format: ocr_spotting, path: annotations/ocr.json, weight: 0.5}
  - {name: shape_marks, format: som, path: annotations/som.json, weight: 0.5}
"""


def write_sources(out: str | Path, seed: int = SEED, counts: dict | None = None) -> Path:
    """Writes images, annotations and ``mix.yaml`` (no tokenizer) to ``out``; returns the mix."""
    counts = {**COUNTS, **(counts or {})}
    out = Path(out)
    img_dir, ann_dir = out / "images", out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    llava = []
    for k in range(counts["llava"]):
        scene = make_scene(rng)
        name = _save(draw_scene(scene), img_dir / f"llava_{k:04d}", png=k % 4 == 3)
        llava.append(llava_record(scene, name, rng, k))
    for k in range(counts["llava_text"]):
        llava.append(arithmetic_record(rng, 1000 + k))
    rng.shuffle(llava)
    dump = lambda name, obj: (ann_dir / name).write_text(json.dumps(obj, indent=0))  # noqa: E731
    dump("llava.json", llava)
    (ann_dir / "text.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _text_records(rng, counts["text"])))
    inst, refs = _detection(rng, img_dir, counts["detection"], start=1)
    dump("instances.json", inst)
    dump("refs.json", refs)
    dump("keypoints.json", _keypoints(rng, img_dir, counts["keypoints"]))
    dump("ocr.json", _ocr(rng, img_dir, counts["ocr"]))
    dump("som.json", _som(rng, img_dir, counts["som"]))
    (out / "mix.yaml").write_text(MIX_YAML)
    return out / "mix.yaml"


def corpus_from_mix(mix_path: str | Path) -> list[str]:
    """Text of every usable dialog of a mix, rendered with the ``sphinx`` template, plus the
    ``llm`` template's role markers (tokenizer training text)."""
    from megatron_sphinx.data.conversation import DialogError, SphinxTemplate, check_dialog
    from megatron_sphinx.data.mixfile import load_mix
    from megatron_sphinx.data.sources import Dropped, convert_source

    tmpl = SphinxTemplate()
    texts = []
    for spec in load_mix(mix_path).sources:
        for _, d in convert_source(spec):
            if isinstance(d, Dropped):
                continue
            try:
                d, _ = check_dialog(d)
            except DialogError:
                continue
            texts.append(tmpl.render(d.turns)[0])
            texts.append("".join(f"[{'user' if r == 'human' else 'assistant'}] {t}\n"
                                 for r, t in d.turns))
    return texts


def corpus_texts(seed: int = SEED) -> list[str]:
    """The tokenizer training text of the sample mix (generated in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="sphinx-sample-") as tmp:
        return corpus_from_mix(write_sources(tmp, seed))


def generate(out: str | Path, seed: int = SEED, with_tokenizer: bool = True,
             counts: dict | None = None) -> Path:
    """Writes the whole sample mix (and its tokenizer) to ``out``; returns the ``mix.yaml`` path.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
    """
    from megatron_sphinx.data.tokenizer import build_project_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose an empty or new --out")
    mix = write_sources(out, seed, counts)
    if with_tokenizer:
        build_project_tokenizer(out / "tokenizer", corpus_from_mix(mix))
    return mix


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m megatron_sphinx.data.sample_data --out DIR``."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(prog="python -m megatron_sphinx.data.sample_data",
                       description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory to create (must be empty or new)")
    p.add_argument("--seed", type=int, default=SEED, help="generator seed")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out that already "
                   "holds sample data (has a mix.yaml)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if args.force and out.exists() and any(out.iterdir()):
        if not (out / "mix.yaml").is_file():
            print(f"error: {out} does not look like sample data (no mix.yaml): choose another "
                  "--out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    try:
        mix = generate(out, args.seed)
    except FileExistsError as e:
        print(f"error: {e} (or pass --force)", file=sys.stderr)
        return 2
    logger.info("sample mix written: %s", mix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
