"""High-resolution image geometry: resize, pad-to-square, sub-image grid and skip decisions.

SPHINX-X resizes an image so that its longer side equals ``image_size`` (448, or 672 for -2K),
places it at the top-left of an ``image_size`` square and pads the rest, then cuts the square into
a ``grid x grid`` array of ``view_size`` sub-images plus one global view (the whole square,
downsampled to ``view_size``). A sub-image whose area lies entirely in the padding is *skipped*:
it is not encoded and one learned skip embedding takes its place in the LLM sequence.

Whether a sub-image is skipped is decided here, from the resize geometry alone, never from pixel
values (after normalisation the pad colour is not exactly zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Tokens an encoded view contributes: 256 patch tokens + 1 "cls" token.
TOKENS_PER_VIEW = 257
#: LLM positions taken by an encoded view: start_img + 257 visual tokens + end_img.
POSITIONS_PER_VIEW = TOKENS_PER_VIEW + 2
#: LLM positions taken by a skipped sub-image: one skip embedding.
POSITIONS_PER_SKIP = 1


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image of ``(height, width)`` lands in the padded square, and which views exist.

    Attributes:
        height: Original image height in pixels.
        width: Original image width in pixels.
        image_size: Side of the padded square (448 or 672).
        grid: Sub-images per side (2 or 3); ``image_size == grid * view_size``.
        resized_height: Image height after the aspect-preserving resize (>= 1).
        resized_width: Image width after the aspect-preserving resize (>= 1).
        skip_padded: Replace fully padded sub-images by a skip token (SPHINX-X). False encodes
            every sub-image, as the reference implementation does (for comparisons).
    """

    height: int
    width: int
    image_size: int
    grid: int
    resized_height: int
    resized_width: int
    skip_padded: bool = True

    @property
    def view_size(self) -> int:
        """Side of one view in pixels (224)."""
        return self.image_size // self.grid

    @property
    def num_views(self) -> int:
        """All views: the global view plus ``grid**2`` sub-images."""
        return 1 + self.grid * self.grid

    def view_valid(self) -> np.ndarray:
        """Bool ``[1 + grid**2]``: global view first (always valid), then sub-images row-major.

        A sub-image is valid (encoded) iff it overlaps the resized image's pixels.
        """
        rows, cols = self._encoded_grid()
        sub = np.zeros((self.grid, self.grid), dtype=bool)
        sub[:rows, :cols] = True
        return np.concatenate([[True], sub.reshape(-1)])

    def _encoded_grid(self) -> tuple[int, int]:
        """Rows and columns of sub-images that reach the resized image (all without skipping):
        the image sits top-left, so row ``r`` is encoded iff ``r * view_size < resized_height``,
        and the same for columns. The one place the skip rule is decided."""
        if not self.skip_padded:
            return self.grid, self.grid
        v = self.view_size
        return (min(self.grid, -(-self.resized_height // v)),
                min(self.grid, -(-self.resized_width // v)))

    def num_encoded(self) -> int:
        """Views encoded, ``view_valid().sum()`` by arithmetic (no arrays: the loader counts
        this for every image of every batch)."""
        rows, cols = self._encoded_grid()
        return 1 + rows * cols

    def encoded_tiles(self) -> list[int]:
        """Row-major indices of the sub-images encoded, the positions of ``view_valid()[1:]``
        that are True."""
        rows, cols = self._encoded_grid()
        return [r * self.grid + c for r in range(rows) for c in range(cols)]

    def num_skipped(self) -> int:
        """Sub-images that lie entirely in the padding."""
        return self.num_views - self.num_encoded()

    def num_positions(self) -> int:
        """LLM positions the image occupies after expansion (views, start/end, skip tokens)."""
        n_valid = self.num_encoded()
        return n_valid * POSITIONS_PER_VIEW + (self.num_views - n_valid) * POSITIONS_PER_SKIP


def image_geometry(height: int, width: int, image_size: int = 448, grid: int = 2,
                   skip_padded: bool = True) -> ImageGeometry:
    """Geometry of an ``(height, width)`` image resized (longer side to ``image_size``) and padded.

    Args:
        height: Image height in pixels (>= 1), after EXIF orientation is applied.
        width: Image width in pixels (>= 1).
        image_size: Side of the padded square.
        grid: Sub-images per side.
        skip_padded: Whether fully padded sub-images are skipped (see :class:`ImageGeometry`).

    Raises:
        ValueError: On a non-positive size or an ``image_size`` not divisible by ``grid``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not divisible by grid {grid}")
    scale = image_size / max(height, width)
    rh = min(image_size, max(1, int(round(height * scale))))
    rw = min(image_size, max(1, int(round(width * scale))))
    return ImageGeometry(height, width, image_size, grid, rh, rw, skip_padded)


def full_image_positions(image_size: int, grid: int) -> int:
    """LLM positions of one image that fills the padded square (every view encoded): the most
    any image takes, ``(1 + grid**2) * POSITIONS_PER_VIEW``."""
    return image_geometry(image_size, image_size, image_size, grid).num_positions()
