"""Fused SwiGLU of the LLM's MLP, in Triton (GPU, or CPU tensors under the interpreter).

The MLP's first linear layer writes ``y = [a, b]`` (``[n, 2f]``: the gate half, then the linear
half) and the activation is ``silu(a) * b``. Megatron's fused path without ``torch.compile``
(how the training command runs by default) runs it as separate kernels on the strided halves:
2 forward (``silu``, ``*``) and ~11 backward (two ``sigmoid``, the products, ``1 - s``, a ``cat``),
each a launch on the host and a pass over memory on the GPU. Here one kernel runs each way:

    forward   out = a s b                               with s = sigmoid(a)
    backward  da  = g b s (1 + a (1 - s))   db = g a s  (written side by side, ``[n, 2f]``)

maths in fp32 and one rounding (the unfused path rounds after every operation, so bf16 results
differ by about one unit in the last place). Rows may be strided (any ``stride(0)``); each row's
halves must be contiguous. The output and the gradient are contiguous.

Which path runs is chosen by :mod:`kernels.fused_layers` (``MEGATRON_SPHINX_SWIGLU``).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors,
which is how the tests check them on machines without a GPU.
"""
from __future__ import annotations

import torch

from kernels.triton_support import runs_here, tl, triton

__all__ = ["FusedSwiGLU", "fused_swiglu", "reference_swiglu", "supported"]

#: Columns (of one half) per program.
BLOCK = 1024


def supported(y: torch.Tensor) -> bool:
    """Whether the kernels handle ``y`` ``[n, 2f]``: two equal halves contiguous in their last
    dimension, on a GPU (or a CPU tensor under the interpreter)."""
    if triton is None or y.dim() != 2 or y.shape[-1] % 2 or y.stride(-1) != 1:
        return False
    return runs_here(y)


def reference_swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` of ``y = [a, b]`` in torch ops (what the kernels are checked against)."""
    a, b = torch.chunk(y, 2, -1)
    return torch.nn.functional.silu(a) * b


if triton is not None:
    @triton.jit
    def _swiglu_fwd_kernel(y_ptr, out_ptr, cols, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        y_row = y_ptr + row * stride_y
        a = tl.load(y_row + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(y_row + cols + c, mask=mask, other=0.0).to(tl.float32)
        out = a * tl.sigmoid(a) * b
        tl.store(out_ptr + row * cols + c, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, y_ptr, dy_ptr, cols, stride_g, stride_y,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < cols
        y_row = y_ptr + row * stride_y
        g = tl.load(g_ptr + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(y_row + c, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(y_row + cols + c, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = g * b * s * (1.0 + a * (1.0 - s))
        db = g * a * s
        dy_row = dy_ptr + row * (2 * cols)
        tl.store(dy_row + c, da.to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dy_row + cols + c, db.to(dy_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(cols, BLOCK)


class FusedSwiGLU(torch.autograd.Function):
    """``silu(a) * b`` of ``y = [a, b]`` ``[n, 2f]`` in one kernel each way; saves ``y`` (as
    Megatron's ``SwiGLUFunction`` does) and recomputes the sigmoid in the backward."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        rows, cols = y.shape[0], y.shape[1] // 2
        out = torch.empty((rows, cols), dtype=y.dtype, device=y.device)
        if rows and cols:
            _swiglu_fwd_kernel[_grid(rows, cols)](y, out, cols, y.stride(0), BLOCK=BLOCK)
        ctx.save_for_backward(y)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        rows, cols = y.shape[0], y.shape[1] // 2
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dy = torch.empty((rows, 2 * cols), dtype=y.dtype, device=y.device)
        if rows and cols:
            _swiglu_bwd_kernel[_grid(rows, cols)](grad, y, dy, cols, grad.stride(0),
                                                  y.stride(0), BLOCK=BLOCK)
        return dy


def fused_swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` of ``y = [a, b]`` (``[..., 2f]``, see :func:`supported` for the 2-D
    case), ``[..., f]``, in one kernel each way."""
    lead = y.shape[:-1]
    out = FusedSwiGLU.apply(y.reshape(-1, y.shape[-1]))
    return out.view(*lead, out.shape[-1])
