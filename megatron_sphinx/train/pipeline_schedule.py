"""The order of one pipeline rank's forward and backward passes in Megatron-Core's training
schedules (1F1B and interleaved 1F1B), and the activation memory it holds at its peak.

Pure arithmetic for :mod:`megatron_sphinx.train.memory`'s estimates; the counts equal
``megatron.core.pipeline_parallel.schedules`` (``get_pp_rank_microbatches``,
``get_schedule_table``): ``tests/test_plan_layout.py`` compares them.
"""
from __future__ import annotations


def warmup_passes(pp: int, rank: int, num_microbatches: int, vpp: int | None = None) -> int:
    """Chunk forward passes pipeline rank ``rank`` runs before its first backward pass.

    Megatron-Core 0.19's count for training (``schedules.get_pp_rank_microbatches``, with
    ``microbatch_group_size_per_vp_stage`` at its default, pp): 1F1B warms up with
    ``pp - rank - 1`` micro-batches; the interleaved schedule with ``2 * (pp - rank - 1)`` chunk
    passes plus ``(vpp - 1) * pp`` (the first group of pp micro-batches through every chunk but
    the last); neither more than the ``m * vpp`` passes of the step. Without pipelining, 0.
    """
    total = num_microbatches * (vpp or 1)
    if pp == 1:
        return 0
    warmup = pp - rank - 1 if vpp is None else 2 * (pp - rank - 1) + (vpp - 1) * pp
    return min(warmup, total)


def chunk_order(num_microbatches: int, vpp: int, group: int) -> list[int]:
    """Model chunk of each forward pass, in the order a rank runs them (Megatron's schedule
    table: micro-batches in groups of ``group``, the last group possibly smaller; every chunk
    runs a whole group before the next chunk starts it)."""
    return [c for start in range(0, num_microbatches, group) for c in range(vpp)
            for _ in range(start, min(start + group, num_microbatches))]


def schedule_ops(pp: int, rank: int, num_microbatches: int,
                 vpp: int | None = None) -> list[tuple[bool, int]]:
    """``(is_forward, chunk)`` of every pass of one rank's training step, in order.

    Warm-up forward passes (:func:`warmup_passes`), then steady-state pairs (the next forward,
    then the oldest backward), then the cool-down backward passes. Backward pass ``k`` runs chunk
    ``vpp - 1 - c`` where forward pass ``k`` ran chunk ``c``. 1F1B is the case ``vpp = 1``.
    """
    v = vpp or 1
    order = chunk_order(num_microbatches, v, pp)
    total, warm = len(order), warmup_passes(pp, rank, num_microbatches, vpp)
    ops = [(True, order[k]) for k in range(warm)]
    for k in range(total - warm):
        ops += [(True, order[warm + k]), (False, v - 1 - order[k])]
    ops += [(False, v - 1 - order[k]) for k in range(total - warm, total)]
    return ops


def schedule_peak(ops: list[tuple[bool, int]], saved: list[float], fwd_transient: list[float],
                  bwd_transient: list[float]) -> float:
    """Peak activation bytes of one rank over ``ops`` (see :func:`schedule_ops`).

    A forward pass of chunk ``c`` first needs ``fwd_transient[c]`` on top of what is held (the
    frozen encoders' working set), then keeps ``saved[c]`` until the chunk's backward pass,
    which needs ``bwd_transient[c]`` on top of everything held, itself included.
    """
    held = peak = 0.0
    for forward, c in ops:
        if forward:
            peak = max(peak, held + fwd_transient[c])
            held += saved[c]
            peak = max(peak, held)
        else:
            peak = max(peak, held + bwd_transient[c])
            held -= saved[c]
    return peak
