"""Benchmark of the packed-sequence (THD) pieces of the local layer spec, side by side.

For one packed row (``--tokens`` positions cut into ``--segments`` samples of random lengths,
TinyLlama's 32 query / 4 key-value heads of 64 channels) prints per variant the kernel launches
of a forward and of a forward + backward on a GPU (on a CPU: the aten ops that compute, each one
launch or more on a GPU) and their times:

* RoPE: Megatron's per-segment loop (``rope_utils._apply_rotary_pos_emb_thd``) against the one
  gather that ``megatron_sphinx.upstream_fixes`` installs for CUDA tensors, at a micro-batch's
  first call (which gathers the cos / sin tables) and at the others (tables kept: every later
  layer, queries and keys) in torch ops, and the fused Triton rotation (``kernels.triton_rope``,
  what GPUs run by default, GPU only);
* attention: one SDPA call per segment against one FlashAttention varlen call (GPU only);
* SwiGLU of the MLP (``[tokens, 2 x 5632]``, TinyLlama's): Megatron's ``SwiGLUFunction`` on eager
  ops (``MEGATRON_SPHINX_SWIGLU=torch``) against the fused Triton kernel (``kernels.triton_swiglu``,
  what GPUs run by default, GPU only).

Usage::

    python tools/bench_packed_layers.py                 # CPU: fp32
    python tools/bench_packed_layers.py --dtype bf16    # GPU
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.cli import quiet_import_notices  # noqa: E402

quiet_import_notices()  # before Megatron's imports: --help stays clean
from megatron_sphinx import upstream_fixes  # noqa: E402
from kernels import triton_rope, triton_swiglu  # noqa: E402
from megatron_sphinx.model import attention  # noqa: E402
from tools.bench_common import device_label, launches, median_ms  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _OneRank:
    """A context-parallel group of size 1."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096,
                   help="positions of the packed row (default 4096)")
    p.add_argument("--segments", type=int, default=40,
                   help="samples the row is cut into, random lengths (default 40)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="default fp32; bf16 on a GPU")
    p.add_argument("--ffn", type=int, default=5632,
                   help="MLP width per half for the SwiGLU rows (default 5632, TinyLlama's)")
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

    def measure(name, call, grad_of=None):
        """A row: launches and ms of the forward (no grad), and of forward + backward when
        ``grad_of`` (a tensor needing grad) is given (``.sum().backward()``: 2 more launches)."""
        def fwd():
            with torch.no_grad():
                return call()

        def fwd_bwd():
            call().sum().backward()

        row = (name, launches(fwd)[0], median_ms(fwd, args.repeats))
        if grad_of is None:
            rows.append(row + (None, None))
        else:
            rows.append(row + (launches(fwd_bwd)[0], median_ms(fwd_bwd, args.repeats)))

    def first_call():  # a micro-batch's first layer: gathers its cos / sin tables
        upstream_fixes._ROPE_TABLES.clear()
        return upstream_fixes.thd_rope_one_gather(x, cu, freqs)

    measure("rope: megatron loop", lambda: loop(x, cu, freqs, cp_group=_OneRank()))
    measure("rope: one gather", first_call)
    xg = x.clone().requires_grad_(True)
    x_cos, x_sin = upstream_fixes.thd_rope_tables(cu, freqs, args.tokens, dtype)

    def unfused_kept():  # the kept-tables rotation in torch ops (MEGATRON_SPHINX_ROPE=torch)
        y = xg.unsqueeze(1)
        return (y * x_cos + rope_utils._rotate_half(y, False) * x_sin).squeeze(1)

    measure("rope: tables kept", unfused_kept, xg)
    if triton_rope.supported(x, d, False):
        measure("rope: triton fused", lambda: triton_rope.fused_rope(xg, x_cos, x_sin), xg)

    q = torch.randn(args.tokens, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(args.tokens, groups, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(args.tokens, groups, d, device=device, dtype=dtype, requires_grad=True)
    ok, why = attention.varlen_status(q, 0.0, d ** -0.5)
    for kernel in ["sdpa"] + (["varlen"] if ok else []):
        os.environ[attention.ATTENTION_ENV] = kernel
        measure(f"attention: {kernel}", lambda: attention.packed_causal_attention(
            q, k, v, cu, max_len, scale=d ** -0.5), q)
    os.environ.pop(attention.ATTENTION_ENV, None)

    from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction

    y = torch.randn(args.tokens, 2 * args.ffn, device=device, dtype=dtype, requires_grad=True)
    measure("swiglu: megatron", lambda: SwiGLUFunction.apply(y, False, False), y)
    if triton_swiglu.supported(y):
        measure("swiglu: triton fused", lambda: triton_swiglu.FusedSwiGLU.apply(y), y)

    where = device_label()
    print(f"\n{where}; {args.tokens} tokens in {args.segments} segments (longest {max_len}), "
          f"{heads} heads / {groups} kv groups x {d}, {args.dtype}; median of {args.repeats}")
    unit = "launches" if device.type == "cuda" else "ops"
    print(f"{'variant':22} {'fwd ' + unit:>13} {'fwd ms':>9} {'fwd+bwd ' + unit:>17} "
          f"{'fwd+bwd ms':>11}")
    for name, ops, t, ops_b, tb in rows:
        both = ("-", "-") if tb is None else (ops_b, f"{tb:.2f}")
        print(f"{name:22} {ops:>13} {t:>9.2f} {both[0]:>17} {both[1]:>11}")
    if not ok:
        print(f"attention: varlen not run here ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
