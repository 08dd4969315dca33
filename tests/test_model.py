"""The SPHINX-X model on one process: skip tokens, packing equivalence, published sizes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sphinx.data.geometry import POSITIONS_PER_VIEW, TOKENS_PER_VIEW, image_geometry
from megatron_sphinx.data.layout import Sample, build_packed_batch
from tests.dist_harness import run_ranks
from tests.sphinx_runs import SEQ, model_of, setup


def _sample(rng, n, hw=None):
    ids = rng.integers(3, 500, n).astype(np.int32)
    ids[0] = 1
    mask = np.zeros(n, bool)
    mask[n // 3:] = True
    return Sample(ids, mask, hw)


def _views(rng, samples):
    n = sum(int(image_geometry(*s.image_hw).view_valid().sum()) for s in samples if s.image_hw)
    return torch.from_numpy(rng.random((n, 3, 224, 224), dtype=np.float32))


def _embed_diff(model, batch):
    """The LLM input against the layout contract, position by position: text rows, then each
    encoded view's 257 projected tokens view after view, then start / end / skip, zeros for
    padding (:mod:`megatron_sphinx.data.layout`)."""
    from megatron_sphinx.data.layout import PAD_INDEX

    emb = model.embed(batch)[:, 0]  # [s, h] (b = 1)
    text = model.language_model.embedding.word_embeddings(batch.text_ids.unsqueeze(0))[0]
    visual = model.projector(model.vision(batch.views))  # [V, 257, h]
    special = model.image_embeddings.weight  # [3, h]
    T, V = len(text), visual.shape[0]
    expect = torch.zeros_like(emb)
    for i, src in enumerate(batch.pack_index.tolist()):
        if src == PAD_INDEX:
            continue
        if src < T:
            expect[i] = text[src]
        elif src < T + V * TOKENS_PER_VIEW:
            expect[i] = visual[(src - T) // TOKENS_PER_VIEW, (src - T) % TOKENS_PER_VIEW]
        else:
            expect[i] = special[src - T - V * TOKENS_PER_VIEW]
    assert V > 1 and (batch.pack_index >= T + V * TOKENS_PER_VIEW).sum() > 0
    return float((emb - expect).abs().max())


def _skip_and_packing(rank, world_size):
    from megatron_sphinx import cpu_compat
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, chunks, *_ = setup(world_size, "debug")
        model = model_of(chunks).eval()
        rng = np.random.default_rng(0)
        # --- skip tokens: a 2:1 image encodes 3 of its 5 views
        wide = _sample(rng, 20, hw=(150, 300))
        views = _views(rng, [wide])
        batch = build_packed_batch([[wide]], SEQ, 448, 2, views)
        before = model.vision.num_views_encoded
        with torch.no_grad():
            model(batch)
        encoded = model.vision.num_views_encoded - before
        full_len = 20 + 5 * POSITIONS_PER_VIEW
        # --- packing: three samples packed vs. each alone
        samples = [_sample(rng, 30), _sample(rng, 25, hw=(300, 150)), _sample(rng, 40)]
        views = _views(rng, samples)
        packed = build_packed_batch([samples], SEQ, 448, 2, views)
        with torch.no_grad():
            packed_loss = model(packed)[0]
            alone = []
            offset = 0
            for smp in samples:
                n_views = int(image_geometry(*smp.image_hw).view_valid().sum()) if smp.image_hw \
                    else 0
                b = build_packed_batch([[smp]], SEQ, 448, 2, views[offset:offset + n_views])
                offset += n_views
                alone.append(model(b)[0][:smp.length(448, 2)])
            # logits too: the LLM without labels returns [s, b, vocab]
            lm = model.language_model
            from megatron.core.packed_seq_params import PackedSeqParams

            def logits(batch):
                p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens,
                                    cu_seqlens_kv=batch.cu_seqlens, max_seqlen_q=batch.max_seqlen,
                                    max_seqlen_kv=batch.max_seqlen)
                return lm(None, None, None, decoder_input=model.embed(batch),
                          packed_seq_params=p)[:, 0]
            packed_logits = logits(packed)
            b0 = build_packed_batch([[samples[0]]], SEQ, 448, 2, views[:0])
            alone_logits0 = logits(b0)[:samples[0].length(448, 2)]
            # two rows in one micro-batch (one THD sequence) against each row alone
            rows = [[samples[0], samples[2]], [samples[1]]]
            two = model(build_packed_batch(rows, SEQ, 448, 2, views))[0].view(2, SEQ)
            row0 = model(build_packed_batch(rows[:1], SEQ, 448, 2, views[:0]))[0]
            row1 = model(build_packed_batch(rows[1:], SEQ, 448, 2, views))[0]
            rows_diff = max(float((two[0] - row0).abs().max()), float((two[1] - row1).abs().max()))
            embed_diff = _embed_diff(model, packed)
        cut = [s.length(448, 2) for s in samples]
        packed_split = torch.split(packed_loss[:sum(cut)], cut)
        return {
            "rows_diff": rows_diff, "embed_diff": embed_diff,
            "encoded": encoded, "calls_len": batch.num_tokens, "full_len": full_len,
            "loss_diff": max(float((a - p).abs().max()) for a, p in zip(alone, packed_split)),
            "loss_scale": float(packed_loss[:sum(cut)].abs().max()),
            "logit_diff": float((packed_logits[:cut[0]] - alone_logits0).abs().max()),
        }


@pytest.fixture(scope="module")
def single_rank_results():
    return run_ranks(_skip_and_packing, 1, timeout=240)[0]


def test_skipped_sub_images_are_not_encoded(single_rank_results):
    r = single_rank_results
    assert r["encoded"] == 3  # global view + the two top sub-images of a 2:1 image
    assert r["full_len"] - r["calls_len"] == 2 * (POSITIONS_PER_VIEW - 1)


def test_packed_sequence_equals_samples_alone(single_rank_results):
    r = single_rank_results
    assert r["loss_scale"] > 1.0  # real losses, not zeros
    assert r["loss_diff"] < 1e-5
    assert r["logit_diff"] < 1e-5


def test_llm_input_follows_the_pack_index(single_rank_results):
    assert single_rank_results["embed_diff"] < 1e-6


def test_two_row_micro_batch_equals_each_row_alone(single_rank_results):
    assert single_rank_results["rows_diff"] < 1e-5


def test_projector_is_linear_then_layer_norm():
    """``LayerNorm(Linear(x))`` with both affine parts and LayerNorm's default eps (SPHINX-X's
    ``nn.LayerNorm(hidden)``), computed in float64 against the functional form."""
    import torch.nn.functional as F

    from megatron_sphinx.model.projector import Projector

    torch.manual_seed(0)
    proj = Projector(48, 16, dtype=torch.float64)
    assert sorted(proj.state_dict()) == ["linear.bias", "linear.weight", "norm.bias",
                                         "norm.weight"]
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    x = torch.randn(3, 5, 48, dtype=torch.float32) * 1e-3  # small: eps matters
    ref = F.layer_norm(F.linear(x.double(), proj.linear.weight, proj.linear.bias), (16,),
                       proj.norm.weight, proj.norm.bias, eps=1e-5)
    out = proj(x)
    assert out.dtype == torch.float64 and out.shape == (3, 5, 16)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


PUBLISHED = {  # LLM parameters (embeddings, layers, output layer)
    "sphinx-tiny": 1.10e9, "sphinx-intern2": 7.74e9, "sphinx-plus": 13.02e9,
    "sphinx-moe": 46.70e9,
}


def _count_params(rank, world_size):
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.distributed import init_distributed
    from megatron_sphinx.model.llm import ParallelSizes, build_gpt, transformer_config
    from megatron_sphinx.model.vision import MixtureOfVisualExperts
    from megatron_sphinx.parallel_dims import ParallelDims

    out = {}
    with cpu_compat.cpu_device_mode():
        groups = init_distributed(ParallelDims(world_size=1), timeout_s=60)
        for name in PUBLISHED:
            cfg = get_recipe(name)
            tcfg = transformer_config(cfg.llm, ParallelSizes(), dtype=torch.bfloat16,
                                      on_gpu=False)
            tcfg.perform_initialization = False
            with torch.device("meta"):
                gpt = build_gpt(cfg.llm, tcfg, "local", pre_process=True, post_process=True,
                                pg_collection=groups.collection)
                out[name] = sum(p.numel() for p in gpt.parameters())
                if name == "sphinx-tiny":
                    mov = MixtureOfVisualExperts(cfg.vision)
                    out["encoders"] = [sum(p.numel() for p in e.parameters())
                                       for e in mov.encoders]
                    assert all(p.device.type == "meta" for p in gpt.parameters())
    return out


def test_recipes_have_published_parameter_counts():
    counts = run_ranks(_count_params, 1, timeout=240)[0]
    for name, published in PUBLISHED.items():
        assert abs(counts[name] / published - 1) < 0.005, (name, counts[name])
    convnext, dino = counts["encoders"]
    assert abs(convnext / 0.846e9 - 1) < 0.01, convnext  # CLIP ConvNeXt-XXL trunk
    assert abs(dino / 1.136e9 - 1) < 0.01, dino  # DINOv2 ViT-g/14


def _rope_tables_per_forward(rank, world_size):
    """Losses of one packed micro-batch with Megatron's per-segment RoPE loop and with the one
    gather GPUs run (forced here), and how often the latter gathered its cos / sin tables."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_sphinx import cpu_compat, upstream_fixes

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, chunks, *_ = setup(world_size, "debug")
        model = model_of(chunks).eval()
        rng = np.random.default_rng(1)
        samples = [_sample(rng, 30), _sample(rng, 25, hw=(300, 150)), _sample(rng, 40)]
        batch = build_packed_batch([samples], SEQ, 448, 2, _views(rng, samples))
        with torch.no_grad():
            loop_loss = model(batch)[0]
        gathers = []
        positions = upstream_fixes.thd_rope_positions
        upstream_fixes.thd_rope_positions = lambda *a: gathers.append(1) or positions(*a)
        installed = rope_utils._apply_rotary_pos_emb_thd
        rope_utils._apply_rotary_pos_emb_thd = (
            lambda t, cu, freqs, rotary_interleaved=False, mla_rotary_interleaved=False,
            mscale=1.0, **_: upstream_fixes.thd_rope_one_gather(
                t, cu, freqs, rotary_interleaved, mla_rotary_interleaved, mscale))
        try:
            with torch.no_grad():
                gather_loss = model(batch)[0]
        finally:
            rope_utils._apply_rotary_pos_emb_thd = installed
            upstream_fixes.thd_rope_positions = positions
        return {"layers": cfg.llm.num_layers, "gathers": len(gathers),
                "diff": float((gather_loss - loop_loss).abs().max())}


def test_rope_tables_are_gathered_once_per_forward_pass():
    """In the model, every layer's queries and keys get the same cu_seqlens and freqs tensors,
    so the one-gather RoPE (GPUs) gathers its cos / sin tables once per micro-batch, not twice
    per layer; its losses are the per-segment loop's."""
    r = run_ranks(_rope_tables_per_forward, 1, timeout=240)[0]
    assert r["layers"] > 1 and r["gathers"] == 1, r
    assert r["diff"] < 1e-5
