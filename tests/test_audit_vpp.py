"""Mutation audit of the interleaved pipeline (``--vpp``) and the overlapped parameter gather:
what tests/test_parallel.py, tests/test_resume.py and tests/test_loop.py let through.

- the training command must really build ``vpp`` chunks and record ``vpp`` in meta.json (a
  ``--vpp`` that is validated but never reaches ``build_model`` trained plain 1F1B unnoticed:
  the interleaved resume test compares two such runs with each other);
- ``sync_params`` must complete the gather of every chunk (the gather test runs one chunk), and
  the schedule must be handed each chunk's own gather and reduce starters.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch

from tests.dist_harness import run_ranks


def _train_counting_chunks(rank, world_size, save, **kw):
    """``loop.run`` of a short synthetic run; returns the number of chunks it built."""
    from megatron_sphinx.train import loop
    from megatron_sphinx.train.run_config import RunConfig

    built = []
    real = loop.build_model
    loop.build_model = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    loop.run(RunConfig(recipe="debug", data="synthetic", steps=1, global_batch_size=2,
                       seq_length=1400, save=save, **kw))
    return [len(chunks) for chunks in built]


def test_the_training_command_builds_and_records_the_interleaved_chunks(tmp_path):
    save = str(tmp_path / "run")
    assert run_ranks(partial(_train_counting_chunks, pp=2, vpp=2), 2, save,
                     timeout=300) == [[2], [2]]
    meta = json.loads((Path(save) / "iter_0000001" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 1, "pp": 2, "vpp": 2, "ep": 1, "dp": 1}


def _chunk_weights(model) -> list[torch.Tensor]:
    from megatron_sphinx.train.build import unwrap

    return [torch.cat([p.detach().reshape(-1).clone() for p in unwrap(c).parameters()
                       if p.requires_grad]) for c in model]


def _gathered_chunks(rank, world_size):
    """pp2 vpp2 dp2, two steps under the overlapped gather: each chunk's weights before and
    after ``sync_params``, and how the schedule was wired."""
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.train.build import sync_params
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import SEQ, setup

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, "debug", pp=2, vpp=2)
        for _ in range(2):  # the first runs at the warm-up's lr 0
            micro = loader.next_step()
            train_step(model, opt, micro, num_microbatches=len(micro), seq_length=SEQ,
                       pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
            sched.step(1)
        before = _chunk_weights(model)
        sync_params(model)
        config = model[0].config
        wiring = {
            "param_sync": config.param_sync_func == [c.start_param_sync for c in model],
            "grad_sync": config.grad_sync_func == [c.start_grad_sync for c in model],
            "aligned": all(c.ddp_config.align_param_gather for c in model),
        }
        return pgs.pp.rank(), before, _chunk_weights(model), wiring


def test_sync_params_completes_the_gather_of_every_chunk():
    results = run_ranks(_gathered_chunks, 4, timeout=400)
    for _, _, _, wiring in results:  # each chunk's gather started by the schedule
        assert wiring == {"param_sync": True, "grad_sync": True, "aligned": True}
    for stage in (0, 1):
        (_, before_a, after_a, _), (_, before_b, after_b, _) = [r for r in results
                                                                if r[0] == stage]
        for k in range(2):
            assert not torch.equal(before_a[k], before_b[k]), (stage, k)  # own shards only
            assert torch.equal(after_a[k], after_b[k]), (stage, k)  # gathered: one model


def _gather_wiring(rank, world_size):
    from megatron_sphinx import cpu_compat
    from tests.sphinx_runs import setup

    with cpu_compat.cpu_device_mode():
        model = setup(world_size, "debug")[3]
        return model[0].ddp_config.align_param_gather, model[0].config.param_sync_func


def test_without_interleaving_the_forward_hooks_start_the_next_gather():
    """One chunk: no schedule starts the gathers, so they must not be "aligned" (aligned, each
    forward hook gathers its own bucket on demand and starts none ahead: no overlap)."""
    assert run_ranks(_gather_wiring, 2, timeout=300) == [(False, None)] * 2
