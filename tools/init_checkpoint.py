"""Writes a weights-only checkpoint of a recipe's freshly initialised model (step 0).

Runs on one CPU process in fp32; Megatron checkpoints are layout-agnostic, so every layout, device
and dtype can start from it with ``--load`` (tests use it to give several runs the same weights).

Usage: python tools/init_checkpoint.py --recipe debug --out DIR [--seed N]
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one line on stderr on bad input (nothing written)."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="recipe name (default: debug)")
    p.add_argument("--out", required=True, help="new or empty directory")
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the recipe's)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_sphinx.cli import UsageError, check_output_dir, fail, setup_cpu_tool
    from megatron_sphinx.config import get_recipe

    try:  # every check before the heavy imports: a mistake costs a second, not a model build
        cfg = get_recipe(args.recipe)
        check_output_dir(args.out, "--out")
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UsageError(f"--out {args.out} is not empty: choose a new directory")
        if args.seed is not None and args.seed < 0:
            raise UsageError(f"--seed {args.seed}: give 0 or more")
    except ValueError as exc:
        return fail(exc)
    setup_cpu_tool()  # the CPU build path, whatever the machine
    import torch

    from megatron_sphinx import cpu_compat, distributed
    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.parallel_dims import ParallelDims
    from megatron_sphinx.train import checkpoint as ckpt_lib
    from megatron_sphinx.train.build import build_model, build_optimizer

    log = logging.getLogger("init_checkpoint")
    seed = cfg.train.seed if args.seed is None else args.seed
    groups = distributed.init_distributed(ParallelDims(world_size=1), timeout_s=120, seed=seed)
    try:
        with cpu_compat.cpu_device_mode():
            torch.manual_seed(seed)
            log.info("building recipe %s on the CPU (fp32, seed %d)", cfg.name, seed)
            model = build_model(cfg, ParallelSizes(), groups.collection, backend="local",
                                dtype=torch.float32, on_gpu=False)
            opt, sched = build_optimizer(cfg, model, groups.collection, dtype=torch.float32,
                                         total_steps=1)
            meta = ckpt_lib.CheckpointMeta(step=0, recipe=cfg.name, layout={},
                                           code_version=ckpt_lib.code_version(), consumed={},
                                           has_optimizer=False)
            log.info("writing the weights to %s", args.out)
            path = ckpt_lib.save_checkpoint(args.out, 0, model, opt, sched, groups.collection,
                                            meta=meta, common={})
    finally:
        distributed.shutdown()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
