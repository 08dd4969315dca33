"""Loss normalisation of a training step, and step FLOPs counted against what the step computes.

* ``train_step`` against a plain autograd reference on the same weights: its loss is the mean
  over every trained token of the global batch and its gradient norm that of this mean, whatever
  the split of the rows into micro-batches (two rows per micro-batch, or one; rows with very
  different numbers of trained tokens) or over two data-parallel ranks, and on later steps too
  (the buffers are zeroed).
* ``flops.py`` against ``torch.utils.flop_counter`` on the ``transformers`` twin of the LLM (same
  architecture, eager attention), the MoV encoders on the meta device and the projector; and
  ``llm_linear_params`` against the parameters of the ``transformers`` model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_sphinx.config import get_recipe
from megatron_sphinx.train.flops import (causal_pairs, encoder_flops_per_view, llm_linear_params,
                                         step_flops)
from tests.dist_harness import run_ranks

SEQ = 48  # positions per packed row of the hand-made micro-batches


# ----------------------------------------------------------------------------- loss normalisation

def _rows():
    """Four text-only rows; trained tokens per row differ a lot (masks start late or early)."""
    from megatron_sphinx.data.layout import Sample

    rng = np.random.default_rng(0)

    def sample(n, first_target):
        ids = rng.integers(3, 500, n).astype(np.int32)
        ids[0] = 1
        mask = np.zeros(n, bool)
        mask[first_target:] = True
        return Sample(ids, mask)

    # a sample of n tokens trained from token f has n - f targets
    return [[sample(40, 36)],  # 4 trained targets
            [sample(20, 2), sample(25, 5)],  # 18 + 20
            [sample(30, 10)],  # 20
            [sample(12, 1), sample(10, 8), sample(20, 3)]]  # 11 + 2 + 17


def _step_worker(rank, world_size):
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.data.layout import build_packed_batch
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import model_of, setup

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, chunks, opt, sched, loader = setup(world_size, "debug", mbs=2)
        model = model_of(chunks)
        rows = _rows()
        alone = [build_packed_batch([r], SEQ, 448, 2) for r in rows]  # the global batch
        mine = rows[2 * rank:2 * rank + 2] if world_size == 2 else rows  # this DP rank's rows
        params = [p for p in model.parameters() if p.requires_grad]

        def reference():
            """Mean loss over all trained tokens and its gradient norm, row by row (b = 1)."""
            total, count = 0.0, 0
            for b in alone:
                losses = model(b).float().reshape(-1)  # [s]
                total = total + (losses * b.loss_mask.reshape(-1)).sum()
                count += int(b.loss_mask.sum())
            loss = total / count
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
            return float(loss), float(norm), count

        splits = {
            "two_rows": [build_packed_batch(mine[i:i + 2], SEQ, 448, 2)
                         for i in range(0, len(mine), 2)],
            "one_row": [build_packed_batch([r], SEQ, 448, 2) for r in mine],
        }
        out = []
        for name in ("two_rows", "one_row", "two_rows"):
            ref = reference()
            micro = splits[name]
            res = train_step(chunks, opt, micro, num_microbatches=len(micro),
                             seq_length=SEQ * micro[0].shape[0], pg_collection=pgs,
                             device=torch.device("cpu"), dp_group=pgs.dp)
            sched.step(1)
            out.append((name, ref, (res.loss, res.grad_norm, res.num_loss_tokens)))
        return out


@pytest.fixture(scope="module", params=[1, 2], ids=["one_rank", "dp2"])
def step_results(request):
    """Every rank's steps: one process with all rows, or two data-parallel ranks with two rows
    each (the reported loss and the gradient are those of the whole global batch)."""
    results = run_ranks(_step_worker, request.param, timeout=240)
    return [step for rank in results for step in rank]


def test_step_loss_is_the_mean_over_trained_tokens(step_results):
    for name, (loss, _, count), (got, _, got_count) in step_results:
        assert count == 4 + 38 + 20 + 30 and got_count == count, name
        assert loss > 1.0, name  # a real loss, not zeros
        assert abs(got - loss) <= 1e-5 * loss, (name, got, loss)


def test_step_gradient_is_that_of_the_token_mean(step_results):
    """Whatever the split into micro-batches, on every step (buffers from the step before)."""
    norms = []
    for name, (_, norm, _), (_, got, _) in step_results:
        assert norm > 0, name
        assert abs(got - norm) <= 1e-5 * norm, (name, got, norm)
        norms.append(norm)
    assert norms[2] != norms[0]  # the third step runs on weights the optimizer moved
    assert len(norms) % 3 == 0 and norms[:3] * (len(norms) // 3) == norms  # ranks agree


# ----------------------------------------------------------------------------- FLOPs

def _hf_model(cfg, device="cpu"):
    import transformers

    from megatron_sphinx.model.hf_mapping import hf_config_from_llm

    hf = hf_config_from_llm(cfg.llm)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")


@pytest.mark.parametrize("recipe", ["debug", "debug-moe", "sphinx-tiny", "sphinx-moe"])
def test_linear_params_are_the_hf_models_matrices(recipe):
    """Every parameter of the twin except the input embedding and the norm weights is a matmul
    weight; MoE routes each token through ``top-k`` of the ``E`` experts."""
    cfg = get_recipe(recipe)
    llm = cfg.llm
    model = _hf_model(cfg, "meta")
    named = dict(model.named_parameters())
    norms = [n for n in named if n.endswith("norm.weight")]
    assert len(norms) == 2 * llm.num_layers + 1
    embed = named["model.embed_tokens.weight"].numel()
    matrices = sum(p.numel() for p in named.values()) - embed - sum(named[n].numel() for n in norms)
    assert llm_linear_params(llm, active=False) == matrices
    experts = sum(p.numel() for n, p in named.items() if ".experts." in n)
    if llm.is_moe:
        assert experts > 0
        active = matrices - experts + experts * llm.moe_router_topk // llm.num_experts
    else:
        assert experts == 0
        active = matrices
    assert llm_linear_params(llm, active=True) == active


def test_llm_and_attention_flops_match_a_counted_step():
    """Forward + backward of the dense twin over one sequence of T tokens, counted: the matmuls
    are ``6 x params x T`` and eager attention's full ``T x T`` scores are ``T^2`` pairs."""
    cfg = get_recipe("debug")
    torch.manual_seed(0)
    model = _hf_model(cfg)
    T = 24
    ids = torch.randint(0, cfg.llm.vocab_size, (1, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    f = step_flops(cfg, T, float(T * T), 0)
    assert f["llm"] + f["attention"] == counter.get_total_flops()
    assert f["attention"] == 12 * cfg.llm.hidden_size * cfg.llm.num_layers * T * T


def test_causal_pairs_count_the_lower_triangle():
    lengths = [1, 2, 7, 30]
    assert causal_pairs(lengths) == sum(int(np.tril(np.ones((n, n))).sum()) for n in lengths)
    assert causal_pairs([]) == 0


def test_encoder_flops_are_the_mov_forward():
    """What the MoV runs per view (ConvNeXt resized to its input size, DINOv2 at 224), counted on
    the meta device (where attention is counted too)."""
    from megatron_sphinx.model.vision import MixtureOfVisualExperts

    cfg = get_recipe("debug")
    with torch.device("meta"):
        mov = MixtureOfVisualExperts(cfg.vision)
        with FlopCounterMode(display=False) as counter:
            mov(torch.empty(3, 3, cfg.vision.view_size, cfg.vision.view_size))
    per_view = counter.get_total_flops() / 3
    assert sum(encoder_flops_per_view(e) for e in cfg.vision.encoders) == per_view
    assert step_flops(cfg, 0, 0.0, 3)["encoders"] == 3 * per_view


def test_projector_flops_are_its_counted_forward_and_backward():
    """Forward plus the weight gradient only: the projector's input comes from the frozen
    encoders and needs no gradient (counted on the real module, every visual token of 2 views;
    LayerNorm's elementwise work is not a matmul and is not counted by either side)."""
    from megatron_sphinx.model.projector import Projector

    cfg = get_recipe("debug")
    proj = Projector(cfg.vision.channels, cfg.llm.hidden_size)
    tokens = torch.randn(2, cfg.vision.tokens_per_view, cfg.vision.channels)  # no grad: frozen
    with FlopCounterMode(display=False) as counter:
        proj(tokens).square().sum().backward()
    assert step_flops(cfg, 0, 0.0, 2)["projector"] == counter.get_total_flops()


def test_attention_pairs_of_a_step_count_samples_not_row_padding():
    """Two rows per micro-batch: row 0's padding segment sits between the rows' samples."""
    from megatron_sphinx.data.layout import Sample, build_packed_batch
    from megatron_sphinx.train.data import loader_summary

    def text(n):
        return Sample(np.arange(1, n + 1), np.ones(n, dtype=bool))

    pb = build_packed_batch([[text(5)], [text(3), text(4)]], 10, 448, 2)
    assert pb.cu_seqlens.tolist() == [0, 5, 10, 13, 17, 20] and pb.sample_lengths == (5, 3, 4)

    def summary_worker(rank, world_size):
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        return loader_summary([pb, pb], None, torch.device("cpu"))  # summed over both ranks

    for summary in run_ranks(summary_worker, 2):
        assert summary["attention_pairs"] == 4 * causal_pairs([5, 3, 4])
        assert summary["tokens"] == 4 * 12 and summary["samples"] == 12


def test_total_is_the_sum_of_the_parts():
    cfg = get_recipe("debug-moe")
    f = step_flops(cfg, 1000, causal_pairs([600, 400]), 5)
    parts = ("llm", "attention", "projector", "encoders")
    assert set(f) == {*parts, "total"}
    assert all(f[p] > 0 for p in parts)
    assert f["total"] == pytest.approx(sum(f[p] for p in parts), rel=1e-12)
