"""Benchmark of the LLM alone: forward + backward of packed micro-batches, fused kernels or not.

Builds the recipe's LLM (a Megatron ``GPTModel``, local layer spec, in Megatron's DDP with fp32
gradients, as training does) with ``--layers`` of its layers, and times forward + backward of one
micro-batch of ``--rows`` packed rows of ``--tokens`` (cut into ``--segments`` samples per row,
random lengths) per variant, all in one process:

* ``unfused``: RoPE and SwiGLU in torch ops, Megatron's cross-entropy, weight gradients added
  to the fp32 gradients by a hook (``MEGATRON_SPHINX_ROPE=torch MEGATRON_SPHINX_SWIGLU=torch
  MEGATRON_SPHINX_CE=torch MEGATRON_SPHINX_WGRAD_FUSION=torch``: GPU training before
  2026-11-27);
* ``fused``: the defaults (``auto``): on GPUs the Triton RoPE, SwiGLU and cross-entropy kernels
  and the weight-gradient GEMMs accumulating into the fp32 gradients, each where its start-up
  check passes (the kernels line printed per variant says which ran);
* ``kernels`` (the Triton kernels alone), ``wgrad`` (the weight-gradient fusion alone) and
  ``ce`` (all but the fused cross-entropy): which part a difference comes from (H100 run 4:
  ``fused``, without the cross-entropy kernel then, was slower than ``unfused`` at one row,
  host-bound, and faster at two and four).

Per variant and number of rows it prints the kernel launches of the micro-batch's forward +
backward divided by the layers (the embedding, output layer and loss included; on a CPU, the
aten ops that compute), the milliseconds per layer (the same division) and per micro-batch, the
share of that time the GPU was busy (kernel time / wall time, from the profiler) and the
tokens/s of the LLM part. Where the GPU is busy well under 100%, the layers are bound by the host
(Python, autograd, launches); that is the phase the fused kernels shorten.

Usage::

    python tools/bench_llm_layers.py --layers 2 --tokens 256 --rows 1      # CPU: debug sizes
    python tools/bench_llm_layers.py --recipe sphinx-tiny --layers 4 --rows 1 2 4   # one GPU
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()  # before Megatron's imports: --help stays clean
from tools.bench_common import (add_dtype_arg, device_label, launches,  # noqa: E402
                                 median_ms, recipe_and_dtype)

#: Environment of each variant (unset variables take their defaults).
VARIANTS = {
    "unfused": {"MEGATRON_SPHINX_ROPE": "torch", "MEGATRON_SPHINX_SWIGLU": "torch",
                "MEGATRON_SPHINX_CE": "torch", "MEGATRON_SPHINX_WGRAD_FUSION": "torch"},
    "fused": {"MEGATRON_SPHINX_ROPE": "auto", "MEGATRON_SPHINX_SWIGLU": "auto",
              "MEGATRON_SPHINX_CE": "auto", "MEGATRON_SPHINX_WGRAD_FUSION": "auto"},
    "kernels": {"MEGATRON_SPHINX_ROPE": "auto", "MEGATRON_SPHINX_SWIGLU": "auto",
                "MEGATRON_SPHINX_CE": "auto", "MEGATRON_SPHINX_WGRAD_FUSION": "torch"},
    "wgrad": {"MEGATRON_SPHINX_ROPE": "torch", "MEGATRON_SPHINX_SWIGLU": "torch",
              "MEGATRON_SPHINX_CE": "torch", "MEGATRON_SPHINX_WGRAD_FUSION": "auto"},
    "ce": {"MEGATRON_SPHINX_ROPE": "auto", "MEGATRON_SPHINX_SWIGLU": "auto",
           "MEGATRON_SPHINX_CE": "torch", "MEGATRON_SPHINX_WGRAD_FUSION": "auto"},
}


def _cu_seqlens(rows: int, tokens: int, segments: int, gen: torch.Generator) -> torch.Tensor:
    """Boundaries of ``segments`` random-length samples per row, row after row."""
    bounds = [0]
    for r in range(rows):
        cuts = torch.randperm(tokens - 1, generator=gen)[:segments - 1].sort().values + 1
        bounds += [r * tokens + int(c) for c in cuts] + [(r + 1) * tokens]
    return torch.tensor(bounds, dtype=torch.int32)


def _build(cfg, layers: int, dtype: torch.dtype, on_gpu: bool):
    """The LLM with ``layers`` layers in Megatron's DDP, as ``build_model`` wraps it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from megatron_sphinx.model import wgrad_fusion
    from megatron_sphinx.model.llm import ParallelSizes, build_gpt, transformer_config

    llm = dataclasses.replace(cfg.llm, num_layers=layers)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    fused, _ = wgrad_fusion.choose(device, dtype)
    tcfg = transformer_config(llm, ParallelSizes(), dtype=dtype, on_gpu=on_gpu, backend="local",
                              wgrad_fusion=fused)
    with device:
        model = build_gpt(llm, tcfg, "local", pre_process=True, post_process=True)
    if dtype != torch.float32:
        model = Float16Module(tcfg, model)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=True, bucket_size=None)
    return DistributedDataParallel(tcfg, ddp, model), llm


def _measure(cfg, args, variant: str, rows: int, dtype, on_gpu: bool) -> dict:
    from kernels import refresh_settings
    from megatron_sphinx.train.build import loss_choice, rope_choice, swiglu_choice

    os.environ.update(VARIANTS[variant])
    refresh_settings()
    torch.manual_seed(0)
    model, llm = _build(cfg, args.layers, dtype, on_gpu)
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    n = rows * args.tokens
    cu = _cu_seqlens(rows, args.tokens, args.segments, gen).to(device)
    longest = int((cu[1:] - cu[:-1]).max())
    ids = torch.randint(0, llm.vocab_size, (1, n), generator=gen).to(device)
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)

    def step():
        loss = model(input_ids=ids, position_ids=None, attention_mask=None, labels=ids,
                     packed_seq_params=packed)
        loss.float().sum().backward()

    # warm-up: start-up checks, kernel compiles, allocator
    wall_ms = median_ms(step, args.repeats, warmup=2)
    launched, gpu_ms = launches(step)
    kernels = (f"rope {rope_choice('local', device, dtype)} | swiglu "
               f"{swiglu_choice(device, dtype)} | loss {loss_choice(device, dtype)} | wgrad "
               f"fused {model.config.gradient_accumulation_fusion}")
    return {"variant": variant, "rows": rows, "launches_per_layer": launched / args.layers,
            "ms_per_layer": wall_ms / args.layers, "ms": wall_ms,
            "gpu_busy": gpu_ms / wall_ms if on_gpu else None,
            "tokens_per_s": n / (wall_ms / 1e3), "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="whose LLM (default debug)")
    p.add_argument("--layers", type=int, default=2, help="layers built (default 2)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--rows", type=int, nargs="+", default=[1],
                   help="rows per micro-batch, one measurement each (default 1)")
    p.add_argument("--segments", type=int, default=40,
                   help="samples per row, random lengths (default 40)")
    p.add_argument("--variants", nargs="+", default=["unfused", "fused"], choices=list(VARIANTS),
                   help="default: unfused fused")
    add_dtype_arg(p)
    p.add_argument("--repeats", type=int, default=5, help="timed runs, median (default 5)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or min(args.rows) < 1:
        p.error("--layers, --repeats and --rows must be at least 1")
    if not 1 <= args.segments <= args.tokens:
        p.error("--segments must lie in [1, --tokens]")
    cfg, on_gpu, dtype = recipe_and_dtype(p, args)

    from megatron_sphinx import cpu_compat
    from megatron_sphinx.distributed import free_port, init_distributed, shutdown
    from megatron_sphinx.parallel_dims import ParallelDims

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    init_distributed(ParallelDims(world_size=1), environ=env)
    results = []
    mode = contextlib.nullcontext() if on_gpu else cpu_compat.cpu_device_mode()
    try:
        with mode:
            for rows in args.rows:
                for variant in args.variants:
                    results.append(_measure(cfg, args, variant, rows, dtype, on_gpu))
                    print(f"  {variant}, {rows} row(s): {results[-1]['kernels']}",
                          file=sys.stderr)
    finally:
        shutdown()
    where = device_label()
    unit = "launches" if on_gpu else "ops"
    print(f"\n{where}; {args.recipe} LLM, {args.layers} layers, {args.tokens} tokens per row in "
          f"{args.segments} samples, {dtype}; median of {args.repeats}")
    print(f"{'variant':8} {'rows':>4} {unit + '/layer':>15} {'ms/layer':>9} {'ms/micro-batch':>15} "
          f"{'GPU busy':>9} {'tokens/s':>10}")
    for r in results:
        busy = "-" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        print(f"{r['variant']:8} {r['rows']:>4} {r['launches_per_layer']:>15.1f} "
              f"{r['ms_per_layer']:>9.2f} {r['ms']:>15.1f} {busy:>9} {r['tokens_per_s']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
