"""The fused cross-entropy kernel (kernels/triton_cross_entropy.py) against the fp32 maths and
Megatron's ``vocab_parallel_cross_entropy`` it replaces (megatron_sphinx/model/fused_loss.py).

On machines without a GPU the kernels run under Triton's CPU interpreter (in one subprocess that
sets ``TRITON_INTERPRET=1`` before triton is imported) and are compiled ahead of time for sm_90;
on a GPU they run for real. With the vocabulary split over two ranks (gloo) it is checked against
Megatron's vocab-parallel loss. Its start-up check and the LLM's loss through it are tested with
the other fused kernels' in tests/test_swiglu_kernel.py.
"""
from __future__ import annotations

import pytest
import torch

from kernels import triton_cross_entropy as ce
from tests.interpreted import INTERPRETED, interpreted



def _check(device, dtype, atol):
    g = torch.Generator().manual_seed(1)
    # (rows, words, padding columns after each row): within one block, several blocks with a
    # partial last one, exactly two blocks, strided rows, one word, no rows
    for rows, words, pad in ((7, 100, 0), (9, 5000, 0), (3, 2 * ce.BLOCK, 0), (5, 3001, 7),
                             (4, 1, 0), (0, 64, 0)):
        base = torch.randn(rows, words + pad, generator=g).mul(4).to(device, dtype)
        base.requires_grad_(True)
        x = base[:, :words]
        assert ce.supported(x)
        labels = torch.randint(0, words, (rows,), generator=g)
        if rows > 2:
            labels[1], labels[2] = -1, words  # outside the vocabulary: no target logit
        labels = labels.to(device)
        w = torch.randn(rows, generator=g).to(device)
        got = ce.cross_entropy(x, labels)
        (g_got,) = torch.autograd.grad((got * w).sum(), base)
        xf = x.detach().float().requires_grad_(True)
        want = ce.reference_cross_entropy(xf, labels)
        (g_want,) = torch.autograd.grad((want * w).sum(), xf)
        assert got.shape == (rows,) and got.dtype == torch.float32 and g_got.dtype == dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_got[:, :words].float(), g_want, atol=atol, rtol=atol)
        assert not g_got[:, words:].any()


def _megatron_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Megatron's loss of one tensor-parallel rank (a gloo group of this process alone), on a
    copy: with fp32 logits its ``.float()`` is no copy, and it shifts them in place."""
    from megatron.core import tensor_parallel

    group = torch.distributed.new_group([0], backend="gloo")
    return tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels, tp_group=group)


@interpreted
def test_interpreted_cross_entropy_matches_the_fp32_maths():
    _check("cpu", torch.float32, 1e-6)
    _check("cpu", torch.bfloat16, 1e-2)


@interpreted
def test_interpreted_cross_entropy_matches_megatron(tmp_path):
    """Loss and gradient equal Megatron's ``vocab_parallel_cross_entropy`` on ``[s, b, V]``
    logits, labels outside the vocabulary included."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(6, 2, 300, generator=g).mul(5).requires_grad_(True)  # [s, b, V]
        labels = torch.randint(0, 300, (6, 2), generator=g)
        labels[0, 1], labels[4, 0] = 300, -1
        w = torch.randn(6, 2, generator=g)
        want = _megatron_cross_entropy(logits, labels)
        (g_want,) = torch.autograd.grad((want * w).sum(), logits)
        got = ce.cross_entropy(logits.view(12, 300), labels.view(12)).view(6, 2)
        (g_got,) = torch.autograd.grad((got * w).sum(), logits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)
    finally:
        torch.distributed.destroy_process_group()


def _vocab_parallel(rank, world_size):
    """This rank's share of the vocabulary (``[s, b, V / 2]``): the fused loss with the group,
    Megatron's vocab-parallel loss, and the single-rank fp32 maths on the whole vocabulary."""
    from megatron.core import tensor_parallel

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 2, 400, generator=g).mul(5)
    labels = torch.randint(0, 400, (6, 2), generator=g)
    labels[0, 1], labels[4, 0] = 400, -1  # outside the vocabulary
    labels[2, 0], labels[3, 1] = 199, 200  # the last word of rank 0, the first of rank 1
    w = torch.randn(6, 2, generator=g)
    share = full[..., rank * 200:(rank + 1) * 200].clone().requires_grad_(True)
    group = torch.distributed.group.WORLD
    got = ce.cross_entropy(share.view(12, 200), labels.view(12), group).view(6, 2)
    (g_got,) = torch.autograd.grad((got * w).sum(), share)
    want = tensor_parallel.vocab_parallel_cross_entropy(share.clone(), labels, tp_group=group)
    (g_want,) = torch.autograd.grad((want * w).sum(), share)
    single = ce.reference_cross_entropy(full.view(12, 400), labels.view(12)).view(6, 2)
    return got.detach(), want.detach(), single, g_got, g_want


@interpreted
def test_interpreted_vocab_parallel_cross_entropy_matches_megatron():
    """The vocabulary split over two ranks (as Megatron's output layer splits it): the fused
    loss equals Megatron's vocab-parallel loss and the one-rank loss on the whole vocabulary;
    each rank's gradient equals Megatron's for its words."""
    from tests.dist_harness import run_ranks

    for got, want, single, g_got, g_want in run_ranks(_vocab_parallel, 2, timeout=120):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-5)



def test_cross_entropy_kernels_compile_for_hopper(tmp_path, monkeypatch):
    """Compiles both directions for sm_90 ahead of time (no GPU needed), for bf16 and fp32
    logits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointers = {"x_ptr": None, "dx_ptr": None, "labels_ptr": "*i64", "max_ptr": "*fp32",
                "sumexp_ptr": "*fp32", "target_ptr": "*fp32", "lse_ptr": "*fp32",
                "g_ptr": "*fp32"}
    for kernel in (ce._ce_fwd_kernel, ce._ce_bwd_kernel):
        for dtype in ("bf16", "fp32"):
            sig = {n: ("constexpr" if n == "BLOCK" else pointers[n] or f"*{dtype}"
                       if n in pointers else "i32") for n in kernel.arg_names}
            src = ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK": ce.BLOCK})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert f".entry {kernel.fn.__name__}" in ptx


def test_not_supported_where_the_kernels_cannot_run():
    if INTERPRETED:
        pytest.skip("the interpreter runs the kernels on CPU tensors")
    x = torch.randn(4, 10)
    assert not ce.supported(x)  # a CPU tensor without the interpreter
    assert not ce.supported(x.t()) and not ce.supported(x[0])  # strided words, not 2-D


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cross_entropy_matches_the_fp32_maths():
    """bf16 logits on a GPU against the fp32 maths: the loss to fp32 rounding, the gradient
    rounded once to bf16."""
    _check("cuda", torch.bfloat16, 1e-2)
    _check("cuda", torch.float32, 1e-5)
