"""Helpers for tests that build and train SPHINX-X inside forked ranks (see dist_harness)."""
from __future__ import annotations

import torch

from megatron_sphinx import cpu_compat
from megatron_sphinx.config import get_recipe
from megatron_sphinx.data.synthetic import SyntheticLoader
from megatron_sphinx.distributed import init_distributed
from megatron_sphinx.model.llm import ParallelSizes
from megatron_sphinx.parallel_dims import ParallelDims
from megatron_sphinx.train import checkpoint as ckpt_lib
from megatron_sphinx.train.build import build_model, build_optimizer, unwrap
from megatron_sphinx.train.run_config import VisionRun
from megatron_sphinx.train.step import train_step

SEQ = 1400  # fits one 5-view image (1295 positions) plus text
GLOBAL_BATCH = 4


def small_recipe(name: str):
    """A debug recipe shortened for multi-rank tests."""
    cfg = get_recipe(name)
    cfg.train.seq_length = SEQ
    cfg.train.global_batch_size = GLOBAL_BATCH
    return cfg


def setup(world_size: int, recipe: str, tp=1, pp=1, ep=1, sp=False, steps=10, seed=1234,
          mbs=1, overlap=True, param_gather=True, vpp=1, vision_batch=0, adam="fused"):
    """Process groups, model, optimizer, scheduler and synthetic loader of one rank
    (``mbs`` packed rows per micro-batch; ``overlap``: gradient reduce during the backward;
    ``param_gather``: the updated parameters gathered during the next forward;
    ``vision_batch``: the step's views encoded as one stream, that many per encoder call;
    ``adam``: the AdamW form, ``build_optimizer``'s)."""
    cfg = small_recipe(recipe)
    cfg.train.micro_batch_size = mbs
    dims = ParallelDims(world_size=world_size, tp=tp, pp=pp, ep=ep, sequence_parallel=sp,
                        vpp=vpp if vpp > 1 else None)
    groups = init_distributed(dims, timeout_s=120, seed=seed)
    pgs = groups.collection
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelSizes(tp, pp, ep, sp, vpp), pgs, backend="local",
                        dtype=torch.float32, on_gpu=False, overlap_grad_reduce=overlap,
                        overlap_param_gather=param_gather, vision=VisionRun(batch=vision_batch))
    assert len(model) == vpp
    assert model[0].ddp_config.overlap_grad_reduce is overlap
    assert model[0].ddp_config.overlap_param_gather is param_gather
    opt, sched = build_optimizer(cfg, model, pgs, dtype=torch.float32, total_steps=steps,
                                 adam=adam)
    loader = SyntheticLoader(cfg.llm.vocab_size, SEQ, cfg.vision.image_size, cfg.vision.grid,
                             GLOBAL_BATCH, pgs.dp.rank(), pgs.dp.size(), seed=7,
                             micro_batch_size=mbs)
    return cfg, dims, pgs, model, opt, sched, loader


def save_initial_weights(rank, world_size, recipe, path):
    """World size 1: build the model from the seed and save its weights only."""
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, recipe)
        meta = ckpt_lib.CheckpointMeta(step=0, recipe=cfg.name, layout={}, code_version="test",
                                       consumed={}, has_optimizer=False)
        ckpt_lib.save_checkpoint(path, 0, model, opt, sched, pgs, meta=meta, common={})


def train_layout(rank, world_size, recipe, layout, init_ckpt, steps=3):
    """Loads the initial weights onto ``layout`` and returns (losses, grad norms) of ``steps``."""
    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, recipe, **layout)
        ckpt_lib.load_checkpoint(ckpt_lib.resolve_load(init_ckpt), model, opt, sched, pgs)
        out = []
        for _ in range(steps):
            micro = loader.next_step()
            assert all(m.shape[0] == cfg.train.micro_batch_size for m in micro)
            res = train_step(model, opt, micro, num_microbatches=len(micro),
                             seq_length=SEQ * cfg.train.micro_batch_size,
                             pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
            sched.step(1)
            out.append((res.loss, res.grad_norm))
        return out


def model_of(chunks):
    """The SphinxModel of a rank's chunks."""
    return unwrap(chunks[0])
