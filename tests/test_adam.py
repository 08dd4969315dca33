"""torch's AdamW in its fused form under Megatron's distributed optimizer
(:mod:`megatron_sphinx.train.adam`): the same updates as the multi-tensor form, and a checkpoint
of either form resumes in the fused one. Resuming the fused form exactly is
``tests/test_resume.py``'s (it is the training default); the GPU's is ``tests/test_gpu.py``'s."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model[0].parameters()]


def _step(model, opt, sched, loader, cfg, pgs) -> None:
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import SEQ

    micro = loader.next_step()
    train_step(model, opt, micro, num_microbatches=len(micro), seq_length=SEQ,
               pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
    sched.step(1)


def _foreach_checkpoint_into_fused(rank, world_size, path):
    """Two steps in the multi-tensor form and a checkpoint after the first; then the same
    optimizer switched to the fused form loads that checkpoint and takes the second step again.
    Returns what the test checks."""
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.train import adam
    from megatron_sphinx.train import checkpoint as ckpt_lib
    from tests.sphinx_runs import setup

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(1, "debug", steps=4, adam="foreach")
        before = adam.describe(opt)
        _step(model, opt, sched, loader, cfg, pgs)
        meta = ckpt_lib.CheckpointMeta(step=1, recipe=cfg.name, layout=dict(tp=1, pp=1, ep=1),
                                       code_version="test", consumed={}, has_optimizer=True)
        ckpt = ckpt_lib.save_checkpoint(path, 1, model, opt, sched, pgs, meta=meta, common={})
        loader_state = loader.state_dict()
        _step(model, opt, sched, loader, cfg, pgs)
        foreach = _params(model)

        adam.use_fused(opt)
        sched.num_steps = 0  # as a new run's: loading adds the checkpoint's steps
        ckpt_lib.load_checkpoint(ckpt, model, opt, sched, pgs)
        loader.load_state_dict(loader_state)
        inner = adam.inner_optimizers(opt)
        groups = [g for i in inner for g in i.param_groups]
        steps = [s["step"] for i in inner for s in i.state.values()]
        loaded = dict(describe=adam.describe(opt),
                      flags={(g["fused"], g["foreach"]) for g in groups},
                      steps={(float(s), s.dtype, s.device.type) for s in steps},
                      distinct=len({id(s) for s in steps}) == len(steps) > 0)
        _step(model, opt, sched, loader, cfg, pgs)
        fused = _params(model)
        after = {(float(s), s.dtype) for i in inner for s in (x["step"] for x in i.state.values())}
        diff = max(float((a - b).abs().max()) for a, b in zip(foreach, fused))
        scale = max(float(a.abs().max()) for a in foreach)
        return before, loaded, after, diff / scale


def test_foreach_checkpoint_resumes_in_the_fused_form(tmp_path):
    [(before, loaded, after, diff)] = run_ranks(_foreach_checkpoint_into_fused, 1,
                                                 str(tmp_path), timeout=300)
    assert before == "torch AdamW, multi-tensor (foreach)"
    # the checkpoint's groups say foreach: the load keeps the form this run chose
    assert loaded["describe"] == "torch AdamW, fused (one kernel)"
    assert loaded["flags"] == {(True, False)}
    # one step counter per parameter (torch's increments each in place), at the saved step,
    # in fp32 on the parameters' device as the fused kernel reads it
    assert loaded["steps"] == {(1.0, torch.float32, "cpu")} and loaded["distinct"]
    assert after == {(2.0, torch.float32)}
    # the second step again, fused: the multi-tensor form's parameters up to fp32 rounding
    assert diff < 1e-6, diff


def test_use_fused_refuses_parameters_the_kernel_does_not_take():
    from megatron_sphinx.train import adam

    class Wrapped:  # the shape of a Megatron optimizer: the torch one under ``.optimizer``
        def __init__(self, params):
            self.optimizer = torch.optim.AdamW(params)

    ints = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="--adam foreach"):
        adam.use_fused(Wrapped([torch.nn.Parameter(torch.zeros(2)), ints]))
    floats = Wrapped([torch.nn.Parameter(torch.zeros(2))])
    adam.use_fused(floats)
    assert adam.describe(floats) == "torch AdamW, fused (one kernel)"
    assert adam.describe(Wrapped([torch.nn.Parameter(torch.zeros(2))])) == \
        "torch AdamW, multi-tensor (foreach)"
