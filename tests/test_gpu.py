"""GPU path of training (skipped without a CUDA GPU): bf16 on the GPU against fp32 on the CPU,
and the Transformer Engine layer spec against the local spec, from the same initial weights.

Runs the real training command in subprocesses (no CUDA in forked workers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_sphinx.model.specs import transformer_engine_available

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
COMMON = ["--data", "synthetic", "--steps", "4", "--global-batch-size", "4",
          "--seq-length", "1400"]


#: What turns today's fused layer kernels off (kernels/fused_layers.py, model/wgrad_fusion.py).
UNFUSED = {"MEGATRON_SPHINX_ROPE": "torch", "MEGATRON_SPHINX_SWIGLU": "torch",
           "MEGATRON_SPHINX_CE": "torch", "MEGATRON_SPHINX_WGRAD_FUSION": "torch"}


def _run(args: list[str], save: Path, cpu: bool = False, env: dict | None = None,
         kernels: list | None = None, code: int = 0) -> list[float]:
    """The training command's losses (all of ``save``'s so far); its start-up ``kernels:`` line
    appended to ``kernels``; ``code``: the exit code it must end with."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", **(env or {}))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "megatron_sphinx.train", *args, "--save",
                           str(save)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == code, proc.stderr[-3000:]
    if kernels is not None:
        kernels += [line for line in proc.stderr.splitlines() if " INFO kernels: " in line]
    return [json.loads(line)["loss"] for line in (save / "metrics.jsonl").read_text().splitlines()]


def _init_checkpoint(recipe: str, out: Path) -> Path:
    """A freshly initialised checkpoint of ``recipe`` at ``out`` (the same weights for runs)."""
    proc = subprocess.run([sys.executable, "tools/init_checkpoint.py", "--recipe", recipe,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory, request):
    return _init_checkpoint("debug", tmp_path_factory.mktemp("init") / "debug")


def _bf16_args(init_weights: Path) -> list[str]:
    return ["--recipe", "debug", "--load", str(init_weights), "--dtype", "bf16", "--backend",
            "local", *COMMON]


@pytest.fixture(scope="module")
def bf16_default(init_weights, tmp_path_factory):
    """The losses and ``kernels:`` line of GPU bf16 training with the defaults (one run, which
    several tests compare against)."""
    kernels = []
    losses = _run(_bf16_args(init_weights), tmp_path_factory.mktemp("bf16"), kernels=kernels)
    return losses, kernels


def test_gpu_bf16_training_tracks_cpu_fp32(init_weights, bf16_default, tmp_path):
    """GPU bf16 with the default kernels (the fused RoPE, SwiGLU and cross-entropy must have
    passed their start-up checks) against CPU fp32."""
    gpu, kernels = bf16_default
    assert "rope one gather, tables kept, triton fused" in kernels[0], kernels
    assert "swiglu triton fused" in kernels[0], kernels
    assert "loss triton fused" in kernels[0], kernels
    cpu = _run(["--recipe", "debug", "--load", str(init_weights), *COMMON], tmp_path / "cpu",
               cpu=True)
    assert len(gpu) == len(cpu) == 4
    for g, c in zip(gpu, cpu):
        assert abs(g - c) < 2e-2 * abs(c), (gpu, cpu)  # bf16 tolerance


def test_gpu_fused_kernels_track_the_torch_ops(init_weights, bf16_default, tmp_path):
    """bf16 on the GPU: the fused RoPE, SwiGLU, cross-entropy and weight-gradient accumulation
    against the torch ops and Megatron's loss, from the same weights (one rounding against
    several: bf16 tolerance)."""
    (a, fused), unfused = bf16_default, []
    b = _run(_bf16_args(init_weights), tmp_path / "unfused", env=UNFUSED, kernels=unfused)
    assert "MEGATRON_SPHINX_ROPE=torch" in unfused[0] and "triton fused" not in unfused[0]
    for x, y in zip(a, b):
        assert abs(x - y) < 2e-2 * abs(y), (a, b, fused, unfused)


def test_gpu_overlapped_vision_gives_the_same_training(init_weights, bf16_default, tmp_path):
    """``--overlap-vision`` (the next micro-batch's views encoded on a second CUDA stream, the
    main stream waiting for them only where it reads them) trains as without it: the same
    first loss (a missing wait would read tokens not yet written), then bf16 tolerance (the
    LLM's backward kernels are not bitwise deterministic). Also with the encoders' calls of 8
    views replayed as CUDA graphs. The debug recipe runs one row per micro-batch: four here."""
    base = _bf16_args(init_weights)
    kernels, queues = [], {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}  # streams side by side
    plain = bf16_default[0]
    overlapped = _run([*base, "--overlap-vision"], tmp_path / "overlap", env=queues,
                      kernels=kernels)
    graphed = _run([*base, "--overlap-vision", "--vision-batch", "8", "--cuda-graph-vision"],
                   tmp_path / "graphs", env=queues, kernels=kernels)
    assert all("one micro-batch ahead on a second CUDA stream" in k and "one hardware queue"
               not in k for k in kernels), kernels
    for run in (overlapped, graphed):
        assert len(run) == len(plain) == 4
        assert abs(run[0] - plain[0]) <= 1e-3 * abs(plain[0]), (plain, run)
        for x, y in zip(run, plain):
            assert abs(x - y) < 2e-2 * abs(y), (plain, run)


def test_gpu_resume_continues_the_fused_optimizer(init_weights, bf16_default, tmp_path):
    """Stopped after step 2 and resumed from the checkpoint: torch's fused AdamW (the default
    without Apex or TE) gets its step counters back on the GPU, where its kernel reads them,
    and the run continues as the uninterrupted one (bf16 tolerance: the backward kernels are
    not bitwise deterministic)."""
    save, kernels = tmp_path / "resumed", []
    _run([*_bf16_args(init_weights), "--exit-interval", "2"], save, code=3, kernels=kernels)
    resumed = _run(_bf16_args(init_weights), save, kernels=kernels)  # --save's own checkpoint
    assert all(" | adam torch AdamW, fused (one kernel) | " in k or "FusedAdam" in k
               for k in kernels), kernels
    plain = bf16_default[0]
    assert len(resumed) == len(plain) == 4
    for x, y in zip(resumed, plain):
        assert abs(x - y) < 2e-2 * abs(y), (plain, resumed)


@pytest.mark.skipif(not transformer_engine_available(),
                    reason="Transformer Engine is not importable on this machine")
def test_te_spec_matches_local_spec(init_weights, bf16_default, tmp_path):
    te = _run(["--recipe", "debug", "--load", str(init_weights), "--dtype", "bf16",
               "--backend", "te", *COMMON], tmp_path / "te")
    local = bf16_default[0]
    for a, b in zip(te, local):
        assert abs(a - b) < 2e-2 * abs(b), (te, local)


@pytest.mark.skipif(not transformer_engine_available(),
                    reason="Transformer Engine is not importable on this machine")
def test_te_grouped_experts_match_local_experts(tmp_path):
    """debug-moe (4 experts, top-2): TE's layers, the experts as grouped GEMMs (TEGroupedMLP),
    against the local spec's experts one at a time (SequentialMLP), from the same weights (a
    checkpoint holds the experts alike for both)."""
    init = _init_checkpoint("debug-moe", tmp_path / "init")
    args = ["--recipe", "debug-moe", "--load", str(init), "--dtype", "bf16", *COMMON]
    te = _run([*args, "--backend", "te"], tmp_path / "te")
    local = _run([*args, "--backend", "local"], tmp_path / "local")
    for a, b in zip(te, local):  # bf16, and a routing choice may flip between near-equal scores
        assert abs(a - b) < 3e-2 * abs(b), (te, local)


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not transformer_engine_available() or not _fp8_gpu(),
                    reason="needs Transformer Engine and an FP8 GPU (compute capability 8.9+)")
def test_te_fp8_tracks_te_bf16(init_weights, tmp_path):
    # FP8 GEMMs need a micro-batch's tokens divisible by 16 (specs.check_fp8_shapes): 1408
    te = ["--recipe", "debug", "--load", str(init_weights), "--dtype", "bf16", "--backend", "te",
          *COMMON, "--seq-length", "1408"]
    fp8 = _run([*te, "--fp8"], tmp_path / "fp8")
    bf16 = _run(te, tmp_path / "bf16")
    for a, b in zip(fp8, bf16):
        assert abs(a - b) < 5e-2 * abs(b), (fp8, bf16)  # FP8 GEMMs: a few percent
