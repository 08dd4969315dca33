"""ConvNeXt's depthwise convolution + LayerNorm as one Triton kernel
(kernels/triton_dwconv_norm.py, ``--vision-dwconv triton``) against the torch ops it replaces.

On machines without a GPU the kernel runs under Triton's CPU interpreter (in a subprocess that
sets ``TRITON_INTERPRET=1`` before triton is imported) and is compiled ahead of time for sm_90;
on a GPU it runs for real in bf16, inside the full-size ConvNeXt too.
"""
from __future__ import annotations

import pytest
import torch

from kernels import fused_layers, triton_dwconv_norm as dw
from megatron_sphinx.config import get_recipe
from tests.encoders import debug_convnext, gpu_fusion_run
from tests.interpreted import INTERPRETED, interpreted

HAS_CUDA = torch.cuda.is_available()


def _inputs(b, h, w, c, k, bias, dtype, device, gen):
    x = torch.randn(b, h, w, c, generator=gen).mul(2).to(device, dtype)
    weight = (torch.randn(c, 1, k, k, generator=gen) / k).to(device, dtype)
    cbias = torch.randn(c, generator=gen).to(device, dtype) if bias else None
    gamma, beta = (torch.randn(c, generator=gen).to(device, dtype) for _ in range(2))
    return x, weight, cbias, gamma, beta


def _check(device, dtype, atol):
    gen = torch.Generator().manual_seed(0)
    # (batch, height, width, channels, kernel, conv bias): ConvNeXt's 7x7; channels not a power
    # of two; a row cut into several pixel tiles (the last partial); maps smaller than the
    # kernel; 3x3 and 1x1 kernels; no bias
    for b, h, w, c, k, bias in ((1, 9, 11, 20, 7, True), (1, 3, 40, 300, 7, True),
                                (1, 2, 3, 8, 7, False), (3, 6, 5, 16, 3, True),
                                (1, 4, 4, 5, 1, True)):
        x, weight, cbias, gamma, beta = _inputs(b, h, w, c, k, bias, dtype, device, gen)
        assert dw.supported(x, k)
        got = dw.dwconv_norm(x, weight, cbias, gamma, beta, 1e-6)
        # the torch ops in fp32 on the same (rounded) inputs
        want = dw.reference_dwconv_norm(
            x.float(), weight.float(), None if cbias is None else cbias.float(), gamma.float(),
            beta.float(), 1e-6)
        assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), want, atol=atol, rtol=atol)


@interpreted
def test_interpreted_kernel_matches_the_torch_ops():
    _check(torch.device("cpu"), torch.float32, 1e-5)
    _check(torch.device("cpu"), torch.bfloat16, 5e-2)  # two bf16 roundings, like the torch ops


@interpreted
def test_interpreted_start_up_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert fused_layers.self_check("dwconv", cpu, dtype) == ""
    real = dw.dwconv_norm
    monkeypatch.setattr(dw, "dwconv_norm", lambda *a: real(*a) * 1.01)
    why = fused_layers.self_check("dwconv", cpu, torch.float32)
    assert why.startswith("forward differs from torch by up to"), why
    from megatron_sphinx.train.build import _check_dwconv

    with pytest.raises(RuntimeError, match="--vision-dwconv triton: the kernel failed its "
                       "start-up check on cpu"):
        _check_dwconv(cpu, torch.float32)


@interpreted
def test_interpreted_convnext_block_runs_the_kernel_and_gives_the_same_map():
    """A debug ConvNeXt block (random weights, its layer scale far from its tiny initial value)
    on a small channels-last map: with ``dwconv="triton"`` it runs the kernel once and gives
    the torch ops' map up to fp32 rounding. (The whole encoder at 512 px is the GPU test's: the
    interpreter would take minutes.)"""
    enc = debug_convnext()
    block = enc.model.stages[1].blocks[0]
    x = torch.randn(2, block.conv_dw.in_channels, 9, 12).contiguous(
        memory_format=torch.channels_last)
    want = block(x)
    calls = []
    real = dw.dwconv_norm

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dw, "dwconv_norm", counted)
        enc.set_fusions(dwconv="triton")
        assert enc.fused_blocks["dwconv_norm"] == 4  # the debug ConvNeXt's four blocks
        got = block(x)
    assert calls == [(2, 9, 12, block.conv_dw.in_channels)]
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)



def test_dwconv_norm_kernel_compiles_for_hopper(tmp_path, monkeypatch):
    """Compiles the kernel for sm_90 ahead of time (no GPU needed) at ConvNeXt-XXL's channel
    counts, in bf16 and fp32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = dw._dwconv_norm_kernel
    for channels, dtype in ((384, "bf16"), (3072, "bf16"), (1536, "fp32")):
        block_c = triton.next_power_of_2(channels)
        consts = {"K": 7, "HAS_BIAS": True, "BLOCK_C": block_c,
                  "BLOCK_P": max(1, dw.DEFAULT_TILE[0] // block_c)}
        sig = {n: ("constexpr" if n in consts else f"*{dtype}" if n.endswith("_ptr")
                   else "fp32" if n == "eps" else "i32") for n in kernel.arg_names}
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": dw.DEFAULT_TILE[1]}).asm["ptx"]
        assert f".entry {kernel.fn.__name__}" in ptx


def test_cpu_blocks_keep_the_torch_ops():
    """Without a GPU (and outside the interpreter) the kernel takes no map, so the blocks chosen
    for it run the torch ops; the training command refuses the flag without a GPU."""
    if INTERPRETED:
        pytest.skip("the interpreter runs the kernel on CPU tensors")
    from megatron_sphinx.model.vision import MixtureOfVisualExperts
    from megatron_sphinx.train.run_config import VisionRun

    x = torch.zeros(1, 4, 4, 8)
    assert not dw.supported(x, 7)
    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(get_recipe("debug").vision)
    views = torch.rand(2, 3, 224, 224)
    want = mov(views)
    mov.set_fusions(dwconv="triton")
    torch.testing.assert_close(mov(views), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--vision-dwconv triton runs a GPU kernel"):
        VisionRun(dwconv="triton").check_device(on_gpu=False)
    with pytest.raises(ValueError, match="choose torch or triton"):
        mov.set_fusions(dwconv="cudnn")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_kernel_matches_the_torch_ops_and_replaces_the_convolution():
    """bf16 on a GPU: the kernel against the fp32 torch ops; its start-up check passes; the
    debug ConvNeXt's four blocks run it, and the tokens track the torch ops' within bf16
    noise."""
    cuda = torch.device("cuda")
    _check(cuda, torch.bfloat16, 5e-2)
    _check(cuda, torch.float32, 1e-4)
    assert fused_layers.self_check("dwconv", cuda, torch.bfloat16) == ""
    want, got, kernels = gpu_fusion_run(dwconv="triton")
    assert sum(n for k, n in kernels.items() if "_dwconv_norm_kernel" in k) == 4
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-2, rel
