"""DALI image views against the Pillow reference; geometry of the views; bad files reported."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_sphinx.config import CLIP_MEAN
from megatron_sphinx.data.geometry import image_geometry
from megatron_sphinx.data.images import (ImageConfig, ImageProcessor, _resize_plane, decode_rgb,
                                         global_view, probe_image, reference_views,
                                         resolve_device)
from tests.files import TEST_IMAGES

IMAGES = TEST_IMAGES
PHOTOS = sorted(IMAGES.glob("*.jpg"))
HARD = ["cmyk.jpg", "exif_orientation6.jpg", "gray16.png", "grayscale.jpg", "one_pixel_1x1.png",
        "rgb16.png", "rgba_alpha.png", "tall_60x4000.jpg", "wide_4000x60.jpg"]
BAD = ["truncated_40pct.jpg", "random_bytes.jpg"]
TOL = 2.0 / 255.0


def _files():
    return [*PHOTOS, *[IMAGES / "adversarial" / f for f in HARD]]


@pytest.fixture(scope="module")
def proc448():
    return ImageProcessor(ImageConfig(448, 2, device="cpu"))


@pytest.mark.parametrize("image_size,grid,interp,float_resize,tol", [
    (448, 2, "cubic", None, TOL), (672, 3, "cubic", None, TOL), (448, 2, "linear", None, TOL),
    # no uint8 rounding after the resize (the GPU's default): only the decoder's is left
    # (measured 0.58/255 cubic, 0.50 linear; rounding, 1.00)
    (448, 2, "cubic", True, 0.7 / 255), (448, 2, "linear", True, 0.7 / 255)])
def test_dali_matches_pillow_reference(image_size, grid, interp, float_resize, tol):
    files = _files()
    assert len(PHOTOS) >= 6, f"test photos missing under {IMAGES}"
    datas = [f.read_bytes() for f in files]
    proc = ImageProcessor(ImageConfig(image_size, grid, device="cpu", interp=interp,
                                      float_resize=float_resize))
    batch = proc(datas)
    assert batch.errors == [None] * len(files)
    off = 0
    for f, data, cnt, hw in zip(files, datas, batch.view_counts.tolist(), batch.sizes):
        ref, ref_hw = reference_views(data, image_size, grid, interp=interp)
        assert hw == ref_hw, f.name
        geo = image_geometry(*hw, image_size, grid)
        assert cnt == int(geo.view_valid().sum()) == ref.shape[0], f.name
        got = batch.views[off:off + cnt].numpy()
        off += cnt
        assert got.shape == ref.shape == (cnt, 3, image_size // grid, image_size // grid)
        err = float(np.abs(got - ref).max())
        assert err <= tol, f"{f.name}: DALI vs Pillow max diff {err * 255:.2f}/255"
        assert got.min() >= 0.0 and got.max() <= 1.0
    assert off == batch.views.shape[0]
    assert batch.views.dtype == torch.float32
    assert proc.stats["dali"] == len(files) - 1 and proc.stats["pillow:alpha"] == 1


@pytest.mark.parametrize("grid,interp", [(2, "cubic"), (3, "cubic"), (2, "linear")])
def test_global_view_filter_is_pillows(grid, interp):
    rng = np.random.default_rng(grid)
    sq = rng.random((2, 3, 224 * grid, 224 * grid), dtype=np.float32)
    sq[:, :, 100:, 50:] = 0.3  # flat areas and edges
    got = global_view(torch.from_numpy(sq), grid, interp).numpy()
    for i in range(2):
        for c in range(3):
            ref = np.clip(_resize_plane(sq[i, c], (224, 224), interp), 0, 1)
            assert np.abs(got[i, c] - ref).max() < 1e-4


def test_pad_is_clip_mean_and_image_top_left(proc448):
    """wide 4000x60 -> 448x7: only the top row of sub-images is valid; below row 7 is padding."""
    data = (IMAGES / "adversarial" / "wide_4000x60.jpg").read_bytes()
    geo = image_geometry(60, 4000, 448, 2)
    assert (geo.resized_height, geo.resized_width) == (7, 448)
    assert geo.view_valid().tolist() == [True, True, True, False, False]
    b = proc448([data])
    assert b.view_counts.tolist() == [3]
    tile = b.views[1]  # top-left sub-image, [3, 224, 224]
    pad = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    assert torch.equal(tile[:, 7:, :], pad.expand(3, 217, 224))  # exact pad colour
    assert not torch.allclose(tile[:, :7, :], pad.expand(3, 7, 224), atol=0.05)  # image pixels
    tall = proc448([(IMAGES / "adversarial" / "tall_60x4000.jpg").read_bytes()])
    g = image_geometry(4000, 60, 448, 2)
    assert (g.resized_height, g.resized_width) == (448, 7)
    assert tall.view_counts.tolist() == [3]  # global + left column
    assert torch.equal(tall.views[2][:, :, 7:], pad.expand(3, 224, 217))


def test_exif_orientation_all_eight(proc448):
    base = Image.open(PHOTOS[0]).convert("RGB").resize((160, 90))
    datas = []
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        buf = io.BytesIO()
        base.save(buf, "JPEG", quality=95, exif=ex.tobytes())
        datas.append(buf.getvalue())
    b = proc448(datas)
    assert b.paths == ["dali"] * 8
    off = 0
    for o, data, cnt, hw in zip(range(1, 9), datas, b.view_counts.tolist(), b.sizes):
        assert hw == ((90, 160) if o <= 4 else (160, 90)), o
        assert probe_image(data).hw == hw
        ref, _ = reference_views(data)
        assert float((b.views[off:off + cnt] - torch.from_numpy(ref)).abs().max()) <= TOL, o
        off += cnt
    # the adversarial file: stored 427 wide x 640 high, orientation 6 -> 640 wide x 427 high
    rot = (IMAGES / "adversarial" / "exif_orientation6.jpg").read_bytes()
    with Image.open(io.BytesIO(rot)) as im:
        assert im.size == (427, 640)
    assert proc448([rot]).sizes == [(427, 640)]


def test_sixteen_bit_gray_is_scaled_not_clipped():
    data = (IMAGES / "adversarial" / "gray16.png").read_bytes()
    raw = np.asarray(Image.open(io.BytesIO(data)))
    assert raw.dtype == np.uint16 and raw.max() > 255
    rgb = decode_rgb(data)
    assert np.array_equal(rgb[..., 0], np.round(raw / 257.0).astype(np.uint8))
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (naive == 255).mean() > 0.9  # what a plain Pillow convert would have given


def test_alpha_composited_over_white(proc448):
    data = (IMAGES / "adversarial" / "rgba_alpha.png").read_bytes()
    alpha = np.asarray(Image.open(io.BytesIO(data)))[..., 3]
    assert alpha[0, 0] == 0
    b = proc448([data])
    assert b.paths == ["pillow:alpha"]
    assert np.array_equal(decode_rgb(data)[0, 0], [255, 255, 255])
    assert torch.allclose(b.views[1][:, 0, 0], torch.ones(3), atol=TOL)  # transparent corner


def test_bad_files_reported_per_image(proc448):
    good = PHOTOS[0].read_bytes()
    bad = [(IMAGES / "adversarial" / f).read_bytes() for f in BAD]
    b = proc448([good, bad[0], good, bad[1], b"", good[:50]])
    assert b.ok == [True, False, True, False, False, False]
    assert "truncated" in b.errors[1]
    assert "not a readable image" in b.errors[3]
    assert b.view_counts.tolist() == [5, 0, 5, 0, 0, 0]
    assert b.views.shape[0] == 10
    ref, _ = reference_views(good)
    assert float((b.views[5:] - torch.from_numpy(ref)).abs().max()) <= TOL
    with pytest.raises(Exception):
        reference_views(bad[0])


def test_formats_dali_lacks_take_the_pillow_path(proc448):
    im = Image.open(PHOTOS[1]).convert("RGB").resize((200, 120))
    buf = io.BytesIO()
    im.save(buf, "GIF")
    b = proc448([buf.getvalue()])
    assert b.paths == ["pillow:format GIF"] and b.ok == [True]
    assert b.view_counts.tolist() == [int(image_geometry(120, 200).view_valid().sum())]


def test_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto picks the GPU there")
    assert resolve_device("auto") == "cpu"
    assert ImageProcessor(ImageConfig(device="auto")).device == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: DALI device='mixed' (nvJPEG) cannot run here")
def test_gpu_mixed_matches_cpu():
    """The same transform on both devices: the CPU pipeline here keeps its resize in float as
    the GPU's does (its default rounds to uint8, ~37% faster on CPUs), so that what is compared
    is the devices, not that setting; the default CPU pipeline's distance is in the message."""
    datas = [f.read_bytes() for f in _files()]
    cpu = ImageProcessor(ImageConfig(device="cpu", float_resize=True))(datas)
    proc = ImageProcessor(ImageConfig(device="gpu"))
    assert proc.cfg.float_resize is None  # the GPU's default: float
    gpu = proc(datas)
    assert gpu.views.is_cuda
    # DALI on the GPU decoded them (not the Pillow path, as the CPU run: all but the RGBA file)
    assert gpu.paths == cpu.paths and proc.stats["dali"] == len(datas) - 1, proc.stats
    assert gpu.view_counts.tolist() == cpu.view_counts.tolist()
    diff = (gpu.views.cpu() - cpu.views).abs()
    err = float(diff.max())
    # H100 run 5 measured 3/255 with both resizes rounding to uint8; DALI's own tests hold the
    # two decoders to 1 apart.
    uint8 = ImageProcessor(ImageConfig(device="cpu"))(datas)
    default = float((gpu.views.cpu() - uint8.views).abs().max())
    print(f"DALI mixed vs CPU: max {err * 255:.2f}/255 (float resize on both), "
          f"{default * 255:.2f}/255 against the CPU's default uint8 resize")
    if err > TOL:  # say where, and whether the decoders already differ
        counts = cpu.view_counts.tolist()
        per_file = [f"{f.name} {float(d.max()) * 255:.2f}" for f, d in
                    zip(_files(), diff.split(counts)) if d.numel()]
        over = float((diff > TOL + 1e-6).float().mean())
        pytest.fail(f"DALI mixed vs CPU: max diff {err * 255:.2f}/255, {over:.2e} of the values "
                    f"over 2/255 ({default * 255:.2f}/255 against the CPU's default uint8 "
                    f"resize); views per file (/255): {', '.join(per_file)}; decoded images "
                    f"alone (/255): {_decoder_diffs(datas)}")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: DALI device='mixed' (nvJPEG) cannot run here")
def test_gpu_map_decoding_ahead_matches_calls():
    """On the GPU the helper thread copies DALI's squares on the consumer's stream while the
    consumer cuts the batch before: the same views as one call at a time."""
    _assert_map_matches_calls(ImageConfig(device="gpu", max_batch_size=4),
                              ImageConfig(device="gpu", max_batch_size=4))


def _decoder_diffs(datas: list[bytes]) -> str:
    """Max |mixed - cpu| of DALI's decoder alone per JPEG (fancy upsampling on, as the views)."""
    try:
        from nvidia.dali import fn, pipeline_def, types

        jpegs = [d for d in datas if d[:2] == b"\xff\xd8"]

        def decode(device):
            @pipeline_def(batch_size=len(jpegs), num_threads=2, device_id=0)
            def pipe():
                enc = fn.external_source(name="enc", dtype=types.UINT8)
                return fn.decoders.image(enc, device=device, output_type=types.RGB,
                                         jpeg_fancy_upsampling=device == "mixed")
            p = pipe()
            p.build()
            p.feed_input("enc", [np.frombuffer(d, np.uint8) for d in jpegs])
            out = p.run()[0]
            out = out.as_cpu() if hasattr(out, "as_cpu") else out
            return [np.asarray(out.at(i)).astype(np.int16) for i in range(len(jpegs))]

        return ", ".join(str(int(np.abs(a - b).max())) if a.shape == b.shape else "shape"
                         for a, b in zip(decode("mixed"), decode("cpu")))
    except Exception as exc:  # noqa: BLE001 - a diagnosis only, the failure above stands
        return f"not compared ({type(exc).__name__}: {exc})"


def test_gpu_pipeline_graph_is_valid_without_a_gpu():
    """The GPU (``mixed``) pipeline's graph passes DALI's checks, which run when it is defined,
    before any GPU is needed: until 2026-11-27 it asked for the decoded shape on the CPU, a
    GPU-to-CPU transition the legacy executor refuses, so the GPU pipeline never built (H100
    run 4 fell back to the CPU pipeline, then silently)."""
    from nvidia.dali import fn

    from nvidia.dali import types

    seen, resized, decode, resize = [], [], fn.decoders.image, fn.resize

    def define(proc):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fn.decoders, "image", lambda *a, **kw: seen.append(kw) or decode(*a, **kw))
            mp.setattr(fn, "resize", lambda *a, **kw: resized.append(kw) or resize(*a, **kw))
            return proc._define()

    for hw_load in (0.65, 1.0):
        proc = ImageProcessor(ImageConfig(device="cpu", hw_decoder_load=hw_load))
        proc.device, proc._gpu_index = "gpu", 0  # define only: nothing here touches a GPU
        pipe = define(proc)
        assert pipe.device_id == 0 and not pipe.exec_dynamic
        assert (seen[-1]["device"], seen[-1]["hw_decoder_load"]) == ("mixed", hw_load)
        assert seen[-1]["jpeg_fancy_upsampling"] is True
        assert resized[-1]["dtype"] == types.FLOAT  # the GPU's default: no uint8 rounding
    define(ImageProcessor(ImageConfig(device="cpu")))  # neither GPU-only argument, uint8
    assert seen[-1]["device"] == "cpu" and not {"hw_decoder_load",
                                                "jpeg_fancy_upsampling"} & set(seen[-1])
    assert resized[-1]["dtype"] == types.UINT8
    with pytest.raises(ValueError, match=r"hw_decoder_load must be in \[0, 1\], got 1.5"):
        ImageConfig(hw_decoder_load=1.5)


@pytest.mark.parametrize("image_size,grid,skip", [(448, 2, True), (672, 3, True),
                                                   (448, 2, False)])
def test_batched_views_equal_per_image_views(image_size, grid, skip):
    """The GPU's batch-wise cutting of the views (run here on the CPU) gives the per-image
    path's views: the photos, the hard files, and a chunk with a Pillow-path image inside."""
    datas = [f.read_bytes() for f in _files()]
    cfg = ImageConfig(image_size, grid, device="cpu", skip_padded=skip, max_batch_size=5)
    per_image, batched = ImageProcessor(cfg), ImageProcessor(cfg)
    batched.batched_views = True
    assert not per_image.batched_views
    a, b = per_image(datas), batched(datas)
    assert a.paths == b.paths and a.view_counts.tolist() == b.view_counts.tolist()
    assert batched.stats == per_image.stats
    assert float((a.views - b.views).abs().max()) < 1e-6


def _failing_build(monkeypatch, device):
    """``_build`` failing for ``device``; "gpu" processors allocate on the CPU (no CUDA here)."""
    real = ImageProcessor._build
    monkeypatch.setattr(ImageProcessor, "_dev", property(lambda self: torch.device("cpu")))

    def build(self):
        if self.device == device:
            raise RuntimeError("nvJPEG library not found\nmore detail")
        return real(self)
    return build


def test_gpu_pipeline_that_does_not_build_gives_way_to_the_cpu(monkeypatch, caplog):
    """Device 'auto' on a GPU whose DALI pipeline does not build: a warning with the reason,
    then the CPU pipeline (stands in for the GPU here by setting the processor's device)."""
    monkeypatch.setattr(ImageProcessor, "_build", _failing_build(monkeypatch, "gpu"))
    proc = ImageProcessor(ImageConfig(device="auto"))
    proc.device = "gpu"  # as if CUDA were there
    with caplog.at_level("WARNING", logger="megatron_sphinx.data.images"):
        batch = proc([p.read_bytes() for p in PHOTOS[:2]])  # no CUDA device context
    assert "could not build its GPU (mixed) image pipeline: nvJPEG library not found" in \
        caplog.text
    assert proc.device == "cpu" and not batch.views.is_cuda
    assert batch.paths == ["dali", "dali"] and proc.stats["dali_gpu_unavailable"] == 1


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_pipeline_of_a_chosen_device_that_does_not_build_is_an_error(monkeypatch, device):
    monkeypatch.setattr(ImageProcessor, "_build", _failing_build(monkeypatch, device))
    proc = ImageProcessor(ImageConfig(device="cpu"))
    proc.device = device
    proc.cfg.device = device
    with pytest.raises(RuntimeError, match=f"DALI could not build its {device} image pipeline: "
                       "nvJPEG library not found; check the DALI install"):
        proc([PHOTOS[0].read_bytes()])


def test_dali_failing_on_an_image_warns_once(monkeypatch, caplog):
    """A DALI failure on single images (a broken decoder fails them all) is said once, with
    DALI's reason; each such image takes the Pillow path."""
    proc = ImageProcessor(ImageConfig(device="cpu"))

    def run_dali(datas, hws):
        raise RuntimeError("[nvjpeg] decode failed\ntrace")
    monkeypatch.setattr(proc, "_run_dali", run_dali)
    with caplog.at_level("WARNING", logger="megatron_sphinx.data.images"):
        batch = proc([p.read_bytes() for p in PHOTOS[:3]])
    assert caplog.text.count("failed on an image: [nvjpeg] decode failed") == 1
    assert batch.paths == ["pillow:dali_error"] * 3 and proc.stats["dali_error"] == 3


@pytest.mark.parametrize("image_size,grid,interp",
                         [(448, 2, "cubic"), (672, 3, "cubic"), (448, 2, "linear")])
def test_trimmed_global_view_equals_full(image_size, grid, interp):
    """The per-image global view filters only where the image reaches: same as the full one."""
    proc = ImageProcessor(ImageConfig(image_size, grid, device="cpu", interp=interp))
    rng = np.random.default_rng(0)
    pad = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    for rh, rw in [(image_size, image_size), (image_size, 1), (1, image_size), (7, image_size),
                   (image_size, 299), (301, image_size), (image_size - 1, 5), (2, 3)]:
        sq = pad.expand(3, image_size, image_size).clone()
        sq[:, :rh, :rw] = torch.from_numpy(rng.random((3, rh, rw), dtype=np.float32))
        want = global_view(sq[None], grid, interp)[0]
        got = proc._global_view(sq, rh, rw)
        assert float((got - want).abs().max()) < 1e-6, (rh, rw)


def test_output_memory_reused_only_when_released(proc448):
    """Outputs share memory with earlier ones only after those are gone."""
    a, b = (PHOTOS[0].read_bytes(), PHOTOS[1].read_bytes())
    first = proc448([a, a])
    held = first.views[2:4]  # a view the caller keeps
    keep = held.clone()
    second = proc448([b, b])
    assert held.data_ptr() != second.views.data_ptr()
    assert torch.equal(held, keep)  # not overwritten
    ptr = second.views.data_ptr()
    del second
    third = proc448([a, a])
    assert third.views.data_ptr() == ptr  # released: its memory is reused
    assert torch.equal(third.views, first.views)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_reference_keeps_solid_colours_exact():
    """The Pillow reference maps uint8 v to exactly v / 255 (white stays 1.0)."""
    colour = (10, 128, 255)
    views, hw = reference_views(_png(Image.new("RGB", (300, 200), colour)), interp="linear")
    assert hw == (200, 300)
    tile = views[1]  # top-left sub-image, all image pixels
    want = np.array(colour, np.float32).reshape(3, 1, 1) / 255.0
    assert np.abs(tile - want).max() < 1e-6


@pytest.mark.parametrize("kind", ["LA", "P+tRNS"])
def test_grey_alpha_and_palette_transparency_take_the_pillow_path(proc448, kind):
    """Transparency that DALI would drop (grey + alpha, a palette's tRNS) is composited over
    white on the Pillow path, like RGBA."""
    if kind == "LA":
        im = Image.new("LA", (200, 120), (30, 0))  # dark grey, fully transparent
    else:
        im = Image.new("P", (200, 120), 0)
        im.putpalette([30, 30, 30] + [0] * 765)
        im.info["transparency"] = 0
    data = _png(im, **({"transparency": 0} if kind != "LA" else {}))
    assert probe_image(data).pillow_reason == "alpha"
    b = proc448([data])
    assert b.paths == ["pillow:alpha"] and b.ok == [True]
    assert torch.allclose(b.views[1][:, :60, :100], torch.ones(3, 60, 100))  # white, not grey


def test_bad_pad_colour_is_refused():
    with pytest.raises(ValueError, match="pad_color"):
        ImageConfig(pad_color=(0.5, 0.5, 1.5))


def test_png_exif_orientation_is_read_from_the_header(proc448):
    base = Image.open(PHOTOS[0]).convert("RGB").resize((160, 90))
    ex = Image.Exif()
    ex[0x0112] = 6
    data = _png(base, exif=ex.tobytes())
    assert probe_image(data).hw == (160, 90)
    b = proc448([data])
    assert b.sizes == [(160, 90)] and b.paths == ["dali"]
    ref, _ = reference_views(data)
    assert float((b.views - torch.from_numpy(ref)).abs().max()) <= TOL


def test_header_and_decoder_disagreeing_is_resolved_by_the_reference(proc448, monkeypatch):
    """If DALI's decoded size differs from the header's oriented size, the image takes the
    Pillow path (its views and size), never views planned from the wrong geometry."""
    from megatron_sphinx.data import images as images_mod

    data = PHOTOS[1].read_bytes()  # not square
    real = probe_image(data)
    h, w = real.hw
    assert h != w
    monkeypatch.setattr(images_mod, "probe_image", lambda d: images_mod.ImageProbe(
        real.fmt, real.mode, (w, h), None))  # a header that claims a 90-degree rotation
    b = proc448([data])
    assert b.paths[0] == "pillow:orientation" and b.sizes[0] == (h, w)
    ref, _ = reference_views(data)
    assert b.view_counts[0] == ref.shape[0]
    assert float((b.views[:ref.shape[0]] - torch.from_numpy(ref)).abs().max()) <= TOL


def test_gpu_pipeline_that_fails_to_rebuild_is_not_swapped_for_the_cpu(monkeypatch):
    """Once a GPU pipeline has been built, a failed rebuild (after a failed run) is an error,
    not a silent switch of the outputs' device mid-run."""
    proc = ImageProcessor(ImageConfig(device="auto"))
    datas = [p.read_bytes() for p in PHOTOS[:2]]
    proc(datas)  # built and run (on the CPU here)
    monkeypatch.setattr(ImageProcessor, "_build", _failing_build(monkeypatch, "gpu"))
    proc.device, proc._pipe = "gpu", None  # as if a GPU run had failed
    with pytest.raises(RuntimeError, match="DALI could not build its gpu image pipeline: nvJPEG"):
        proc(datas)
    assert proc.device == "gpu" and "dali_gpu_unavailable" not in proc.stats


def _map_batches() -> list[list[bytes]]:
    """Photos, hard files (Pillow paths, orientation, extreme shapes) and bad files in batches
    that span several DALI runs each (max_batch_size 4), one of them empty."""
    files = [*PHOTOS, *[IMAGES / "adversarial" / f for f in HARD + BAD]]
    datas = [f.read_bytes() for f in files] * 2
    return [datas[:7], [], datas[7:19], datas[19:21], datas[21:]]


def _assert_map_matches_calls(cfg_map: ImageConfig, cfg_call: ImageConfig, ahead: int = 1):
    batches = _map_batches()
    one, two = ImageProcessor(cfg_map), ImageProcessor(cfg_call)
    mapped = list(one.map(iter(batches), ahead=ahead))
    assert len(mapped) == len(batches)
    for got, images in zip(mapped, batches):
        want = two(images)
        assert got.paths == want.paths and got.errors == want.errors
        assert got.sizes == want.sizes
        assert got.view_counts.tolist() == want.view_counts.tolist()
        assert torch.equal(got.views.cpu(), want.views.cpu())
    assert one.stats == two.stats


@pytest.mark.parametrize("ahead", [1, 3, 0])
def test_map_decoding_ahead_matches_calls(ahead):
    """Decoding ahead in a helper thread gives each batch's views, sizes, errors and paths as
    one call at a time, across several DALI runs per batch (the CPU's squares are copied out of
    DALI's buffers, which the next run overwrites), bisected failures and the Pillow paths."""
    cfg = ImageConfig(device="cpu", max_batch_size=4)
    _assert_map_matches_calls(cfg, cfg, ahead)


def _decode_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "image-decode-ahead"]


def test_map_raises_a_failing_batch_source_after_the_batches_before():
    proc = ImageProcessor(ImageConfig(device="cpu"))

    def batches():
        yield [PHOTOS[0].read_bytes()]
        raise OSError("store read failed")

    got = proc.map(batches())
    assert next(got).paths == ["dali"]
    with pytest.raises(OSError, match="store read failed"):
        next(got)
    assert not _decode_threads()


def test_map_stopped_early_ends_its_helper():
    """A consumer that stops early (``close()``, or a ``break`` out of its loop) ends the
    helper thread, which then reads no more batches."""
    proc = ImageProcessor(ImageConfig(device="cpu"))
    read = []

    def batches():
        for k in range(100):
            read.append(k)
            yield [PHOTOS[k % len(PHOTOS)].read_bytes()]

    got = proc.map(batches(), ahead=2)
    next(got)
    got.close()
    assert not _decode_threads()
    assert len(read) <= 5  # the one consumed, two waiting, one being decoded, one read
    with pytest.raises(ValueError, match="ahead must be >= 0"):
        next(proc.map([], ahead=-1))
