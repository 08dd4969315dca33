"""Fused rotary position embedding (RoPE) of packed tokens, in Triton (opt-in, GPU or interpreter).

Megatron's unfused RoPE (what the local layer spec runs without Transformer Engine) rotates
queries and keys with five kernels each way (``x * cos``, ``-x2``, a ``cat``, ``* sin``, ``+``),
the multiplications broadcast over heads and so not vectorised; with the tables kept per
micro-batch (:func:`megatron_sphinx.upstream_fixes.thd_rope_tables`) that is still ~20 launches
per layer, forward and backward. Here one kernel rotates one tensor, forward or backward:

    forward   o1 = x1 c1 - x2 s1      o2 = x2 c2 + x1 s2
    backward  g1 = y1 c1 + y2 s2      g2 = y2 c2 - y1 s1

with ``x = [x1, x2]`` the two halves of the head dimension (the non-interleaved layout of LLaMA's
RoPE), ``cos = [c1, c2]`` and ``sin = [s1, s2]`` the ``[t, d]`` tables, maths in fp32 and one
rounding (the unfused path rounds after every operation, so results differ by about one unit of
the last place in bf16). The input may be a strided view (Megatron's query / key split of the
QKV projection); the output is contiguous.

Which path runs is chosen by :mod:`kernels.fused_layers` (``MEGATRON_SPHINX_ROPE``; by default
the kernel on GPUs where it passes a start-up check), where :func:`supported`.
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel runs on CPU tensors, which
is how the tests check it on machines without a GPU.
"""
from __future__ import annotations

import torch


from kernels.triton_support import runs_here, tl, triton

__all__ = ["FusedRotaryTHD", "fused_rope", "supported"]

#: Tokens per program.
BLOCK_T = 16


def supported(x: torch.Tensor, rot_dim: int, interleaved: bool) -> bool:
    """Whether the kernel handles ``x`` ``[t, h, d]``: a full, non-interleaved rotation of a
    power-of-two head dimension, contiguous in it, on a GPU (or a CPU tensor under the
    interpreter)."""
    if triton is None or interleaved or x.dim() != 3 or rot_dim != x.shape[-1]:
        return False
    d = x.shape[-1]
    if d < 2 or d & (d - 1) or x.stride(-1) != 1:
        return False
    return runs_here(x)


if triton is not None:
    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, tokens, heads, stride_xt, stride_xh,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     BACKWARD: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, HALF)
        t3 = t[:, None, None]
        h3 = h[None, :, None]
        d3 = d[None, None, :]
        mask = (t3 < tokens) & (h3 < heads) & (d3 < HALF)
        x_off = t3.to(tl.int64) * stride_xt + h3 * stride_xh + d3
        x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        tab = t3.to(tl.int64) * (2 * HALF) + d3  # cos / sin: [t, 2 * HALF], contiguous
        tab_mask = (t3 < tokens) & (d3 < HALF)
        c1 = tl.load(cos_ptr + tab, mask=tab_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tab + HALF, mask=tab_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=tab_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tab + HALF, mask=tab_mask, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        out_off = (t3.to(tl.int64) * heads + h3) * (2 * HALF) + d3
        tl.store(out_ptr + out_off, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_off + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    tokens, heads, d = x.shape
    out = torch.empty((tokens, heads, d), dtype=x.dtype, device=x.device)
    if tokens == 0 or heads == 0:
        return out
    block_h = min(triton.next_power_of_2(heads), 32)
    grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, cos, sin, out, tokens, heads, x.stride(0), x.stride(1),
                       HALF=d // 2, BLOCK_T=BLOCK_T, BLOCK_H=block_h, BACKWARD=backward)
    return out


class FusedRotaryTHD(torch.autograd.Function):
    """``x`` ``[t, h, d]`` rotated by ``cos`` / ``sin`` ``[t, d]`` (contiguous); the backward
    rotates the gradient the other way (the tables get no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _launch(grad, cos, sin, backward=True), None, None


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[t, h, d]`` with per-token tables ``cos`` / ``sin`` (``[t, d]`` or any
    shape of ``t * d`` elements, e.g. Megatron's ``[t, 1, 1, d]``), in one kernel each way."""
    tokens, _, d = x.shape
    cos = cos.reshape(tokens, d).contiguous()
    sin = sin.reshape(tokens, d).contiguous()
    return FusedRotaryTHD.apply(x, cos, sin)
