"""The layout planner: its memory model against a measured training step, and its layouts.

How the peak is measured (CPU, no ``torch.cuda`` statistics): forked ranks build the debug model,
its DDP buffers and the distributed optimizer *inside* a
:class:`~megatron_sphinx.train.memory.TensorMemoryTracker` (a ``TorchDispatchMode`` that adds the
bytes of every new tensor storage an aten op creates and subtracts them when the storage is
freed, via a weak-reference finalizer), run one warm-up step (the optimizer allocates its Adam
state lazily), reset the peak and run one more real training step
(:func:`~megatron_sphinx.train.step.train_step`: Megatron's schedule over the micro-batches, then
the optimizer). The loader runs with the tracker paused: its micro-batch tensors (pixels
included, built partly with aten ops such as ``torch.cat``) are host memory in a GPU run, and
only the one micro-batch being run is copied to the device. Measured = the tracker's peak (all
tensor memory live from model construction on: parameters, gradient buffers, optimizer state,
activations, transients) plus the bytes of the largest micro-batch's tensors. The estimate is
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


def _untracked(tracker, fn):
    """``fn()`` with the tracker paused (it is re-entered afterwards)."""
    tracker.__exit__(None, None, None)
    try:
        return fn()
    finally:
        tracker.__enter__()


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
                micro = _untracked(tracker, loader.next_step)
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
def test_memory_estimate_within_5_percent_of_measured_step(recipe, mbs):
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
    assert abs(est.total - measured) / measured < 0.05, (est.as_gib(), measured / GIB)
    # Activations dominate this model: the check is about them, not about the weights.
    assert est.activations > 0.7 * est.total


def _measure_pipeline(rank, world_size, vpp):
    """pp 2 (vpp model chunks per rank) on the debug recipe of tests/sphinx_runs.py."""
    from megatron_sphinx import cpu_compat
    from megatron_sphinx.train.step import train_step
    from tests import sphinx_runs

    with cpu_compat.cpu_device_mode():
        tracker = TensorMemoryTracker()
        with tracker:
            cfg, dims, pgs, model, opt, sched, loader = sphinx_runs.setup(
                world_size, "debug", pp=2, vpp=vpp)

            def step():
                micro = _untracked(tracker, loader.next_step)
                train_step(model, opt, micro, num_microbatches=len(micro),
                           seq_length=sphinx_runs.SEQ, pg_collection=pgs,
                           device=torch.device("cpu"), dp_group=pgs.dp)
                return micro

            step()
            static = tracker.live  # weights, gradient buffers, optimizer state
            tracker.reset_peak()
            micro = step()
        params = [p for chunk in model for p in chunk.parameters()]
        return {"peak": tracker.peak, "static": static, "m": len(micro),
                "inputs": max(sum(v.nbytes for v in vars(m).values() if torch.is_tensor(v))
                              for m in micro),
                "views": max(m.views.shape[0] for m in micro),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "frozen": sum(p.numel() for p in params if not p.requires_grad)}


def test_interleaved_pipeline_memory_matches_measured_ranks():
    """pp 2 with 1F1B and with vpp 2 (one layer per chunk), 4 micro-batches: the activations
    within 5% of the measured growth during the step, every rank's total within 10% of its
    measured peak (what is left over is small fixed state a model this size makes visible:
    per-chunk RoPE caches, the p2p receive buffers kept between steps), and interleaving costs
    more activation memory on both ranks, measured and estimated (rank 0: 5 chunk passes of
    1 layer in flight against 2 micro-batches of 2 layers; rank 1: 3 against 1)."""
    from tests.sphinx_runs import SEQ, small_recipe

    cfg = small_recipe("debug")
    frozen = vision_footprint(cfg, torch.float32)[0]
    measured_act, estimated_act = {}, {}
    for vpp in (None, 2):
        got = run_ranks(_measure_pipeline, 2, vpp or 1, timeout=240)
        dims = ParallelDims(world_size=2, pp=2, vpp=vpp)
        est = estimate_memory(cfg, dims, seq_length=SEQ, num_microbatches=got[0]["m"],
                              dtype=torch.float32, path="local",
                              views=max(g["views"] for g in got))
        for rank, (g, e) in enumerate(zip(got, est)):
            sp = stage_params(cfg, dims, rank, frozen)
            assert (sp.trainable, sp.frozen) == (g["trainable"], g["frozen"])
            measured = g["peak"] + g["inputs"]
            assert abs(e.total - measured) / measured < 0.10, (vpp, rank, e.as_gib(),
                                                               measured / GIB)
            act = g["peak"] - g["static"]
            assert abs(e.activations - act) / act < 0.05, (vpp, rank, e.activations, act)
            measured_act[vpp, rank], estimated_act[vpp, rank] = act, e.activations
        assert [e.detail["in_flight"] for e in est] == ([2, 1] if vpp is None else [5, 3])
    for table in (measured_act, estimated_act):
        assert table[2, 0] > 1.2 * table[None, 0] and table[2, 1] > 1.2 * table[None, 1]


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
    tp1 = next(p for p in fits
               if (p.dims.tp, p.dims.ep, p.dims.pp, p.dims.vpp) == (1, 8, 4, None))
    n_frozen = vision_footprint(cfg, torch.bfloat16)[0]
    assert tp1.stages[0].encoders == 2 * n_frozen and tp1.stages[1].encoders == 0
    # Recompute trades activations for time.
    by_rc = {p.recompute: p for p in plans
             if (p.dims.tp, p.dims.ep, p.dims.pp, p.dims.vpp) == (1, 8, 4, None)}
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


# ------------------------------------------------------------------------------ interleaving

def test_interleaved_bubble_falls_with_vpp_and_messages_grow():
    """vpp 1 (None) keeps the 1F1B bubble (pp - 1) / (m + pp - 1); vpp v gives
    (pp - 1) / (v m + pp - 1), a shorter compute time, and v times the pipeline messages."""
    from megatron_sphinx.train.memory import estimate_step_time

    cfg = get_recipe("sphinx-moe")
    times = {}
    for vpp in (None, 2, 4, 8):
        dims = ParallelDims(world_size=64, ep=8, pp=4, vpp=vpp)
        times[vpp] = estimate_step_time(cfg, dims, seq_length=4096, global_batch_size=256,
                                        mfu=0.4, peak_tflops=989)
    m = 256 // 16
    assert times[None].bubble_fraction == pytest.approx(3 / (m + 3))
    for v in (2, 4, 8):
        assert times[v].bubble_fraction == pytest.approx(3 / (v * m + 3))
        assert times[v].p2p_bytes == pytest.approx(v * times[None].p2p_bytes)
        assert times[v].p2p_seconds == pytest.approx(v * times[None].p2p_seconds)
    bubbles = [times[v].bubble_fraction for v in (None, 2, 4, 8)]
    compute = [times[v].seconds - times[v].p2p_seconds for v in (None, 2, 4, 8)]
    assert bubbles == sorted(bubbles, reverse=True) and len(set(bubbles)) == 4
    assert compute == sorted(compute, reverse=True) and len(set(compute)) == 4
    # compute = (m + (pp - 1) / vpp) slots: what vpp 2 saves is half the 1F1B fill and drain
    slot = compute[0] / (m + 3)
    assert compute[1] == pytest.approx((m + 1.5) * slot)
    # one message per chunk pass each way: [t/tp, h] bf16 at tp 1, 2 m of them under 1F1B
    assert times[None].p2p_bytes == 2 * m * 4096 * 4096 * 2
    # no pipeline, no messages and no bubble
    flat = estimate_step_time(cfg, ParallelDims(world_size=64, ep=8), seq_length=4096,
                              global_batch_size=256, mfu=0.4, peak_tflops=989)
    assert flat.p2p_seconds == 0 and flat.bubble_fraction == 0


def _megatron_warmup(pp, rank, m, vpp):
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    # Megatron reads pp size, pp rank and vpp from the communicator: no process group needed.
    comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda: rank),
                           virtual_pipeline_model_parallel_size=vpp)
    return get_pp_rank_microbatches(m, vpp or 1, pp, p2p_communicator=comm)


@pytest.mark.parametrize("pp,vpp,m", [(2, None, 1), (4, None, 2), (4, None, 16), (2, 2, 2),
                                      (2, 2, 4), (4, 2, 4), (4, 2, 16), (4, 4, 8), (3, 3, 6),
                                      (8, 2, 8)])
def test_warmup_and_pass_order_follow_megatron(pp, vpp, m):
    """Warm-up counts equal Megatron's ``get_pp_rank_microbatches``, the chunk order its
    schedule table, and replaying the passes with one unit per chunk pass peaks at warm-up + 1
    (Megatron's ``max_outstanding_backprops``) or every pass when all are warm-up."""
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    from megatron_sphinx.train.pipeline_schedule import (chunk_order, schedule_ops,
                                                         schedule_peak, warmup_passes)

    v = vpp or 1
    if vpp:
        assert chunk_order(m, v, pp) == [c for _, c in get_schedule_table(m, v, pp)]
    for rank in range(pp):
        total, all_warm, warm, _ = _megatron_warmup(pp, rank, m, vpp)
        assert warmup_passes(pp, rank, m, vpp) == warm
        ops = schedule_ops(pp, rank, m, vpp)
        assert sum(f for f, _ in ops) == len(ops) - sum(f for f, _ in ops) == total
        for c in range(v):  # every chunk runs forward and backward once per micro-batch
            assert ops.count((True, c)) == ops.count((False, c)) == m
        assert schedule_peak(ops, [1.0] * v, [0.0] * v, [0.0] * v) == (
            total if all_warm else warm + 1)


def test_interleaved_stage_memory_follows_the_schedule():
    """Same parameters per rank as 1F1B; in flight: 2 (pp - s - 1) + (vpp - 1) pp + 1 chunk
    passes of L / (pp vpp) layers (rank 0: pp - 1 chunk passes more than 1F1B's pp
    micro-batches; the last rank: (vpp - 1) pp + 1 instead of one micro-batch); and at vpp 1
    the replayed schedule gives the closed 1F1B form."""
    cfg = get_recipe("sphinx-intern2")  # 32 layers
    pp, m = 4, 16
    base = estimate_memory(cfg, ParallelDims(world_size=8, tp=2, pp=pp, sequence_parallel=True),
                           seq_length=4096, num_microbatches=m)
    for vpp in (2, 4):
        dims = ParallelDims(world_size=8, tp=2, pp=pp, vpp=vpp, sequence_parallel=True)
        stages = estimate_memory(cfg, dims, seq_length=4096, num_microbatches=m)
        for s, (one, inter) in enumerate(zip(base, stages)):
            assert (inter.params, inter.grads, inter.optimizer, inter.encoders) == (
                one.params, one.grads, one.optimizer, one.encoders)
            assert inter.detail["in_flight"] == 2 * (pp - s - 1) + (vpp - 1) * pp + 1
            assert inter.detail["chunk_layers"] == 32 // (pp * vpp)
        # the last rank holds (vpp - 1) pp + 1 chunk passes instead of one micro-batch
        assert stages[-1].activations > base[-1].activations
        if vpp == 2:  # rank 0 by hand, from the pass order 0000 1111 0000 1111 ... (warm-up 10)
            d = stages[0].detail
            chunk, head = d["chunk_layers"] * d["per_layer"], d["stage_extra"]
            # encoders: before the 2nd steady-state forward of chunk 0, 10 passes held, 7 of
            # them chunk 0's (with projector inputs); training: 11 passes, 8 of chunk 0
            expected = max(10 * chunk + 7 * head + d["vision_transient"], 11 * chunk + 8 * head)
            assert stages[0].activations == pytest.approx(expected, rel=1e-12)
            # last rank (warm-up 4): the output layer's backward starts with 5 passes held,
            # one of them the last chunk's (with the output layer's activations)
            d = stages[-1].detail
            expected = 5 * chunk + d["stage_extra"] + d["bwd_transient"]
            assert stages[-1].activations == pytest.approx(expected, rel=1e-12)
    # vpp 1 through the replayed schedule is the closed 1F1B form
    for one in base:
        d = one.detail
        held = d["in_flight"] * (d["layers"] * d["per_layer"] + d["stage_extra"])
        closed = held + d["bwd_transient"]
        if one.stage == 0:
            closed = max(closed, held - d["layers"] * d["per_layer"] - d["stage_extra"]
                         + d["vision_transient"])
        assert one.activations == pytest.approx(closed, rel=1e-12)


def test_plans_list_exactly_the_valid_vpp():
    """Every 1F1B layout with pp >= 2 gets its vpp 2, 4, 8 variants exactly when pp * vpp
    divides the layers and the micro-batches are a multiple of pp (here: only with tp >= 2,
    since 4 rows over 8 GPUs leave tp1 layouts m = pp / 2)."""
    cfg = get_recipe("sphinx-intern2")  # 32 layers
    plans = plan_layouts(cfg, gpus=8, gpu_mem_gib=80, seq_length=4096, global_batch_size=4,
                         recompute_options=("full",))
    listed: dict[tuple, set] = {}
    for p in plans:
        listed.setdefault((p.dims.tp, p.dims.pp, p.dims.dp), set()).add(p.dims.vpp)
    assert any(len(v) > 1 for v in listed.values())
    for (tp, pp, dp), vpps in listed.items():
        m = 4 // dp
        expected = {None} | {v for v in (2, 4, 8)
                             if pp >= 2 and 32 % (pp * v) == 0 and m % pp == 0}
        assert vpps == expected, (tp, pp, dp)
    assert any(tp == 1 and pp >= 2 for tp, pp, _ in listed)  # tp1 pipelines: 1F1B only
    # --max-vpp caps them; 1 turns interleaving off
    capped = plan_layouts(cfg, gpus=8, gpu_mem_gib=80, seq_length=4096, global_batch_size=4,
                          recompute_options=("full",), max_vpp=2)
    assert {p.dims.vpp for p in capped} == {None, 2}
    off = plan_layouts(cfg, gpus=8, gpu_mem_gib=80, seq_length=4096, global_batch_size=4,
                       recompute_options=("full",), max_vpp=1)
    assert {p.dims.vpp for p in off} == {None}


def test_cli_shows_vpp(tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert _tool().main(["--recipe", "sphinx-plus", "--gpus", "16", "--gpu-mem-gib", "80",
                         "--max-vpp", "4", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if "step_s" in line).split()
    assert "vpp" in head and "p2p_s" in head
    import json

    plans = json.loads(out.read_text())["plans"]
    assert {p["vpp"] for p in plans} == {1, 2, 4}
    keys = [(p["tp"], p["pp"], p["vpp"], p["ep"], p["recompute"]) for p in plans]
    assert len(keys) == len(set(keys))  # rows that differ only by vpp stay apart
    col = head.index("vpp")
    rows = [line.split() for line in lines[lines.index(next(l for l in lines if "step_s" in l))
                                           + 2:]]
    assert [int(r[col]) for r in rows] == [p["vpp"] for p in plans]
    times = [p["step_time_s"] for p in plans]
    assert times == sorted(times)


@pytest.mark.parametrize("flag, value", [("--max-vpp", "0"), ("--p2p-gbs", "0")])
def test_cli_bad_vpp_options(flag, value, tmp_path, capsys):
    out = tmp_path / "plans.json"
    assert _tool().main(["--recipe", "debug", "--gpus", "8", "--gpu-mem-gib", "80", flag, value,
                         "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0]
    assert not out.exists()
