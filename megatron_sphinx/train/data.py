"""The training loop's data: which loader feeds this data-parallel rank, and step summaries."""
from __future__ import annotations

import torch

from megatron_sphinx.config import SphinxConfig
from megatron_sphinx.data.geometry import TOKENS_PER_VIEW
from megatron_sphinx.data.layout import PackedBatch
from megatron_sphinx.train.flops import causal_pairs
from megatron_sphinx.train.run_config import RunConfig


def build_loader(rc: RunConfig, cfg: SphinxConfig, *, dp_rank: int, dp_size: int):
    """The loader for this data-parallel rank.

    ``--data synthetic`` gives random samples (tests, benchmarks); otherwise the preprocessed
    store at ``--data`` (or the embedded sample data when ``--data`` is not given).
    """
    t = cfg.train
    if rc.data == "synthetic":
        from megatron_sphinx.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg.llm.vocab_size, t.seq_length, cfg.vision.image_size,
                               cfg.vision.grid, t.global_batch_size, dp_rank, dp_size, t.seed,
                               packing=rc.packing)
    raise NotImplementedError("store-backed loading lands with the data system")


def loader_summary(micro: list[PackedBatch], dp_group, device: torch.device) -> dict:
    """Global (all data-parallel ranks) counts of a step's micro-batches."""
    local = torch.tensor([
        sum(m.num_tokens for m in micro),
        sum(m.num_samples for m in micro),
        sum(m.num_skipped for m in micro),
        sum(int(m.view_counts.sum()) for m in micro),
        sum(causal_pairs((m.cu_seqlens[1:] - m.cu_seqlens[:-1])[:m.num_samples].tolist())
            for m in micro),
    ], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(local, group=dp_group)
    tokens, samples, skipped, views, pairs = local.tolist()
    return {"tokens": int(tokens), "samples": int(samples), "skipped": int(skipped),
            "views": int(views), "attention_pairs": pairs,
            "visual_tokens_saved": int(skipped) * (TOKENS_PER_VIEW + 1)}
