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

With the vocabulary split over tensor-parallel ranks (``group``), each rank's forward kernel
returns its rows' max, sum of ``exp(x - max)`` and target logit over its own words; two
all-reduces over the group (the max, then the rescaled sums and the targets together) give the
rows' ``lse``, and the backward needs no communication. A label outside the vocabulary counts no
target logit, as Megatron's loss does: its loss is ``lse - max_j x_j`` and its gradient the
softmax.

Which path runs is chosen by :mod:`kernels.fused_layers` (``MEGATRON_SPHINX_CE``). Under
``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors, which is
how the tests check them on machines without a GPU.
"""
from __future__ import annotations

import torch

from kernels.triton_support import runs_here, tl, triton

__all__ = ["FusedCrossEntropy", "cross_entropy", "reference_cross_entropy", "supported"]

#: Words per program and loop step.
BLOCK = 2048


def supported(logits: torch.Tensor) -> bool:
    """Whether the kernels handle ``logits`` ``[n, V]``: rows contiguous in the vocabulary, on a
    GPU (or a CPU tensor under the interpreter)."""
    if triton is None or logits.dim() != 2 or logits.shape[1] == 0 or logits.stride(1) != 1:
        return False
    return runs_here(logits)


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
    def _ce_fwd_kernel(x_ptr, labels_ptr, max_ptr, sumexp_ptr, target_ptr, words, vocab_start,
                       stride_x, BLOCK: tl.constexpr):
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
        tl.store(max_ptr + row, row_max)
        tl.store(sumexp_ptr + row, tl.sum(s * tl.exp(m - row_max), 0))
        label = tl.load(labels_ptr + row) - vocab_start
        hit = (label >= 0) & (label < words)
        target = tl.load(x_row + tl.where(hit, label, 0)).to(tl.float32)
        tl.store(target_ptr + row, tl.where(hit, target, 0.0))
        tl.store(target_ptr + row + tl.num_programs(0), tl.where(hit, 1.0, 0.0))

    @triton.jit
    def _ce_bwd_kernel(x_ptr, labels_ptr, lse_ptr, g_ptr, dx_ptr, words, vocab_start, stride_x,
                       stride_g, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < words
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row * stride_g).to(tl.float32)
        label = tl.load(labels_ptr + row) - vocab_start
        p = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(dx_ptr + row * words + cols, (g * p).to(dx_ptr.dtype.element_ty), mask=mask)


class FusedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of ``logits`` ``[n, V]`` (this rank's ``V`` words of the
    vocabulary, from ``vocab_start``) against global ``labels`` ``[n]`` (int64): ``[n]`` fp32
    losses, the same on every rank of ``group`` (None: one rank); one kernel each way, two
    all-reduces of ``[n]`` rows forward with a group. Saves the logits, the labels and each
    row's log-sum-exp."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group=None,
                vocab_start: int = 0) -> torch.Tensor:
        rows, words = logits.shape
        labels = labels.to(torch.int64).contiguous()
        f32 = dict(dtype=torch.float32, device=logits.device)
        row_max, sumexp = torch.empty(rows, **f32), torch.empty(rows, **f32)
        target = torch.empty(2, rows, **f32)  # the label's logit, whether this rank holds it
        if rows:
            _ce_fwd_kernel[(rows,)](logits, labels, row_max, sumexp, target, words, vocab_start,
                                    logits.stride(0), BLOCK=BLOCK)
        if group is not None and torch.distributed.get_world_size(group) > 1:
            local_max = row_max.clone()
            torch.distributed.all_reduce(row_max, torch.distributed.ReduceOp.MAX, group=group)
            parts = torch.cat([sumexp.mul_(torch.exp(local_max - row_max)).unsqueeze(0),
                               target])
            torch.distributed.all_reduce(parts, group=group)
            sumexp, target = parts[0], parts[1:]
        lse = row_max + torch.log(sumexp)
        loss = lse - torch.where(target[1] > 0, target[0], row_max)
        ctx.vocab_start = vocab_start
        ctx.save_for_backward(logits, labels, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        rows, words = logits.shape
        dx = torch.empty((rows, words), dtype=logits.dtype, device=logits.device)
        if rows:
            _ce_bwd_kernel[(rows, triton.cdiv(words, BLOCK))](
                logits, labels, lse, grad, dx, words, ctx.vocab_start, logits.stride(0),
                grad.stride(0), BLOCK=BLOCK)
        return dx, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None) -> torch.Tensor:
    """Per-row fp32 losses of ``logits`` ``[n, V / ranks]``, this rank's share of the
    vocabulary split evenly over ``group`` in rank order (as Megatron's vocab-parallel output
    layer holds it; None: the whole vocabulary), against global ``labels`` ``[n]``."""
    start = 0 if group is None else torch.distributed.get_rank(group) * logits.shape[1]
    return FusedCrossEntropy.apply(logits, labels, group, start)
