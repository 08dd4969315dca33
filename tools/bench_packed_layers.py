"""Benchmark of the packed-sequence (THD) pieces of the local layer spec, side by side.

For one packed row (``--tokens`` positions cut into ``--segments`` samples of random lengths,
TinyLlama's 32 query / 4 key-value heads of 64 channels) prints per variant the top-level torch
ops per call (each one a kernel launch or more on a GPU) and the time of a forward (and, for
attention, forward + backward):

* RoPE: Megatron's per-segment loop (``rope_utils._apply_rotary_pos_emb_thd``) against the one
  gather that ``megatron_sphinx.upstream_fixes`` installs for CUDA tensors, at a micro-batch's
  first call (which gathers the cos / sin tables) and at the others (tables kept: every later
  layer, queries and keys), and the fused Triton rotation (``MEGATRON_SPHINX_ROPE=triton``,
  GPU only) forward and backward;
* attention: one SDPA call per segment against one FlashAttention varlen call (GPU only).

Usage::

    python tools/bench_packed_layers.py                 # CPU: fp32
    python tools/bench_packed_layers.py --dtype bf16    # GPU
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()  # before Megatron's imports: --help stays clean
from megatron_sphinx import upstream_fixes  # noqa: E402
from kernels import triton_rope  # noqa: E402
from megatron_sphinx.model import attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _OneRank:
    """A context-parallel group of size 1."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _ops(fn) -> int:
    """Top-level aten ops of one ``fn()`` call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096,
                   help="positions of the packed row (default 4096)")
    p.add_argument("--segments", type=int, default=40,
                   help="samples the row is cut into, random lengths (default 40)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="default fp32; bf16 on a GPU")
    p.add_argument("--repeats", type=int, default=5, help="timed runs, median reported (default 5)")
    args = p.parse_args(argv)
    if not 1 <= args.segments <= args.tokens:
        p.error("--segments must lie in [1, --tokens]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    cuts = torch.randperm(args.tokens - 1)[:args.segments - 1].sort().values + 1
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([args.tokens])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(device)
    heads, groups, d = 32, 4, 64
    rows = []

    upstream_fixes.apply()
    from megatron.core.models.common.embeddings import rope_utils
    loop = rope_utils._apply_rotary_pos_emb_thd.__wrapped__
    x = torch.randn(args.tokens, heads, d, device=device, dtype=dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.outer(torch.arange(max_len, device=device).float(), inv)
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]

    def first_call():  # a micro-batch's first layer: gathers its cos / sin tables
        upstream_fixes._ROPE_TABLES.clear()
        return upstream_fixes.thd_rope_one_gather(x, cu, freqs)

    variants = (("rope: megatron loop", lambda: loop(x, cu, freqs, cp_group=_OneRank())),
                ("rope: one gather", first_call),
                ("rope: tables kept", lambda: upstream_fixes.thd_rope_one_gather(x, cu, freqs)))
    for name, call in variants:
        rows.append((name, _ops(call), _time(call, device, args.repeats), None))
    # forward + backward of the kept-tables rotation against the fused kernel (GPU)
    xg = x.clone().requires_grad_(True)
    rope_paths = {"rope: tables kept": lambda: upstream_fixes.thd_rope_one_gather(xg, cu, freqs)}
    if triton_rope.supported(x, d, False):
        rope_paths["rope: triton fused"] = lambda: triton_rope.fused_rope(
            xg, *upstream_fixes.thd_rope_tables(cu, freqs, args.tokens, dtype))
    for name, call in rope_paths.items():
        def both(call=call):
            call().sum().backward()
        timed = _time(both, device, args.repeats)
        if name == "rope: tables kept":  # its forward row is above
            rows[-1] = rows[-1][:3] + (timed,)
        else:
            rows.append((name, _ops(call), _time(call, device, args.repeats), timed))

    q = torch.randn(args.tokens, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(args.tokens, groups, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(args.tokens, groups, d, device=device, dtype=dtype, requires_grad=True)
    ok, why = attention.varlen_status(q, 0.0, d ** -0.5)
    kernels = ["sdpa"] + (["varlen"] if ok else [])
    for kernel in kernels:
        os.environ[attention.ATTENTION_ENV] = kernel

        def fwd():
            with torch.no_grad():
                return attention.packed_causal_attention(q, k, v, cu, max_len, scale=d ** -0.5)

        def fwd_bwd():
            out = attention.packed_causal_attention(q, k, v, cu, max_len, scale=d ** -0.5)
            out.sum().backward()

        rows.append((f"attention: {kernel}", _ops(fwd), _time(fwd, device, args.repeats),
                     _time(fwd_bwd, device, args.repeats)))
    os.environ.pop(attention.ATTENTION_ENV, None)

    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({os.cpu_count()} cores)")
    print(f"\n{where}; {args.tokens} tokens in {args.segments} segments (longest {max_len}), "
          f"{heads} heads / {groups} kv groups x {d}, {args.dtype}; median of {args.repeats}")
    print(f"{'variant':22} {'ops/call':>8} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for name, ops, t, tb in rows:
        both = "-" if tb is None else f"{tb:.2f}"
        print(f"{name:22} {ops:>8} {t:>9.2f} {both:>11}")
    if not ok:
        print(f"attention: varlen not run here ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
