"""Image decoding and the high-resolution view transform: NVIDIA DALI, with a Pillow reference.

One encoded image (JPEG / PNG / ... bytes from the store) becomes its encoded views:

1. **Decode** to RGB, EXIF orientation applied. DALI ``fn.decoders.image`` runs with
   ``device="mixed"`` (nvJPEG on the GPU, chroma upsampled as libjpeg-turbo does unless
   ``ImageConfig.fancy_upsampling`` is off) when CUDA is available and ``device="cpu"``
   otherwise, chosen once per process and logged; a GPU pipeline that does not build gives way
   to the CPU one with a warning.
2. **Resize** (antialiased bicubic, or linear with ``ImageConfig.interp="linear"``; DALI
   ``fn.resize``) so that the longer side is
   ``image_size``; the resized size is exactly
   :func:`~megatron_sphinx.data.geometry.image_geometry`'s ``resized_height/width`` (computed on
   the host and fed to DALI, so DALI's own rounding never decides it). On GPUs the resized
   pixels stay float (clamped to [0, 255]): no rounding to uint8 between the resize and the
   views, which keeps them within ~0.6/255 of :func:`reference_views` instead of ~1/255 and
   leaves the GPU pipeline only the decoders' difference from the CPU one (H100 run 5 measured
   3/255 with both rounding). On CPUs they are rounded to uint8, as float costs the CPU
   pipeline ~37% of its images/s there (``ImageConfig.float_resize`` decides).
3. **Pad** to the ``image_size`` square, image at the TOP-LEFT, as float32 in [0, 1] CHW: one
   DALI ``crop_mirror_normalize`` (``out_of_bounds_policy="pad"``, ``std=255``) whose fill is
   the pad colour exactly (the CLIP mean, which is not a uint8 colour). This is the whole
   "normalise" step of the data pipeline: each encoder normalises with its own mean/std inside
   the model (:class:`~megatron_sphinx.config.EncoderConfig`), so one set of views serves both
   encoders.
4. **Views**, CHW: the global view (the whole square downsampled by ``grid`` to ``view_size``:
   Pillow's antialiased kernel at an integer factor, edges clamped, done in torch on the same
   device as a separable filter of contiguous multiply-adds, clamped to [0, 1]) then the
   sub-images row-major, keeping only those that
   :meth:`~megatron_sphinx.data.geometry.ImageGeometry.view_valid` marks valid (all of them with
   ``ImageConfig.skip_padded=False``). Skipped sub-images are never copied out. Each image's
   views are written straight into its slot of one ``[V, 3, v, v]`` output.

Speed on CPU (``tools/bench_data.py``; 2 cores, test photos at 448, cubic): ~6.5 ms of CPU per
image against ~12 ms for :func:`reference_views`, of which DALI (decode ~1.4, resize ~3.5, pad
~0.3) is ~5.2 ms. What it took: DALI's output is read in place (no copy); the global view is
filtered one image at a time (in cache; the batch at once was ~3x slower) and only where the
image reaches (the rest is the pad colour); its column pass reads the columns split by phase
(contiguous, ~3x faster than stride-``grid`` taps); and no memory is new per call: DALI's
legacy executor (``exec_dynamic=False``) reuses its buffers, and the output reuses an earlier
output's memory once nothing references it (page faults on ~50 MB of fresh memory per call
cost as much as the global view). Each call first probes every image's header
(:func:`probe_image`: ~6 us for a JPEG, whose header is read directly, ~40 us through Pillow
for other files) and plans its views by arithmetic, ~11 us per image in all.

A stream of batches can overlap them: :meth:`ImageProcessor.map` decodes the next batches in a
helper thread while the caller's thread cuts this batch's views (DALI releases the GIL while it
runs); one call at a time, DALI waits while the views are cut.

:func:`reference_views` is the same transform in Pillow + numpy; DALI matches it within 2/255
(``tests/test_images.py``; measured: at most 1/255 on every test photo and hard file, 0.58/255
with the resize in float). What makes
the two agree: both use the Catmull-Rom cubic (a = -0.5) scaled for antialiasing; image borders
are edge-clamped (DALI's behaviour; the reference pads the edges before Pillow's resize); and the
reference resamples in float (Pillow's uint8 bicubic clamps between its two passes, up to 9/255
off).

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
every use is counted in :attr:`ImageProcessor.stats` by reason. When a DALI run fails (DALI fails a
whole batch for one bad image), the batch is split in halves and retried until the bad image is
alone; that one goes to the Pillow path, and only if Pillow fails too is it reported as failed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_sphinx.config import CLIP_MEAN
from megatron_sphinx.data.geometry import ImageGeometry, image_geometry
from megatron_sphinx.data.image_header import MAX_PIXELS, exif_orientation, jpeg_header
from megatron_sphinx.data.resample import (_downsample_padded, _replicate_edges,  # noqa: F401
                                           downsample_weights, global_view)

logger = logging.getLogger(__name__)

#: Pillow format names DALI's decoder reads (others go to the Pillow path).
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_device_logged = False
_device_lock = threading.Lock()
# Storage reference count (private torch API; None: outputs are never reused) and its value for
# a tensor nothing else references, measured the same way.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


_probe = torch.empty(1)
_UNSHARED = _use_count(_probe) if _storage_use_count is not None else None
del _probe


#: Earlier outputs whose memory an ImageProcessor keeps for reuse (per processor).
_KEEP_OUTPUTS = 2


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
    interp: Literal["cubic", "linear"] = "cubic"
    """Antialiased resampling kernel: ``cubic`` (Catmull-Rom, as CLIP preprocessing) or
    ``linear`` (triangle; DALI's CPU resize costs ~1/3 of cubic's)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes: ``auto`` = ``gpu`` (``mixed``) when CUDA is available, else ``cpu``."""
    device_id: int | None = None
    """CUDA device of the ``mixed`` decoder and the views; None: the constructing thread's current
    device (pass it explicitly when the processor is built in a worker thread)."""
    num_threads: int = 2
    """DALI CPU worker threads."""
    max_batch_size: int = 32
    """Images per DALI run (larger requests are split)."""
    skip_padded: bool = True
    """Leave out fully padded sub-images (SPHINX-X); False emits all ``1 + grid**2`` views."""
    fancy_upsampling: bool = True
    """GPU JPEG decoding upsamples chroma as libjpeg-turbo does (DALI's
    ``jpeg_fancy_upsampling``), so that the GPU's views match the CPU pipeline's; False lets
    nvJPEG use its own (and its hardware decoder where it has one)."""
    float_resize: bool | None = None
    """Keep the resized pixels float (clamped to [0, 255]) instead of rounding them to uint8
    before the views; None: on the GPU (where it costs little) but not on the CPU (where it cost
    ~37% of the pipeline's images/s, 2 cores, cubic)."""
    hw_decoder_load: float = 0.65
    """Share of the JPEGs that GPU decoding sends to the GPU's hardware JPEG decoder where it has
    one (A100, H100), the rest to nvJPEG's CUDA decoder with its Huffman stage on the CPU
    (DALI's ``hw_decoder_load``; 0.65 is DALI's default)."""

    def __post_init__(self) -> None:
        if self.image_size % self.grid:
            raise ValueError(f"image_size {self.image_size} is not divisible by grid {self.grid}: "
                             "change one of them")
        if self.interp not in ("cubic", "linear"):
            raise ValueError(f"interp must be cubic or linear, got {self.interp!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device must be auto, cpu or gpu, got {self.device!r}")
        if self.num_threads < 1 or self.max_batch_size < 1:
            raise ValueError("num_threads and max_batch_size must be >= 1")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
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
class ImageProbe:
    """What an image's header says: format, mode, ``(h, w)`` after EXIF orientation, and why it
    goes to the Pillow path (None: DALI decodes it)."""

    fmt: str
    mode: str
    hw: tuple[int, int]
    pillow_reason: str | None


def resolve_device(device: str = "auto") -> str:
    """``cpu`` or ``gpu`` for ``device`` (``auto``: ``gpu`` iff CUDA is available); logs once."""
    global _device_logged
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    elif device == "gpu" and not torch.cuda.is_available():
        raise ValueError("image device 'gpu' needs CUDA, which is not available here: use "
                         "device='auto' or 'cpu'")
    with _device_lock:
        if not _device_logged:
            _device_logged = True
            logger.info("DALI image decoding on %s (decoders.image device=%s)", device,
                        "mixed" if device == "gpu" else "cpu")
    return device


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or "transparency" in im.info


def probe_image(data: bytes) -> ImageProbe:
    """Format, mode and oriented size from the header, and whether DALI should decode it.

    A plain JPEG's header is read directly (:func:`~.image_header.jpeg_header`, a few
    microseconds), anything else by opening it with Pillow (~40 us), with the same answer.

    Raises:
        ImageDecodeError: If the bytes are not an image Pillow recognises, or it is empty or
            larger than :data:`~.image_header.MAX_PIXELS`.
    """
    head = jpeg_header(data)
    if head is not None:
        fmt, mode, orient, reason = "JPEG", head.mode, head.orientation, None
        h, w = head.height, head.width
    else:
        fmt, mode, (h, w), orient, reason = _probe_with_pillow(data)
    if w < 1 or h < 1:
        raise ImageDecodeError(f"empty image {w}x{h}")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(f"image too large: {w}x{h} pixels, more than {MAX_PIXELS:,}")
    if orient in (5, 6, 7, 8):
        h, w = w, h
    return ImageProbe(fmt, mode, (h, w), reason)


def _probe_with_pillow(data: bytes) -> tuple[str, str, tuple[int, int], int, str | None]:
    """``(format, mode, (h, w) as stored, EXIF orientation, Pillow-path reason)`` from Pillow."""
    try:
        fp = io.BytesIO(data)
        with Image.open(fp) as im:
            w, h = im.size
            orient = exif_orientation(im, fp)
            fmt, mode = im.format or "?", im.mode
            reason = None
            if _has_alpha(im):
                reason = "alpha"
            elif fmt not in DALI_FORMATS:
                reason = f"format {fmt}"
    except UnidentifiedImageError as e:  # its text names the BytesIO object: say it plainly
        raise ImageDecodeError("not a readable image: no image format recognised") from e
    except Image.DecompressionBombError as e:  # above Pillow's own limit (~179M pixels)
        raise ImageDecodeError(f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"not a readable image: {e}") from e
    return fmt, mode, (h, w), orient, reason


# ----------------------------------------------------------------------------- Pillow reference

def decode_rgb(data: bytes, alpha_background: tuple[int, int, int] = (255, 255, 255)
               ) -> np.ndarray:
    """Decodes to uint8 ``[h, w, 3]`` RGB with Pillow (EXIF applied, alpha composited, 16 bit
    scaled).

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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"Pillow cannot decode the image: {e}") from e


_PIL_FILTER = {"cubic": Image.BICUBIC, "linear": Image.BILINEAR}


def _resize_plane(plane: np.ndarray, out_hw: tuple[int, int], interp: str = "cubic"
                  ) -> np.ndarray:
    """Antialiased resize of a float32 ``[h, w]`` plane with edge-clamped borders."""
    h, w = plane.shape
    oh, ow = out_hw
    factor = max(h / oh, w / ow, 1.0)
    k = int(math.ceil(2.0 * factor)) + 2  # kernel support (<= 2 taps) scaled by the downsampling
    padded = np.pad(plane, k, mode="edge")
    im = Image.fromarray(np.ascontiguousarray(padded, dtype=np.float32), "F")
    return np.asarray(im.resize((ow, oh), _PIL_FILTER[interp], box=(k, k, k + w, k + h)))


def reference_square(rgb: np.ndarray, image_size: int = 448, grid: int = 2,
                     pad_color: Sequence[float] = CLIP_MEAN, interp: str = "cubic") -> np.ndarray:
    """The padded square, float32 ``[S, S, 3]`` in [0, 1], image top-left (Pillow reference)."""
    h, w = rgb.shape[:2]
    geo = image_geometry(h, w, image_size, grid)
    rh, rw = geo.resized_height, geo.resized_width
    resized = np.stack([_resize_plane(rgb[..., c].astype(np.float32), (rh, rw), interp)
                        for c in range(3)], axis=-1)  # [rh, rw, 3]
    resized = np.clip(np.round(resized), 0, 255)
    square = np.empty((image_size, image_size, 3), dtype=np.float32)
    square[:] = np.asarray(pad_color, dtype=np.float32)
    square[:rh, :rw] = resized / 255.0
    return square


def reference_views(data: bytes, image_size: int = 448, grid: int = 2,
                    pad_color: Sequence[float] = CLIP_MEAN,
                    alpha_background: tuple[int, int, int] = (255, 255, 255),
                    interp: str = "cubic", skip_padded: bool = True
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """The whole transform in Pillow + numpy: the reference DALI is tested against.

    Args:
        data: Encoded image bytes.
        image_size: Side of the padded square.
        grid: Sub-images per side.
        pad_color: Padding colour in [0, 1].
        alpha_background: Colour transparent images are composited over.
        interp: ``cubic`` or ``linear`` antialiased resampling.
        skip_padded: Leave out fully padded sub-images (False: every sub-image).

    Returns:
        ``(views, (height, width))``: float32 ``[n_valid, 3, v, v]`` views (global first, then
        valid sub-images row-major) and the oriented image size.

    Raises:
        ImageDecodeError: If the image cannot be decoded.
    """
    rgb = decode_rgb(data, alpha_background)
    h, w = rgb.shape[:2]
    square = reference_square(rgb, image_size, grid, pad_color, interp)
    v = image_size // grid
    glob = np.stack([_resize_plane(square[..., c], (v, v), interp) for c in range(3)], axis=0)
    views = [np.clip(glob, 0.0, 1.0)]
    valid = image_geometry(h, w, image_size, grid, skip_padded).view_valid()
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
        self._gpu_index = None
        if self.device == "gpu":
            self._gpu_index = (self.cfg.device_id if self.cfg.device_id is not None
                               else torch.cuda.current_device())
        self.stats: Counter = Counter()
        self._pipe = None
        self._built = False  # a pipeline was built once (see _pipeline)
        self._batched: bool | None = None  # None: by device (see batched_views)
        self._ws: dict[str, torch.Tensor] = {}
        self._outs: list[torch.Tensor] = []  # earlier outputs' memory, see _output
        w, self._left = downsample_weights(self.cfg.grid, self.cfg.interp)
        self._big = self.cfg.image_size + len(w) - self.cfg.grid
        self._pad = torch.tensor(self.cfg.pad_color, dtype=torch.float32,
                                 device=self._dev).view(3, 1, 1)

    @property
    def batched_views(self) -> bool:
        """Whether the views are cut batch-wise (:meth:`_views_batched`: the GPU, where launches
        cost) or image by image (the CPU, where one image's data stays in cache)."""
        return self._batched if self._batched is not None else self.device == "gpu"

    @batched_views.setter
    def batched_views(self, value: bool | None) -> None:
        self._batched = value

    @property
    def _dev(self) -> torch.device:
        if self.device == "gpu":
            return torch.device("cuda", self._gpu_index)
        return torch.device("cpu")

    def _buf(self, name: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        """A reused buffer (fresh CPU allocations of this size page-fault on every call)."""
        numel = int(np.prod(shape))
        b = self._ws.get(name)
        if b is None or b.numel() < numel or b.dtype != dtype:
            b = self._ws[name] = torch.empty(numel, dtype=dtype, device=self._dev)
        return b[:numel].view(shape)

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 output tensor of ``shape`` for :class:`ImageBatch` ``views``.

        On the CPU it reuses the memory of an earlier output once nothing references it any more
        (no tensor, view or array of it is alive): a fresh ~50 MB tensor is backed by new pages
        each time, and faulting them in cost ~1 ms per image, as much as the global view. The
        processor keeps up to ``_KEEP_OUTPUTS`` such buffers (~1.25x one output each).
        """
        numel = int(np.prod(shape))
        if self.device == "gpu" or _storage_use_count is None:
            return torch.empty(shape, device=self._dev)
        for b in self._outs:
            if b.numel() >= numel and _use_count(b) == _UNSHARED:
                return b[:numel].view(shape)
        b = torch.empty(numel * 5 // 4 + 1)  # some room: the view counts vary per call
        self._outs = (self._outs + [b])[-_KEEP_OUTPUTS:]
        return b[:numel].view(shape)

    # The pipeline is built lazily: importing DALI costs ~1 s and text-only runs never need it.
    def _build(self):
        pipe = self._define()
        pipe.build()
        return pipe

    def _define(self):
        """The DALI pipeline for this processor's device, defined but not built (defining needs
        no GPU: DALI checks the graph, e.g. for GPU-to-CPU transitions, already here)."""
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        cfg, s = self.cfg, self.cfg.image_size
        gpu = self.device == "gpu"

        # exec_dynamic=False: the legacy executor reuses its output buffers (the dynamic one
        # allocates, and page-faults, ~2.5 MB per image each run); the squares are read in place
        # and used up before the next run.
        @pipeline_def(batch_size=cfg.max_batch_size, num_threads=cfg.num_threads,
                      device_id=self._gpu_index if gpu else None,
                      prefetch_queue_depth=1, exec_dynamic=False)
        def views_pipeline():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            size = fn.external_source(name="size", dtype=types.FLOAT)  # [2] (rh, rw)
            mixed = {"jpeg_fancy_upsampling": cfg.fancy_upsampling,
                     "hw_decoder_load": cfg.hw_decoder_load} if gpu else {}
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    **mixed)  # [h, w, 3] uint8, EXIF applied
            interp = types.INTERP_CUBIC if cfg.interp == "cubic" else types.INTERP_LINEAR
            float_resize = gpu if cfg.float_resize is None else cfg.float_resize
            resized = fn.resize(img, size=size, interp_type=interp, antialias=True,
                                dtype=types.FLOAT if float_resize else types.UINT8)
            if float_resize:  # the cubic's overshoot, clipped as the uint8 output clips it
                resized = dmath.clamp(resized, 0.0, 255.0)  # [rh, rw, 3] float, else uint8
            # The padded square in one op: the image top-left, float in [0, 1] (x / 255), CHW,
            # padded with the exact pad colour (fill_values are output values). mean/std are
            # per-channel lists on purpose: DALI 2.4 with a scalar mean/std and per-channel
            # fill_values zeroes channels 1 and 2 of the image region.
            square = fn.crop_mirror_normalize(
                resized, crop=(s, s), crop_pos_x=0.0, crop_pos_y=0.0, out_of_bounds_policy="pad",
                fill_values=[float(c) for c in cfg.pad_color], mean=[0.0] * 3,
                std=[255.0] * 3, dtype=types.FLOAT, output_layout="CHW")  # [3, S, S] float32
            # The decoded shape stays on the decoder's device: the legacy executor forbids a
            # GPU-to-CPU transition inside the pipeline (a CPU shape of the mixed decoder's
            # output made the GPU pipeline fail to build); _run_dali copies it out.
            return square, img.shape(device="gpu" if gpu else "cpu")

        return views_pipeline()

    def _pipeline(self):
        """The DALI pipeline, built on first use.

        A GPU (``mixed``) pipeline that does not build the first time, with the device chosen
        automatically, gives way to the CPU pipeline with a warning (and
        ``stats["dali_gpu_unavailable"]``): the views then come back on the CPU.

        Raises:
            RuntimeError: If the pipeline of a device chosen explicitly does not build, or a
                rebuild (after a failed run) fails.
        """
        if self._pipe is not None:
            return self._pipe
        try:
            self._pipe = self._build()
        except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError, imports others
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if self.device != "gpu" or self.cfg.device != "auto" or self._built:
                hint = " (or set the image device to 'cpu')" if self.device == "gpu" else ""
                raise RuntimeError(f"DALI could not build its {self.device} image pipeline: "
                                   f"{reason}; check the DALI install{hint}") from exc
            logger.warning("DALI could not build its GPU (mixed) image pipeline: %s; decoding "
                           "on the CPU instead", reason)
            self.stats["dali_gpu_unavailable"] += 1
            self.device, self._gpu_index, self._ws = "cpu", None, {}
            self._pad = self._pad.cpu()
            self._pipe = self._build()
        self._built = True  # later rebuilds keep the device (outputs stay where they were)
        return self._pipe

    def _run_dali(self, datas: list[bytes], geos: list[ImageGeometry]):
        """One DALI run, each image resized to its geometry's resized size.

        Returns:
            ``(square, decoded)``: ``[n, 3, S, S]`` float32 padded squares (on the CPU a
            zero-copy view of DALI's output, valid until the next run; on the GPU a copy in a
            new tensor, which the caching allocator recycles) and the decoded ``(h, w)``.
        """
        pipe = self._pipeline()
        s = self.cfg.image_size
        sizes = np.array([(g.resized_height, g.resized_width) for g in geos], dtype=np.float32)
        pipe.feed_input("enc", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        pipe.feed_input("size", sizes)  # [n, 2]: the batch's samples along the first axis
        try:
            out, shapes = pipe.run()
        except Exception:
            self._pipe = None  # rebuilt on the next call, whatever state DALI is left in
            raise
        n = len(datas)
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            stream = torch.cuda.current_stream()
            square = feed_ndarray(out.as_tensor(), torch.empty((n, 3, s, s), device=self._dev),
                                  stream)  # queued on the stream that cuts the views
            # DALI's next run writes into the same output buffers: the copy must be done by
            # then (map() starts that run while the views are being cut)
            copied = torch.cuda.Event()
            copied.record(stream)
            copied.synchronize()
            shapes = shapes.as_cpu()  # [n] x [3], read on the host just below
        else:
            square = torch.from_numpy(np.array(out.as_tensor(), copy=False))  # [n, 3, S, S]
        decoded = [(h, w) for h, w, _ in shapes.as_array().tolist()]  # [n, 3]: (h, w, c)
        return square, decoded

    def _global_view(self, square: torch.Tensor, rh: int, rw: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Global view of one ``[3, S, S]`` square (image ``rh x rw`` top-left) into ``out``
        ``[3, v, v]`` (default: a reused buffer); equal to :func:`global_view` of that square.

        One image at a time, so the edge-padded square and the row pass stay in cache (a whole
        batch at once runs ~3x slower on CPU); and only the outputs that the image reaches are
        filtered: the others read pad pixels only and are the pad colour.
        """
        cfg, s, left, g, v = self.cfg, self.cfg.image_size, self._left, self.cfg.grid, \
            self.cfg.view_size
        taps = self._big - s + g  # filter length
        nr = min(v, -(-(rh + left) // g))  # output rows/cols touching the image
        nc = min(v, -(-(rw + left) // g))
        padded = self._buf("padded", (1, 3, self._big, self._big))  # edge-padded square
        er, ec = min(s, nr * g + taps - g - left), min(s, nc * g + taps - g - left)
        padded[0, :, left:left + er, left:left + ec] = square[:, :er, :ec]
        _replicate_edges(padded, left, s)  # rows/cols past er/ec hold stale data, never read
        out = (self._buf("glob", (3, v, v)) if out is None else out).unsqueeze(0)
        if nr < v:
            out[0, :, nr:, :] = self._pad
        if nc < v:
            out[0, :, :nr, nc:] = self._pad
        big_r, big_c = nr * g + taps - g, nc * g + taps - g
        wph = -(-big_c // g)
        bufs = (self._buf("rows", (1, 3, nr, wph * g)), self._buf("phases", (g, 1, 3, nr, wph)))
        _downsample_padded(padded[..., :big_r, :big_c], g, (nr, nc), cfg.interp, bufs,
                           out[..., :nr, :nc])
        return out[0]

    def __call__(self, images: Sequence[bytes]) -> ImageBatch:
        """Views of a batch of encoded images; per-image failures are reported, not raised.

        Args:
            images: Encoded image files.

        Returns:
            The views in input order (see :class:`ImageBatch`).
        """
        with self._device_scope():
            call = self._start(images)
            for dec in self._decode(call, keep=False):
                self._cut(call, dec)
            return self._finish(call)

    def map(self, batches: Iterable[Sequence[bytes]], ahead: int = 1) -> Iterator[ImageBatch]:
        """The views of each batch in turn, as :meth:`__call__` gives them, with the decoding of
        up to ``ahead`` next batches overlapped with this one's views.

        A helper thread reads ``batches`` and runs DALI (header probes, decoding, resize, pad;
        DALI releases the GIL while it runs) while the calling thread cuts the views of the
        batch before: one pipeline's host and GPU stages then overlap across batches, which
        :meth:`__call__`, a batch at a time, never does. The decoded squares are kept until cut
        (``ahead + 2`` batches of ``[n, 3, S, S]`` float32 at most; on the CPU copied out of
        DALI's buffers, which the next run reuses). ``ahead=0`` is :meth:`__call__` in a loop.
        The processor is busy until the iterator ends or is closed: no other call in between.

        Args:
            batches: Batches of encoded image files (read by the helper thread).
            ahead: Decoded batches waiting to be cut, at most.

        Yields:
            One :class:`ImageBatch` per batch, in order. An exception raised while reading or
            decoding a batch is raised here, after the batches before it.
        """
        if ahead < 0:
            raise ValueError(f"ahead must be >= 0, got {ahead}")
        if ahead == 0:
            yield from (self(images) for images in batches)
            return
        done = queue.Queue(maxsize=ahead)
        stop = threading.Event()

        def put(item) -> bool:  # False once the consumer has gone
            while not stop.is_set():
                try:
                    done.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        # the squares are copied on the consumer's stream, which then cuts them
        stream = (torch.cuda.current_stream(self._gpu_index)
                  if self.device == "gpu" and self._gpu_index is not None else None)

        def decode_all() -> None:
            try:
                with self._device_scope(), (torch.cuda.stream(stream) if stream is not None
                                            else contextlib.nullcontext()):
                    for images in batches:
                        call = self._start(images)
                        if not put((call, list(self._decode(call, keep=True)))):
                            return
            except BaseException as exc:  # noqa: BLE001 - raised in the consumer
                put(exc)
                return
            put(None)

        helper = threading.Thread(target=decode_all, name="image-decode-ahead", daemon=True)
        helper.start()
        try:
            while (item := done.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                call, decoded = item
                with self._device_scope():
                    for dec in decoded:
                        self._cut(call, dec)
                    batch = self._finish(call)
                yield batch
        finally:  # also when the consumer stops early: the helper ends at its next batch
            stop.set()
            helper.join()

    def _device_scope(self):
        """The processor's CUDA device as the current one (a no-op on the CPU)."""
        if self.device == "gpu" and self._gpu_index is not None:
            return torch.cuda.device(self._gpu_index)
        return contextlib.nullcontext()

    # A call in three stages: _start (header probes; the Pillow path for what DALI cannot read),
    # _decode (DALI), _cut (the views). map() runs _start and _decode in a helper thread: they
    # touch only the call, the pipeline and the stats keys other than "dali" and "failed".
    def _start(self, images: Sequence[bytes]) -> "_Call":
        call = _Call(self, [bytes(x) for x in images])
        for i, p in call.probes.items():
            if p.pillow_reason is not None:
                call.fallback(i, p.pillow_reason)
        return call

    def _decode(self, call: "_Call", keep: bool) -> Iterator["_Decoded"]:
        """DALI's runs of the call's images, ``max_batch_size`` at a time; ``keep``: the squares
        outlive the next run (copied out of DALI's buffers on the CPU)."""
        idx = [i for i, p in call.probes.items() if p.pillow_reason is None]
        if idx:
            self._pipeline()  # a pipeline that cannot build is no image's fault: not per image
        for a in range(0, len(idx), self.cfg.max_batch_size):
            yield from self._decode_chunk(call, idx[a:a + self.cfg.max_batch_size], keep)

    def _finish(self, call: "_Call") -> ImageBatch:
        self.stats["failed"] += sum(e is not None for e in call.errors)
        return call.result()

    def _decode_chunk(self, call: "_Call", chunk: list[int], keep: bool) -> Iterator["_Decoded"]:
        hws = [call.probes[i].hw for i in chunk]
        try:
            square, decoded = self._run_dali([call.datas[i] for i in chunk],
                                             [call.geos[i] for i in chunk])
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for any bad sample
            if len(chunk) > 1:  # find the bad image(s) by bisection
                half = len(chunk) // 2
                self.stats["dali_retry"] += 1
                yield from self._decode_chunk(call, chunk[:half], keep)
                yield from self._decode_chunk(call, chunk[half:], keep)
                return
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not self.stats["dali_error"]:  # once per processor: a broken decoder shows
                logger.warning("DALI (%s) failed on an image: %s; such images take the Pillow "
                               "path (counted in stats)", self.device, reason)
            self.stats["dali_error"] += 1
            call.fallback(chunk[0], "dali_error")
            return
        good = []
        for k, i in enumerate(chunk):
            if decoded[k] != hws[k]:
                # DALI oriented the image differently from the header: trust the reference.
                call.fallback(i, "orientation")
            else:
                good.append(k)
        if keep and self.device == "cpu":
            square = square.clone()
        yield _Decoded(chunk, hws, square, good)

    def _cut(self, call: "_Call", dec: "_Decoded") -> None:
        """Writes the views of one DALI run's good images into their slots."""
        chunk, hws, square, good = dec
        if self.batched_views:
            self._views_batched(call, chunk, hws, square, good)
            return
        cfg, v = self.cfg, self.cfg.view_size
        for k in good:
            i = chunk[k]
            geo = call.geos[i]
            # The views go straight into this image's slot of the output (planned from the same
            # header size, so the count always matches here).
            slot = call.slot(i)  # [n_valid, 3, v, v]
            self._global_view(square[k], geo.resized_height, geo.resized_width, slot[0])
            for n, t in enumerate(geo.encoded_tiles(), start=1):
                r, c = divmod(t, cfg.grid)
                slot[n].copy_(square[k, :, r * v:(r + 1) * v, c * v:(c + 1) * v])
            call.done(i, hws[k], "dali")
            self.stats["dali"] += 1

    def _views_batched(self, call: "_Call", chunk: list[int], hws: list[tuple[int, int]],
                       square: torch.Tensor, good: list[int]) -> None:
        """The views of the chunk's images ``good`` in a few whole-batch ops: every global view
        at once (:func:`global_view`, the same values as :meth:`_global_view`), then one gather
        of the valid sub-images into their slots. The GPU path: per image, the ~20 small ops of
        the global view cost more host time than the GPU spends on them."""
        if not good:
            return
        cfg, g, v = self.cfg, self.cfg.grid, self.cfg.view_size
        src, dst, glob_dst = [], [], []
        for j, k in enumerate(good):
            i = chunk[k]
            tiles = call.geos[i].encoded_tiles()
            a = int(call.offsets[i])
            glob_dst.append(a)
            src += [j * g * g + t for t in tiles]
            dst += range(a + 1, a + 1 + len(tiles))
            call.done(i, hws[k], "dali")
        picked = square[torch.tensor(good, device=square.device)] if len(good) < len(square) \
            else square
        dev = call.out.device
        call.out[torch.tensor(glob_dst, device=dev)] = global_view(picked, g, cfg.interp)
        if src:
            m = len(good)  # [m, 3, g*v, g*v] -> [m * g * g, 3, v, v], row-major tiles
            tiles = picked.view(m, 3, g, v, g, v).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, v, v)
            call.out[torch.tensor(dst, device=dev)] = tiles[torch.tensor(src, device=dev)]
        self.stats["dali"] += len(good)


class _Decoded(NamedTuple):
    """One DALI run's output: images ``chunk`` (indices into the call), their header sizes,
    their padded squares ``[len(chunk), 3, S, S]`` and the positions in ``chunk`` that decoded as
    the header said (the others took the Pillow path)."""

    chunk: list[int]
    hws: list[tuple[int, int]]
    square: torch.Tensor
    good: list[int]


class _Call:
    """One :meth:`ImageProcessor.__call__`: writes each image's views straight into its slot of
    one output tensor, planned from the header geometry."""

    def __init__(self, proc: ImageProcessor, datas: list[bytes]):
        self.proc, self.datas = proc, datas
        n, cfg = len(datas), proc.cfg
        self.errors: list[str | None] = [None] * n
        self.sizes: list[tuple[int, int] | None] = [None] * n
        self.paths = ["failed"] * n
        self.probes: dict[int, ImageProbe] = {}
        #: Each probed image's geometry (header size), for its DALI resize and its views.
        self.geos: dict[int, ImageGeometry] = {}
        planned = [0] * n
        for i, d in enumerate(datas):
            try:
                self.probes[i] = p = probe_image(d)
            except ImageDecodeError as e:
                self.errors[i] = str(e)
                continue
            self.geos[i] = geo = image_geometry(*p.hw, cfg.image_size, cfg.grid,
                                                cfg.skip_padded)
            planned[i] = geo.num_encoded()
        self.planned = planned
        self.offsets = np.concatenate([[0], np.cumsum(planned)]).astype(int)
        v = cfg.view_size
        self.out = proc._output((int(self.offsets[-1]), 3, v, v))  # [V, 3, v, v]
        self.extra: dict[int, torch.Tensor] = {}

    def slot(self, i: int) -> torch.Tensor:
        """Image ``i``'s planned ``[planned[i], 3, v, v]`` part of the output."""
        return self.out[int(self.offsets[i]):int(self.offsets[i + 1])]

    def done(self, i: int, hw: tuple[int, int], path: str) -> None:
        """Marks image ``i`` as written into its :meth:`slot`."""
        self.sizes[i], self.paths[i] = hw, path

    def put(self, i: int, views: Sequence[torch.Tensor], hw: tuple[int, int], path: str) -> None:
        if len(views) == self.planned[i]:
            a = int(self.offsets[i])
            for k, t in enumerate(views):
                self.out[a + k].copy_(t)
        else:  # the decoded size differs from the header's: keep apart, rebuilt in result()
            self.extra[i] = torch.stack([t.to(self.out.device) for t in views])
        self.sizes[i], self.paths[i] = hw, path

    def fallback(self, i: int, reason: str) -> None:
        c = self.proc.cfg
        try:
            views, hw = reference_views(self.datas[i], c.image_size, c.grid, c.pad_color,
                                        c.alpha_background, c.interp, c.skip_padded)
        except ImageDecodeError as e:
            self.errors[i] = ("DALI and " if reason == "dali_error" else "") + str(e)
            return
        self.proc.stats[f"pillow:{reason}"] += 1
        self.put(i, list(torch.from_numpy(views)), hw, f"pillow:{reason}")

    def result(self) -> ImageBatch:
        ok = [e is None for e in self.errors]
        counts = []
        for i in range(len(ok)):
            counts.append(0 if not ok[i] else (len(self.extra[i]) if i in self.extra
                                               else self.planned[i]))
        if all(ok) and not self.extra:
            views = self.out
        else:  # rare: drop failed slots, splice re-planned images
            parts = []
            for i in range(len(ok)):
                if i in self.extra:
                    parts.append(self.extra[i])
                elif ok[i]:
                    parts.append(self.out[int(self.offsets[i]):int(self.offsets[i + 1])])
            v = self.proc.cfg.view_size
            views = torch.cat(parts) if parts else self.out.new_zeros(0, 3, v, v)
        return ImageBatch(views, torch.tensor(counts, dtype=torch.int64), self.sizes,
                          self.errors, self.paths)
