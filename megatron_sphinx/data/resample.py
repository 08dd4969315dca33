"""The global view's exact downsample: Pillow's separable resampling kernels in torch.

The global view is the padded square shrunk by ``grid`` (448 -> 224, 672 -> 224) with the same
kernel Pillow applies (Keys cubic or linear, support scaled by the factor, edges clamped), so the
DALI pipeline and the Pillow reference of :mod:`megatron_sphinx.data.images` agree within
rounding. Split out of ``images.py``, which uses these functions.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (Catmull-Rom for a = -0.5), as Pillow and DALI use."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def downsample_weights(factor: int, interp: str = "cubic") -> tuple[np.ndarray, int]:
    """Taps of an antialiased downsampling by an integer ``factor`` (Pillow's weights; ``cubic``
    or ``linear`` kernel).

    Output pixel ``i`` is ``sum_k w[k] * x[i * factor + k - left]`` with edge-clamped borders.

    Returns:
        ``(w, left)``: float64 weights (summing to 1) and the left offset.
    """
    k = np.arange(-2 * factor, 3 * factor)
    d = (k + 0.5) - factor / 2.0  # distance of input pixel centre to the output centre
    w = _cubic(d / factor) if interp == "cubic" else np.maximum(0.0, 1.0 - np.abs(d / factor))
    keep = np.flatnonzero(w != 0)
    w, k = w[keep[0]:keep[-1] + 1], k[keep[0]:keep[-1] + 1]
    return w / w.sum(), int(-k[0])


@functools.lru_cache(maxsize=None)
def _taps(factor: int, interp: str) -> tuple[float, ...]:
    """:func:`downsample_weights` as a tuple of floats (cached: it runs once per image)."""
    return tuple(float(x) for x in downsample_weights(factor, interp)[0])


def _replicate_edges(padded: torch.Tensor, left: int, size: int) -> None:
    """Fills the border of ``padded`` ``[..., P, P]`` around its ``size`` interior (at ``left``)
    with the nearest interior pixel, in place."""
    a, b = left, left + size
    padded[..., a:b, :a] = padded[..., a:b, a:a + 1]
    padded[..., a:b, b:] = padded[..., a:b, b - 1:b]
    padded[..., :a, :] = padded[..., a:a + 1, :]
    padded[..., b:, :] = padded[..., b - 1:b, :]


def _separable(x: torch.Tensor, w: Sequence[float], grid: int, v: int, dim: int,
               out: torch.Tensor) -> torch.Tensor:
    """``out = sum_k w[k] * x[..., k::grid][:v]`` along ``dim`` (-1 or -2), without temporaries."""
    def tap(k):
        return x[..., k:k + grid * v:grid] if dim == -1 else x[..., k:k + grid * v:grid, :]
    torch.mul(tap(0), float(w[0]), out=out)
    for k in range(1, len(w)):
        out.add_(tap(k), alpha=float(w[k]))
    return out


def global_view(square: torch.Tensor, grid: int, interp: str = "cubic") -> torch.Tensor:
    """The global view: ``[n, 3, S, S]`` squares downsampled by ``grid`` to ``[n, 3, v, v]``.

    Separable filter with :func:`downsample_weights` (exactly Pillow's antialiased kernel at an
    integer factor, edges clamped), as strided multiply-adds (much faster on CPU than a depthwise
    convolution), clamped to [0, 1]; runs on the squares' device.
    """
    w, left = downsample_weights(grid, interp)
    n, c, s, _ = square.shape
    big = s + len(w) - grid
    padded = square.new_empty(n, c, big, big)
    padded[..., left:left + s, left:left + s] = square
    _replicate_edges(padded, left, s)
    return _downsample_padded(padded, grid, s // grid, interp)


def _downsample_padded(padded: torch.Tensor, grid: int, v: int | tuple[int, int],
                       interp: str = "cubic", bufs: tuple[torch.Tensor, ...] | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Filters edge-padded ``[n, c, P, P']`` into ``[n, c, vr, vc]`` (``v`` = ``vr = vc`` or
    ``(vr, vc)``), clamped to [0, 1].

    ``bufs``: optional ``([n, c, vr, W * grid], [grid, n, c, vr, W])`` work buffers with
    ``W = ceil(P' / grid)``; ``out``: optional output.
    """
    w = _taps(grid, interp)
    vr, vc = (v, v) if isinstance(v, int) else v
    n, c, _, big_c = padded.shape
    wph = -(-big_c // grid)  # columns per phase
    if bufs is None:
        bufs = (padded.new_empty(n, c, vr, wph * grid), padded.new_empty(grid, n, c, vr, wph))
    rows, phases = bufs
    out = padded.new_empty(n, c, vr, vc) if out is None else out
    # Rows first: its taps read whole contiguous rows, and it halves the data for the columns.
    _separable(padded, w, grid, vr, -2, rows[..., :big_c])  # [n, 3, vr, P']
    # Columns: a stride-`grid` read along the contiguous axis does not vectorise; split the
    # columns by phase once (column j*grid + q -> phases[q, ..., j]) so every tap is a
    # contiguous slice (~3x faster than strided taps, the split included). Columns past P'
    # (uninitialised) are never read by a tap.
    phases.copy_(rows.unflatten(-1, (wph, grid)).movedim(-1, 0))  # [g, n, 3, vr, W]
    torch.mul(phases[0][..., :vc], float(w[0]), out=out)
    for k in range(1, len(w)):
        q, j = k % grid, k // grid
        out.add_(phases[q][..., j:j + vc], alpha=float(w[k]))  # [n, 3, vr, vc]
    return out.clamp_(0.0, 1.0)
