"""The layout planner: its memory model against a measured training step, and its layouts.

How the peak is measured (CPU, no ``torch.cuda`` statistics): a forked world-size-1 rank builds the
debug model, its DDP buffers and the distributed optimizer *inside* a
:class:`~megatron_sphinx.train.memory.TensorMemoryTracker` (a ``TorchDispatchMode`` that adds the
bytes of every new tensor storage an aten op creates and subtracts them when the storage is
freed, via a weak-reference finalizer), runs one warm-up step (the optimizer allocates its Adam
state lazily), resets the peak and runs one more real training step
(:func:`~megatron_sphinx.train.step.train_step`: Megatron's schedule over two micro-batches, then
the optimizer). Measured = the tracker's peak (all tensor memory live from model construction on:
parameters, gradient buffers, optimizer state, activations, transients) plus the bytes of the
largest micro-batch's tensors, which the loader builds with ``torch.from_numpy`` outside aten ops
and which a GPU run would copy to the device inside the step. The estimate is
:func:`~megatron_sphinx.train.memory.estimate_memory` for the same recipe, layout, dtype (fp32),
kernel path (``local``), sequence length and number of encoded views.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_sphinx.config import get_recipe
from megatron_sphinx.parallel_dims import ParallelDims
from megatron_sphinx.train.memory import (GIB, TensorMemoryTracker, estimate_memory,
                                          plan_layouts, stage_params, vision_footprint)
from tests.dist_harness import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 2


def _measure(rank, world_size, recipe, mbs=1):
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.data.synthetic import SyntheticLoader
    from megatron_sphinx.distributed import init_distributed
    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.train.build import build_model, build_optimizer
    from megatron_sphinx.train.step import train_step

    with cpu_compat.cpu_device_mode():
        cfg = get_recipe(recipe)
        pgs = init_distributed(ParallelDims(world_size=1), timeout_s=120).collection
        tracker = TensorMemoryTracker()
        with tracker:
            model = build_model(cfg, ParallelSizes(), pgs, backend="local",
                                dtype=torch.float32, on_gpu=False)
            opt, _ = build_optimizer(cfg, model, pgs, dtype=torch.float32, total_steps=4)
            seq = cfg.train.seq_length
            loader = SyntheticLoader(cfg.llm.vocab_size, seq, cfg.vision.image_size,
                                     cfg.vision.grid, GLOBAL_BATCH, seed=7, micro_batch_size=mbs)

            def step():
                micro = loader.next_step()
                train_step(model, opt, micro, num_microbatches=len(micro), seq_length=seq * mbs,
                           pg_collection=pgs, device=torch.device("cpu"), dp_group=pgs.dp)
                return micro

            step()
            tracker.reset_peak()
            micro = step()
        params = list(model[0].parameters())
        inputs = max(sum(v.nbytes for v in vars(m).values() if torch.is_tensor(v))
                     for m in micro)
        return {"peak": tracker.peak, "inputs": inputs,
                "views": max(m.views.shape[0] for m in micro),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "frozen": sum(p.numel() for p in params if not p.requires_grad)}


@pytest.mark.parametrize("recipe,mbs", [("debug", 1), ("debug-moe", 1), ("debug", 2)])
def test_memory_estimate_within_15_percent_of_measured_step(recipe, mbs):
    """mbs 2: both rows in one micro-batch (one THD sequence of 2 x seq_length positions)."""
    got = run_ranks(_measure, 1, recipe, mbs, timeout=240)[0]
    cfg = get_recipe(recipe)
    dims = ParallelDims(world_size=1)
    # The parameter arithmetic is exact.
    sp = stage_params(cfg, dims, 0, vision_footprint(cfg, torch.float32)[0])
    assert (sp.trainable, sp.frozen) == (got["trainable"], got["frozen"])
    est = estimate_memory(cfg, dims, seq_length=cfg.train.seq_length * mbs,
                          num_microbatches=GLOBAL_BATCH // mbs, dtype=torch.float32, path="local",
                          views=got["views"])[0]
    measured = got["peak"] + got["inputs"]
    assert abs(est.total - measured) / measured < 0.15, (est.as_gib(), measured / GIB)
    # Activations dominate this model: the check is about them, not about the weights.
    assert est.activations > 0.7 * est.total


def test_tracker_counts_new_storages_once_and_frees_them():
    base = torch.ones(1000)
    with TensorMemoryTracker() as tracker:
        view = base[:10]  # a view: no new storage
        base.add_(1)  # in place: no new storage
        a = torch.empty(1024)  # 4 KiB
        b = a * 2  # 4 KiB
        del a
        c = torch.empty(256)  # 1 KiB, while b is alive
    assert tracker.peak == 8192
    assert tracker.live == 4096 + 1024
    del b, c, view


def test_sphinx_moe_on_64_h100_fits_tp1_ep8_pp4():
    cfg = get_recipe("sphinx-moe")
    plans = plan_layouts(cfg, gpus=64, gpu_mem_gib=80, seq_length=4096, global_batch_size=256)
    fits = [p for p in plans if p.fits]
    layouts = {(p.dims.tp, p.dims.ep, p.dims.pp) for p in fits}
    assert (1, 8, 4) in layouts
    times = [p.time.seconds for p in plans]
    assert times == sorted(times)
    for p in plans:  # every listed layout passes Megatron's rules and splits the batch
        assert p.dims.world_size == 64 and 256 % p.dims.dp == 0
        assert (p.dims.dp * p.dims.tp) % (p.dims.expert_tp * p.dims.ep) == 0
        assert all(s.total > 0 for s in p.stages)
        assert p.fits == (p.peak.total <= 0.9 * 80 * GIB)
    # The first stage carries the frozen encoders (bf16), no other stage does.
    tp1 = next(p for p in fits if (p.dims.tp, p.dims.ep, p.dims.pp) == (1, 8, 4))
    n_frozen = vision_footprint(cfg, torch.bfloat16)[0]
    assert tp1.stages[0].encoders == 2 * n_frozen and tp1.stages[1].encoders == 0
    # Recompute trades activations for time.
    by_rc = {p.recompute: p for p in plans if (p.dims.tp, p.dims.ep, p.dims.pp) == (1, 8, 4)}
    assert by_rc["full"].peak.activations < by_rc["none"].peak.activations
    assert by_rc["full"].time.seconds > by_rc["none"].time.seconds


def test_nothing_fits_when_the_model_cannot():
    cfg = get_recipe("sphinx-moe")  # ~47B parameters at 18 bytes each do not fit 8 x 80 GiB
    plans = plan_layouts(cfg, gpus=8, gpu_mem_gib=80, seq_length=4096, global_batch_size=256)
    assert plans and not any(p.fits for p in plans)


def _tool():
    spec = importlib.util.spec_from_file_location("plan_layout", ROOT / "tools" / "plan_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_lists_fits_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plans.json"
    rc = _tool().main(["--recipe", "sphinx-moe", "--gpus", "64", "--gpu-mem-gib", "80",
                       "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "step_s" in text
    import json

    plans = json.loads(out.read_text())["plans"]
    assert plans and all(p["fits"] for p in plans)
    assert any((p["tp"], p["ep"], p["pp"]) == (1, 8, 4) for p in plans)


def test_two_row_micro_batches_hold_more_activations_per_pass():
    cfg = get_recipe("sphinx-tiny")
    one, two = (plan_layouts(cfg, gpus=8, gpu_mem_gib=80, seq_length=4096, global_batch_size=64,
                             recompute_options=("none",), micro_batch_size=m) for m in (1, 2))
    by_layout = {(p.dims.tp, p.dims.pp, p.dims.ep): p for p in two}
    compared = 0
    for p in one:
        q = by_layout.get((p.dims.tp, p.dims.pp, p.dims.ep))
        if q is None or p.dims.pp > 1:
            continue
        compared += 1
        # same FLOPs per step; a pass holds two rows' activations
        assert q.time.seconds == pytest.approx(p.time.seconds, rel=1e-6)
        assert q.peak.activations > 1.5 * p.peak.activations
    assert compared


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope", "--gpus", "8", "--gpu-mem-gib", "80"], "unknown recipe"),
    (["--recipe", "debug", "--gpus", "0", "--gpu-mem-gib", "80"], "--gpus"),
    (["--recipe", "debug", "--gpus", "8", "--gpu-mem-gib", "80", "--mfu", "2"], "--mfu"),
    (["--recipe", "debug", "--gpus", "8", "--gpu-mem-gib", "80", "--micro-batch-size", "0"],
     "--micro-batch-size"),
])
def test_cli_bad_input(argv, message, tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert _tool().main(argv + ["--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not out.exists()


def test_parts_follow_the_layout_rules():
    """Experts split over ep * etp; fp32 gradient buffers; 1F1B holds pp - s micro-batches on
    stage s; the bubble is (pp - 1) / (m + pp - 1)."""
    from megatron_sphinx.train.memory import estimate_step_time

    cfg = get_recipe("sphinx-moe")
    one, two = (stage_params(cfg, ParallelDims(world_size=16, tp=2, ep=4, etp=etp), 0)
                for etp in (1, 2))
    assert one.expert == 2 * two.expert > 0 and one.dense == two.dense
    dims = ParallelDims(world_size=64, ep=8, pp=4)
    stages = estimate_memory(cfg, dims, seq_length=4096, num_microbatches=16)
    for s, stage in enumerate(stages):
        trainable = stage_params(cfg, dims, s).trainable
        assert stage.params == 2 * trainable and stage.grads == 4 * trainable  # bf16, fp32
        assert stage.detail["in_flight"] == 4 - s
    few = estimate_memory(cfg, dims, seq_length=4096, num_microbatches=2)
    assert [st.detail["in_flight"] for st in few] == [2, 2, 2, 1]
    t = estimate_step_time(cfg, dims, seq_length=4096, global_batch_size=64, mfu=0.4,
                           peak_tflops=989)
    m = 64 // dims.dp
    assert t.bubble_fraction == pytest.approx(3 / (m + 3))
