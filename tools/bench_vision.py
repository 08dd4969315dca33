"""Benchmark of the frozen encoders alone: timm's blocks against the fused ones, side by side.

Builds the recipe's Mixture of Visual experts (random weights) and times calls of ``--views``
views (what one ``--vision-batch`` call encodes) per variant, in one process:

* ``timm``: every block runs timm's own forward;
* ``fused``: the training default (``megatron_sphinx/model/vision_fusions.py``: layer scale and
  residual add as one ``addcmul``, the ViT's SwiGLU gate as the fused kernel where chosen);
* ``fused-graph`` (GPU): the same replayed as one CUDA graph per call (``--cuda-graph-vision``);
* ``fused-tanh``: the fused blocks with ConvNeXt's GELU in the epilogue of its first GEMM, in
  tanh form (``--vision-gelu tanh``; on CPUs torch computes the exact GELU there): one pass over
  the feed-forward's 4x-wide activation fewer; its "vs fused" column is the tokens' change;
* ``fused-dwconv``: the fused blocks with ConvNeXt's depthwise convolution and LayerNorm as one
  Triton kernel (``--vision-dwconv triton``, ``kernels/triton_dwconv_norm.py``) instead of
  cuDNN's convolution and the norm's kernel (GPU; on a CPU the blocks fall back to the torch
  ops, so the row equals ``fused``); ``--dwconv-tiles A,W ...`` times it at other tiles (fp32
  accumulators and warps per program), one ``dwconv-AxW`` row each;
* ``fused-cudnn``: the fused blocks with cuDNN timing its convolution algorithms for the
  call's shapes and keeping the fastest (``--vision-cudnn-benchmark``; the default picks by
  heuristics: H100 run 2 ran the 7x7 depthwise convolution as ``conv2d_c1_k1_nhwc_specialized``
  at 61 ms of a step). Its first call pays the timing (GPU; on a CPU the row equals ``fused``);
* ``compiled`` (opt-in): the fused encoders through ``torch.compile`` (Inductor fuses the
  LayerNorms, GELUs and layer scales into fewer memory passes; whether that pays for the
  encoders, bound by the GPU at ~40% MFU in H100 run 4, is what this row measures). Not a
  training option yet. Needs ``TORCH_COMPILE_DISABLE`` unset.

Prints milliseconds per call, views/s and TFLOP/s (the encoders' forward FLOPs as the training
command counts them, ``megatron_sphinx/train/flops.py``), MFU where the peak is known, and the
first call's seconds (cuDNN planning, a graph's capture, a compile).

Usage::

    python tools/bench_vision.py                                       # CPU: debug encoders
    python tools/bench_vision.py --recipe sphinx-tiny --views 32       # one GPU, bf16
    python tools/bench_vision.py --recipe sphinx-tiny --variants fused fused-tanh fused-dwconv
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()
from tools.bench_common import (add_dtype_arg, call_seconds, device_label,  # noqa: E402
                                median_ms, recipe_and_dtype)


VARIANTS = ["timm", "fused", "fused-graph", "fused-tanh", "fused-dwconv", "fused-cudnn",
            "compiled"]


def _set_variant(mov, variant: str) -> None:
    """Every encoder block on the variant's forwards: timm's, or the fused ones (with the GELU
    in the GEMM epilogue for ``fused-tanh``, the depthwise convolution and norm one kernel for
    ``fused-dwconv``)."""
    from megatron_sphinx.model.vision_fusions import restore_timm_forwards

    if variant == "timm":
        for enc in mov.encoders:
            restore_timm_forwards(enc.model)
    else:
        mov.set_fusions(gelu="tanh" if variant == "fused-tanh" else "exact",
                        dwconv="triton" if variant == "fused-dwconv" else "torch")


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="whose encoders (default debug)")
    p.add_argument("--views", type=int, default=32, help="views per call (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls, median (default 5)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="what to time (default: timm fused, and fused-graph on a GPU)")
    p.add_argument("--dwconv-tiles", nargs="+", default=[], metavar="A,W",
                   help="also time fused-dwconv at these tiles: fp32 accumulators (a power of "
                   "two) and warps per program, e.g. 8192,4 32768,16")
    add_dtype_arg(p)
    args = p.parse_args(argv)
    if args.views < 1 or args.repeats < 1:
        p.error("--views and --repeats must be at least 1")
    from kernels import triton_dwconv_norm
    from kernels.triton_pack import parse_tile

    try:
        tiles = [parse_tile(t, "--dwconv-tiles") for t in args.dwconv_tiles]
    except ValueError as exc:
        p.error(str(exc))
    gpu = torch.cuda.is_available()
    variants = args.variants or ["timm", "fused"] + (["fused-graph"] if gpu else [])
    if "fused-graph" in variants and not gpu:
        p.error("--variants fused-graph replays a CUDA graph, and this machine has no GPU: "
                "drop it")
    if "compiled" in variants and os.environ.get("TORCH_COMPILE_DISABLE", "0") not in ("", "0"):
        p.error("--variants compiled: TORCH_COMPILE_DISABLE is set, which turns torch.compile "
                "into a no-op: unset it for this run")
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

    _set_variant(mov, "fused")
    mov.cuda_graphs = False
    ref = mov(views).float()  # the training default's tokens, which every variant must give
    rows = []
    default_tile = triton_dwconv_norm.DEFAULT_TILE
    runs = [(v, default_tile) for v in variants] + [
        (f"dwconv-{a}x{w}", (a, w)) for a, w in tiles]
    for variant, tile in runs:
        triton_dwconv_norm.DEFAULT_TILE = tile
        _set_variant(mov, "fused-dwconv" if variant.startswith("dwconv-") else variant)
        mov.cuda_graphs = variant == "fused-graph"
        mov.cudnn_benchmark = variant == "fused-cudnn"
        mov._graphs.clear()
        call = mov
        if variant == "compiled":
            encode = torch.compile(mov._encode)
            call = torch.no_grad()(encode)
        first = call_seconds(lambda: call(views))  # planning, kernel compiles, a capture, a compile
        err = float((call(views).float() - ref).norm() / ref.norm())
        rows.append((variant, median_ms(lambda: call(views), args.repeats, warmup=1) / 1e3,
                     first, err))
    print(f"\n{device_label()}; {args.recipe} encoders "
          f"({', '.join(e.timm_name for e in cfg.vision.encoders)}), {args.views} views per "
          f"call, {dtype}; median of {args.repeats}")
    print(f"{'variant':12} {'ms/call':>9} {'views/s':>9} {'TFLOP/s':>9} {'MFU':>6} "
          f"{'1st call s':>10} {'vs fused':>9}")
    def tflops_mfu(flops: float, seconds: float) -> str:
        tflops = flops / seconds / 1e12
        return f"{tflops:>9.2f} " + (f"{100 * tflops / peak:>5.1f}%" if peak else f"{'-':>6}")

    for variant, seconds, first, err in rows:
        print(f"{variant:12} {seconds * 1e3:>9.2f} {args.views / seconds:>9.1f} "
              f"{tflops_mfu(flops, seconds)} {first:>10.2f} {err:>9.1e}")
    print("(vs fused: |tokens - fused eager tokens| / |fused eager tokens|, Frobenius norms)")
    # Each encoder alone, fused and eager (H100 run 5: both together at 40.5% MFU; which one
    # holds them back is where to work next)
    _set_variant(mov, "fused")
    triton_dwconv_norm.DEFAULT_TILE = default_tile
    print(f"\n{'encoder':28} {'ms/call':>9} {'share':>6} {'TFLOP/s':>9} {'MFU':>6}")
    timed = []
    for enc, enc_cfg in zip(mov.encoders, cfg.vision.encoders):
        call = torch.no_grad()(lambda enc=enc: enc(views))
        timed.append((enc_cfg.timm_name, median_ms(call, args.repeats, warmup=1) / 1e3,
                      args.views * encoder_flops_per_view(enc_cfg)))
    total = sum(seconds for _, seconds, _ in timed)
    for name, seconds, enc_flops in timed:
        print(f"{name:28} {seconds * 1e3:>9.2f} {100 * seconds / total:>5.0f}% "
              f"{tflops_mfu(enc_flops, seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
