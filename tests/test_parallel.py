"""Every parallel layout reproduces the single-process run (same initial weights, fp32).

The world-size-1 model's weights are saved once per recipe and loaded onto each layout
(Megatron reshards them), then three training steps run on the same global batches; losses and
gradient norms must match the single-process run within 1e-5 relative. Micro-batches of several
packed rows (one THD sequence each) must reproduce it too, and so must encoding the step's views
as one stream (``--vision-batch``).
"""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_ranks
from tests.sphinx_runs import save_initial_weights, train_layout

LAYOUTS = {
    "debug": [
        ("tp2", 2, dict(tp=2)),
        ("tp2_sp", 2, dict(tp=2, sp=True)),
        ("pp2", 2, dict(pp=2)),
        # gradient reduce-scatter overlapped with the backward, parameter all-gather with the
        # next forward (the defaults)
        ("dp2", 2, dict()),
        ("dp2_no_overlap", 2, dict(overlap=False, param_gather=False)),
        ("tp2_pp2", 4, dict(tp=2, pp=2)),
        # interleaved schedule: two chunks of one layer per pipeline rank
        ("pp2_vpp2", 2, dict(pp=2, vpp=2)),
        ("pp2_vpp2_dp2", 4, dict(pp=2, vpp=2)),  # + each chunk's parameter gather aligned
        # micro-batches of 2 rows run as one THD sequence of 2 x seq_length tokens
        ("mbs2", 1, dict(mbs=2)),
        ("tp2_sp_mbs2", 2, dict(tp=2, sp=True, mbs=2)),
        ("pp2_mbs2", 2, dict(pp=2, mbs=2)),
        # the step's views encoded as one stream, 8 per encoder call (the last call padded)
        ("vb8", 1, dict(vision_batch=8)),
        ("pp2_vpp2_vb8", 2, dict(pp=2, vpp=2, vision_batch=8)),
    ],
    "debug-moe": [
        ("ep2", 2, dict(ep=2)),
        ("tp2_sp_ep2", 4, dict(tp=2, ep=2, sp=True)),  # Megatron: MoE + TP needs SP
        ("ep2_mbs2", 2, dict(ep=2, mbs=2)),
        ("pp2_vpp2_ep2", 4, dict(pp=2, vpp=2, ep=2)),
    ],
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def reference(request, tmp_path_factory):
    recipe = request.param
    path = tmp_path_factory.mktemp(f"init_{recipe}")
    run_ranks(save_initial_weights, 1, recipe, str(path), timeout=240)
    ref = run_ranks(train_layout, 1, recipe, {}, str(path), timeout=300)[0]
    return recipe, str(path), ref


def test_layouts_match_single_process(reference):
    recipe, path, ref = reference
    assert len(ref) == 3 and all(loss > 1.0 for loss, _ in ref)
    failures = []
    for name, world, layout in LAYOUTS[recipe]:
        results = run_ranks(train_layout, world, recipe, layout, path, timeout=400)
        for rank_result in results:  # every rank reports the same global numbers
            for (loss, gn), (rl, rg) in zip(rank_result, ref):
                if abs(loss - rl) > 1e-5 * abs(rl) or abs(gn - rg) > 1e-5 * abs(rg):
                    failures.append((name, loss, rl, gn, rg))
    assert not failures, failures


def _text_only_steps(rank, world_size, overlap):
    """Three steps whose micro-batches hold no image (text-only rows) after one with images."""
    import torch

    from megatron_sphinx import cpu_compat
    from megatron_sphinx.data.synthetic import SyntheticLoader
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import GLOBAL_BATCH, SEQ, setup

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, "debug", overlap=overlap)
        text_only = SyntheticLoader(cfg.llm.vocab_size, SEQ, cfg.vision.image_size,
                                    cfg.vision.grid, GLOBAL_BATCH, pgs.dp.rank(), pgs.dp.size(),
                                    seed=7, image_fraction=0.0)
        out = []
        for src in (loader, text_only, text_only):
            micro = src.next_step()
            res = train_step(model, opt, micro, num_microbatches=len(micro), seq_length=SEQ,
                             pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
            sched.step(1)
            out.append((res.loss, res.grad_norm, sum(m.views.shape[0] for m in micro)))
        return out


def test_micro_batches_without_images_under_overlapped_gradient_reduce():
    """DDP's overlapped reduce waits for every trainable parameter's gradient; the projector
    must take part in a micro-batch without images too (it failed with 'Communication call
    has not been issued for this bucket')."""
    plain = run_ranks(_text_only_steps, 2, False, timeout=300)
    overlapped = run_ranks(_text_only_steps, 2, True, timeout=300)
    assert plain[0][0][2] > 0 and plain[0][1][2] == plain[0][2][2] == 0  # views, then none
    assert overlapped == plain


def _weights_after_one_step(rank, world_size, param_gather):
    """The updated weights as this rank holds them after two steps (the first runs at the
    warm-up's lr 0), before and after ``sync_params``."""
    import torch

    from megatron_sphinx import cpu_compat
    from megatron_sphinx.train.build import sync_params
    from megatron_sphinx.train.step import train_step
    from tests.sphinx_runs import SEQ, model_of, setup

    with cpu_compat.cpu_device_mode():
        cfg, dims, pgs, model, opt, sched, loader = setup(world_size, "debug",
                                                          param_gather=param_gather)
        for _ in range(2):
            micro = loader.next_step()
            train_step(model, opt, micro, num_microbatches=len(micro), seq_length=SEQ,
                       pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
            sched.step(1)
        flat = lambda: torch.cat([p.detach().reshape(-1).clone()  # noqa: E731
                                  for p in model_of(model).parameters() if p.requires_grad])
        before = flat()
        sync_params(model)
        return before, flat()


@pytest.mark.parametrize("param_gather", [True, False], ids=["overlapped", "in_step"])
def test_parameter_gather_waits_for_the_next_forward_pass(param_gather):
    """With the overlapped gather the optimizer step leaves each rank with only its own shard
    updated (the ranks differ) until the gather; ``sync_params`` completes it."""
    (before0, after0), (before1, after1) = run_ranks(_weights_after_one_step, 2, param_gather,
                                                     timeout=300)
    assert torch.equal(after0, after1)
    assert torch.equal(before0, before1) is not param_gather
    assert torch.equal(before0, after0) is not param_gather
