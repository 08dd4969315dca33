"""Benchmark of the frozen encoders alone: timm's blocks against the fused ones, side by side.

Builds the recipe's Mixture of Visual experts (random weights) and times calls of ``--views``
views (what one ``--vision-batch`` call encodes) per variant, in one process:

* ``timm``: every block runs timm's own forward;
* ``fused``: the training default (``megatron_sphinx/model/vision_fusions.py``: layer scale and
  residual add as one ``addcmul``, the ViT's SwiGLU gate as the fused kernel where chosen);
* ``fused-graph`` (GPU): the same replayed as one CUDA graph per call (``--cuda-graph-vision``).

Prints milliseconds per call, views/s and TFLOP/s (the encoders' forward FLOPs as the training
command counts them, ``megatron_sphinx/train/flops.py``) and MFU where the peak is known.

Usage::

    python tools/bench_vision.py                                       # CPU: debug encoders
    python tools/bench_vision.py --recipe sphinx-tiny --views 32       # one GPU, bf16
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()
from tools.bench_common import add_dtype_arg, median_ms, recipe_and_dtype  # noqa: E402


def _set_fused(mov, fused: bool) -> None:
    """Every encoder block on the fused forwards, or back on timm's."""
    from megatron_sphinx.model.vision_fusions import fuse_frozen_blocks, restore_timm_forwards

    for enc in mov.encoders:
        restore_timm_forwards(enc.model)
        if fused:
            fuse_frozen_blocks(enc.model)


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="whose encoders (default debug)")
    p.add_argument("--views", type=int, default=32, help="views per call (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls, median (default 5)")
    add_dtype_arg(p)
    args = p.parse_args(argv)
    if args.views < 1 or args.repeats < 1:
        p.error("--views and --repeats must be at least 1")
    from megatron_sphinx.model.vision import MixtureOfVisualExperts
    from megatron_sphinx.train.flops import device_peak_tflops, encoder_flops_per_view

    cfg, on_gpu, dtype = recipe_and_dtype(p, args)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    with device:
        mov = MixtureOfVisualExperts(cfg.vision).to(dtype)
    views = torch.rand(args.views, 3, cfg.vision.view_size, cfg.vision.view_size, device=device)
    flops = args.views * sum(encoder_flops_per_view(e) for e in cfg.vision.encoders)
    peak = device_peak_tflops()

    rows = []
    variants = ["timm", "fused"] + (["fused-graph"] if on_gpu else [])
    for variant in variants:
        _set_fused(mov, variant != "timm")
        mov.cuda_graphs = variant == "fused-graph"
        mov._graphs.clear()
        # warm-up: planning, kernel compiles, a graph's capture
        rows.append((variant, median_ms(lambda: mov(views), args.repeats, warmup=2) / 1e3))
    where = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{where}; {args.recipe} encoders "
          f"({', '.join(e.timm_name for e in cfg.vision.encoders)}), {args.views} views per "
          f"call, {dtype}; median of {args.repeats}")
    print(f"{'variant':12} {'ms/call':>9} {'views/s':>9} {'TFLOP/s':>9} {'MFU':>6}")
    for variant, seconds in rows:
        tflops = flops / seconds / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(f"{variant:12} {seconds * 1e3:>9.2f} {args.views / seconds:>9.1f} "
              f"{tflops:>9.2f} {mfu:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
