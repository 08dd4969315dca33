"""Image decoding and the high-resolution view transform: NVIDIA DALI, with a Pillow reference.

One encoded image (JPEG / PNG / ... bytes from the store) becomes its encoded views:

1. **Decode** to RGB, EXIF orientation applied. DALI ``fn.decoders.image`` runs with
   ``device="mixed"`` (nvJPEG on the GPU) when CUDA is available and ``device="cpu"`` otherwise,
   chosen once per process and logged.
2. **Resize** (bicubic, antialiased) so that the longer side is ``image_size``; the resized size is
   exactly :func:`~megatron_sphinx.data.geometry.image_geometry`'s ``resized_height/width`` (the
   size is computed on the host and fed to DALI, so DALI's own rounding never decides it). The
   resized pixels are rounded to uint8.
3. **Pad** to the ``image_size`` square, image at the TOP-LEFT, pad colour = the CLIP mean (exact,
   in float). Pixels become float32 in [0, 1] (``uint8 / 255``). This is the whole "normalise" step
   of the data pipeline: each encoder normalises with its own mean/std inside the model
   (:class:`~megatron_sphinx.config.EncoderConfig`), so one set of views serves both encoders.
4. **Views**, CHW: the global view (the whole square downsampled to ``view_size``, bicubic,
   clamped to [0, 1]) then the sub-images row-major, keeping only those that
   :meth:`~megatron_sphinx.data.geometry.ImageGeometry.view_valid` marks valid. Skipped sub-images
   are never copied out.

:func:`reference_views` is the same transform in Pillow + numpy; DALI matches it within 2/255
(``tests/test_images.py``). Resampling details that make the two agree: both use the
Catmull-Rom cubic (a = -0.5) scaled for antialiasing; image borders are edge-clamped (DALI's
behaviour; the reference pads the edges before Pillow's resize); and the reference resamples in
float (Pillow's uint8 bicubic clamps between its two passes, up to 9/255 off).

Input kinds (what DALI 2.4 does with each, measured on ``testdata/images/adversarial``):

===========================  =================================================================
grayscale, palette, 1-bit    DALI expands to RGB, same as Pillow ``convert("RGB")``.
CMYK / YCCK JPEG             DALI == Pillow (Adobe inverted CMYK handled), to the last bit.
16-bit PNG (gray and RGB)    DALI scales to 8 bit correctly (v / 257). Pillow's
                             ``convert("RGB")`` of ``I;16`` clips to 255: the reference scales.
EXIF orientation 1-8         DALI applies it for JPEG, PNG, WebP and TIFF (== ``exif_transpose``).
alpha (RGBA, LA, tRNS)       DALI drops alpha, keeping the colour stored under transparent
                             pixels (often black, or a cut-out's background). Such images take
                             the **Pillow path**: composited over ``alpha_background`` (white).
GIF and formats DALI lacks   **Pillow path** (reason ``format``).
truncated, not an image      Reported per image (``ImageBatch.errors``), never raised.
===========================  =================================================================

The Pillow path runs :func:`reference_views` for that image and splices its views into the batch;
every use is counted in :attr:`ImageProcessor.stats` by reason. An image DALI fails on is retried
alone, then on the Pillow path; only if that fails too is it reported as failed.
"""
from __future__ import annotations

import io
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_sphinx.config import CLIP_MEAN
from megatron_sphinx.data.geometry import image_geometry

logger = logging.getLogger(__name__)

#: Pillow format names DALI's decoder reads (others go to the Pillow path).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112
_device_logged = False
_device_lock = threading.Lock()


class ImageDecodeError(ValueError):
    """An image that cannot be decoded (truncated, not an image, unsupported)."""


@dataclass
class ImageConfig:
    """The image transform and its execution."""

    image_size: int = 448
    """Side of the padded square (448; 672 for -2K)."""
    grid: int = 2
    """Sub-images per side (2; 3 for -2K)."""
    pad_color: tuple[float, float, float] = CLIP_MEAN
    """Padding colour in [0, 1] RGB (the CLIP mean)."""
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    """Colour that images with transparency are composited over."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes: ``auto`` = ``gpu`` (``mixed``) when CUDA is available, else ``cpu``."""
    num_threads: int = 2
    """DALI CPU worker threads."""
    max_batch_size: int = 32
    """Images per DALI run (larger requests are split)."""

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not divisible by grid {self.grid}: "
                             "change one of them")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.num_threads < 1 or self.max_batch_size < 1:
            raise ValueError("num_threads and max_batch_size must be >= 1")
        if not all(0.0 <= c <= 1.0 for c in self.pad_color):
            raise ValueError(f"pad_color must be in [0, 1], got {self.pad_color}")

    @property
    def view_size(self) -> int:
        """Side of one view (224)."""
        return self.image_size // self.grid


@dataclass
class ImageBatch:
    """The views of a batch of images.

    Attributes:
        views: float32 ``[V, 3, view, view]`` valid views of the images that decoded, in input
            order (global view first per image, then valid sub-images row-major). On the GPU when
            DALI ran ``mixed``.
        view_counts: int64 ``[n]`` views per input image (0 where it failed).
        sizes: ``(height, width)`` after EXIF orientation per image, None where it failed.
        errors: None per image that decoded, else the reason it failed.
        paths: ``"dali"``, ``"pillow:<reason>"`` or ``"failed"`` per image.
    """

    views: torch.Tensor
    view_counts: torch.Tensor
    sizes: list[tuple[int, int] | None]
    errors: list[str | None]
    paths: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[bool]:
        """Per image: whether it decoded."""
        return [e is None for e in self.errors]


@dataclass
class _Probe:
    fmt: str
    mode: str
    hw: tuple[int, int]
    pillow_reason: str | None


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``gpu`` for ``device`` (``auto``: ``gpu`` iff CUDA is available); logs once."""
    global _device_logged
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    with _device_lock:
        if not _device_logged:
            _device_logged = True
            logger.info("DALI image decoding on %s (decoders.image device=%s)", device,
                        "mixed" if device == "gpu" else "cpu")
    return device


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation from the header only (never decodes pixels)."""
    raw = im.info.get("exif")
    if im.format in ("JPEG", "WEBP", "TIFF", "MPO"):
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    if raw:
        ex = Image.Exif()
        ex.load(raw)
        return int(ex.get(_EXIF_ORIENTATION, 1))
    return 1


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def probe_image(data: bytes) -> _Probe:
    """Format, mode and oriented size from the header, and whether DALI should decode it.

    Raises:
        ImageDecodeError: If the bytes are not an image Pillow recognises.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orient = _exif_orientation(im)
            fmt, mode = im.format or "?", im.mode
            reason = None
            if _has_alpha(im):
                reason = "alpha"
            elif fmt not in DALI_FORMATS:
                reason = f"format {fmt}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"not a readable image: {e}") from e
    if w < 1 or h < 1:
        raise ImageDecodeError(f"empty image {w}x{h}")
    if orient in (5, 6, 7, 8):
        h, w = w, h
    return _Probe(fmt, mode, (h, w), reason)


# ----------------------------------------------------------------------------- Pillow reference

def decode_rgb(data: bytes, alpha_background: tuple[int, int, int] = (255, 255, 255)
               ) -> np.ndarray:
    """Decodes to uint8 ``[h, w, 3]`` RGB with Pillow: EXIF applied, alpha composited, 16 bit scaled.

    Raises:
        ImageDecodeError: If Pillow cannot decode the bytes (truncated data included).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if _has_alpha(im):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, tuple(alpha_background) + (255,))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            elif im.mode.startswith("I") or im.mode == "F":
                # 16-bit (or 32-bit int) gray: scale 0..65535 to 0..255 like DALI (v / 257).
                a = np.asarray(im, dtype=np.float64)
                a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
                im = Image.fromarray(a, "L").convert("RGB")
            else:
                im = im.convert("RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"Pillow cannot decode the image: {e}") from e


def _resize_plane(plane: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic antialiased resize of a float32 ``[h, w]`` plane with edge-clamped borders."""
    h, w = plane.shape
    oh, ow = out_hw
    factor = max(h / oh, w / ow, 1.0)
    k = int(math.ceil(2.0 * factor)) + 2  # cubic support (2 taps) scaled by the downsampling
    padded = np.pad(plane, k, mode="edge")
    im = Image.fromarray(np.ascontiguousarray(padded, dtype=np.float32), "F")
    return np.asarray(im.resize((ow, oh), Image.BICUBIC, box=(k, k, k + w, k + h)))


def reference_square(rgb: np.ndarray, image_size: int = 448, grid: int = 2,
                     pad_color: Sequence[float] = CLIP_MEAN) -> np.ndarray:
    """The padded square, float32 ``[S, S, 3]`` in [0, 1], image top-left (Pillow reference)."""
    h, w = rgb.shape[:2]
    geo = image_geometry(h, w, image_size, grid)
    rh, rw = geo.resized_height, geo.resized_width
    resized = np.stack([_resize_plane(rgb[..., c].astype(np.float32), (rh, rw))
                        for c in range(3)], axis=-1)  # [rh, rw, 3]
    resized = np.clip(np.round(resized), 0, 255)
    square = np.empty((image_size, image_size, 3), dtype=np.float32)
    square[:] = np.asarray(pad_color, dtype=np.float32)
    square[:rh, :rw] = resized / 255.0
    return square


def reference_views(data: bytes, image_size: int = 448, grid: int = 2,
                    pad_color: Sequence[float] = CLIP_MEAN,
                    alpha_background: tuple[int, int, int] = (255, 255, 255),
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """The whole transform in Pillow + numpy: the reference DALI is tested against.

    Args:
        data: Encoded image bytes.
        image_size: Side of the padded square.
        grid: Sub-images per side.
        pad_color: Padding colour in [0, 1].
        alpha_background: Colour transparent images are composited over.

    Returns:
        ``(views, (height, width))``: float32 ``[n_valid, 3, v, v]`` views (global first, then
        valid sub-images row-major) and the oriented image size.

    Raises:
        ImageDecodeError: If the image cannot be decoded.
    """
    rgb = decode_rgb(data, alpha_background)
    h, w = rgb.shape[:2]
    square = reference_square(rgb, image_size, grid, pad_color)
    v = image_size // grid
    glob = np.stack([_resize_plane(square[..., c], (v, v)) for c in range(3)], axis=0)
    views = [np.clip(glob, 0.0, 1.0)]
    valid = image_geometry(h, w, image_size, grid).view_valid()
    for t, ok in enumerate(valid[1:]):
        if ok:
            r, c = divmod(t, grid)
            views.append(square[r * v:(r + 1) * v, c * v:(c + 1) * v].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(views), dtype=np.float32), (h, w)


# ----------------------------------------------------------------------------- DALI

class ImageProcessor:
    """Decodes batches of encoded images into views with one DALI pipeline (not thread-safe:
    make one per worker thread).

    Args:
        cfg: The transform and execution settings.
    """

    def __init__(self, cfg: ImageConfig | None = None):
        self.cfg = cfg or ImageConfig()
        self.device = resolve_device(self.cfg.device)
        self.stats: Counter = Counter()
        self._pipe = None

    # The pipeline is built lazily: importing DALI costs ~1 s and text-only runs never need it.
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg, s, v = self.cfg, self.cfg.image_size, self.cfg.view_size
        gpu = self.device == "gpu"

        @pipeline_def(batch_size=cfg.max_batch_size, num_threads=cfg.num_threads,
                      device_id=torch.cuda.current_device() if gpu else None,
                      prefetch_queue_depth=1)
        def views_pipeline():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)  # [2] (rh, rw)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu",
                                    output_type=types.RGB)  # [h, w, 3] uint8, EXIF applied
            resized = fn.resize(img, size=size, interp_type=types.INTERP_CUBIC,
                                antialias=True)  # [rh, rw, 3] uint8
            square = fn.crop_mirror_normalize(
                resized, crop=(s, s), crop_pos_x=0.0, crop_pos_y=0.0,
                out_of_bounds_policy="pad", fill_values=list(cfg.pad_color),
                mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0], dtype=types.FLOAT,
                output_layout="HWC")  # [S, S, 3] float in [0, 1], image top-left
            glob = fn.resize(square, size=(v, v), interp_type=types.INTERP_CUBIC,
                             antialias=True)  # [v, v, 3] float
            return square, glob, img.shape()

        pipe = views_pipeline()
        pipe.build()
        return pipe

    def _run_dali(self, datas: list[bytes], hws: list[tuple[int, int]]):
        """One DALI run. Returns ``(square [n,S,S,3], glob [n,v,v,3], decoded hw list)``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._pipe is None:
            self._pipe = self._build()
        cfg = self.cfg
        sizes = []
        for h, w in hws:
            g = image_geometry(h, w, cfg.image_size, cfg.grid)
            sizes.append(np.array([g.resized_height, g.resized_width], dtype=np.float32))
        self._pipe.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        self._pipe.feed_input("size", sizes)
        try:
            sq, gl, shapes = self._pipe.run()
        except Exception:
            self._pipe = None  # rebuilt on the next call, whatever state DALI is left in
            raise
        n, s, v = len(datas), cfg.image_size, cfg.view_size
        dev = torch.device("cuda", torch.cuda.current_device()) if self.device == "gpu" else "cpu"
        stream = torch.cuda.current_stream() if self.device == "gpu" else None
        square = feed_ndarray(sq.as_tensor(), torch.empty(n, s, s, 3, device=dev), stream)
        glob = feed_ndarray(gl.as_tensor(), torch.empty(n, v, v, 3, device=dev), stream)
        decoded = [tuple(int(x) for x in np.asarray(shapes[i])[:2]) for i in range(n)]
        return square, glob, decoded

    def _views_of(self, square: torch.Tensor, glob: torch.Tensor, hw: tuple[int, int]
                  ) -> list[torch.Tensor]:
        """CHW views of one image from its HWC square and global view (valid tiles only)."""
        cfg, v = self.cfg, self.cfg.view_size
        out = [glob.permute(2, 0, 1).clamp(0.0, 1.0)]
        valid = image_geometry(*hw, cfg.image_size, cfg.grid).view_valid()
        for t, ok in enumerate(valid[1:]):
            if ok:
                r, c = divmod(t, cfg.grid)
                out.append(square[r * v:(r + 1) * v, c * v:(c + 1) * v].permute(2, 0, 1))
        return out

    def _pillow(self, data: bytes, reason: str) -> tuple[list[torch.Tensor], tuple[int, int]]:
        views, hw = reference_views(data, self.cfg.image_size, self.cfg.grid,
                                    self.cfg.pad_color, self.cfg.alpha_background)
        self.stats[f"pillow:{reason}"] += 1
        return list(torch.from_numpy(views)), hw

    def __call__(self, images: Sequence[bytes]) -> ImageBatch:
        """Views of a batch of encoded images; per-image failures are reported, not raised.

        Args:
            images: Encoded image files.

        Returns:
            The views in input order (see :class:`ImageBatch`).
        """
        n = len(images)
        per: list[list[torch.Tensor] | None] = [None] * n
        sizes: list[tuple[int, int] | None] = [None] * n
        errors: list[str | None] = [None] * n
        paths = ["failed"] * n
        dali_idx: list[int] = []
        probes: dict[int, _Probe] = {}
        for i, data in enumerate(images):
            try:
                p = probe_image(bytes(data))
            except ImageDecodeError as e:
                errors[i] = str(e)
                continue
            probes[i] = p
            if p.pillow_reason is None:
                dali_idx.append(i)
            else:
                self._fallback(i, images[i], p.pillow_reason, per, sizes, errors, paths)
        for a in range(0, len(dali_idx), self.cfg.max_batch_size):
            chunk = dali_idx[a:a + self.cfg.max_batch_size]
            self._dali_chunk(chunk, images, probes, per, sizes, errors, paths)
        dev = ("cuda" if self.device == "gpu" else "cpu")
        flat = [t for p in per if p is not None for t in p]
        v = self.cfg.view_size
        if flat:
            views = torch.stack([t.to(dev) for t in flat]).contiguous()  # [V, 3, v, v]
        else:
            views = torch.zeros(0, 3, v, v, device=dev)
        counts = torch.tensor([len(p) if p is not None else 0 for p in per], dtype=torch.int64)
        for i, e in enumerate(errors):
            if e is not None:
                self.stats["failed"] += 1
        return ImageBatch(views, counts, sizes, errors, paths)

    def _fallback(self, i, data, reason, per, sizes, errors, paths) -> None:
        try:
            per[i], sizes[i] = self._pillow(bytes(data), reason)
            paths[i] = f"pillow:{reason}"
        except ImageDecodeError as e:
            errors[i] = ("DALI and " if reason == "dali_error" else "") + str(e)

    def _dali_chunk(self, chunk, images, probes, per, sizes, errors, paths) -> None:
        datas = [bytes(images[i]) for i in chunk]
        hws = [probes[i].hw for i in chunk]
        try:
            square, glob, decoded = self._run_dali(datas, hws)
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for any bad sample
            if len(chunk) > 1:  # find the bad image(s) by bisection
                half = len(chunk) // 2
                self.stats["dali_retry"] += 1
                for part in (chunk[:half], chunk[half:]):
                    self._dali_chunk(part, images, probes, per, sizes, errors, paths)
                return
            logger.debug("DALI failed on one image (%s); trying Pillow", str(e).splitlines()[0])
            self._fallback(chunk[0], images[chunk[0]], "dali_error", per, sizes, errors, paths)
            return
        for k, i in enumerate(chunk):
            if decoded[k] != hws[k]:
                # DALI oriented the image differently from the header: trust the reference.
                self._fallback(i, images[i], "orientation", per, sizes, errors, paths)
                continue
            per[i] = self._views_of(square[k], glob[k], hws[k])
            sizes[i] = hws[k]
            paths[i] = "dali"
            self.stats["dali"] += 1
