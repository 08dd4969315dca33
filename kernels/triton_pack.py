"""Triton implementation of the pack op (GPU, or CPU tensors under ``TRITON_INTERPRET=1``).

Forward: a 2-D grid of ``[BLOCK_R rows, BLOCK_H columns]`` tiles; each tile reads its index
entries, picks per row the one source that holds it (row-wise conditions select one of three
pointers, int64 offsets), and moves the tile with one masked load (padding rows load nothing and
stay zero) and one store. Compiled for sm_90 (bf16, a 4 x 1024 tile) that is 4 16-byte loads per
thread and 145 PTX instructions, where the former three masked loads merged by two ``where`` took
12 loads and 353 instructions. No plan is needed.

Backward (deterministic, no atomics), from the shared :class:`~kernels.reference.PackPlan`:

* text and visual rows: a gather. Each source row reads its positions
  ``order[offsets[r]:offsets[r + 1]]`` (usually one) and sums them in position order in fp32.
* special rows (few rows, up to thousands of positions each): two stages. Stage 1 cuts each
  special row's sorted positions into chunks of ``CHUNK`` and writes one fp32 partial row per
  chunk (the grid has ``ceil(N / CHUNK)`` chunks per special row, an upper bound known without a
  host sync; programs past a row's end exit at once and write nothing). Stage 2 sums each row's
  written chunks in chunk order. Same-order sums make the result bit-reproducible run to run,
  unlike an ``atomicAdd`` scatter, at the cost of one small extra pass over the partials.

``TRITON_INTERPRET=1`` must be set before Python imports triton: ``@triton.jit`` (here and in
triton's own standard library, e.g. ``tl.max``) picks compiled or interpreted at decoration time,
and the two cannot be mixed, so :func:`available` refuses a setting that changed after import.
Under the interpreter each program costs ~1 ms, so tiles are made as large as allowed there.
"""
from __future__ import annotations

import torch

from kernels.reference import PackPlan, alloc
from kernels.settings import TILE_ENV, settings

from kernels.triton_support import IMPORT_ERROR, tl, triton

#: Positions per stage-1 chunk of the special-row reduction on GPU (256 under the interpreter).
CHUNK = 32


def interpret_env() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


_interpreted: bool | None = None


def interpreted() -> bool:
    """Whether this module's kernels were decorated for Triton's CPU interpreter (fixed at
    import)."""
    global _interpreted
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction
        _interpreted = isinstance(_pack_fwd_kernel, InterpretedFunction)
    return _interpreted


def available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and why (not)."""
    device = torch.device(device)
    if triton is None:
        return False, IMPORT_ERROR
    if device.type == "cpu":
        if not interpret_env():
            return False, "CPU tensors need TRITON_INTERPRET=1 (Triton's CPU interpreter), " \
                "set before Python starts"
        if not interpreted():
            return False, "TRITON_INTERPRET=1 was set after triton was imported: set it before " \
                "Python starts"
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    if device.type != "cuda":
        return False, f"no Triton backend for {device.type} tensors"
    if interpreted():
        return False, "triton was imported with TRITON_INTERPRET=1 (CPU interpreter): unset it " \
            "to run on CUDA tensors"
    return True, "CUDA tensors"


if triton is not None:

    @triton.jit
    def _round_to(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, round to nearest even. bf16 is rounded by hand: compiled Triton does
        that too, but the CPU interpreter truncates fp32 -> bf16."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(DTYPE)
        return y

    @triton.jit
    def _pack_fwd_kernel(out_ptr, text_ptr, vis_ptr, sp_ptr, index_ptr, n, num_text, num_vis,
                         num_sp, hidden, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        pos = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R]
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        pmask = pos < n
        cmask = cols[None, :] < hidden  # [1, BLOCK_H]
        idx = tl.load(index_ptr + pos, mask=pmask, other=-1)  # [BLOCK_R] int64
        # Per row: which source holds the row, and the row within it (int64 offsets).
        is_t = idx < num_text
        is_v = idx < num_text + num_vis
        valid = (idx >= 0) & (idx < num_text + num_vis + num_sp)  # padding / outside: zeros
        row = tl.where(is_t, idx, tl.where(is_v, idx - num_text, idx - num_text - num_vis))
        off = (tl.where(valid, row, 0) * hidden)[:, None] + cols[None, :]  # [BLOCK_R, BLOCK_H]
        # One pointer per element from the row's source, then ONE masked load. (Selecting the
        # [BLOCK_R] row-start pointers first is the same code once compiled, but it hides their
        # 16-byte alignment from Triton and loses the vector loads.)
        src = tl.where(is_t[:, None], text_ptr + off,
                       tl.where(is_v[:, None], vis_ptr + off, sp_ptr + off))
        x = tl.load(src, mask=valid[:, None] & cmask, other=0.0)
        tl.store(out_ptr + pos[:, None] * hidden + cols[None, :], x, mask=pmask[:, None] & cmask)

    @triton.jit
    def _gather_rows_kernel(grad_src_ptr, grad_out_ptr, order_ptr, offsets_ptr, row_base, num_src,
                            hidden, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R]
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < num_src
        cmask = cols < hidden
        start = tl.load(offsets_ptr + row_base + rows, mask=rmask, other=0)
        count = tl.load(offsets_ptr + row_base + rows + 1, mask=rmask, other=0) - start
        acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
        # Each row's positions, almost always 0 or 1. Written for Triton 3.6 too: a while loop
        # (its interpreter cannot take a reduction as a range() bound), and the 2-D mask from
        # count itself rather than the 1-D `count > k` broadcast, which 3.6 fails to compile for
        # sm_90 at some tiles (e.g. 64 x 64 with hidden divisible by 16: "'tt.load' op failed
        # to verify that mask type matches ptr type").
        k = 0
        while k < tl.max(count, 0):
            p = tl.load(order_ptr + start + k, mask=count > k, other=0)
            acc += tl.load(grad_out_ptr + p[:, None] * hidden + cols[None, :],
                           mask=(count[:, None] > k) & cmask[None, :], other=0.0
                           ).to(tl.float32)
            k += 1
        tl.store(grad_src_ptr + rows[:, None] * hidden + cols[None, :],
                 _round_to(acc, grad_src_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _special_partial_kernel(partial_ptr, grad_out_ptr, order_ptr, offsets_ptr, sp_base,
                                num_chunks, hidden, CHUNK_SIZE: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        c = tl.program_id(0)
        j = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < hidden
        seg_end = tl.load(offsets_ptr + sp_base + j + 1)
        lo = tl.load(offsets_ptr + sp_base + j) + c * CHUNK_SIZE
        if lo < seg_end:  # chunks past the row's positions write nothing and are never read
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for k0 in range(0, CHUNK_SIZE, BLOCK_P):
                ks = lo + k0 + tl.arange(0, BLOCK_P)
                kmask = ks < seg_end
                p = tl.load(order_ptr + ks, mask=kmask, other=0)
                g = tl.load(grad_out_ptr + p[:, None] * hidden + cols[None, :],
                            mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc += tl.sum(g.to(tl.float32), axis=0)
            tl.store(partial_ptr + (j.to(tl.int64) * num_chunks + c) * hidden + cols, acc,
                     mask=cmask)

    @triton.jit
    def _special_sum_kernel(grad_sp_ptr, partial_ptr, offsets_ptr, sp_base, num_chunks, hidden,
                            CHUNK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr):
        j = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < hidden
        count = tl.load(offsets_ptr + sp_base + j + 1) - tl.load(offsets_ptr + sp_base + j)
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        # The written chunks, in order (a while loop: Triton 3.6's interpreter cannot take a
        # loaded scalar as a range() bound).
        c = 0
        while c < tl.cdiv(count, CHUNK_SIZE):
            acc += tl.load(partial_ptr + (j.to(tl.int64) * num_chunks + c) * hidden + cols,
                           mask=cmask, other=0.0)
            c += 1
        tl.store(grad_sp_ptr + j * hidden + cols, _round_to(acc, grad_sp_ptr.dtype.element_ty),
                 mask=cmask)


#: GPU row-copy tile ``(ELEMENTS, WARPS)``: elements per program (``BLOCK_R * BLOCK_H``, a power of
#: two) and warps per program. :data:`TILE_ENV` (``"8192,8"``; read once, see
#: :mod:`kernels.settings`) overrides it for the process, ``TritonBackend(tile=...)`` per backend.
#: 16384 x 8 was the fastest of the sweep 4096,4 / 8192,8 / 16384,8 at every shape measured on an
#: H100 (the forward at 81-86% of copy bandwidth against 41-69% for 4096,4: docs/PERFORMANCE.md).
DEFAULT_TILE = (16384, 8)
_parsed_tile: tuple[str, tuple[int, int]] = ("", DEFAULT_TILE)  # (raw env value, its parse)


def parse_tile(raw: str, source: str = TILE_ENV) -> tuple[int, int]:
    """``"ELEMENTS,WARPS"`` -> ``(elements, warps)``; ValueError naming ``source`` if malformed."""
    try:
        elems, warps = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{source}={raw!r}: expected ELEMENTS,WARPS such as 8192,8") from None
    if elems < 1 or elems & (elems - 1) or warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"{source}={raw!r}: ELEMENTS must be a power of two and WARPS one "
                         "of 1, 2, 4, 8, 16, 32")
    return elems, warps


def _gpu_tile() -> tuple[int, int]:
    """The GPU tile of :data:`TILE_ENV` (default :data:`DEFAULT_TILE`), parsed once per value."""
    global _parsed_tile
    raw = settings().triton_tile
    if raw != _parsed_tile[0]:
        _parsed_tile = (raw, parse_tile(raw) if raw else DEFAULT_TILE)  # raises on a bad value
    return _parsed_tile[1]


def _tiles(hidden: int, rows_hint: int, tile: tuple[int, int] | None = None
           ) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)`` for a row-gather over ``hidden`` columns. ``tile`` (the
    backend's own ``(elements, warps)``) wins over the interpreter's and :data:`TILE_ENV`'s."""
    if tile is None and interpreted():  # ~1 ms per program: few, large programs
        block_h = min(triton.next_power_of_2(max(hidden, 1)), 4096)
        block_r = max(1, min(triton.next_power_of_2(max(rows_hint, 1)), 65536 // block_h))
        return block_r, block_h, 4
    elems, warps = tile or _gpu_tile()
    block_h = min(triton.next_power_of_2(max(hidden, 1)), 1024, elems)
    return max(1, elems // block_h), block_h, warps


class TritonBackend:
    """Triton kernels behind :class:`~kernels.reference.PackTokensFunction`.

    Args:
        tile: ``(elements, warps)`` of the row-copy programs (e.g. ``(8192, 8)``) for this
            instance; None = :data:`TILE_ENV` or the default on GPU, large tiles under the
            interpreter. Used by the benchmark's tile sweep, and by tests to get many programs.
    """

    name = "triton"
    needs_plan_forward = False

    def __init__(self, tile: tuple[int, int] | None = None) -> None:
        self.tile = None if tile is None else parse_tile(",".join(map(str, tile)), "tile")

    def forward(self, out: torch.Tensor, text: torch.Tensor, visual: torch.Tensor,
                special: torch.Tensor, index: torch.Tensor, plan: PackPlan | None) -> None:
        """Writes ``out[i] = table[index[i]]``."""
        n, h = out.shape
        if n == 0 or h == 0:
            return
        block_r, block_h, warps = _tiles(h, n, self.tile)
        grid = (triton.cdiv(n, block_r), triton.cdiv(h, block_h))
        _pack_fwd_kernel[grid](
            out, text, visual, special, index, n, text.shape[0], visual.shape[0],
            special.shape[0], h, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)

    def _gather(self, grad_out: torch.Tensor, plan: PackPlan, row_base: int, num_src: int
                ) -> torch.Tensor:
        h = grad_out.shape[1]
        g = alloc((num_src, h), grad_out)
        if num_src == 0 or h == 0:
            return g
        block_r, block_h, warps = _tiles(h, num_src, self.tile)
        grid = (triton.cdiv(num_src, block_r), triton.cdiv(h, block_h))
        _gather_rows_kernel[grid](
            g, grad_out, plan.order, plan.offsets, row_base, num_src, h,
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps)
        return g

    def backward(self, grad_out: torch.Tensor, plan: PackPlan, needs: tuple[bool, bool, bool]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of text, visual and special (None where not needed)."""
        t, r, k = plan.num_text, plan.num_visual, plan.num_special
        n, h = grad_out.shape
        g_text = self._gather(grad_out, plan, 0, t) if needs[0] else None
        g_vis = self._gather(grad_out, plan, t, r) if needs[1] else None
        g_sp = None
        if needs[2]:
            g_sp = alloc((k, h), grad_out)
            if k and h:
                # Stage 1: chunk partials (upper bound of chunks, no host sync; untouched memory
                # past each row's chunks costs nothing). Stage 2: sum them in chunk order.
                chunk = 256 if interpreted() else CHUNK
                chunks = max(1, triton.cdiv(n, chunk))
                partial = torch.empty(k, chunks, h, dtype=torch.float32, device=grad_out.device)
                block_h = min(triton.next_power_of_2(h), 4096 if interpreted() else 256)
                if n:
                    _special_partial_kernel[(chunks, k, triton.cdiv(h, block_h))](
                        partial, grad_out, plan.order, plan.offsets, t + r, chunks, h,
                        CHUNK_SIZE=chunk, BLOCK_P=chunk if interpreted() else 16,
                        BLOCK_H=block_h, num_warps=4)
                _special_sum_kernel[(k, triton.cdiv(h, block_h))](
                    g_sp, partial, plan.offsets, t + r, chunks, h, CHUNK_SIZE=chunk,
                    BLOCK_H=block_h, num_warps=4)
        return g_text, g_vis, g_sp
