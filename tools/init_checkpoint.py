"""Writes a weights-only checkpoint of a recipe's freshly initialised model (step 0).

Runs on one CPU process in fp32; Megatron checkpoints are layout-agnostic, so every layout, device
and dtype can start from it with ``--load`` (tests use it to give several runs the same weights).

Usage: python tools/init_checkpoint.py --recipe debug --out DIR [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug")
    p.add_argument("--out", required=True, help="new or empty directory")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU build path, whatever the machine
    import torch

    from megatron_sphinx import cpu_compat, distributed
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.parallel_dims import ParallelDims
    from megatron_sphinx.train import checkpoint as ckpt_lib
    from megatron_sphinx.train.build import build_model, build_optimizer

    try:
        cfg = get_recipe(args.recipe)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: --out {args.out} is not empty: choose a new directory", file=sys.stderr)
        return 2
    seed = cfg.train.seed if args.seed is None else args.seed
    groups = distributed.init_distributed(ParallelDims(world_size=1), timeout_s=120, seed=seed)
    try:
        with cpu_compat.cpu_device_mode():
            torch.manual_seed(seed)
            model = build_model(cfg, ParallelSizes(), groups.collection, backend="local",
                                dtype=torch.float32, on_gpu=False)
            opt, sched = build_optimizer(cfg, model, groups.collection, dtype=torch.float32,
                                         total_steps=1)
            meta = ckpt_lib.CheckpointMeta(step=0, recipe=cfg.name, layout={},
                                           code_version=ckpt_lib.code_version(), consumed={},
                                           has_optimizer=False)
            path = ckpt_lib.save_checkpoint(args.out, 0, model, opt, sched, groups.collection,
                                            meta=meta, common={})
    finally:
        distributed.shutdown()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
