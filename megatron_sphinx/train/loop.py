"""The training loop: set up, resume, step, log, save, stop cleanly.

Each piece lives in its own module (process groups in :mod:`megatron_sphinx.distributed`, model
and optimizer in :mod:`.build`, the step in :mod:`.step`, checkpoints in :mod:`.checkpoint`);
this module only wires them together in order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from megatron_sphinx.config import SphinxConfig, get_recipe
from megatron_sphinx.data.loader import PackedLoader
from megatron_sphinx.train import checkpoint as ckpt_lib
from megatron_sphinx.train.build import build_model, build_optimizer, kernel_choices
from megatron_sphinx.train.data import build_loader, by_source, loader_summary, source_names
from megatron_sphinx.train.evaluate import Evaluator, describe, evaluation_due
from megatron_sphinx.train.flops import device_peak_tflops, step_flops
from megatron_sphinx.train.metrics import MetricsWriter
from megatron_sphinx.train.run_config import RunConfig
from megatron_sphinx.train.signals import StopRequest
from megatron_sphinx.train.startup import StartupClock
from megatron_sphinx.train.step import StepResult, train_step

log = logging.getLogger("megatron_sphinx.train")

#: Exit code of a run stopped by a signal after saving (the sbatch script requeues on it).
EXIT_REQUEUE = 3


def resolve_recipe(rc: RunConfig) -> SphinxConfig:
    """The recipe with the run's overrides applied."""
    cfg = get_recipe(rc.recipe)
    t = cfg.train
    if rc.global_batch_size is not None:
        t.global_batch_size = rc.global_batch_size
    if rc.seq_length is not None:
        t.seq_length = rc.seq_length
    if rc.micro_batch_size is not None:
        if rc.micro_batch_size < 1:
            raise ValueError("--micro-batch-size must be at least 1")
        t.micro_batch_size = rc.micro_batch_size
    for name in ("lr", "min_lr", "warmup_fraction", "weight_decay", "clip_grad"):
        if getattr(rc, name) is not None:
            setattr(t, name, getattr(rc, name))
    if rc.seed is not None:
        t.seed = rc.seed
    t.__post_init__()
    return cfg


def run_identity(cfg: SphinxConfig) -> dict:
    """What makes two runs the same run (for --save onto an existing directory)."""
    return {"recipe": cfg.name, "llm": dataclasses.asdict(cfg.llm),
            "image_size": cfg.vision.image_size, "grid": cfg.vision.grid}


def check_save_dir(save: str | None, cfg: SphinxConfig) -> None:
    """Refuses a --save directory that belongs to something else (nothing is written).

    Raises:
        ValueError: With what to change.
    """
    if not save:
        return
    d = Path(save)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--save {save} is a file: pass a directory")
    if not d.exists() or not any(d.iterdir()):
        return
    run_json = d / "run.json"
    if not run_json.exists():
        raise ValueError(f"--save {save} is not empty and is not a megatron_sphinx run: "
                         "pass an empty or new directory")
    theirs = json.loads(run_json.read_text())
    if theirs != run_identity(cfg):
        raise ValueError(f"--save {save} belongs to a run of recipe {theirs.get('recipe')!r} "
                         f"with another architecture: pass a new directory")


def _check_load_matches(ckpt: Path, cfg: SphinxConfig) -> ckpt_lib.CheckpointMeta:
    meta = ckpt_lib.read_meta(ckpt)
    if meta.recipe != cfg.name:
        raise ValueError(f"--load {ckpt} is a checkpoint of recipe {meta.recipe!r}, not "
                         f"{cfg.name!r}: pass --recipe {meta.recipe} or another checkpoint")
    return meta


def train_dtype(name: str) -> torch.dtype:
    """``--dtype``: bf16, fp32, or auto (bf16 on GPUs, fp32 on CPUs)."""
    auto = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(name, auto)


def validated_dims(cfg: SphinxConfig, tp: int, pp: int, ep: int, sequence_parallel: bool,
                   vpp: int = 1):
    """The parallel layout of this launch, checked against the recipe (before any process group).

    ``vpp`` > 1 interleaves that many virtual pipeline stages per pipeline rank.

    MoE layers with tensor parallelism need sequence parallelism in Megatron: it is switched on.

    Raises:
        ValueError: One line saying what to change.
    """
    from megatron_sphinx import distributed
    from megatron_sphinx.parallel_dims import ParallelDims

    if cfg.llm.is_moe and tp > 1 and not sequence_parallel:
        log.info("MoE with --tp %d: enabling sequence parallelism (Megatron requires it)", tp)
        sequence_parallel = True
    dims = ParallelDims(tp=tp, pp=pp, ep=ep, world_size=distributed.detect_launch_env().world_size,
                        sequence_parallel=sequence_parallel, vpp=None if vpp == 1 else vpp)
    if cfg.train.global_batch_size % dims.dp:
        raise ValueError(f"global batch {cfg.train.global_batch_size} is not divisible by the "
                         f"data-parallel size {dims.dp}: change --global-batch-size")
    mbs = cfg.train.micro_batch_size
    if (cfg.train.global_batch_size // dims.dp) % mbs:
        raise ValueError(f"{cfg.train.global_batch_size // dims.dp} rows per data-parallel rank "
                         f"do not split into micro-batches of {mbs}: change --micro-batch-size "
                         "or --global-batch-size")
    dims.validate_model(num_layers=cfg.llm.num_layers, num_heads=cfg.llm.num_attention_heads,
                        num_kv_heads=cfg.llm.num_query_groups, num_experts=cfg.llm.num_experts,
                        seq_length=cfg.train.seq_length,
                        num_microbatches=cfg.train.global_batch_size // dims.dp // mbs,
                        model_name=cfg.name)
    return dims


def preflight(rc: RunConfig):
    """The recipe, parallel layout and dtype of ``rc``, all checked before any process group
    exists (the trainer and the profiler share it).

    Returns:
        ``(cfg, dims, dtype)``.

    Raises:
        ValueError: One line saying what to change.
    """
    cfg = resolve_recipe(rc)
    dims = validated_dims(cfg, rc.tp, rc.pp, rc.ep, rc.sequence_parallel, rc.vpp)
    dtype = train_dtype(rc.dtype)
    if rc.fp8:
        from megatron_sphinx.model.specs import check_fp8, check_fp8_shapes
        check_fp8_shapes(cfg.llm, cfg.train.seq_length, cfg.train.micro_batch_size, dims.tp,
                         dims.sequence_parallel)
        check_fp8(rc.backend, dtype)
    rc.vision.check_device(torch.cuda.is_available())
    return cfg, dims, dtype


def run(rc: RunConfig) -> list[StepResult]:
    """Trains according to ``rc``; returns the results of the steps run (on every rank)."""
    from megatron_sphinx import distributed

    from megatron_sphinx.cli import SameOnEveryRank

    clock = StartupClock()  # before it: the interpreter, the imports, the argument checks
    try:  # depends on the arguments and the launch only: every rank fails alike, rank 0 says so
        cfg, dims, dtype = preflight(rc)
        rc = dataclasses.replace(rc, sequence_parallel=dims.sequence_parallel)
        check_save_dir(rc.save, cfg)
        load_from = ckpt_lib.start_point(rc.save, rc.load)  # --save's newest resumes, no flag
        if load_from is not None:
            _check_load_matches(load_from, cfg)
    except ValueError as exc:
        raise SameOnEveryRank(str(exc)) from exc

    on_gpu = torch.cuda.is_available()
    from megatron_sphinx import cpu_compat

    # From here on a stop signal is a graceful stop and --exit-after-minutes counts: start-up
    # (process groups, model, checkpoint load) is part of the job's wall time.
    stop = StopRequest(rc.exit_after_minutes)
    clock.lap("checks")
    groups = distributed.init_distributed(dims, timeout_s=60.0 * rc.timeout_minutes,
                                          seed=cfg.train.seed)
    clock.lap("process groups")
    try:
        with cpu_compat.cpu_device_mode():
            return _train(rc, cfg, dims, groups.collection, dtype, on_gpu, load_from, stop,
                          clock)
    finally:
        distributed.shutdown()


def _train(rc, cfg, dims, pgs, dtype, on_gpu, load_from, stop, clock: StartupClock,
           ) -> list[StepResult]:
    from megatron.core import tensor_parallel

    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.model.specs import choose_backend

    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    rank = torch.distributed.get_rank()
    seed = cfg.train.seed
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    backend = choose_backend(rc.backend)
    if rank == 0:
        log.info("recipe %s | layout tp=%d pp=%d%s ep=%d dp=%d sp=%s | backend %s | %s | %s",
                 cfg.name, dims.tp, dims.pp, f" vpp={dims.vpp}" if dims.vpp else "", dims.ep,
                 dims.dp, dims.sequence_parallel, backend, dtype, device)
    par = ParallelSizes(dims.tp, dims.pp, dims.ep, dims.sequence_parallel, dims.vpp or 1)
    model = build_model(cfg, par, pgs, backend=backend, dtype=dtype, on_gpu=on_gpu,
                        recompute=rc.recompute, fp8=rc.fp8,
                        overlap_grad_reduce=rc.overlap_grad_reduce,
                        overlap_param_gather=rc.overlap_param_gather,
                        vision=rc.vision)
    clock.lap("model")
    optimizer, scheduler = build_optimizer(cfg, model, pgs, dtype=dtype, total_steps=rc.steps,
                                           adam=rc.adam)
    clock.lap("optimizer")
    loader = build_loader(rc, cfg, dp_rank=pgs.dp.rank(), dp_size=pgs.dp.size())
    images = None
    if isinstance(loader, PackedLoader):  # decodes the store's images (synthetic data: none)
        from megatron_sphinx.data.images import resolve_device
        images = resolve_device(loader.cfg.image_device)
    clock.lap("data")
    choices = kernel_choices(cfg, backend=backend, dtype=dtype, device=device, fp8=rc.fp8,
                             images=images, vision=rc.vision, optimizer=optimizer)
    clock.lap("kernel checks")
    if rank == 0:
        log.info("kernels: %s", " | ".join(f"{k} {v}" for k, v in choices.items()))
    evaluator = None
    try:
        if rc.evaluates:
            eval_loader = build_loader(rc, cfg, dp_rank=pgs.dp.rank(), dp_size=pgs.dp.size(),
                                       evaluation=True)
            evaluator = Evaluator(
                eval_loader, rc.eval_batches,
                seq_length=cfg.train.seq_length * cfg.train.micro_batch_size,
                pg_collection=pgs, device=device, source_names=source_names(eval_loader))
            if rank == 0:
                log.info(describe(rc, cfg))
            clock.lap("data")
        return _run_steps(rc, cfg, dims, pgs, model, optimizer, scheduler, loader, device,
                          on_gpu, load_from, stop, clock, evaluator)
    finally:
        if hasattr(loader, "close"):  # background data workers
            loader.close()
        if evaluator is not None:
            evaluator.close()


def _run_steps(rc, cfg, dims, pgs, model, optimizer, scheduler, loader, device, on_gpu,
               load_from, stop: StopRequest, clock: StartupClock,
               evaluator: Evaluator | None = None) -> list[StepResult]:
    rank = torch.distributed.get_rank()
    start = 0
    if load_from is not None:
        state = ckpt_lib.load_checkpoint(load_from, model, optimizer, scheduler, pgs,
                                         weights_only=rc.eval_only)
        start = int(state["step"])
        if state.get("common", {}).get("loader") is not None and not rc.eval_only:
            loader.load_state_dict(state["common"]["loader"])
        clock.lap("checkpoint load")
        if rank == 0:
            log.info("%s %s at step %d", "loaded" if rc.eval_only else "resumed from",
                     load_from, start)
    if rc.eval_only:
        ev = evaluator(model)
        if rank == 0:
            log.info("eval loss %.4f | %d tokens | %.2f s | %s at step %d", ev.loss,
                     ev.num_loss_tokens, ev.time_s, load_from or "the initial weights", start)
        return []
    if rc.save and rank == 0:
        Path(rc.save).mkdir(parents=True, exist_ok=True)
        (Path(rc.save) / "run.json").write_text(json.dumps(run_identity(cfg), indent=1))
    metrics = MetricsWriter(rc.save, enabled=rank == 0, tensorboard_dir=rc.tensorboard_dir,
                            first_step=start + 1)
    clock.lap("metrics files")
    if rank == 0:
        log.info(clock.summary())
    try:
        return _train_loop(rc, cfg, dims, pgs, model, optimizer, scheduler, loader, device,
                           on_gpu, start, stop, evaluator, metrics, clock.total_s())
    finally:
        metrics.close()


def _train_loop(rc, cfg, dims, pgs, model, optimizer, scheduler, loader, device, on_gpu,
                start: int, stop: StopRequest, evaluator: Evaluator | None,
                metrics: MetricsWriter, startup_s: float) -> list[StepResult]:
    rank = torch.distributed.get_rank()
    peak = device_peak_tflops()
    world = torch.distributed.get_world_size()
    results: list[StepResult] = []
    names = source_names(loader)

    saved_at = start

    def save(step: int) -> None:
        nonlocal saved_at
        if not rc.save or step == saved_at:  # never save (delete and rewrite) a step twice
            return
        saved_at = step
        meta = ckpt_lib.CheckpointMeta(
            step=step, recipe=cfg.name,
            layout={"tp": dims.tp, "pp": dims.pp, "vpp": dims.vpp or 1, "ep": dims.ep,
                    "dp": dims.dp},
            code_version=ckpt_lib.code_version(), consumed=loader.state_dict())
        ckpt_lib.save_checkpoint(rc.save, step, model, optimizer, scheduler, pgs, meta=meta,
                                 common={"loader": loader.state_dict()}, keep_last=rc.keep_last)

    step = start
    for step in range(start + 1, rc.steps + 1):
        t0 = time.perf_counter()
        micro = loader.next_step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it)
        res = train_step(model, optimizer, micro, num_microbatches=len(micro),
                         seq_length=cfg.train.seq_length * cfg.train.micro_batch_size,
                         pg_collection=pgs, device=device,
                         dp_group=pgs.dp, num_sources=len(names))
        scheduler.step(increment=1)
        if on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        results.append(res)
        summary = loader_summary(micro, pgs.dp, device)  # global tokens, lengths, views
        flops = step_flops(cfg, summary["tokens"], summary["attention_pairs"], summary["views"])
        tflops = flops["total"] / dt / world / 1e12
        record = {
            "step": step, "total_steps": rc.steps, "loss": res.loss,
            "lr": lr, "grad_norm": res.grad_norm,
            "tokens": summary["tokens"], "loss_tokens": res.num_loss_tokens,
            "samples": summary["samples"], "skipped_views": summary["skipped"],
            "packing_efficiency": summary["tokens"] / summary["positions"],
            "tokens_per_s": summary["tokens"] / dt, "step_time_s": dt,
            "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
        }
        if step == start + 1:  # this process's start-up, up to this first step
            record["startup_s"] = startup_s
        if on_gpu:  # this rank's peak since the start, and the allocator's cache flushes
            record.update(max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                          alloc_retries=torch.cuda.memory_stats(device).get("num_alloc_retries", 0))
        if res.source_losses:  # a mix of several sources: the loss of each
            record["source_loss"] = by_source(names, res.source_losses)
            record["source_loss_tokens"] = {n: t for n, (_, t) in zip(names, res.source_losses)}
        if evaluator is not None and evaluation_due(step, rc.eval_interval, rc.steps):
            ev = evaluator(model)
            record.update(eval_loss=ev.loss, eval_loss_tokens=ev.num_loss_tokens,
                          eval_time_s=ev.time_s)
            if ev.source_loss:
                record["eval_source_loss"] = ev.source_loss
        metrics.write(record, console=step % rc.log_interval == 0 or step == rc.steps)
        if rc.save_interval and step % rc.save_interval == 0 and step < rc.steps:
            save(step)
        interval_exit = bool(rc.exit_interval) and step % rc.exit_interval == 0
        if step < rc.steps and (interval_exit or stop.agreed(device)):
            save(step)
            if rank == 0:
                log.warning("stopped at step %d after a stop request; exit %d to requeue",
                            step, EXIT_REQUEUE)
            raise SystemExit(EXIT_REQUEUE)
    if step > start:
        if rc.final_save:
            save(step)
    elif rank == 0:
        log.info("nothing to do: the run is already at step %d of %d", start, rc.steps)
    with contextlib.suppress(Exception):
        torch.distributed.barrier()
    return results
