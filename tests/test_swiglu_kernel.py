"""The fused SwiGLU kernel (kernels/triton_swiglu.py) against Megatron's SwiGLU it replaces, and
the start-up checks of the fused layer kernels (kernels/fused_layers.py).

On machines without a GPU the kernels run under Triton's CPU interpreter (in one subprocess that
sets ``TRITON_INTERPRET=1`` before triton is imported) and are compiled ahead of time for sm_90;
on a GPU they run for real in bf16.
"""
from __future__ import annotations

import logging

import pytest
import torch

from kernels import fused_layers, triton_cross_entropy, triton_rope, triton_swiglu
from tests.interpreted import INTERPRETED, interpreted

HAS_CUDA = torch.cuda.is_available()


def _megatron_swiglu(y: torch.Tensor) -> torch.Tensor:
    """Megatron's unfused path: ``SwiGLUFunction`` on eager ops (TORCH_COMPILE_DISABLE=1)."""
    from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction

    return SwiGLUFunction.apply(y, False, False)


def _check(device, dtype, atol):
    g = torch.Generator().manual_seed(1)
    # (rows, ffn per half, padding columns after each row): one block, several with a partial
    # last one, strided rows, no rows
    for rows, f, pad in ((7, 64, 0), (19, 2500, 0), (5, 1030, 6), (0, 96, 0), (3, 1, 0)):
        base = torch.randn(rows, 2 * f + pad, generator=g).mul(3).to(device, dtype)
        base.requires_grad_(True)
        y = base[:, :2 * f]
        assert triton_swiglu.supported(y)
        w = torch.randn(rows, f, generator=g).to(device, dtype)
        got = triton_swiglu.fused_swiglu(y)
        (g_got,) = torch.autograd.grad((got.float() * w.float()).sum(), base)
        # Megatron's SwiGLU in fp32 on the same inputs: the kernel rounds once, so in bf16 it
        # is within one unit of the last place of the exact result
        base32 = base.detach().float().requires_grad_(True)
        want = _megatron_swiglu(base32[:, :2 * f])
        (g_want,) = torch.autograd.grad((want * w.float()).sum(), base32)
        assert got.shape == want.shape == (rows, f) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)
        torch.testing.assert_close(g_got.float(), g_want.float(), atol=atol, rtol=atol)
        assert not g_got[:, 2 * f:].any()


@interpreted
def test_interpreted_swiglu_matches_megatron():
    _check("cpu", torch.float32, 1e-5)
    y = torch.randn(4, 3, 20)  # [s, b, 2f] as the MLP passes it
    torch.testing.assert_close(triton_swiglu.fused_swiglu(y), _megatron_swiglu(y.view(12, 20))
                               .view(4, 3, 10), atol=1e-5, rtol=1e-5)


@interpreted
def test_interpreted_mlp_runs_the_kernel_where_chosen(monkeypatch, kernel_env):
    """Megatron's MLP entry point (patched by ``upstream_fixes``) runs the kernel for the plain
    case where it is chosen, and Megatron's function otherwise (bias, FP8 store, ``torch``)."""
    from megatron_sphinx import upstream_fixes
    from kernels.settings import SWIGLU_ENV

    upstream_fixes.apply()
    from megatron.core.transformer import mlp

    impl = mlp.bias_swiglu_impl
    assert impl.unfused.__module__ == "megatron.core.fusions.fused_bias_swiglu"
    kernel_env(SWIGLU_ENV, "auto")
    assert fused_layers.choice("swiglu", "cpu", torch.float32)[0]  # its check runs the kernel
    calls = []
    real = triton_swiglu.FusedSwiGLU.apply
    monkeypatch.setattr(triton_swiglu.FusedSwiGLU, "apply", lambda y: calls.append(1) or real(y))
    y = torch.randn(6, 2, 40, requires_grad=True)  # [s, b, 2 * ffn]
    out = impl(y, None)
    assert calls == [1] and out.shape == (6, 2, 20)
    torch.testing.assert_close(out, impl.unfused(y, None), atol=1e-5, rtol=1e-5)
    impl(y, torch.zeros(40))  # a bias: Megatron's
    impl(y, None, True)  # FP8 input store: Megatron's
    kernel_env(SWIGLU_ENV, "torch")
    impl(y, None)
    assert calls == [1]


@interpreted
@pytest.mark.parametrize("op", ["rope", "swiglu", "ce"])
def test_interpreted_checks_pass_and_catch_wrong_kernels(op, monkeypatch, kernel_env, caplog):
    """The start-up check passes the real kernel in both dtypes; a kernel whose forward or
    backward is off by 1% fails it: ``auto`` then runs the torch ops (with a warning naming
    the reason) and ``triton`` stops the start-up."""
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert fused_layers.self_check(op, cpu, dtype) == ""
    fn = {"rope": triton_rope.FusedRotaryTHD, "swiglu": triton_swiglu.FusedSwiGLU,
          "ce": triton_cross_entropy.FusedCrossEntropy}[op]
    forward, backward = fn.forward, fn.backward
    for name, broken in (
            ("forward", lambda ctx, *a: forward(ctx, *a) * 1.01),
            ("backward", lambda ctx, g: tuple(
                t * 1.01 if t is not None else None for t in _as_tuple(backward(ctx, g))))):
        with monkeypatch.context() as m:
            m.setattr(fn, name, staticmethod(broken))
            why = fused_layers.self_check(op, cpu, torch.float32)
            assert why.startswith(f"{name} differs from torch by up to"), why
            env = fused_layers.OPS[op]
            kernel_env(env, "auto")
            with caplog.at_level(logging.WARNING, logger="kernels.fused_layers"):
                assert fused_layers.choice(op, cpu, torch.float32) == (
                    False, f"the kernel failed its start-up check: {why}")
            assert f"{env}=torch hides this warning" in caplog.text
            kernel_env(env, "triton")
            with pytest.raises(RuntimeError, match=f"{env}=triton, but the {op} kernel failed"):
                fused_layers.choice(op, cpu, torch.float32)
    kernel_env(fused_layers.OPS[op], "auto")
    assert fused_layers.choice(op, cpu, torch.float32) == (True, "passed its start-up check")


def _llm_loss_and_grad_norm(rank, world_size, fused, tp=1):
    """Loss and gradient norm of one debug-LLM forward + backward on a packed row, on the path
    GPUs run (Megatron's fused SwiGLU entry point, the one-gather RoPE, the loss of
    ``fused_loss``), with the Triton kernels (interpreted) or the torch ops (and Megatron's
    cross-entropy); and how many times each kernel ran."""
    import os

    from kernels import refresh_settings
    from kernels.settings import CE_ENV, ROPE_ENV, SWIGLU_ENV
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron_sphinx import cpu_compat, upstream_fixes
    from tests.sphinx_runs import model_of, setup

    os.environ[ROPE_ENV] = os.environ[SWIGLU_ENV] = os.environ[CE_ENV] = (
        "triton" if fused else "torch")
    refresh_settings()
    for op in fused_layers.OPS:  # the start-up checks first: they run the kernels too
        fused_layers.choice(op, "cpu", torch.float32)
    calls = {"rope": 0, "swiglu": 0, "ce": 0}
    rope_fn, swiglu_fn = triton_rope.fused_rope, triton_swiglu.FusedSwiGLU.apply
    ce_fn = triton_cross_entropy.FusedCrossEntropy.apply

    def count(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    triton_rope.fused_rope = count("rope", rope_fn)
    triton_swiglu.FusedSwiGLU.apply = count("swiglu", swiglu_fn)
    triton_cross_entropy.FusedCrossEntropy.apply = count("ce", ce_fn)
    # CPUs keep Megatron's per-sample RoPE loop; GPUs run the one gather (and the kernel)
    rope_utils._apply_rotary_pos_emb_thd = (
        lambda t, cu, freqs, **kw: upstream_fixes.thd_rope_one_gather(t, cu, freqs))
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, chunks, *_ = setup(world_size, "debug", tp=tp)
        gpt = model_of(chunks).language_model
        gpt.config.bias_activation_fusion = True  # as on GPUs: Megatron's fused SwiGLU path
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.llm.vocab_size, (1, 96), generator=g)
        cu = torch.tensor([0, 30, 31, 77, 96], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=46, max_seqlen_kv=46)
        loss = gpt(input_ids=ids, position_ids=None, attention_mask=None, labels=ids,
                   packed_seq_params=packed).sum()
        loss.backward()
        norm = torch.sqrt(sum((p.main_grad.double() ** 2).sum() for p in gpt.parameters()))
        return float(loss), float(norm), calls


@interpreted
def test_interpreted_llm_runs_the_kernels_and_matches_the_torch_ops():
    """The debug LLM on the GPU path: with the kernels (queries and keys of every layer rotated
    by the RoPE kernel, every MLP's SwiGLU by its kernel, the loss by the cross-entropy kernel)
    the loss and the gradient norm equal those of the torch ops and Megatron's loss; also on
    two tensor-parallel ranks (the vocabulary split, the loss's two all-reduces; each rank's
    gradient norm over its own shards)."""
    from tests.dist_harness import run_ranks

    for tp in (1, 2):
        fused = run_ranks(_llm_loss_and_grad_norm, tp, True, tp, timeout=300)
        torch_ops = run_ranks(_llm_loss_and_grad_norm, tp, False, tp, timeout=300)
        for (loss, norm, calls), (loss0, norm0, calls0) in zip(fused, torch_ops):
            assert calls == {"rope": 2 * 4, "swiglu": 4, "ce": 1}
            assert calls0 == {"rope": 0, "swiglu": 0, "ce": 0}
            assert loss == pytest.approx(loss0, rel=1e-6)
            assert norm == pytest.approx(norm0, rel=1e-5)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)



def test_swiglu_kernels_compile_for_hopper(tmp_path, monkeypatch):
    """Compiles both directions for sm_90 ahead of time (no GPU needed), in every dtype."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for kernel in (triton_swiglu._swiglu_fwd_kernel, triton_swiglu._swiglu_bwd_kernel):
        for dtype in ("bf16", "fp16", "fp32"):
            sig = {n: ("constexpr" if n == "BLOCK" else f"*{dtype}" if n.endswith("_ptr")
                       else "i32") for n in kernel.arg_names}
            src = ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK": triton_swiglu.BLOCK})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert f".entry {kernel.fn.__name__}" in ptx


def test_kernels_not_chosen_without_a_gpu(kernel_env):
    """On CPU tensors (no interpreter) ``auto`` and ``triton`` both run the torch ops, without
    a check; ``torch`` says so."""
    if INTERPRETED:
        pytest.skip("the interpreter runs the kernels on CPU tensors")
    cpu = torch.device("cpu")
    for op, env in fused_layers.OPS.items():
        for value in ("auto", "triton"):
            kernel_env(env, value)
            assert fused_layers.choice(op, cpu, torch.float32) == (
                False, "cpu tensors (the kernel needs a GPU)")
        kernel_env(env, "torch")
        assert fused_layers.choice(op, cpu, torch.float32) == (False, f"{env}=torch")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_swiglu_matches_megatron():
    """bf16 on a GPU against the exact (fp32) maths: one rounding, within 1 bf16 ulp; the
    start-up checks of both kernels pass on this GPU."""
    _check("cuda", torch.bfloat16, 1e-2)
    _check("cuda", torch.float32, 1e-5)
    for op in fused_layers.OPS:
        for dtype in (torch.bfloat16, torch.float32):
            assert fused_layers.self_check(op, torch.device("cuda"), dtype) == ""
