"""Gradient-accumulation fusion without Apex (megatron_sphinx/model/wgrad_fusion.py): the torch
stand-in for Apex's extension, its start-up choice, and training with it against without it."""
from __future__ import annotations

import logging

import pytest
import torch

from megatron_sphinx.model import wgrad_fusion
from tests.dist_harness import run_ranks

CPU = torch.device("cpu")


@pytest.fixture
def wgrad_env(monkeypatch):
    """Sets ``MEGATRON_SPHINX_WGRAD_FUSION`` with a fresh choice cache."""
    monkeypatch.setattr(wgrad_fusion, "_chosen", {})

    def set_env(value: str) -> None:
        monkeypatch.setenv(wgrad_fusion.WGRAD_ENV, value)
        wgrad_fusion._chosen.clear()

    return set_env


def test_accumulates_the_weight_gradient_into_main_grad():
    g = torch.Generator().manual_seed(0)
    main = torch.randn(5, 7, generator=g)
    want = main.double().clone()
    for rows in (3, 11):  # two micro-batches
        x, dy = torch.randn(rows, 7, generator=g), torch.randn(rows, 5, generator=g)
        wgrad_fusion.wgrad_gemm_accum_fp32(x, dy, main)
        want += dy.double().t() @ x.double()
    torch.testing.assert_close(main.double(), want, atol=1e-5, rtol=1e-5)
    half = torch.zeros(5, 7, dtype=torch.bfloat16)
    wgrad_fusion.wgrad_gemm_accum_fp16(x.bfloat16(), dy.bfloat16(), half)
    torch.testing.assert_close(half.float(), dy.t() @ x, atol=0.1, rtol=2e-2)


def test_choice_per_environment(wgrad_env, monkeypatch, caplog):
    wgrad_env("auto")  # GPUs only
    assert wgrad_fusion.choose(CPU, torch.float32) == (
        False, "cpu tensors (MEGATRON_SPHINX_WGRAD_FUSION=addmm forces it)")
    wgrad_env("addmm")
    assert wgrad_fusion.choose(CPU, torch.float32) == (
        True, "addmm into main_grad, start-up check passed")
    assert wgrad_fusion.choose(CPU, torch.bfloat16) == (
        False, "torch.bfloat16 on cpu (mixed-dtype GEMMs are CUDA-only)")
    wgrad_env("torch")
    assert wgrad_fusion.choose(CPU, torch.float32) == (False, "MEGATRON_SPHINX_WGRAD_FUSION=torch")
    # a broken GEMM fails the check, which names the error
    with monkeypatch.context() as m:
        m.setattr(wgrad_fusion, "wgrad_gemm_accum_fp32",
                  lambda x, dy, main: main.add_(dy.t() @ x * 1.01))
        why = wgrad_fusion.self_check(CPU, torch.float32)
    assert why.startswith("differs from float64 by"), why
    # a GPU whose check fails (faked: no GPU is touched): auto warns and runs the hook's add,
    # addmm stops the start-up
    monkeypatch.setattr(wgrad_fusion, "self_check", lambda device, dtype: why)
    gpu = torch.device("cuda", 0)
    wgrad_env("auto")
    with caplog.at_level(logging.WARNING, logger="megatron_sphinx.model.wgrad_fusion"):
        assert wgrad_fusion.choose(gpu, torch.bfloat16) == (
            False, f"failed its start-up check: {why}")
    assert "MEGATRON_SPHINX_WGRAD_FUSION=torch hides this warning" in caplog.text
    wgrad_env("addmm")
    with pytest.raises(RuntimeError, match="failed its start-up check on cuda:0 .*; unset MEGA"):
        wgrad_fusion.choose(gpu, torch.bfloat16)
    wgrad_env("fast")
    with pytest.raises(ValueError, match="choose auto, torch or addmm"):
        wgrad_fusion.choose(CPU, torch.float32)
    # where Apex's extension imports, Megatron's layers use it: the start-up line says so
    monkeypatch.setattr(wgrad_fusion, "_apex_extension", lambda: True)
    monkeypatch.setattr(wgrad_fusion, "self_check", lambda device, dtype: 1 / 0)  # not run
    wgrad_env("auto")
    assert wgrad_fusion.choose(gpu, torch.bfloat16) == (
        True, "Apex's fused_weight_gradient_mlp_cuda")
    wgrad_env("torch")
    assert wgrad_fusion.choose(gpu, torch.bfloat16) == (False, "MEGATRON_SPHINX_WGRAD_FUSION=torch")


def _two_steps(rank, world_size, fusion):
    """(losses, grad norms, stand-in calls, config flag) of two debug steps with or without the
    fusion; the same seed and data either way."""
    import os

    from megatron_sphinx import cpu_compat
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import SEQ, setup

    os.environ[wgrad_fusion.WGRAD_ENV] = "addmm" if fusion else "torch"  # auto: GPUs only
    calls = []
    real = wgrad_fusion.wgrad_gemm_accum_fp32
    wgrad_fusion.TORCH_WGRAD.wgrad_gemm_accum_fp32 = lambda *a: calls.append(1) or real(*a)
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, "debug")
        out = []
        for _ in range(2):
            micro = loader.next_step()
            res = train_step(model, opt, micro, num_microbatches=len(micro),
                             seq_length=SEQ * cfg.train.micro_batch_size, pg_collection=pgs,
                             device=torch.device("cpu"), dp_group=pgs.dp)
            out.append((res.loss, res.grad_norm))
        return out, len(calls), model[0].config.gradient_accumulation_fusion


def test_training_with_the_fusion_matches_without():
    """Two debug steps (fp32, one process): the same losses and gradient norms with the weight
    gradients accumulated in the GEMM as with the hook's separate add, and the linear layers'
    backward really took the fused path (the stand-in ran for every linear weight)."""
    fused, calls, flag = run_ranks(_two_steps, 1, True, timeout=300)[0]
    plain, no_calls, no_flag = run_ranks(_two_steps, 1, False, timeout=300)[0]
    assert flag and not no_flag and no_calls == 0
    from tests.sphinx_runs import GLOBAL_BATCH, small_recipe

    linears = 4 * small_recipe("debug").llm.num_layers + 1  # qkv, proj, fc1, fc2; output layer
    assert calls == 2 * GLOBAL_BATCH * linears  # steps x micro-batches (one row each) x linears
    for (loss, norm), (loss0, norm0) in zip(fused, plain):
        assert loss == pytest.approx(loss0, rel=1e-5)
        assert norm == pytest.approx(norm0, rel=1e-4)
