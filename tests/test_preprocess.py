"""Preprocessing: image probing, bad input, overlong samples, output safety, and a real MPI run."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.preprocess import BadImage, load_image, probe_image
from megatron_sphinx.data.sample_data import generate
from megatron_sphinx.data.store import StoreReader

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata" / "images"
if not TESTDATA.is_dir():
    TESTDATA = Path("/work/shared/testdata/images")
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
