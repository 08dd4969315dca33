"""The pack op's contract, its shared autograd Function and the plain torch reference.

The op reads three sources as one virtual row table and writes one output row per entry of
``index``::

    rows [0, T)              text     [T, h]
    rows [T, T + R)          visual   [R, h]
    rows [T + R, T + R + K)  special  [K, h]   (K = 3: start_img, end_img, skip)
    -1                       padding: a row of zeros

``out[i] = table[index[i]]``; entries outside ``[-1, T + R + K)`` are rejected by
:func:`kernels.pack_tokens` when it checks (CPU index, or ``MEGATRON_SPHINX_PACK_DEBUG=1``) and
otherwise give zeros in every implementation. Backward: ``grad_src[r] = sum of grad_out[i] over i
with index[i] == r`` (zero for rows never named), accumulated in fp32 for 16-bit types.

Every implementation shares :class:`PackTokensFunction` and a :class:`PackPlan`: the index sorted
by source row (stable), so the positions of row ``r`` are ``order[offsets[r]:offsets[r + 1]]`` in
increasing position order. The plan turns every backward into a deterministic *gather*: a source
row sums its own positions in a fixed order (no atomics). The shared special rows, which appear at
thousands of positions, are reduced in fixed-size chunks into fp32 partials that are then summed
in chunk order (the Triton and CUDA backends; see their modules).

The reference here is also the CPU implementation. It never concatenates the sources: the output
is written by one ``index_copy_`` per source (from the source itself when its rows are used once
each in a contiguous range, the normal case, else from a gathered copy), one ``index_fill_`` for
padding and a small gather for the special rows. Rows are moved as 16-byte elements (a
``complex128`` view of the same bytes) where the row size and alignment allow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.settings import settings


def debug_enabled() -> bool:
    """Whether ``MEGATRON_SPHINX_PACK_DEBUG`` is set to a true value (read once per process:
    see :mod:`kernels.settings`)."""
    return settings().debug


def alloc(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None
          ) -> torch.Tensor:
    """Uninitialised tensor on ``like``'s device (NaN-filled when debugging)."""
    if settings().debug and (dtype or like.dtype).is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)
    return like.new_empty(shape, dtype=dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation type of gradient sums: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_index(index: torch.Tensor, num_rows: int) -> None:
    """Raises ValueError unless every entry is -1 or a row in ``[0, num_rows)`` (host sync)."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= num_rows:
        raise ValueError(f"pack index values must lie in [-1, {num_rows}) (text + visual + special "
                         f"rows), got min {lo} max {hi}: rebuild the index for these sources")


@dataclass
class PackPlan:
    """The index sorted by source row: where each source row goes.

    Attributes:
        num_text: Text rows ``T``.
        num_visual: Visual rows ``R``.
        num_special: Special rows ``K``.
        rows_sorted: int64 ``[N]`` index values in ascending order (stable sort).
        order: int64 ``[N]`` output positions in that order.
        offsets: int64 ``[T + R + K + 1]``; row ``r``'s positions are
            ``order[offsets[r]:offsets[r + 1]]``; ``order[:offsets[0]]`` are padding positions.
    """

    num_text: int
    num_visual: int
    num_special: int
    rows_sorted: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    _bounds: list[int] | None = None

    @property
    def num_rows(self) -> int:
        """Rows of the virtual table ``T + R + K``."""
        return self.num_text + self.num_visual + self.num_special

    def bounds(self) -> list[int]:
        """Host copy of ``offsets`` at ``[0, T, T + R, T + R + 1, ..., T + R + K]`` (one sync)."""
        if self._bounds is None:
            t, r = self.num_text, self.num_visual
            at = [0, t] + [t + r + j for j in range(self.num_special + 1)]
            self._bounds = self.offsets[torch.tensor(at, device=self.offsets.device)].tolist()
        return self._bounds


def build_plan(index: torch.Tensor, num_text: int, num_visual: int, num_special: int) -> PackPlan:
    """Sorts ``index`` by source row (torch ops on the index's device, no host sync)."""
    rows_sorted, order = torch.sort(index, stable=True)
    m = num_text + num_visual + num_special
    probe = torch.arange(m + 1, device=index.device, dtype=index.dtype)
    offsets = torch.searchsorted(rows_sorted, probe)  # first k with rows_sorted[k] >= r
    return PackPlan(num_text, num_visual, num_special, rows_sorted, order, offsets)


_WIDE = ((torch.complex128, 16), (torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


def _wide(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same bytes viewed with the widest element (16, 8, 4 or 2 bytes) the rows allow.

    The forward only moves rows, so any element type will do; CPU ``index_copy_`` is per element
    and runs up to ~2x faster on 16-byte elements than on bf16 (measured on the 2-core dev box).
    """
    es = tensors[0].element_size()
    row = tensors[0].shape[-1] * es
    for dtype, w in _WIDE:
        if w > es and row % w == 0 and all(t.storage_offset() * es % w == 0 for t in tensors):
            return tuple(t.view(dtype) for t in tensors)
    return tensors


def _consecutive(rows: torch.Tensor) -> bool:
    """Whether sorted ``rows`` are ``r0, r0 + 1, ...`` (each row once, one contiguous range)."""
    n = rows.numel()
    return n == 1 or bool((rows[1:] - rows[:-1] == 1).all())


def _copy_rows(out: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, src: torch.Tensor,
               base: int) -> None:
    """``out[pos[k]] = src[rows[k] - base]`` for sorted ``rows``."""
    n = pos.numel()
    if n == 0:
        return
    if _consecutive(rows):
        r0 = int(rows[0]) - base
        src = src[r0:r0 + n]  # straight from the source: one pass
    else:
        src = src.index_select(0, rows - base)
    out, src = _wide(out, src)
    out.index_copy_(0, pos, src)


def _gather_rows(grad_out: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, base: int,
                 num_src: int) -> torch.Tensor:
    """``g[r] = sum of grad_out[pos[k]] over rows[k] - base == r`` (zero where never named)."""
    h = grad_out.shape[1]
    n = pos.numel()
    if n == 0:
        return torch.zeros(num_src, h, dtype=grad_out.dtype, device=grad_out.device)
    if _consecutive(rows):
        g = alloc((num_src, h), grad_out)
        r0 = int(rows[0]) - base
        src, dst = _wide(grad_out, g[r0:r0 + n])
        torch.index_select(src, 0, pos, out=dst)
        g[:r0].zero_()
        g[r0 + n:].zero_()
        return g
    if bool((rows[1:] != rows[:-1]).all()):  # each row at most once
        g = torch.zeros(num_src, h, dtype=grad_out.dtype, device=grad_out.device)
        g.index_copy_(0, rows - base, grad_out.index_select(0, pos))
        return g
    # Rows named several times: sum in fp32. index_add_ is sequential (deterministic) on CPU; on
    # CUDA it uses atomics, deterministic only under torch.use_deterministic_algorithms.
    acc = torch.zeros(num_src, h, dtype=acc_dtype(grad_out.dtype), device=grad_out.device)
    acc.index_add_(0, rows - base, grad_out.index_select(0, pos).to(acc.dtype))
    return acc.to(grad_out.dtype)


class ReferenceBackend:
    """Plain torch implementation (defines the op; also the CPU path)."""

    name = "torch"
    needs_plan_forward = True

    def forward(self, out: torch.Tensor, text: torch.Tensor, visual: torch.Tensor,
                special: torch.Tensor, index: torch.Tensor, plan: PackPlan | None) -> None:
        """Writes ``out[i] = table[index[i]]`` for all ``i``."""
        assert plan is not None
        t, r = plan.num_text, plan.num_visual
        b = plan.bounds()
        order, rows = plan.order, plan.rows_sorted
        if b[0]:
            out.index_fill_(0, order[:b[0]], 0)
        _copy_rows(out, order[b[0]:b[1]], rows[b[0]:b[1]], text, 0)
        _copy_rows(out, order[b[1]:b[2]], rows[b[1]:b[2]], visual, t)
        if b[-1] > b[2]:
            out_w, sp_w = _wide(out, special.index_select(0, rows[b[2]:b[-1]] - t - r))
            out_w.index_copy_(0, order[b[2]:b[-1]], sp_w)
        if b[-1] < order.numel():  # rows past the table (only unchecked GPU input): zeros, as
            out.index_fill_(0, order[b[-1]:], 0)  # the CUDA and Triton kernels write

    def backward(self, grad_out: torch.Tensor, plan: PackPlan, needs: tuple[bool, bool, bool]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of text ``[T, h]``, visual ``[R, h]``, special ``[K, h]`` (None: unneeded)."""
        t, r, k = plan.num_text, plan.num_visual, plan.num_special
        b = plan.bounds()
        order, rows = plan.order, plan.rows_sorted
        g_text = g_vis = g_sp = None
        if needs[0]:
            g_text = _gather_rows(grad_out, order[b[0]:b[1]], rows[b[0]:b[1]], 0, t)
        if needs[1]:
            g_vis = _gather_rows(grad_out, order[b[1]:b[2]], rows[b[1]:b[2]], t, r)
        if needs[2]:
            acc = torch.zeros(k, grad_out.shape[1], dtype=acc_dtype(grad_out.dtype),
                              device=grad_out.device)
            for j in range(k):
                if b[3 + j] > b[2 + j]:
                    pos = order[b[2 + j]:b[3 + j]]
                    acc[j] = grad_out.index_select(0, pos).sum(0, dtype=acc.dtype)
            g_sp = acc.to(grad_out.dtype)
        return g_text, g_vis, g_sp


def pack_forward(text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                 index: torch.Tensor, backend) -> tuple[torch.Tensor, PackPlan | None]:
    """Allocates the ``[N, h]`` output and runs ``backend``'s forward; returns it and the plan
    (None when the backend needs none)."""
    plan = build_plan(index, text.shape[0], visual.shape[0], special.shape[0]) \
        if backend.needs_plan_forward else None
    out = alloc((index.shape[0], text.shape[1]), text)  # [N, h]
    backend.forward(out, text, visual, special, index, plan)
    return out, plan


class PackTokensFunction(torch.autograd.Function):
    """``out = table[index]`` with pluggable forward/backward kernels (see module docstring)."""

    @staticmethod
    def forward(ctx, text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                index: torch.Tensor, backend) -> torch.Tensor:
        out, plan = pack_forward(text, visual, special, index, backend)
        ctx.backend, ctx.plan = backend, plan
        if plan is None:  # built in backward (one sort of the index there)
            ctx.sizes = (text.shape[0], visual.shape[0], special.shape[0])
            ctx.save_for_backward(index)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: gradients that refuse a double backward
            return _backward_once(ctx, grad_out)
        return _backward(ctx, grad_out)  # the usual case, without once_differentiable's cost


def _backward(ctx, grad_out: torch.Tensor):
    """:class:`PackTokensFunction`'s backward (the kernels are not differentiable)."""
    plan = ctx.plan
    if plan is None:
        (index,) = ctx.saved_tensors
        plan = build_plan(index, *ctx.sizes)
    grads = ctx.backend.backward(grad_out.contiguous(), plan, ctx.needs_input_grad[:3])
    return (*grads, None, None)


_backward_once = torch.autograd.function.once_differentiable(_backward)


def pack_tokens_reference(text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                          index: torch.Tensor) -> torch.Tensor:
    """The reference op (no input checks; use :func:`kernels.pack_tokens`)."""
    return PackTokensFunction.apply(text, visual, special, index, ReferenceBackend())
