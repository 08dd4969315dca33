"""Preprocessing: image probing, bad input, overlong samples, output safety and roll-back, the
settings checks, progress lines, and real MPI runs."""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_sphinx.data import build_store as build_store_module
from megatron_sphinx.data.build_store import BuildError, Comm, StoreSpec, build_store
from megatron_sphinx.data.geometry import full_image_positions, image_geometry
from megatron_sphinx.data.mixfile import load_mix
from megatron_sphinx.data.preprocess import (
    BadImage, PreprocessSettings, load_image, probe_image)
from megatron_sphinx.data.sample_data import generate
from megatron_sphinx.data.sources import convert_source
from megatron_sphinx.data.store import StoreReader, create_store, read_meta
from tests.files import TEST_IMAGES, snapshot, unreadable_mix

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = TEST_IMAGES
ADV = TESTDATA / "adversarial"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_testdata = pytest.mark.skipif(not ADV.is_dir(), reason=f"test images not found at {ADV}")


def _tool():
    spec = importlib.util.spec_from_file_location("preprocess_data",
                                                  ROOT / "tools" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tool(*args) -> int:
    return _tool().main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "data"
    generate(out)
    return out


# ----------------------------------------------------------------------------- images

@needs_testdata
@pytest.mark.parametrize("name,hw", [
    ("one_pixel_1x1.png", (1, 1)), ("wide_4000x60.jpg", (60, 4000)),
    ("tall_60x4000.jpg", (4000, 60)), ("cmyk.jpg", (400, 600)), ("gray16.png", (214, 320)),
    ("rgb16.png", (200, 300)), ("rgba_alpha.png", (256, 256)), ("grayscale.jpg", (300, 451)),
])
def test_probe_accepts_odd_but_valid_images(name, hw):
    info = probe_image((ADV / name).read_bytes())
    assert (info.height, info.width) == hw


@needs_testdata
def test_probe_exif_orientation_swaps_height_and_width():
    data = (ADV / "exif_orientation6.jpg").read_bytes()
    raw_w, raw_h = Image.open(io.BytesIO(data)).size
    info = probe_image(data)
    assert info.orientation == 6 and (info.height, info.width) == (raw_w, raw_h)


@needs_testdata
@pytest.mark.parametrize("name,reason", [
    ("truncated_40pct.jpg", "image_corrupt"), ("random_bytes.jpg", "image_not_an_image")])
def test_probe_rejects_broken_files(name, reason):
    with pytest.raises(BadImage) as e:
        probe_image((ADV / name).read_bytes())
    assert e.value.reason == reason


def test_truncated_png_and_missing_file(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    with pytest.raises(BadImage, match="image_corrupt"):
        probe_image(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage) as e:
        load_image(str(tmp_path / "nope.jpg"))
    assert e.value.reason == "image_missing"


def test_other_formats_are_reencoded_to_png():
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 255, 0)).save(buf, format="GIF")
    data, info, reencoded = load_image(buf.getvalue())
    assert reencoded and info.format == "PNG" and (info.height, info.width) == (20, 30)
    assert Image.open(io.BytesIO(data)).format == "PNG"


# ----------------------------------------------------------------------------- bad input end to end

def _bad_mix(tmp: Path) -> Path:
    imgs = tmp / "imgs"
    imgs.mkdir()
    for f in ADV.iterdir():
        shutil.copy(f, imgs / f.name)
    shutil.copy(TESTDATA / "chelsea.jpg", imgs / "chelsea.jpg")

    def rec(i, image, q="<image>\nWhat is this?", a="A picture.", **kw):
        r = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if image:
            r["image"] = image
        r.update(kw)
        return r

    llava = [
        rec(0, "chelsea.jpg"),
        rec(1, "truncated_40pct.jpg"),          # image_corrupt
        rec(2, "random_bytes.jpg"),             # image_not_an_image
        rec(3, "does_not_exist.jpg"),           # image_missing
        rec(4, "one_pixel_1x1.png"),
        rec(5, "wide_4000x60.jpg"),
        rec(6, "tall_60x4000.jpg"),
        rec(7, "cmyk.jpg"),
        rec(8, "gray16.png"),
        rec(9, "rgb16.png"),
        rec(10, "exif_orientation6.jpg"),       # note image_exif_oriented
        {"id": 11, "image": "chelsea.jpg", "conversations": []},  # empty_conversation
        {"id": 12, "conversations": [{"from": "gpt", "value": "Hi"},
                                     {"from": "human", "value": "Hello"}]},  # starts_with_assistant
        rec(13, None),                          # placeholder_without_image
        rec(14, "chelsea.jpg", q="What is this?"),  # note image_without_placeholder
        {"id": 15},                             # malformed_record
    ]
    (tmp / "llava.json").write_text(json.dumps(llava))
    long_answer = " ".join(f"word{i}" for i in range(1500))
    lines = [json.dumps({"id": "ok", "data": ["What is 2 + 2?", "2 + 2 = 4."]}),
             '{"id": "broken", "data": ["unterminated',                       # malformed_json
             json.dumps({"id": "long", "data": ["Tell me a long story.", long_answer]})]
    (tmp / "text.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "mix.yaml").write_text(
        "sources:\n"
        "  - {name: bad_images, format: llava, path: llava.json, image_root: imgs}\n"
        "  - {name: bad_text, format: sharegpt, path: text.jsonl, weight: 0.5}\n")
    return tmp / "mix.yaml"


@needs_testdata
def test_bad_input_is_counted_never_fatal(tmp_path, sample):
    mix = _bad_mix(tmp_path)
    tok = sample / "tokenizer"
    out, js = tmp_path / "s.zarr", tmp_path / "summary.json"
    assert run_tool("--mix", mix, "--tokenizer", tok, "--out", out, "--seq-length", 2048,
                    "--summary-json", js) == 0
    summ = json.loads(js.read_text())
    img, txt = summ["sources"]["bad_images"], summ["sources"]["bad_text"]
    assert img["read"] == 16 and img["written"] == 9
    assert img["dropped"] == {"empty_conversation": 1, "image_corrupt": 1, "image_missing": 1,
                              "image_not_an_image": 1, "malformed_record": 1,
                              "placeholder_without_image": 1, "starts_with_assistant": 1}
    assert img["notes"] == {"image_exif_oriented": 1, "image_without_placeholder": 1}
    assert txt["read"] == 3 and txt["written"] == 2 and txt["truncated"] == 1
    assert txt["dropped"] == {"malformed_json": 1}
    assert summ["total"]["written"] == 11

    r = StoreReader(out, image_size=448, grid=2, seq_length=2048)
    assert len(r) == 11 and r.source_names == ["bad_images", "bad_text"]
    hws = {tuple(hw) for hw in r.image_hw[r.has_image]}
    assert {(1, 1), (60, 4000), (4000, 60), (400, 600), (427, 640)} <= hws  # exif6: 640x427 raw
    wide = int(np.flatnonzero((r.image_hw == (60, 4000)).all(1))[0])
    s, data = r.get(wide)
    assert data == (ADV / "wide_4000x60.jpg").read_bytes()  # original bytes, not pixels
    geo = image_geometry(60, 4000, 448, 2)
    assert geo.num_skipped() == 2 and r.lengths[wide] == len(s.input_ids) + geo.num_positions()
    long = int(np.argmax(r.lengths))
    s = r.get_sample(long)
    assert r.lengths[long] == 2048 and s.image_hw is None and s.target_mask.any()
    expected_saved = sum(image_geometry(h, w, 448, 2).num_skipped() for h, w in r.image_hw[
        r.has_image]) * 258
    assert summ["total"]["visual_tokens_saved"] == expected_saved > 0


@needs_testdata
def test_overlong_drop_and_output_safety(tmp_path, sample):
    mix = _bad_mix(tmp_path)
    tok = sample / "tokenizer"
    out, js = tmp_path / "s.zarr", tmp_path / "summary.json"
    args = ["--mix", mix, "--tokenizer", tok, "--out", out, "--seq-length", 2048]
    assert run_tool(*args, "--overlong", "drop", "--summary-json", js) == 0
    txt = json.loads(js.read_text())["sources"]["bad_text"]
    assert txt["dropped"] == {"longer_than_seq_length": 1, "malformed_json": 1}
    assert txt["truncated"] == 0
    stamp = (out / "zarr.json").stat().st_mtime_ns
    # Same inputs and settings: nothing to do, nothing rewritten.
    assert run_tool(*args, "--overlong", "drop") == 0
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    # Other settings: refused without --overwrite, store untouched.
    assert run_tool(*args, "--overlong", "truncate") == 2
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    assert len(StoreReader(out)) == 10
    assert run_tool(*args, "--overlong", "truncate", "--overwrite") == 0
    assert len(StoreReader(out)) == 11
    # A non-empty directory that is not a store is never touched, even with --overwrite.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        assert run_tool("--mix", mix, "--tokenizer", tok, "--out", other, *extra) == 2
    assert os.listdir(other) == ["keep.txt"]
    # Bad arguments: one clear error, no store.
    assert run_tool("--mix", tmp_path / "nope.yaml", "--out", tmp_path / "x") == 2
    assert run_tool("--mix", mix, "--tokenizer", tmp_path / "nope", "--out", tmp_path / "x") == 2
    assert run_tool("--mix", mix, "--tokenizer", tok, "--out", tmp_path / "x", "--image-size",
                    448, "--grid", 3) == 2
    assert not (tmp_path / "x").exists()


def test_mpi_two_ranks_equal_one_rank(tmp_path, sample, capfd):
    """The sample mix with the project tokenizer (built into the store), then 2 MPI ranks."""
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    js = tmp_path / "one.json"
    assert run_tool("--mix", sample / "mix.yaml", "--out", one, "--seq-length", 4096,
                    "--summary-json", js) == 0
    summ = json.loads(js.read_text())
    assert summ["total"]["dropped"] == {} and summ["total"]["written"] == summ["total"]["read"]
    assert summ["total"]["skipped_subimages"] > 0
    a = StoreReader(one, image_size=448, grid=2)
    assert a.tokenizer_dir() == one / "tokenizer" and a.meta.extra["vocab_size"] <= 512
    if not MPIEXEC.is_file():
        pytest.skip(f"{MPIEXEC} not found (pip install mpich): the 2-rank half did not run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI", "PMIX"))}
    proc = subprocess.run(
        [str(MPIEXEC), "-n", "2", sys.executable, str(ROOT / "tools" / "preprocess_data.py"),
         "--mix", str(sample / "mix.yaml"), "--tokenizer", str(one / "tokenizer"),
         "--out", str(two), "--seq-length", "4096", "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stderr
    b = StoreReader(two, image_size=448, grid=2)
    assert b.meta.num_shards == 2 and len(a) == len(b) == summ["total"]["written"]
    assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.source_ids, b.source_ids)
    for i in range(len(a)):
        (sa, ia), (sb, ib) = a.get(i), b.get(i)
        assert np.array_equal(sa.input_ids, sb.input_ids), i
        assert np.array_equal(sa.target_mask, sb.target_mask), i
        assert (sa.image_hw, sa.source_id, ia) == (sb.image_hw, sb.source_id, ib), i


# ----------------------------------------------------------------------------- build_store safety


def _text_mix(folder: Path, records: int = 3, broken: int = 0, ext: str = "jsonl") -> Path:
    """A sharegpt source of ``records`` short dialogs (JSON lines, or a JSON list for ``ext``
    ``json``), and one of ``broken`` records that all get dropped (``malformed_record``) when
    ``broken`` > 0."""
    folder.mkdir(parents=True, exist_ok=True)
    recs = [{"id": k, "data": [f"What is {k} + {k}?", f"It is {2 * k}."]} for k in range(records)]
    text = (json.dumps(recs) if ext == "json"
            else "".join(json.dumps(r) + "\n" for r in recs))
    (folder / f"text.{ext}").write_text(text)
    mix = f"sources:\n  - {{name: text, format: sharegpt, path: text.{ext}}}\n"
    if broken:
        (folder / "bad.jsonl").write_text("".join(json.dumps({"id": k}) + "\n"
                                                  for k in range(broken)))
        mix += "  - {name: bad, format: sharegpt, path: bad.jsonl}\n"
    (folder / "mix.yaml").write_text(mix)
    return folder / "mix.yaml"



def _build(mix: Path, out: Path, tok: Path, **kw):
    kw.setdefault("progress", False)
    return build_store(StoreSpec(mix=mix, out=out, tokenizer=tok, seq_length=2048, **kw),
                       Comm.single())


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_failed_overwrite_keeps_the_previous_store(tmp_path, sample, monkeypatch):
    tok = sample / "tokenizer"
    out = tmp_path / "s.zarr"
    _build(_text_mix(tmp_path / "good"), out, tok)
    before = snapshot(out)
    with pytest.raises(BuildError, match=r"is not valid JSON.*previous store at --out was kept"):
        _build(unreadable_mix(tmp_path / "bad"), out, tok, overwrite=True)
    assert snapshot(out) == before and len(StoreReader(out)) == 3
    assert _hidden(tmp_path) == []  # the holder it was renamed into is gone

    for exc in (RuntimeError("a bug half-way"), KeyboardInterrupt()):
        def crash(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(build_store_module, "preprocess_rank", crash)
        if isinstance(exc, KeyboardInterrupt):  # propagates, after the roll-back
            with pytest.raises(KeyboardInterrupt):
                _build(_text_mix(tmp_path / "good2", records=5), out, tok, overwrite=True)
        else:  # a bug: a BuildError on every rank, chained to it
            with pytest.raises(BuildError, match=r"rank 0 failed while writing its shard "
                               r"\(RuntimeError: a bug half-way; .*previous store .* kept") as e:
                _build(_text_mix(tmp_path / "good2", records=5), out, tok, overwrite=True)
            assert e.value.__cause__ is exc
        assert snapshot(out) == before and len(StoreReader(out)) == 3
        assert _hidden(tmp_path) == []


def test_a_build_without_samples_fails_and_keeps_no_store(tmp_path, sample, caplog):
    tok = sample / "tokenizer"
    mix = _text_mix(tmp_path / "mix", records=0, broken=4)
    out = tmp_path / "s.zarr"
    caplog.set_level(logging.INFO)
    with pytest.raises(BuildError, match=r"no record of --mix .* became a sample .* fix the mix "
                                         r"or its files \(the store this run began was removed"):
        _build(mix, out, tok)
    assert not out.exists()
    assert "dropped 4 x malformed_record" in caplog.text  # the summary was logged first
    mine = tmp_path / "mine"  # an empty directory the user made stays, empty
    mine.mkdir()
    with pytest.raises(BuildError, match="no record"):
        _build(mix, mine, tok)
    assert mine.is_dir() and list(mine.iterdir()) == []
    _build(_text_mix(tmp_path / "good"), out, tok)
    before = snapshot(out)
    with pytest.raises(BuildError, match="no record .* previous store at --out was kept"):
        _build(mix, out, tok, overwrite=True)
    assert snapshot(out) == before and len(StoreReader(out)) == 3
    assert _hidden(tmp_path) == []


def test_a_successful_overwrite_leaves_nothing_aside(tmp_path, sample, caplog):
    tok = sample / "tokenizer"
    out, js = tmp_path / "s.zarr", tmp_path / "new" / "folder" / "summary.json"
    _build(_text_mix(tmp_path / "old"), out, tok)
    caplog.set_level(logging.INFO)
    summary = _build(_text_mix(tmp_path / "new", records=5, broken=2), out, tok,
                     overwrite=True, summary_json=js)
    assert summary["total"]["written"] == 5 and len(StoreReader(out)) == 5
    assert json.loads(js.read_text()) == summary  # its folder was created
    assert _hidden(tmp_path) == []
    assert "moved the store at" in caplog.text  # the old store was set aside, then deleted
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "source bad contributed no sample (see the summary)" in warned
    assert not any("source text contributed" in m for m in warned)


@pytest.mark.parametrize("kw,needle", [
    ({"image_size": 300}, "--image-size 300: give a multiple of 224"),
    ({"image_size": 0}, "--image-size 0: give a multiple of 224"),
    ({"image_size": -448}, "--image-size -448: give a multiple of 224"),
    ({"grid": 0}, "--grid 0 does not fit --image-size 448 (views of 224 pixels): pass --grid 2"),
    ({"image_size": 672, "grid": 2}, "--grid 2 does not fit --image-size 672"),
    ({"seq_length": 1295}, "--seq-length 1295 cannot hold one image (1295 positions at "
                           "--image-size 448) and its text: use a --seq-length above 1295"),
    ({"image_size": 672, "seq_length": 2048}, "use a --seq-length above 2590"),
    ({"overlong": "cut"}, "--overlong cut: choose truncate or drop"),
])
def test_settings_checks(kw, needle):
    with pytest.raises(ValueError) as e:
        PreprocessSettings(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_settings_accept_the_recipes_and_derive_the_grid(tmp_path):
    assert PreprocessSettings().grid == 2
    assert PreprocessSettings(seq_length=1296).seq_length == 1296  # one image + one token
    assert PreprocessSettings(image_size=672, seq_length=4096).grid == 3
    assert PreprocessSettings(image_size=672, grid=3, seq_length=2591).grid == 3
    assert full_image_positions(448, 2) == image_geometry(448, 448, 448, 2).num_positions() \
        == 5 * (257 + 2)
    # build_store checks them on every rank, before anything is written
    with pytest.raises(BuildError, match="--image-size 300"):
        build_store(StoreSpec(mix=tmp_path / "any.yaml", out=tmp_path / "s.zarr",
                              image_size=300), Comm.single())
    assert not (tmp_path / "s.zarr").exists()


def test_settings_module_imports_without_torch():
    """The tool checks the settings before its heavy imports: this module must stay light."""
    code = ("import sys; import megatron_sphinx.data.preprocess; "
            "print(sorted({'torch', 'transformers', 'zarr', 'tqdm'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_progress_lines_without_a_bar(tmp_path, sample, caplog, monkeypatch):
    from megatron_sphinx.data import preprocess

    tok = sample / "tokenizer"
    mix = _text_mix(tmp_path / "mix", records=25, broken=2, ext="json")
    caplog.set_level(logging.INFO, logger="megatron_sphinx.data.preprocess")

    def text_lines():
        return [r.getMessage() for r in caplog.records
                if r.name == "megatron_sphinx.data.preprocess" and "source text" in r.getMessage()]

    _build(mix, tmp_path / "q.zarr", tok, progress=None)  # done in well under 5 s: quiet
    assert [line.split(":")[2].split(",")[0] for line in text_lines()] == [
        " 25 records on this rank", " done"]
    caplog.clear()
    monkeypatch.setattr(preprocess, "PROGRESS_QUIET_SECONDS", 0.0)  # as if the source were slow
    _build(mix, tmp_path / "s.zarr", tok, progress=None)  # not a terminal here: no bar
    lines = text_lines()
    assert lines[0] == "rank 0: source text: 25 records on this rank"
    progress = [re.fullmatch(r"rank 0: source text: (\d+)/25 records \((\d+)%\), "
                             r"[0-9.]+ records/s", line) for line in lines[1:-1]]
    assert all(progress), lines  # about 10 lines: every ceil(25 / 10) = 3 records
    assert [(int(m[1]), int(m[2])) for m in progress] == [(n, 4 * n) for n in range(3, 25, 3)]
    assert lines[-1].startswith("rank 0: source text: done, 25 records read, 25 written, "
                                "0 dropped in ")
    assert "rank 0: source bad: done, 2 records read, 0 written, 2 dropped in " in caplog.text

    caplog.clear()  # with a bar, no progress lines
    _build(mix, tmp_path / "t.zarr", tok, progress=True)
    assert "records on this rank" not in caplog.text
    spec = load_mix(mix).sources[0]
    for rank, share in ((0, 13), (1, 12)):  # the count the start line gives, read once
        counts: list = []
        assert sum(1 for _ in convert_source(spec, rank, 2, on_load=counts.append)) == share
        assert counts == [share]

    caplog.clear()  # a streamed .jsonl source: its count is not known in advance
    _build(_text_mix(tmp_path / "lines", records=5), tmp_path / "u.zarr", tok, progress=None)
    lines = [r.getMessage() for r in caplog.records if "source text" in r.getMessage()]
    assert lines[0] == "rank 0: source text: streaming records on this rank"
    assert lines[-1].startswith("rank 0: source text: done, 5 records read, 5 written")


CRASH_ON_RANK_1 = """
import runpy, sys
from megatron_sphinx.data import build_store as bs
real = bs.preprocess_rank
def crash(mix, encoder, writer, settings, rank, *args, **kwargs):
    if rank == 1:
        raise RuntimeError("a bug on rank 1")
    return real(mix, encoder, writer, settings, rank, *args, **kwargs)
bs.preprocess_rank = crash
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_mpi_failed_overwrite_keeps_the_store(tmp_path, sample):
    """Under 2 MPI ranks, an unreadable source and a bug on rank 1 both roll back."""
    if not MPIEXEC.is_file():
        pytest.skip(f"{MPIEXEC} not found (pip install mpich): the MPI runs did not happen")
    tok = sample / "tokenizer"
    out = tmp_path / "s.zarr"
    _build(_text_mix(tmp_path / "good"), out, tok)
    before = snapshot(out)
    (tmp_path / "crash.py").write_text(CRASH_ON_RANK_1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI", "PMIX"))}
    env["PYTHONPATH"] = str(ROOT)
    for script, mix, needle in [
            ([], unreadable_mix(tmp_path / "bad"), "is not valid JSON"),
            ([str(tmp_path / "crash.py")], _text_mix(tmp_path / "more", records=6),
             "rank 1 failed while writing its shard (RuntimeError: a bug on rank 1;")]:
        proc = subprocess.run(
            [str(MPIEXEC), "-n", "2", sys.executable, *script,
             str(ROOT / "tools" / "preprocess_data.py"), "--mix", str(mix), "--tokenizer",
             str(tok), "--out", str(out), "--seq-length", "2048", "--overwrite"],
            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
        assert needle in errors[0] and errors[0].endswith(
            "(the previous store at --out was kept)"), errors[0]
        assert snapshot(out) == before and len(StoreReader(out)) == 3
        assert _hidden(tmp_path) == []


def test_a_second_build_follows_the_inputs(tmp_path, sample):
    """Same inputs: nothing to do; --overwrite: rebuilt; another --seq-length or an annotation
    file edited in place (same size): refused without --overwrite, store untouched."""
    tok = sample / "tokenizer"
    mix = _text_mix(tmp_path / "m")
    out = tmp_path / "s.zarr"
    _build(mix, out, tok)
    assert StoreReader(out).meta.extra["weights"] == {"text": 1.0}  # the loader's default mix
    before = snapshot(out)
    assert _build(mix, out, tok) == {"uptodate": True, "store": str(out)}
    assert snapshot(out) == before
    assert _build(mix, out, tok, overwrite=True)["total"]["written"] == 3  # rebuilt
    assert snapshot(out) != before
    before = snapshot(out)
    with pytest.raises(BuildError, match="other inputs: pass --overwrite"):
        build_store(StoreSpec(mix=mix, out=out, tokenizer=tok, seq_length=3000,
                              progress=False), Comm.single())
    ann = tmp_path / "m" / "text.jsonl"
    old, stat = ann.read_text(), ann.stat()
    ann.write_text(old.replace("It is 0.", "It is 9."))  # same size, other content
    os.utime(ann, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(BuildError, match="other inputs: pass --overwrite"):
        _build(mix, out, tok)
    assert snapshot(out) == before


class _LengthEncoder:
    """Encodes dialog ``"n:t"`` (its id) to ``n`` tokens, BOS first, targets from token ``t``."""

    def encode(self, dialogs):
        out = []
        for d in dialogs:
            n, t = (int(x) for x in d.id.split(":"))
            ids = (np.arange(n) % 400 + 3).astype(np.int32)
            ids[0] = 1
            out.append((ids, np.arange(n) >= t))
        return out


class _ListWriter:
    def __init__(self):
        self.added = []

    def add(self, sample, data, key):
        self.added.append((sample, data, key))


def test_samples_at_the_sequence_limit(tmp_path):
    """Exactly seq_length fits; one more is dropped (drop) or cut to seq_length (truncate), its
    image kept after BOS; a cut that leaves no target is dropped."""
    from megatron_sphinx.data.preprocess import preprocess_rank

    seq = 1400
    Image.new("RGB", (400, 100), (10, 200, 30)).save(tmp_path / "w.png")
    image = image_geometry(100, 400, 448, 2).num_positions()
    recs = [{"id": f"{seq + 1}:5", "data": ["q", "a"]}, {"id": f"{seq}:5", "data": ["q", "a"]},
            {"id": f"{seq + 100}:{seq + 50}", "data": ["q", "a"]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    img = [{"id": f"{seq}:5", "image": "w.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "i.json").write_text(json.dumps(img))
    (tmp_path / "mix.yaml").write_text(
        "sources:\n  - {name: t, format: sharegpt, path: t.jsonl}\n"
        "  - {name: i, format: llava, path: i.json}\n")
    mix = load_mix(tmp_path / "mix.yaml")

    w = _ListWriter()
    stats = preprocess_rank(mix, _LengthEncoder(), w, PreprocessSettings(seq, overlong="drop"),
                            progress=False)
    assert [(len(s.input_ids), key) for s, _, key in w.added] == [(seq, (0, 1))]
    assert stats["t"]["dropped"] == {"longer_than_seq_length": 2}
    assert stats["t"]["truncated"] == 0 and stats["i"]["dropped"] == {
        "longer_than_seq_length": 1}

    w = _ListWriter()
    stats = preprocess_rank(mix, _LengthEncoder(), w, PreprocessSettings(seq), progress=False)
    got = [(len(s.input_ids), s.length(448, 2), s.image_slot, key) for s, _, key in w.added]
    assert got == [(seq, seq, 1, (0, 0)), (seq, seq, 1, (0, 1)),
                   (seq - image, seq, 1, (1, 0))]
    assert stats["t"]["truncated"] == 1 and stats["i"]["truncated"] == 1
    assert stats["t"]["dropped"] == {"no_target_after_truncation": 1}
    assert w.added[2][1] == (tmp_path / "w.png").read_bytes()


def test_probe_every_exif_orientation():
    """Orientations 5-8 turn the image by 90 degrees (height and width swap); 1-4 do not."""
    base = Image.new("RGB", (160, 90), (50, 60, 70))
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        buf = io.BytesIO()
        base.save(buf, "JPEG", exif=ex.tobytes())
        info = probe_image(buf.getvalue())
        assert info.orientation == o
        assert (info.height, info.width) == ((90, 160) if o <= 4 else (160, 90)), o


def test_multi_picture_jpeg_orientation_matches_the_stored_image():
    """Phone cameras write MPO (JPEG + a second picture): Pillow re-encodes it to PNG with the
    EXIF rotation applied, so the recorded size must be the rotated one (the loader drops a
    sample whose decoded size differs from the stored size)."""
    first = Image.new("RGB", (160, 90), (200, 10, 10))
    ex = Image.Exif()
    ex[0x0112] = 6
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (160, 90))],
               exif=ex.tobytes())
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    info = probe_image(buf.getvalue())
    assert (info.height, info.width, info.orientation) == (160, 90, 6)
    data, info, reencoded = load_image(buf.getvalue())
    w, h = Image.open(io.BytesIO(data)).size
    assert reencoded and (info.height, info.width) == (h, w) == (160, 90)


def _png_with_exif_after_the_pixels(path: Path, orientation: int | None) -> bytes:
    """A 300x200 noise PNG (~180 KB, far past any header) with, if ``orientation`` is given, an
    ``eXIf`` chunk after the pixel data, where Pillow finds it only by decoding."""
    import struct
    import zlib

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    if orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = orientation
        raw = ex.tobytes()[6:]  # the chunk holds the TIFF data without the "Exif\0\0" prefix
        chunk = (struct.pack(">I", len(raw)) + b"eXIf" + raw
                 + struct.pack(">I", zlib.crc32(b"eXIf" + raw)))
        iend = data.rindex(b"IEND") - 4
        data = data[:iend] + chunk + data[iend:]
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("orientation", [None, 6])
def test_header_probes_agree_on_large_pngs_without_decoding(tmp_path, monkeypatch, orientation):
    """Preprocessing, the source converters (boxes are normalised by this size) and the loader
    read the same oriented size as a full decode, from the header alone: decoding is made to
    fail while they run. (The converters' probe used to give up on any PNG over 64 KiB.)"""
    from PIL import PngImagePlugin

    from megatron_sphinx.data.images import decode_rgb
    from megatron_sphinx.data.images import probe_image as loader_probe
    from megatron_sphinx.data.sources import image_hw

    data = _png_with_exif_after_the_pixels(tmp_path / "big.png", orientation)
    want = decode_rgb(data).shape[:2]
    assert want == ((300, 200) if orientation else (200, 300))

    def no_decode(self):
        raise AssertionError("the header probe decoded the pixels")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decode)
    info = probe_image(data, check=False)
    assert (info.height, info.width, info.orientation) == (*want, orientation or 1)
    assert image_hw(str(tmp_path / "big.png")) == want
    assert loader_probe(data).hw == want


# ----------------------------------------------------------------------------- interrupted builds

def _old_store(tmp_path: Path, tok: Path) -> Path:
    """``tmp_path/s.zarr``: a store of the "old" text mix, for an ``--overwrite`` to replace."""
    out = tmp_path / "s.zarr"
    _build(_text_mix(tmp_path / "old"), out, tok)
    return out


def _overwrite_args(tmp_path: Path, tok: Path, out: Path) -> list[str]:
    """``tools/preprocess_data.py`` and its arguments replacing ``out`` by the "new" text mix."""
    return [str(ROOT / "tools" / "preprocess_data.py"), "--mix", str(_text_mix(tmp_path / "new")),
            "--tokenizer", str(tok), "--out", str(out), "--seq-length", "2048", "--overwrite",
            "--no-progress"]


STALL_THEN_RUN = """
import pathlib, runpy, sys, time
from megatron_sphinx.data import build_store as bs
started = pathlib.Path(sys.argv[1])
def stall(*args, **kwargs):
    started.write_text("writing")
    time.sleep(120)
bs.preprocess_rank = stall
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_termination_signal_puts_the_replaced_store_back(tmp_path, sample, signum):
    """A Slurm time limit or scancel (SIGTERM), or a closed terminal (SIGHUP), while an
    --overwrite writes its shards: the new store is removed, the old one renamed back, one
    error line, exit 128 + the signal's number."""
    tok = sample / "tokenizer"
    out = _old_store(tmp_path, tok)
    before = snapshot(out)
    (tmp_path / "stall.py").write_text(STALL_THEN_RUN)
    started = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "stall.py"), str(started),
         *_overwrite_args(tmp_path, tok, out)], env=env, cwd=ROOT, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.stderr.read() if proc.poll() is not None else "no start"
    assert len(_hidden(tmp_path)) == 1  # the old store is aside while the new one is written
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 128 + signum, err[-2000:]
    assert len(errors) == 1 and f"stopped by {signal.Signals(signum).name}" in errors[0], err
    assert snapshot(out) == before and len(StoreReader(out)) == 3
    assert _hidden(tmp_path) == []


def test_a_store_set_aside_by_a_killed_build_is_named_then_replaced(tmp_path, sample, caplog):
    """SIGKILL leaves the replaced store in .NAME.old-*: the next build says where it is (and
    changes nothing); the next --overwrite deletes it once the new store is complete."""
    tok = sample / "tokenizer"
    out = _old_store(tmp_path, tok)
    holder = tmp_path / ".s.zarr.old-killed"
    holder.mkdir()
    os.rename(out, holder / "s.zarr")  # what a killed --overwrite leaves: the old store aside
    kept = snapshot(holder / "s.zarr")
    create_store(out, read_meta(holder / "s.zarr")[0])  # and the new one begun (no index)
    with pytest.raises(BuildError, match=rf"interrupted build replaced is at {holder}/s.zarr: "
                                         rf"move that back .* or pass --overwrite"):
        _build(_text_mix(tmp_path / "new", records=5), out, tok)
    assert snapshot(holder / "s.zarr") == kept
    caplog.set_level(logging.INFO)
    assert _build(_text_mix(tmp_path / "new", records=5), out, tok,
                  overwrite=True)["total"]["written"] == 5
    assert len(StoreReader(out)) == 5 and _hidden(tmp_path) == []
    assert f"deleted {holder}/s.zarr" in caplog.text
