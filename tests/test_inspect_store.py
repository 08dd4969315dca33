"""tools/inspect_store.py: the summary against the store read sample by sample, rendered samples
against their tokens and mask, --json, --save-images, and the one-line errors of bad input."""
from __future__ import annotations

import importlib.util
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from PIL import Image

from megatron_sphinx.data import store as store_mod
from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.layout import Sample
from megatron_sphinx.data.sample_data import generate
from megatron_sphinx.data.store import StoreMeta, StoreReader, create_store, write_index
from megatron_sphinx.data.tokenizer import build_project_tokenizer, load_tokenizer, tokenizer_hash
from tests.files import snapshot
from tests.stores import write_source_store

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "inspect_store.py"
SOURCES = ["chat", "photos", "wide", "unused"]  # "unused" gets no sample
WORDS = ("red green blue yellow circle square triangle the a is on of what how many shapes "
         "picture there are left right top bottom colour background").split()
#: (width, height, format) of the images; the last three leave sub-images in the padding.
PHOTOS = [(640, 480, "JPEG"), (300, 300, "PNG"), (480, 640, "JPEG")]
WIDE = [(600, 60, "PNG"), (60, 600, "JPEG"), (900, 300, "JPEG")]


def _load_tool():
    spec = importlib.util.spec_from_file_location("inspect_store", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _image(w: int, h: int, fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (seed * 40 % 256, 90, 200)).save(buf, format=fmt)
    return buf.getvalue()


def _dialog(tok, rng, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS, then per turn an untrained question and a trained answer, then a trained EOS."""
    ids, mask = [tok.bos_token_id], [False]
    for _ in range(turns):
        q = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
        a = " ".join(rng.choice(WORDS, int(rng.integers(2, 12))))
        for text, trained in ((f"### Human: {q}?\n### Assistant:", False), (f" {a}.\n", True)):
            e = tok.encode(text, add_special_tokens=False)
            ids += e
            mask += [trained] * len(e)
    ids.append(tok.eos_token_id)
    mask.append(True)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> Path:
    """A 2-shard store of 3 sources with samples (text-only, photos, wide/tall images with
    skipped sub-images, one image at the end and one inside a trained span), small chunks, and
    its tokenizer inside."""
    tmp = tmp_path_factory.mktemp("handmade")
    corpus = [" ".join(WORDS)] * 20 + ["### Human: what?\n### Assistant: it is."] * 20
    tok_dir = build_project_tokenizer(tmp / "tok", texts=corpus)
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(7)
    items = []
    for k in range(9):
        ids, mask = _dialog(tok, rng, 1 + k % 3)
        items.append((Sample(ids, mask, None, 1, 0), None))
    for k, spec in enumerate(PHOTOS + PHOTOS + [None]):  # the last one without its image
        ids, mask = _dialog(tok, rng, 1 + k % 2)
        if spec is None:
            items.append((Sample(ids, mask, None, 1, 1), None))
        else:
            w, h, fmt = spec
            items.append((Sample(ids, mask, (h, w), 1, 1), _image(w, h, fmt, k)))
    for k, (w, h, fmt) in enumerate(WIDE + WIDE[:2]):
        ids, mask = _dialog(tok, rng, 2)
        slot = {3: len(ids), 4: int(np.flatnonzero(mask)[1])}.get(k, 1)  # end; inside a span
        items.append((Sample(ids, mask, (h, w), slot, 2), _image(w, h, fmt, k)))
    path = tmp / "store.zarr"
    meta = StoreMeta(448, 2, 4096, SOURCES, tokenizer_path=str(tok_dir),
                     tokenizer_hash=tokenizer_hash(tok_dir), template="sphinx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_mod, "TEXT_CHUNK", 64)  # samples straddle chunk files
        mp.setattr(store_mod, "IMAGE_CHUNK", 4096)
        create_store(path, meta)
        for r in range(2):
            w = store_mod.ShardWriter(path, r, 448, 2)
            for i, (smp, img) in enumerate(items):
                if i % 2 == r:
                    w.add(smp, img, (smp.source_id, i))
            w.close()
        write_index(path, meta)
    shutil.copytree(tok_dir, path / "tokenizer")
    shutil.rmtree(tok_dir)  # only the copy inside the store is left
    assert len(StoreReader(path)) == len(items) == 21
    return path


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    """The embedded sample mix through tools/preprocess_data.py (one rank, tokenizer outside)."""
    tmp = tmp_path_factory.mktemp("pre")
    generate(tmp / "data")
    spec = importlib.util.spec_from_file_location("preprocess_data",
                                                  ROOT / "tools" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp / "store.zarr"
    assert mod.main(["--mix", str(tmp / "data" / "mix.yaml"), "--tokenizer",
                     str(tmp / "data" / "tokenizer"), "--out", str(out), "--seq-length", "2048",
                     "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory) -> Path:
    """A one-shard store of image and text samples with no tokenizer at all."""
    path = tmp_path_factory.mktemp("notok") / "store.zarr"
    rng = np.random.default_rng(3)
    samples, images = [], []
    for k in range(6):
        n = int(rng.integers(5, 40))
        mask = rng.random(n) < 0.4
        mask[-1] = True
        hw = (60, 600) if k % 2 else None
        samples.append(Sample(rng.integers(3, 512, n).astype(np.int32), mask, hw, 1, k % 2))
        images.append(_image(600, 60, "PNG", k) if hw else None)
    write_source_store(path, SimpleNamespace(samples=samples, images=images), ["x", "y"])
    return path


def _expected(path: Path) -> tuple[dict, dict]:
    """Per-source and total statistics, from the reader one sample at a time."""
    r = StoreReader(path)
    names = r.source_names
    zero = dict(samples=0, images=0, tokens=0, tokens_max=0, text_tokens=0, trained_tokens=0,
                views_encoded=0, subimages_skipped=0)
    per = {n: dict(zero) for n in names}
    for i in range(len(r)):
        smp, img = r.get(i)
        row = per[names[smp.source_id]]
        length = smp.length(448, 2)
        assert length == r.lengths[i]
        row["samples"] += 1
        row["tokens"] += length
        row["tokens_max"] = max(row["tokens_max"], length)
        row["text_tokens"] += len(smp.input_ids)
        row["trained_tokens"] += int(smp.target_mask.sum())
        if smp.image_hw is not None:
            assert img is not None
            geo = image_geometry(*smp.image_hw, 448, 2)
            row["images"] += 1
            row["views_encoded"] += int(geo.view_valid().sum())
            row["subimages_skipped"] += geo.num_skipped()
    total = {k: sum(p[k] for p in per.values()) for k in zero}
    total["tokens_max"] = max(p["tokens_max"] for p in per.values())
    return per, total


def _check_row(got: dict, want: dict) -> None:
    for k, v in want.items():
        if k == "tokens_max" and want["samples"] == 0:
            assert got[k] is None
        else:
            assert got[k] == v, k
    n, t = want["samples"], want["text_tokens"]
    assert got["tokens_mean"] == (pytest.approx(want["tokens"] / n) if n else None)
    assert got["trained_fraction"] == (pytest.approx(want["trained_tokens"] / t) if t else None)


# ----------------------------------------------------------------------------- summary

@pytest.mark.parametrize("chunk", [5, 64, tool.MASK_CHUNK])
def test_json_summary_equals_the_store_read_sample_by_sample(handmade, capsys, monkeypatch,
                                                             chunk):
    monkeypatch.setattr(tool, "MASK_CHUNK", chunk)  # chunk edges inside samples and shards
    rc, out, err = run(capsys, handmade, "--json")
    assert rc == 0 and err == ""
    s = json.loads(out)
    per, total = _expected(handmade)
    assert [r["source"] for r in s["sources"]] == SOURCES
    for row in s["sources"]:
        _check_row(row, per[row["source"]])
    _check_row(s["total"], total)
    assert per["unused"]["samples"] == 0 and total["subimages_skipped"] > 0
    assert per["photos"]["images"] < per["photos"]["samples"]  # one text-only photo sample
    assert (s["num_samples"], s["num_shards"], s["seq_length"], s["image_size"], s["grid"]) == (
        21, 2, 4096, 448, 2)
    assert s["tokenizer"]["status"] == "in store" and s["tokenizer"]["matches"] is True
    assert s["length_mismatches"] == 0 and "samples" not in s


def test_table_summary(handmade, capsys):
    rc, out, err = run(capsys, handmade)
    assert rc == 0 and err == ""
    per, total = _expected(handmade)
    assert "21 samples in 2 shard(s)" in out
    assert "seq length 4096, image size 448 (grid 2x2 of 224 px views), template sphinx" in out
    assert f"tokenizer in store: {handmade / 'tokenizer'}" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.split() and line.split()[0] in SOURCES + ["TOTAL"]}
    for name, want in list(per.items()) + [("TOTAL", total)]:
        cells = rows[name]  # samples images tokens mean max text trained views skipped
        assert len(cells) == 9
        ints = [int(c.replace(",", "")) for c in cells[:3] + cells[5:6] + cells[7:]]
        assert ints == [want["samples"], want["images"], want["tokens"], want["text_tokens"],
                        want["views_encoded"], want["subimages_skipped"]]
        assert cells[4] == (f"{want['tokens_max']:,}" if want["samples"] else "-")
        if want["text_tokens"]:
            assert cells[6] == f"{100 * want['trained_tokens'] / want['text_tokens']:.1f}%"
            assert cells[3] == f"{want['tokens'] / want['samples']:,.1f}"
        else:
            assert cells[3] == cells[4] == cells[6] == "-"


def test_summary_matches_preprocessing_counts(preprocessed, capsys):
    """Independent numbers: what preprocessing counted while it wrote the store."""
    rc, out, _ = run(capsys, preprocessed, "--json")
    assert rc == 0
    s = json.loads(out)
    prep = StoreReader(preprocessed).meta.extra["summary"]["sources"]
    assert [r["source"] for r in s["sources"]] == list(prep)
    for row in s["sources"]:
        p = prep[row["source"]]
        assert (row["samples"], row["images"], row["tokens"], row["text_tokens"],
                row["trained_tokens"], row["subimages_skipped"]) == (
            p["written"], p["images"], p["total_length"], p["text_tokens"], p["target_tokens"],
            p["skipped_subimages"])
    assert s["total"]["subimages_skipped"] > 0 and s["preprocess_dropped"] == {}
    assert s["tokenizer"]["status"] == "at recorded path" and s["tokenizer"]["matches"]
    per, total = _expected(preprocessed)
    _check_row(s["total"], total)


@pytest.mark.parametrize("chunk", [1, 2, 7, 10_000])
def test_trained_per_sample_over_chunks(chunk):
    rng = np.random.default_rng(chunk)
    sizes = rng.integers(0, 9, 60)  # empty samples too
    sizes[:2] = 0
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    mask = (rng.random(int(offsets[-1])) < 0.5).astype(np.uint8)
    got = tool.trained_per_sample(mask, offsets, chunk)
    assert got.tolist() == [int(mask[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert tool.trained_per_sample(mask[:0], np.zeros(1, np.int64), chunk).tolist() == []


def test_no_mask_leaves_target_mask_unread(handmade, tmp_path, capsys):
    broken = tmp_path / "s.zarr"
    shutil.copytree(handmade, broken)
    shutil.rmtree(broken / "shards" / "r00001" / "target_mask")
    rc, out, err = run(capsys, broken, "--json", "--no-mask")
    assert rc == 0, err
    s = json.loads(out)
    assert s["total"]["trained_tokens"] is None and s["total"]["trained_fraction"] is None
    assert s["total"]["text_tokens"] == _expected(handmade)[1]["text_tokens"]
    rc, out, err = run(capsys, broken)  # reading it fails with one line
    assert rc == 2 and out == "" and re.fullmatch(r"error: store .*target_mask.*\n", err)


def test_empty_store(tmp_path, capsys):
    path = tmp_path / "e.zarr"
    meta = StoreMeta(448, 2, 4096, ["a"])
    create_store(path, meta)
    write_index(path, meta)
    rc, out, err = run(capsys, path, "--json")
    assert rc == 0 and err == ""
    s = json.loads(out)
    assert s["total"]["samples"] == 0 and s["total"]["tokens_mean"] is None
    assert s["tokenizer"]["status"] == "none"
    rc, out, err = run(capsys, path, "--sample", 0)
    assert rc == 2 and out == "" and "no index at all" in err


# ----------------------------------------------------------------------------- samples

def _runs(mask: np.ndarray, cut: int | None) -> list[tuple[int, int, bool]]:
    out, pos = [], 0
    for trained, grp in itertools.groupby(mask.tolist()):
        n = len(list(grp))
        if cut is not None and pos < cut < pos + n:
            out += [(pos, cut, trained), (cut, pos + n, trained)]
        else:
            out.append((pos, pos + n, trained))
        pos += n
    return out


def _blocks(out: str) -> dict[int, tuple[str, str]]:
    """``{index: (header line, body)}`` of the rendered samples in the text output."""
    parts = re.split(r"^=== sample (\d+): ", out, flags=re.M)
    blocks = {}
    for k in range(1, len(parts), 2):
        end = "\n\n" if k + 2 < len(parts) else "\n"  # print's newline (+ the blank line)
        assert parts[k + 1].endswith(end)
        blocks[int(parts[k])] = tuple(parts[k + 1][:-len(end)].split("\n", 1))
    return blocks


def _image_line(body: str) -> str:
    lines = [ln for ln in body.split("\n") if ln.startswith("[IMAGE ")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("marks", [("[[", "]]"), ("<<T:", ":T>>")])
def test_rendered_text_and_trained_spans(handmade, capsys, marks):
    r = StoreReader(handmade)
    tok = load_tokenizer(handmade / "tokenizer")
    picks = [0, 4, 15, 9, 10, 16, 18, 19, 20]  # text; photo without image; photos; wide; end;
    # inside a trained span
    argv = [handmade, "--sample", *picks]
    if marks != ("[[", "]]"):
        argv += ["--marks", *marks]
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == "" and "note:" not in out
    blocks = _blocks(out)
    assert sorted(blocks) == sorted(picks)
    o, c = map(re.escape, marks)
    slots = set()
    for i in picks:
        smp, img = r.get(i)
        head, body = blocks[i]
        ids, mask = smp.input_ids, smp.target_mask
        assert head.startswith(f"source {SOURCES[smp.source_id]}, sequence length "
                               f"{r.lengths[i]} ({len(ids)} text tokens")
        assert f"{int(mask.sum())} trained" in head
        text = body
        cut = None
        if smp.image_hw is not None:
            h, w = smp.image_hw
            geo = image_geometry(h, w, 448, 2)
            line = _image_line(body)
            n_valid = int(geo.view_valid().sum())
            fmt = "png" if img.startswith(b"\x89PNG") else "jpg"
            assert line.startswith(f"[IMAGE {w}x{h} (w x h) {fmt} {len(img):,} bytes -> "
                                   f"{geo.resized_width}x{geo.resized_height} ")
            assert (f"{n_valid} of 5 views encoded (global + {n_valid - 1} sub-images), "
                    f"{geo.num_skipped()} skipped") in line
            assert f"; {geo.num_positions()} positions]" in line
            before, after = text.split("\n" + line + "\n")
            plain = re.sub(f"{o}|{c}", "", before)
            assert plain == tok.decode(ids[:smp.image_slot].tolist(), skip_special_tokens=False)
            text, cut = before + after, smp.image_slot
            slots.add(smp.image_slot)
        else:
            assert "[IMAGE" not in body
        assert re.sub(f"{o}|{c}", "", text) == tok.decode(ids.tolist(), skip_special_tokens=False)
        marked = re.findall(f"{o}(.*?){c}", text, flags=re.S)
        want = [tok.decode(ids[a:b].tolist(), skip_special_tokens=False)
                for a, b, t in _runs(mask, cut) if t]
        assert marked == want and want
    assert len(slots) == 3  # after BOS, at the end, inside a trained span


def test_json_samples_and_ids_mode(handmade, capsys):
    r = StoreReader(handmade)
    rc, out, _ = run(capsys, handmade, "--json", "--ids", "--sample", 17, 3)
    assert rc == 0
    s = json.loads(out)
    assert [x["index"] for x in s["samples"]] == [17, 3] and s["note"] is None
    for x in s["samples"]:
        smp = r.get_sample(x["index"])
        assert x["input_ids"] == smp.input_ids.tolist() and not x["decoded"]
        segs = [g for g in x["segments"] if "image" not in g]
        assert [(g["start"], g["stop"], g["trained"]) for g in segs] == _runs(
            smp.target_mask, smp.image_slot if smp.image_hw else None)
        for g in segs:
            assert g["text"] == " ".join(map(str, smp.input_ids[g["start"]:g["stop"]].tolist()))
        assert (x["image"] is None) == (smp.image_hw is None)
        assert x["length"] == r.lengths[x["index"]] and x["source"] == SOURCES[smp.source_id]
    assert s["samples"][0]["image"]["subimages_skipped"] == 2  # the tall 60x600 image


def test_without_tokenizer_ids_are_shown_and_said_once(no_tokenizer, capsys):
    r = StoreReader(no_tokenizer)
    picks = [0, 1, 2, 3]
    rc, out, err = run(capsys, no_tokenizer, "--sample", *picks)
    assert rc == 0 and err == ""
    assert "  tokenizer none\n" in out and out.count("note:") == 1
    assert "note: the store has no tokenizer (none inside it): token ids are shown" in out
    blocks = _blocks(out)
    for i in picks:
        smp = r.get_sample(i)
        body = blocks[i][1]
        if smp.image_hw is not None:
            body = body.replace("\n" + _image_line(body) + "\n", " ")
        assert [int(t) for t in re.sub(r"\[\[|\]\]", "", body).split()] == \
            smp.input_ids.tolist()
        marked = [[int(t) for t in m.split()] for m in re.findall(r"\[\[(.*?)\]\]", body)]
        cut = smp.image_slot if smp.image_hw else None
        assert marked == [smp.input_ids[a:b].tolist() for a, b, t in _runs(smp.target_mask, cut)
                          if t]


def test_changed_tokenizer_is_flagged(handmade, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(handmade, path)
    cfg = path / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + "\n")
    rc, out, _ = run(capsys, path, "--sample", 0)
    assert rc == 0
    assert "CHANGED since preprocessing" in out and "note: the tokenizer at" in out


# ----------------------------------------------------------------------------- images

def test_image_extension_from_magic_bytes():
    for fmt, ext in (("JPEG", ".jpg"), ("PNG", ".png"), ("GIF", ".gif"), ("WEBP", ".webp"),
                     ("BMP", ".bmp"), ("TIFF", ".tif")):
        assert tool.image_extension(_image(8, 8, fmt, 1)) == ext, fmt
    assert tool.image_extension(b"RIFF\x00\x00\x00\x00WAVEfmt ") == ".bin"
    assert tool.image_extension(b"") == tool.image_extension(b"\x00" * 40) == ".bin"


def test_save_images_writes_original_bytes_and_never_overwrites(handmade, tmp_path, capsys):
    r = StoreReader(handmade)
    folder = tmp_path / "imgs" / "new"
    rc, out, err = run(capsys, handmade, "--sample", 9, 0, 16, 9, "--save-images", folder)
    assert rc == 0 and err == ""
    assert sorted(p.name for p in folder.iterdir()) == ["sample_16.png", "sample_9.jpg"]
    assert (folder / "sample_9.jpg").read_bytes() == r.get_image(9)
    assert (folder / "sample_16.png").read_bytes() == r.get_image(16)
    assert f"image saved to {folder / 'sample_16.png'}" in out
    assert out.count("=== sample 9:") == 1  # a repeated index is rendered and saved once
    before = snapshot(tmp_path)
    rc, out, err = run(capsys, handmade, "--sample", 10, 16, "--save-images", folder)
    assert rc == 2 and out == ""
    assert re.fullmatch(r"error: --save-images .*sample_16\.png already exists.*\n", err)
    assert snapshot(tmp_path) == before  # sample 10's image was not written either


# ----------------------------------------------------------------------------- bad input

def _incomplete(tmp: Path) -> Path:
    create_store(tmp / "inc.zarr", StoreMeta(448, 2, 4096, ["a"]))
    return tmp / "inc.zarr"


def _foreign_zarr(tmp: Path) -> Path:
    zarr.open_group(str(tmp / "other.zarr"), mode="w").attrs["x"] = 1
    return tmp / "other.zarr"


def _damaged(tmp: Path, handmade: Path) -> Path:
    shutil.copytree(handmade, tmp / "dmg.zarr")
    shutil.rmtree(tmp / "dmg.zarr" / "index" / "local")
    return tmp / "dmg.zarr"


def _a_file(tmp: Path) -> Path:
    (tmp / "f.txt").write_text("x")
    return tmp / "f.txt"


@pytest.mark.parametrize("case,needle", [
    ("missing", r"store .*missing does not exist"),
    ("file", r"store .*f\.txt is a file"),
    ("plain dir", r"store .*plain is not a megatron_sphinx store"),
    ("foreign zarr", r"store .*other\.zarr is not a megatron_sphinx store"),
    ("incomplete", r"store .*inc\.zarr is incomplete"),
    ("damaged", r"store .*dmg\.zarr cannot be read .*preprocess it again"),
    ("index too big", r"--sample 21: store .* holds 21 samples \(indices 0 to 20\)"),
    ("negative index", r"--sample -1: store"),
    ("images dir is a file", r"--save-images .*f\.txt is a file"),
    ("images without sample", r"--save-images needs --sample"),
    ("empty marks", r"--marks '' '\]\]'"),
])
def test_bad_input_one_error_line_exit_2_nothing_written(handmade, tmp_path, capsys, case,
                                                          needle):
    (tmp_path / "plain").mkdir()
    argv = {
        "missing": lambda: [tmp_path / "missing"],
        "file": lambda: [_a_file(tmp_path)],
        "plain dir": lambda: [tmp_path / "plain"],
        "foreign zarr": lambda: [_foreign_zarr(tmp_path)],
        "incomplete": lambda: [_incomplete(tmp_path)],
        "damaged": lambda: [_damaged(tmp_path, handmade)],
        "index too big": lambda: [handmade, "--sample", 1, 21],
        "negative index": lambda: [handmade, "--sample", -1],
        "images dir is a file": lambda: [handmade, "--sample", 9, "--save-images",
                                         _a_file(tmp_path)],
        "images without sample": lambda: [handmade, "--save-images", tmp_path / "out"],
        "empty marks": lambda: [handmade, "--sample", 0, "--marks", "", "]]"],
    }[case]()
    before, store_before = snapshot(tmp_path), snapshot(handmade)
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(needle, err), err
    assert snapshot(tmp_path) == before and snapshot(handmade) == store_before


def test_argument_errors_are_one_line(handmade, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main([str(handmade), "--sample", "x"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: argument --sample: invalid int value: 'x'")


# ----------------------------------------------------------------------------- as a command

def test_command_line(preprocessed, tmp_path, capsys):
    """The script as a user runs it: help with defaults, JSON equal to the in-process call."""
    help_ = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "default: [[ ]]" in help_.stdout
    proc = subprocess.run([sys.executable, str(TOOL), str(preprocessed), "--json", "--sample",
                           "0", "130"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rc, out, _ = run(capsys, preprocessed, "--json", "--sample", 0, 130)
    assert rc == 0 and json.loads(proc.stdout) == json.loads(out)
    sample = json.loads(out)["samples"][0]
    assert sample["decoded"] and sample["text"].startswith("<s>\n[IMAGE ")
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert re.fullmatch(r"error: store \S+nope does not exist: .*\n", proc.stderr)
