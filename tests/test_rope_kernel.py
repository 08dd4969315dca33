"""The fused RoPE kernel (kernels/triton_rope.py) against the unfused rotation it replaces.

On machines without a GPU the kernel runs under Triton's CPU interpreter (in a subprocess that
sets ``TRITON_INTERPRET=1`` before triton is imported) and is compiled ahead of time for sm_90;
on a GPU it runs for real in bf16.
"""
from __future__ import annotations

import pytest
import torch

from kernels import triton_rope
from megatron_sphinx import upstream_fixes
from tests.interpreted import interpreted

HAS_CUDA = torch.cuda.is_available()


def _tables(tokens: int, d: int, device="cpu", dtype=torch.float32):
    """Per-token cos / sin tables as Megatron's RoPE builds them (positions restart at 0)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.outer(torch.arange(tokens, device=device).float() % 37, inv)
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]  # [t, 1, 1, d]
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


def _unfused(x, cos, sin):
    from megatron.core.models.common.embeddings import rope_utils

    y = x.unsqueeze(1)
    return (y * cos + rope_utils._rotate_half(y, False) * sin).squeeze(1)


def _qk_views(tokens, heads, groups, d, device="cpu", dtype=torch.float32):
    """Query and key views of one QKV projection, as Megatron's attention splits it (the keys a
    strided view; the queries one too when there is one query head per group)."""
    g = torch.Generator(device="cpu").manual_seed(tokens * 7 + heads)
    ratio = heads // groups
    qkv = torch.randn(tokens, groups, ratio + 2, d, generator=g).to(device, dtype)
    qkv.requires_grad_(True)
    q = qkv[:, :, :ratio].reshape(tokens, heads, d)
    k = qkv[:, :, ratio]  # [t, groups, d], strided
    return qkv, q, k


def _check(device, dtype, atol):
    for tokens, heads, groups, d in ((37, 8, 2, 16), (16, 4, 4, 64), (5, 3, 1, 8)):
        cos, sin = _tables(tokens, d, device, dtype)
        for which in (1, 2):  # queries, keys: both strided views
            qkv, q, k = _qk_views(tokens, heads, groups, d, device, dtype)
            x = q if which == 1 else k
            assert x.stride(-1) == 1 and (which == 1 or not x.is_contiguous())
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
            got = triton_rope.fused_rope(x, cos, sin)
            (g_got,) = torch.autograd.grad((got.float() * w.float()).sum(), qkv)
            # the unfused rotation in fp32 on the same inputs: the kernel rounds once, so in
            # bf16 it is within one unit of the last place of the exact result
            qkv32 = qkv.detach().float().requires_grad_(True)
            x32 = qkv32[:, :, :heads // groups].reshape(tokens, heads, d) if which == 1 \
                else qkv32[:, :, heads // groups]
            want = _unfused(x32, cos.float(), sin.float())
            (g_want,) = torch.autograd.grad((want * w.float()).sum(), qkv32)
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)
            torch.testing.assert_close(g_got.float(), g_want.float(), atol=atol, rtol=atol)


@interpreted
def test_interpreted_rope_matches_the_unfused_rotation():
    _check("cpu", torch.float32, 1e-6)



def test_rope_kernel_compiles_for_hopper(tmp_path, monkeypatch):
    """Compiles both directions for sm_90 ahead of time (no GPU needed) at the block sizes the
    launcher picks for TinyLlama's queries (32 heads) and keys (4) in bf16, and one of those
    four in each other dtype (the dtype changes only the loads' and stores' casts; ~1.7 s per
    compile here)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = triton_rope._rope_kernel
    cases = [("bf16", h, b) for h in (32, 4) for b in (False, True)]
    for dtype, block_h, backward in cases + [("fp16", 32, False), ("fp32", 4, True)]:
        sig = {n: ("constexpr" if n in ("HALF", "BLOCK_T", "BLOCK_H", "BACKWARD")
                   else f"*{dtype}" if n.endswith("_ptr") else "i32")
               for n in kernel.arg_names}
        src = ASTSource(fn=kernel, signature=sig, constexprs=dict(
            HALF=32, BLOCK_T=triton_rope.BLOCK_T, BLOCK_H=block_h, BACKWARD=backward))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert ".entry _rope_kernel" in ptx


def test_fused_rope_is_dispatched_where_it_applies(monkeypatch, rope_env):
    """The one-gather RoPE runs the kernel for full, non-interleaved rotations where
    :mod:`kernels.fused_layers` chooses it (``auto`` or ``triton``), never with ``torch``;
    partial or interleaved ones keep the unfused path; a bad value says what to choose."""
    from kernels import fused_layers

    calls = []
    monkeypatch.setattr(triton_rope, "fused_rope", lambda x, c, s: calls.append(x.shape) or x)
    monkeypatch.setattr(triton_rope, "supported",
                        lambda x, rot, inter: rot == x.shape[-1] and not inter)
    monkeypatch.setattr(fused_layers, "choose", lambda op, device, dtype: (
        fused_layers.settings().rope != "torch", "faked"))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    x = torch.randn(5, 2, 8)
    freqs = torch.randn(3, 1, 1, 8)
    rope_env("torch")
    upstream_fixes.thd_rope_one_gather(x, cu, freqs)
    assert calls == []
    for value in ("auto", "triton"):
        rope_env(value)
        upstream_fixes.thd_rope_one_gather(x, cu, freqs)
    assert calls == [(5, 2, 8)] * 2
    upstream_fixes.thd_rope_one_gather(x, cu, freqs, rotary_interleaved=True)
    upstream_fixes.thd_rope_one_gather(x, cu, freqs[..., :4])  # partial rotation
    assert len(calls) == 2
    with pytest.raises(ValueError, match="choose auto, torch or triton"):
        rope_env("fast")
    with pytest.raises(ValueError, match="choose auto, torch or triton"):
        upstream_fixes.thd_rope_one_gather(x, cu, freqs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_rope_matches_the_unfused_rotation():
    """bf16 on a GPU against the exact (fp32) rotation: one rounding, within 1 bf16 ulp."""
    _check("cuda", torch.bfloat16, 1e-2)
    _check("cuda", torch.float32, 1e-5)
