"""The training loop's data: which loader feeds this data-parallel rank, and step summaries."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_sphinx.config import SphinxConfig
from megatron_sphinx.data.geometry import TOKENS_PER_VIEW
from megatron_sphinx.data.layout import PackedBatch
from megatron_sphinx.train.flops import causal_pairs
from megatron_sphinx.train.run_config import RunConfig


#: Seed offset of the synthetic evaluation stream (so that it is not the training stream).
EVAL_SEED_OFFSET = 1


def build_loader(rc: RunConfig, cfg: SphinxConfig, *, dp_rank: int, dp_size: int,
                 evaluation: bool = False):
    """The loader for this data-parallel rank.

    ``--data synthetic`` gives random samples (tests, benchmarks); otherwise the preprocessed
    store at ``--data`` (or the embedded sample data when ``--data`` is not given). With
    ``evaluation``, the same for ``--eval-data`` (the synthetic stream then has another seed).
    With ``--eval-split F`` the store's held-out part (:mod:`megatron_sphinx.data.split`) is the
    evaluation data and training reads the rest. Both loaders batch alike: global batch,
    micro-batch, sequence length, packing and skipping.
    """
    t = cfg.train
    data, flag = (rc.data, "--data")
    if evaluation and rc.eval_data is not None:
        data, flag = rc.eval_data, "--eval-data"
    if data == "synthetic":
        from megatron_sphinx.data.synthetic import SyntheticLoader

        return SyntheticLoader(cfg.llm.vocab_size, t.seq_length, cfg.vision.image_size,
                               cfg.vision.grid, t.global_batch_size, dp_rank, dp_size,
                               t.seed + (EVAL_SEED_OFFSET if evaluation else 0),
                               packing=rc.packing, skip_padded=rc.skip_padded_views,
                               micro_batch_size=t.micro_batch_size,
                               # GPUs only: there the step waits on it; on CPUs a 4-rank
                               # test crashed once (segfault) with the thread, cause unknown
                               prefetch=torch.cuda.is_available())
    from megatron_sphinx.data.loader import LoaderConfig, PackedLoader
    from megatron_sphinx.data.store import StoreReader

    path = Path(data) if data else ensure_sample_store(cfg)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist: pass a store written by "
                                "tools/preprocess_data.py")
    reader = StoreReader(path, image_size=cfg.vision.image_size, grid=cfg.vision.grid)
    if rc.eval_split is not None:
        from megatron_sphinx.data.split import split_source

        reader = split_source(reader, rc.eval_split)[1 if evaluation else 0]
    # Without pipeline parallelism a packed row is only padded to a multiple of 64 positions
    # (THD attention takes any length); pipelines exchange fixed [seq_length, b, h] tensors.
    lcfg = LoaderConfig(seq_length=t.seq_length, image_size=cfg.vision.image_size,
                        grid=cfg.vision.grid, global_batch_size=t.global_batch_size,
                        micro_batch_size=t.micro_batch_size, seed=t.seed,
                        pad_to_multiple=TRIM_MULTIPLE if rc.pp == 1 else None,
                        packing=rc.packing, skip_padded=rc.skip_padded_views)
    return PackedLoader(reader, lcfg, dp_rank=dp_rank, dp_size=dp_size)


#: Packed rows are padded to a multiple of this many positions (when not pipelining).
TRIM_MULTIPLE = 64

#: Where the embedded sample data and its store are built on first use.
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample_data"


def source_names(loader) -> list[str]:
    """The mix sources a loader reads, by source id (synthetic data: one, unnamed)."""
    source = getattr(loader, "source", None)
    return list(source.source_names) if source is not None else ["synthetic"]


def by_source(names: list[str], pairs) -> dict[str, float]:
    """``{source name: mean loss per trained token}`` of the sources with trained tokens, from
    ``(loss sum, tokens)`` pairs by source id (empty for a one-source mix)."""
    return {name: total / tokens for name, (total, tokens) in zip(names, pairs) if tokens}


def ensure_sample_store(cfg: SphinxConfig) -> Path:
    """The store of the embedded sample data, generated and preprocessed once (rank 0 builds,
    the other ranks wait)."""
    import shutil

    from megatron_sphinx.data import store as store_lib
    from megatron_sphinx.data.build_store import Comm, StoreSpec, build_store
    from megatron_sphinx.data.sample_data import generate

    raw = SAMPLE_DIR / "raw"
    store = SAMPLE_DIR / f"store_{cfg.vision.image_size}_{cfg.vision.grid}.zarr"
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if first:
        if not (raw / "mix.yaml").exists():  # absent, or a generation that died half-way
            shutil.rmtree(raw, ignore_errors=True)
            logging.getLogger(__name__).info("generating the sample data in %s", raw)
            generate(raw)
        if store.exists() and not store_lib.read_meta(store)[1]:  # an interrupted build
            shutil.rmtree(store)
        build_store(StoreSpec(mix=raw / "mix.yaml", out=store, seq_length=4096,
                              image_size=cfg.vision.image_size, grid=cfg.vision.grid,
                              progress=False), comm=Comm.single())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return store


def loader_summary(micro: list[PackedBatch], dp_group, device: torch.device) -> dict:
    """Global (all data-parallel ranks) counts of a step's micro-batches."""
    local = torch.tensor([
        sum(m.num_tokens for m in micro),
        sum(m.num_samples for m in micro),
        sum(m.num_skipped for m in micro),
        sum(int(m.view_counts.sum()) for m in micro),
        sum(causal_pairs(m.sample_lengths) for m in micro),
        sum(m.labels.numel() for m in micro),
    ], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(local, group=dp_group)
    tokens, samples, skipped, views, pairs, positions = local.tolist()
    return {"tokens": int(tokens), "samples": int(samples), "skipped": int(skipped),
            "views": int(views), "attention_pairs": pairs, "positions": int(positions),
            "visual_tokens_saved": int(skipped) * (TOKENS_PER_VIEW + 1)}
