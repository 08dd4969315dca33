"""Fused cross-entropy of the LLM's logits, in Triton (GPU, or CPU tensors under the interpreter).

Without Transformer Engine the loss is Megatron's ``vocab_parallel_cross_entropy``: it copies
the bf16 logits to fp32, then makes about eight passes over them (max, subtract, exp, sum,
divide; in the backward the one-hot subtraction, the scaling, the cast back), ~50 bytes of
memory traffic per logit: for sphinx-tiny, 8192 tokens x 32000 words per micro-batch, ~13 GB,
~4 ms of one H100's bandwidth, and ~2 GB of fp32 copies held until the backward. Here one kernel
runs each way, in fp32 registers, reading the logits in their own dtype (~6 bytes per logit in
all, nothing but the rows' log-sum-exp kept):

    forward   lse = log sum_j exp(x_j)      (running max and sum over blocks of the vocabulary)
              loss = lse - x[label]
    backward  dx_j = g (exp(x_j - lse) - [j == label])      written in the logits' dtype

A label outside ``[0, V)`` counts no target logit, as Megatron's does with one tensor-parallel
rank: its loss is ``lse - max_j x_j`` and its gradient the softmax. One tensor-parallel rank only
(the whole vocabulary in each row); sharded logits keep Megatron's path.

Which path runs is chosen by :mod:`kernels.fused_layers` (``MEGATRON_SPHINX_CE``). Under
``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors, which is
how the tests check them on machines without a GPU.
"""
from __future__ import annotations

import torch

try:  # triton is optional: without it the fused path is unavailable
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = tl = None

__all__ = ["FusedCrossEntropy", "reference_cross_entropy", "supported"]

#: Words per program and loop step.
BLOCK = 2048


def supported(logits: torch.Tensor) -> bool:
    """Whether the kernels handle ``logits`` ``[n, V]``: rows contiguous in the vocabulary, on a
    GPU (or a CPU tensor under the interpreter)."""
    if triton is None or logits.dim() != 2 or logits.shape[1] == 0 or logits.stride(1) != 1:
        return False
    return logits.is_cuda or bool(triton.knobs.runtime.interpret)


def reference_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row loss in fp32 torch ops, with Megatron's (one rank) rule for labels outside
    ``[0, V)``: the row's max in the target's place, no gradient through it (what the kernels
    are checked against)."""
    x = logits.float()
    valid = (labels >= 0) & (labels < x.shape[1])
    target = x.gather(1, labels.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1)
    target = torch.where(valid, target, x.detach().max(1).values)
    return torch.logsumexp(x, 1) - target


if triton is not None:
    @triton.jit
    def _ce_fwd_kernel(x_ptr, labels_ptr, loss_ptr, lse_ptr, words, stride_x,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        offs = tl.arange(0, BLOCK)
        # per lane: running max (finite start: a lane that never sees a word stays at it and
        # adds exp(-inf) = 0) and sum of exp(x - max)
        m = tl.full((BLOCK,), -3.0e38, tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, words, BLOCK):
            x = tl.load(x_row + start + offs, mask=start + offs < words,
                        other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, x)
            s = s * tl.exp(m - new_m) + tl.exp(x - new_m)
            m = new_m
        row_max = tl.max(m, 0)
        lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
        label = tl.load(labels_ptr + row)
        valid = (label >= 0) & (label < words)
        target = tl.load(x_row + tl.where(valid, label, 0)).to(tl.float32)
        target = tl.where(valid, target, row_max)
        tl.store(loss_ptr + row, lse - target)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_bwd_kernel(x_ptr, labels_ptr, lse_ptr, g_ptr, dx_ptr, words, stride_x, stride_g,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < words
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        label = tl.load(labels_ptr + row)
        p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(dx_ptr + row * words + cols, (g * p).to(dx_ptr.dtype.element_ty), mask=mask)


class FusedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of ``logits`` ``[n, V]`` against ``labels`` ``[n]`` (int64):
    ``[n]`` fp32 losses, one kernel each way; saves the logits, the labels and each row's
    log-sum-exp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, words = logits.shape
        labels = labels.to(torch.int64).contiguous()
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows:
            _ce_fwd_kernel[(rows,)](logits, labels, loss, lse, words, logits.stride(0),
                                    BLOCK=BLOCK)
        ctx.save_for_backward(logits, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        rows, words = logits.shape
        dx = torch.empty((rows, words), dtype=logits.dtype, device=logits.device)
        if rows:
            _ce_bwd_kernel[(rows, triton.cdiv(words, BLOCK))](
                logits, labels, lse, grad, dx, words, logits.stride(0), grad.stride(0),
                BLOCK=BLOCK)
        return dx, None
