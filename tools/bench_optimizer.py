"""Benchmark of the optimizer step alone: torch's AdamW fused against its multi-tensor form.

Builds the recipe's LLM (all its layers unless ``--layers``; Megatron's DDP with fp32 gradient
buffers, as training wraps it) and Megatron's distributed optimizer over it, as
``megatron_sphinx.train.build.build_optimizer`` makes it for training, once per variant:

* ``fused``: ``--adam fused``, the training default (``megatron_sphinx/train/adam.py``);
* ``foreach``: ``--adam foreach``, torch's multi-tensor ops (Megatron's fallback as it is).

It fills the gradient buffers with the same random values for both and times
``optimizer.step()`` (gradients into the fp32 main copies, gradient norm and clipping, AdamW,
the updated parameters back into the model's): median milliseconds, kernel launches (on a CPU:
aten ops that compute) and the GPU's kernel time of one step. Both variants start from the same
weights and take the same steps (the learning rate the recipe's peak): the table gives the
largest change of a parameter over those steps and the largest difference between the
parameters the variants end with, relative to the largest parameter; the two forms agree up to
rounding. Where Apex or Transformer Engine is installed, Megatron
uses their ``FusedAdam`` and the two variants are the same.

Usage::

    python tools/bench_optimizer.py                                          # CPU: debug LLM
    python tools/bench_optimizer.py --recipe sphinx-tiny                     # one GPU
"""
from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()  # before Megatron's imports: --help stays clean
from tools.bench_common import (add_dtype_arg, device_label, launches,  # noqa: E402
                                 median_ms, recipe_and_dtype)
from megatron_sphinx.train.run_config import ADAM_FORMS  # noqa: E402
from tools.bench_llm_layers import _build  # noqa: E402


def _measure(cfg, args, variant: str, dtype, on_gpu: bool, groups) -> tuple[dict, list]:
    """Times ``variant``'s step; returns its row and the parameters it ends with (on the CPU)."""
    from megatron_sphinx.train.adam import describe
    from megatron_sphinx.train.build import build_optimizer

    torch.manual_seed(0)
    model, llm = _build(cfg, args.layers, dtype, on_gpu)
    optimizer, scheduler = build_optimizer(cfg, [model], groups.collection, dtype=dtype,
                                           total_steps=args.repeats + 3, adam=variant)
    scheduler.step(1)  # past the warm-up's first step, whose learning rate is 0
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    for buffer in model.buffers:
        buffer.grad_data.normal_(0.0, 1e-3, generator=gen)
    params = sum(p.numel() for p in model.parameters())
    initial = [p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()]

    wall_ms = median_ms(optimizer.step, args.repeats, warmup=2)
    launched, gpu_ms = launches(optimizer.step)
    final = [p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()]
    scale = max(float(a.abs().max()) for a in initial)
    moved = max(float((a - b).abs().max()) for a, b in zip(initial, final)) / scale
    row = {"variant": variant, "adam": describe(optimizer), "params": params, "ms": wall_ms,
           "launches": launched, "gpu_ms": gpu_ms, "moved": moved}
    del optimizer, scheduler, model
    gc.collect()  # the model's config holds the optimizer's loss scaler: a reference cycle
    if on_gpu:
        torch.cuda.empty_cache()
    return row, final


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="whose LLM (default debug)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers built (default: all of the recipe's)")
    p.add_argument("--variants", nargs="+", default=["foreach", "fused"], choices=ADAM_FORMS,
                   help="default: foreach fused")
    add_dtype_arg(p)
    p.add_argument("--repeats", type=int, default=5, help="timed steps, median (default 5)")
    args = p.parse_args(argv)
    if (args.layers is not None and args.layers < 1) or args.repeats < 1:
        p.error("--layers and --repeats must be at least 1")
    cfg, on_gpu, dtype = recipe_and_dtype(p, args)
    if args.layers is None:
        args.layers = cfg.llm.num_layers

    from megatron_sphinx import cpu_compat
    from megatron_sphinx.distributed import free_port, init_distributed, shutdown
    from megatron_sphinx.parallel_dims import ParallelDims

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    groups = init_distributed(ParallelDims(world_size=1), environ=env)
    rows, first = [], None
    mode = contextlib.nullcontext() if on_gpu else cpu_compat.cpu_device_mode()
    try:
        with mode:
            for variant in args.variants:
                row, final = _measure(cfg, args, variant, dtype, on_gpu, groups)
                if first is None:
                    first, row["diff"] = final, 0.0
                else:
                    scale = max(float(a.abs().max()) for a in first)
                    row["diff"] = max(float((a - b).abs().max())
                                      for a, b in zip(first, final)) / scale
                rows.append(row)
                print(f"  {variant}: {row['adam']}", file=sys.stderr)
    finally:
        shutdown()
    unit = "launches" if on_gpu else "ops"
    print(f"\n{device_label()}; {args.recipe} LLM, {args.layers} layers, "
          f"{rows[0]['params'] / 1e6:.1f} M parameters, {dtype}; optimizer.step(), "
          f"median of {args.repeats}")
    print(f"{'variant':8} {'ms/step':>9} {unit + '/step':>14} {'GPU ms':>8} {'update':>8} "
          f"{'params vs ' + rows[0]['variant']:>18}")
    for r in rows:
        gpu = f"{r['gpu_ms']:.1f}" if on_gpu else "-"
        print(f"{r['variant']:8} {r['ms']:>9.2f} {r['launches']:>14} {gpu:>8} "
              f"{r['moved']:>8.1e} {r['diff']:>18.1e}")
    print("update: the largest change of a parameter over the steps taken; params vs: the "
          "largest difference from the first variant's; both relative to the largest parameter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
