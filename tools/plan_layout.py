"""Scale-out on paper: which TP/PP/EP/DP layouts of a recipe fit N GPUs, and how fast they are.

    python tools/plan_layout.py --recipe sphinx-moe --gpus 64 --gpu-mem-gib 80 \\
        [--seq-length 4096] [--global-batch-size 256] [--mfu 0.4] [--peak-tflops 989] \\
        [--headroom 0.1] [--max-tp 8] [--max-vpp 8] [--p2p-gbs 25] [--all] [--top N] \\
        [--json OUT]

Every valid layout (Megatron-Core 0.19's rules, via ``ParallelDims.validate_model``), plain
1F1B and interleaved (``vpp`` model chunks per pipeline rank, 2, 4, ... up to ``--max-vpp``),
with each recompute option (none / selective / full) gets a per-GPU memory estimate of its
busiest pipeline stage, broken down into parameters, gradients, distributed-optimizer shards,
frozen encoders, activations and inputs, and a FLOPs-based step time at the given MFU (pipeline
bubble, pipeline messages at ``--p2p-gbs`` and the replicated encoders included, other
communication not). Rows are sorted by step time (then peak memory, then vpp); only layouts
that fit are listed unless ``--all``. The model is :mod:`megatron_sphinx.train.memory`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description="List the parallel layouts of a recipe that fit.")
    p.add_argument("--recipe", required=True, help="recipe name, e.g. sphinx-moe")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU in GiB")
    p.add_argument("--seq-length", type=int, default=None, help="default: the recipe's")
    p.add_argument("--global-batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="packed rows per forward pass (one THD sequence; default 1)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="fraction of peak the compute reaches (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU in TFLOP/s (default 989, H100/H200)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of GPU memory kept free (CUDA context, NCCL, fragmentation)")
    p.add_argument("--max-tp", type=int, default=8, help="largest TP (GPUs per node; default 8)")
    p.add_argument("--max-vpp", type=int, default=8,
                   help="largest virtual pipeline size tried (powers of two; 1: plain 1F1B "
                   "only; default 8)")
    p.add_argument("--p2p-gbs", type=float, default=25.0,
                   help="achieved GB/s between pipeline neighbours (default 25)")
    p.add_argument("--all", action="store_true", help="also list layouts that do not fit")
    p.add_argument("--top", type=int, default=0, help="print only the first N rows (0: all)")
    p.add_argument("--json", default=None, help="write every listed plan to this JSON file")
    return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: give at least 1 GPU")
    if args.gpu_mem_gib <= 0:
        raise ValueError(f"--gpu-mem-gib {args.gpu_mem_gib}: give a positive memory size")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu}: give a fraction in (0, 1]")
    if args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops {args.peak_tflops}: give a positive peak")
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom {args.headroom}: give a fraction in [0, 1)")
    for name in ("seq_length", "global_batch_size", "micro_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a positive number")
    if args.max_tp < 1:
        raise ValueError(f"--max-tp {args.max_tp}: give at least 1 (GPUs per node)")
    if args.max_vpp < 1:
        raise ValueError(f"--max-vpp {args.max_vpp}: give at least 1 (1: no interleaving)")
    if args.p2p_gbs <= 0:
        raise ValueError(f"--p2p-gbs {args.p2p_gbs}: give a positive bandwidth")
    if args.top < 0:
        raise ValueError(f"--top {args.top}: give 0 (all rows) or a positive count")
    if args.json:
        from megatron_sphinx.cli import check_output_file

        check_output_file(args.json, "--json")


def plan_record(plan, seq_length: int, global_batch_size: int) -> dict:
    """One plan as plain data (GiB, seconds)."""
    d = plan.dims
    peak = plan.peak
    tokens = seq_length * global_batch_size
    return {
        "tp": d.tp, "pp": d.pp, "vpp": d.vpp or 1, "ep": d.ep, "dp": d.dp,
        "expert_dp": d.expert_dp,
        "sequence_parallel": d.sequence_parallel, "recompute": plan.recompute,
        "fits": plan.fits, "peak_stage": peak.stage, "memory_gib": peak.as_gib(),
        "stages_total_gib": [s.total / 2 ** 30 for s in plan.stages],
        "activation_detail": {k: (v / 2 ** 30 if k in ("per_layer", "stage_extra",
                                                       "bwd_transient", "vision_transient")
                                  else v) for k, v in peak.detail.items()},
        "step_time_s": plan.time.seconds, "bubble_fraction": plan.time.bubble_fraction,
        "p2p_s": plan.time.p2p_seconds,
        "model_tflops_per_step": plan.time.model_flops / 1e12,
        "tokens_per_s": tokens / plan.time.seconds,
    }


def format_table(records: list[dict]) -> str:
    """The plans as a fixed-width table (memory in GiB of the busiest stage)."""
    head = (f"{'#':>3} {'tp':>3} {'pp':>3} {'vpp':>3} {'ep':>3} {'dp':>4} {'edp':>4} "
            f"{'recompute':>9} "
            f"{'stage':>5} {'params':>7} {'grads':>7} {'optim':>7} {'encod':>6} {'activ':>7} "
            f"{'input':>6} {'total':>7} {'fits':>4} {'step_s':>8} {'bubble':>6} {'p2p_s':>6} "
            f"{'tok/s':>9}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(records, 1):
        m = r["memory_gib"]
        lines.append(
            f"{i:>3} {r['tp']:>3} {r['pp']:>3} {r['vpp']:>3} {r['ep']:>3} {r['dp']:>4} "
            f"{r['expert_dp']:>4} "
            f"{r['recompute']:>9} {r['peak_stage']:>5} {m['params']:>7.2f} {m['grads']:>7.2f} "
            f"{m['optimizer']:>7.2f} {m['encoders']:>6.2f} {m['activations']:>7.2f} "
            f"{m['inputs']:>6.2f} {m['total']:>7.2f} {'yes' if r['fits'] else 'no':>4} "
            f"{r['step_time_s']:>8.2f} {r['bubble_fraction']:>6.3f} {r['p2p_s']:>6.2f} "
            f"{r['tokens_per_s']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one line on stderr and exit code 2."""
    args = parse_args(argv)
    from megatron_sphinx.cli import quiet_import_notices

    quiet_import_notices()
    try:
        _check(args)
        from megatron_sphinx.config import get_recipe

        cfg = get_recipe(args.recipe)
    except ValueError as exc:
        from megatron_sphinx.cli import fail

        return fail(exc)
    from megatron_sphinx.train.memory import plan_layouts

    seq = args.seq_length or cfg.train.seq_length
    gbs = args.global_batch_size or cfg.train.global_batch_size
    plans = plan_layouts(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem_gib, seq_length=seq,
                         global_batch_size=gbs, mfu=args.mfu, peak_tflops=args.peak_tflops,
                         headroom=args.headroom, max_tp=args.max_tp,
                         micro_batch_size=args.micro_batch_size, max_vpp=args.max_vpp,
                         p2p_gbs=args.p2p_gbs)
    shown = [p for p in plans if p.fits or args.all]
    records = [plan_record(p, seq, gbs) for p in shown]
    if args.top:
        records = records[:args.top]
    print(f"{cfg.name} on {args.gpus} x {args.gpu_mem_gib:g} GiB (usable "
          f"{(1 - args.headroom) * args.gpu_mem_gib:.1f} GiB), seq {seq}, global batch {gbs}, "
          f"micro-batch {args.micro_batch_size}, bf16, MFU {args.mfu} of {args.peak_tflops:g} "
          f"TFLOP/s, pipeline messages at {args.p2p_gbs:g} GB/s")
    print(f"{sum(p.fits for p in plans)} of {len(plans)} valid layout x recompute options fit")
    if records:
        print(format_table(records))
    else:
        print("no layout fits: add GPUs, use GPUs with more memory, or shorten --seq-length")
    if args.json:
        payload = {"recipe": cfg.name, "gpus": args.gpus, "gpu_mem_gib": args.gpu_mem_gib,
                   "seq_length": seq, "global_batch_size": gbs, "mfu": args.mfu,
                   "peak_tflops": args.peak_tflops, "headroom": args.headroom,
                   "max_vpp": args.max_vpp, "p2p_gbs": args.p2p_gbs, "plans": records}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
