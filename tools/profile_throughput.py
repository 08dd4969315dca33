"""Throughput profiler: real training steps of a recipe, timed part by part.

    python tools/profile_throughput.py --recipe debug --steps 5 --json runs/profile.json \\
        [--plot runs/profile.png] [--tp N --pp N --ep N --sp] \\
        [--data stream|synthetic|sample|PATH] [--backend auto|te|local] [--recompute R] \\
        [--seq-length S] [--global-batch-size G] [--peak-tflops X] [--warmup N] \\
        [--no-packing] [--no-skip] [--compare] [--kernels runs/kernels.txt] \\
        [--trace runs/step.json.gz]
    torchrun --nproc-per-node 8 tools/profile_throughput.py --recipe sphinx-tiny ...

The model, optimizer and loader are the training command's own (``build_model``,
``build_optimizer``, ``build_loader``) and each step is
:func:`~megatron_sphinx.train.step.train_step` (Megatron's schedule, then the optimizer);
:mod:`megatron_sphinx.train.profiler` times it: waiting for data, image decoding, vision
encoding, the pack kernel, LLM forward/backward, optimizer, communication, other. FLOPs are
counted by :mod:`megatron_sphinx.train.flops`, as the training command's metrics count them.
``--compare`` profiles, in one process and on one model, the baseline and the variants without
packing, without skip tokens, and without both (the reference implementation's way), and prints
one table; its default data, ``stream``, feeds every variant the same samples
(:class:`StreamLoader`). Rank 0 writes the JSON (every figure, the machine) and the PNG of the
breakdown.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As the training command by default (no torch.compile'd fusions); read when torch is imported.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_sphinx.config import VISION_DWCONV_FORMS, VISION_GELU_FORMS  # noqa: E402
from megatron_sphinx.train.run_config import ADAM_FORMS  # noqa: E402

log = logging.getLogger("megatron_sphinx.profile")

VARIANTS = {  # name -> (packing, skip padded sub-images)
    "baseline": (True, True),
    "no-packing": (False, True),
    "no-skip": (True, False),
    "no-packing+no-skip": (False, False),
}


class StreamLoader:
    """Packed micro-batches from one fixed stream of random samples, for comparing variants.

    Sample ``k`` is a pure function of ``(seed, k)``, drawn from the distribution of
    :class:`~megatron_sphinx.data.synthetic.SyntheticLoader` (8-95 text tokens, half of them with
    an image of a random aspect ratio), but independently of how rows are filled. The training
    command's synthetic loader decides whether a sample gets an image from the room left in its
    row, so its samples change with packing and skipping; here every variant reads the same
    samples: the project's packer (:class:`~megatron_sphinx.data.packing.SequencePacker`, best
    fit over a window of the stream) fills the rows, or each row takes the next sample
    (``packing=False``); with ``skip_padded=False`` every sub-image is encoded (lengths, layout
    and views all follow :func:`~megatron_sphinx.data.geometry.image_geometry`'s switch). Each
    step is a global batch of ``global_batch_size`` rows; data-parallel rank ``r`` of ``D`` takes
    rows ``r * G/D ... (r + 1) * G/D - 1`` as micro-batches of ``micro_batch_size`` rows.
    """

    def __init__(self, vocab_size: int, seq_length: int, image_size: int, grid: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 packing: bool = True, image_fraction: float = 0.5, skip_padded: bool = True,
                 micro_batch_size: int = 1):
        if global_batch_size % dp_size or (global_batch_size // dp_size) % micro_batch_size:
            raise ValueError(f"global batch {global_batch_size} does not split into "
                             f"{dp_size} data-parallel ranks x micro-batches of "
                             f"{micro_batch_size}: change --global-batch-size")
        self.micro_batch_size = micro_batch_size
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.image_size, self.grid = image_size, grid
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.seed, self.packing, self.image_fraction = seed, packing, image_fraction
        self.skip_padded = skip_padded
        self._next = 0  # index of the next sample of the stream
        self._packer = None
        self.samples_seen = 0

    def sample(self, k: int):
        """Sample ``k`` of the stream (text truncated, image dropped, if it exceeds a row)."""
        from megatron_sphinx.data.layout import Sample
        from megatron_sphinx.data.synthetic import ASPECTS

        rng = np.random.default_rng([self.seed, k])
        n_text = int(rng.integers(8, 96))
        hw = None
        if rng.random() < self.image_fraction:
            a, b = ASPECTS[rng.integers(len(ASPECTS))]
            hw = (int(100 * a), int(100 * b))
        ids = rng.integers(3, self.vocab_size, n_text).astype(np.int32)
        ids[0] = 1  # BOS
        target = np.zeros(n_text, dtype=bool)
        target[n_text // 2:] = True
        smp = Sample(ids, target, hw)
        if smp.length(self.image_size, self.grid, self.skip_padded) > self.seq_length:
            keep = min(n_text, self.seq_length)
            smp = Sample(ids[:keep], target[:keep], None)
        return smp

    def _length(self, k: int) -> int:
        return self.sample(k).length(self.image_size, self.grid, self.skip_padded)

    def _feed(self, n: int) -> np.ndarray:
        """The next ``n`` stream indices, their lengths appended to the packer's table."""
        idx = np.arange(self._next, self._next + n)
        self._next += n
        more = np.array([self._length(int(k)) for k in idx], dtype=np.int64)
        self._packer.lengths = np.concatenate([self._packer.lengths, more])
        return idx

    def _rows(self) -> list[list]:
        if not self.packing:  # one sample per row, in stream order
            rows = [[self.sample(self._next + b)] for b in range(self.global_batch_size)]
            self._next += self.global_batch_size
            return rows
        if self._packer is None:
            from megatron_sphinx.data.packing import PackingConfig, SequencePacker

            cfg = PackingConfig(self.seq_length, self.global_batch_size)
            self._packer = SequencePacker(cfg, np.array([self._length(0)], dtype=np.int64))
            self._packer.lengths = self._packer.lengths[:0]
        return [[self.sample(i) for i, _ in row] for row in self._packer.pack_step(self._feed)]

    def next_step(self) -> list:
        """This rank's micro-batches (``micro_batch_size`` rows each) of the next global batch."""
        from megatron_sphinx.data.geometry import image_geometry
        from megatron_sphinx.data.layout import build_packed_batch

        rows = self._rows()
        self.samples_seen += sum(len(r) for r in rows)
        per_rank = self.global_batch_size // self.dp_size
        v = self.image_size // self.grid
        out, mbs = [], self.micro_batch_size
        for first in range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank, mbs):
            views = []
            for i in range(first, first + mbs):
                n = sum(image_geometry(*s.image_hw, self.image_size, self.grid,
                                       self.skip_padded).num_encoded()
                        for s in rows[i] if s.image_hw is not None)
                rng = np.random.default_rng([self.seed, self._next, i])
                views.append(torch.from_numpy(rng.random((n, 3, v, v), dtype=np.float32)))
            out.append(build_packed_batch(rows[first:first + mbs], self.seq_length,
                                          self.image_size, self.grid, torch.cat(views),
                                          self.skip_padded).pin_memory())
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description="Profile the training throughput of a recipe.")
    p.add_argument("--recipe", default="debug", help="recipe name (default: debug)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=1,
                   help="virtual pipeline stages per pipeline rank (default 1: no interleaving)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (on for MoE with TP)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured steps first, per variant (default 1)")
    p.add_argument("--json", required=True, help="output JSON (rank 0 writes it)")
    p.add_argument("--plot", default=None, help="output PNG of the time breakdown")
    p.add_argument("--kernels", default=None,
                   help="output text: one more step of the first variant under torch.profiler, "
                        "its time per kernel category and its top kernels (rank 0 writes it)")
    p.add_argument("--trace", default=None,
                   help="with --kernels: that step's timeline as a Chrome trace (.json, or "
                        ".json.gz compressed; open in https://ui.perfetto.dev)")
    p.add_argument("--data", default=None,
                   help="'stream' (one fixed random sample stream: the default with --compare), "
                        "'synthetic' (the training command's random data: the default "
                        "otherwise), 'sample' (the embedded sample data's store) or a store path")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="packed rows per forward pass (one THD sequence)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs, e.g. H100 989; none on CPU)")
    p.add_argument("--no-packing", action="store_true", help="one padded sample per sequence")
    p.add_argument("--no-skip", action="store_true", help="encode every sub-image")
    p.add_argument("--compare", action="store_true",
                   help="baseline, --no-packing, --no-skip and both, side by side")
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--recompute", default=None, choices=["selective", "full"])
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs (TE layers, FP8 GPU)")
    p.add_argument("--vision-batch", type=int, default=0,
                   help="encode the step's views as one stream, N per encoder call (as training)")
    p.add_argument("--cuda-graph-vision", action="store_true",
                   help="replay the encoders as CUDA graphs (GPU; needs --vision-batch)")
    p.add_argument("--overlap-vision", action="store_true",
                   help="encode the next micro-batch's views on a second CUDA stream (GPU)")
    p.add_argument("--vision-gelu", default="exact", choices=VISION_GELU_FORMS,
                   help="tanh: the encoders' GELU in tanh form, in the GEMM epilogue (GPU)")
    p.add_argument("--vision-dwconv", default="torch", choices=VISION_DWCONV_FORMS,
                   help="triton: ConvNeXt's depthwise convolution + norm as one kernel (GPU)")
    p.add_argument("--vision-cudnn-benchmark", action="store_true",
                   help="cuDNN times its convolution algorithms per shape in the encoders (GPU)")
    p.add_argument("--adam", default="fused", choices=ADAM_FORMS,
                   help="torch's AdamW step as one fused kernel or multi-tensor ops (as training)")
    p.add_argument("--timeout-minutes", type=float, default=10.0,
                   help="collective timeout (default 10)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: measure at least 1 step")
    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: give 0 or more warm-up steps")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ValueError(f"--peak-tflops {args.peak_tflops}: give a positive peak")
    from megatron_sphinx.cli import check_output_file

    if args.trace and not args.kernels:
        raise ValueError("--trace records the --kernels step: give --kernels FILE too")
    if args.trace and not args.trace.endswith((".json", ".json.gz")):
        raise ValueError(f"--trace {args.trace}: name a .json or .json.gz file")
    for flag in ("json", "plot", "kernels", "trace"):
        path = getattr(args, flag)
        if path:
            check_output_file(path, f"--{flag}")
    if args.compare and (args.no_packing or args.no_skip):
        raise ValueError("--compare already runs --no-packing and --no-skip: drop those flags")
    if args.data is None:
        args.data = "stream" if args.compare else "synthetic"
    if args.data not in ("stream", "synthetic", "sample") and not Path(args.data).exists():
        raise ValueError(f"--data {args.data} does not exist: pass a store written by "
                         "tools/preprocess_data.py, or stream, synthetic or sample")


def _variants(args: argparse.Namespace) -> list[str]:
    if args.compare:
        return list(VARIANTS)
    for name, (packing, skip) in VARIANTS.items():
        if packing != args.no_packing and skip != args.no_skip:
            return [name]
    raise AssertionError("unreachable")


def _run_config(args: argparse.Namespace, packing: bool = True, skip: bool = True):
    from megatron_sphinx.train.run_config import RunConfig

    data = {"sample": None, "stream": "synthetic"}.get(args.data, args.data)
    return RunConfig(recipe=args.recipe, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                     sequence_parallel=args.sp, steps=args.warmup + args.steps, data=data,
                     global_batch_size=args.global_batch_size, seq_length=args.seq_length,
                     micro_batch_size=args.micro_batch_size,
                     backend=args.backend, dtype=args.dtype, recompute=args.recompute,
                     fp8=args.fp8, packing=packing, skip_padded_views=skip,
                     vision_batch=args.vision_batch, cuda_graph_vision=args.cuda_graph_vision,
                     overlap_vision=args.overlap_vision, vision_gelu=args.vision_gelu,
                     vision_dwconv=args.vision_dwconv,
                     vision_cudnn_benchmark=args.vision_cudnn_benchmark, adam=args.adam,
                     timeout_minutes=args.timeout_minutes)


def _build_loader(args, cfg, packing: bool, skip: bool, dp_rank: int, dp_size: int):
    """This variant's loader.

    ``stream``: :class:`StreamLoader`. ``synthetic`` and a store (``sample`` or a path): the
    training command's loader (``build_loader``) with its packing and skip switches.
    """
    from megatron_sphinx.train.data import build_loader

    t = cfg.train
    if args.data == "stream":
        return StreamLoader(cfg.llm.vocab_size, t.seq_length, cfg.vision.image_size,
                            cfg.vision.grid, t.global_batch_size, dp_rank, dp_size, t.seed,
                            packing=packing, skip_padded=skip,
                            micro_batch_size=t.micro_batch_size)
    return build_loader(_run_config(args, packing, skip), cfg, dp_rank=dp_rank, dp_size=dp_size)


def _profile_variant(name, args, cfg, dims, pgs, model, optimizer, scheduler, recorder, device,
                     peak) -> dict:
    from megatron_sphinx.train.data import loader_summary
    from megatron_sphinx.train.flops import step_flops
    from megatron_sphinx.train.profiler import RssSampler, VariantStats
    from megatron_sphinx.train.step import train_step

    packing, skip = VARIANTS[name]
    world = torch.distributed.get_world_size()
    t = cfg.train
    stats = VariantStats()
    losses = []
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    alloc_before: dict[str, int] = {}
    rss = RssSampler() if not on_gpu else contextlib.nullcontext()
    with rss:
        loader = _build_loader(args, cfg, packing, skip, pgs.dp.rank(), pgs.dp.size())
        try:
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    alloc_before = _allocator_counts(on_gpu)
                recorder.begin_step()
                with recorder.in_phase("data"):
                    micro = loader.next_step()
                res = train_step(model, optimizer, micro, num_microbatches=len(micro),
                                 seq_length=t.seq_length * t.micro_batch_size,
                                 pg_collection=pgs, device=device,
                                 dp_group=pgs.dp)
                scheduler.step(increment=1)
                times = recorder.end_step()
                summary = loader_summary(micro, pgs.dp, device)
                if i < args.warmup:
                    continue
                summary["flops"] = step_flops(cfg, summary["tokens"], summary["attention_pairs"],
                                              summary["views"])
                stats.steps.append(times)
                stats.summaries.append(summary)
                losses.append(res.loss)
            if args.kernels and name == _variants(args)[0]:
                _profile_kernels(args, loader, model, optimizer, scheduler, recorder, pgs, device,
                                 seq_length=t.seq_length * t.micro_batch_size)
        finally:
            if hasattr(loader, "close"):
                loader.close()
    # The step ends when the slowest rank ends: take each step's longest time over all ranks.
    step_times = torch.tensor([s["step_time"] for s in stats.steps], dtype=torch.float64,
                              device=device)
    torch.distributed.all_reduce(step_times, op=torch.distributed.ReduceOp.MAX)
    alloc = {k: v - alloc_before[k] for k, v in _allocator_counts(on_gpu).items()}
    mem = float(torch.cuda.max_memory_allocated() if on_gpu else rss.peak)
    mem_t = torch.tensor([mem], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(mem_t, op=torch.distributed.ReduceOp.MAX)
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, stats.mean_breakdown())
    n = len(stats.steps)
    total_s = float(step_times.sum())
    tokens = sum(s["tokens"] for s in stats.summaries)
    samples = sum(s["samples"] for s in stats.summaries)
    flops = {k: sum(s["flops"][k] for s in stats.summaries) for k in stats.summaries[0]["flops"]}
    tflops = flops["total"] / total_s / world / 1e12
    skipped = sum(s["skipped"] for s in stats.summaries)
    breakdown = stats.mean_breakdown()
    return {
        "name": name, "packing": packing, "skip_padded_views": skip, "steps": n,
        "step_time_s": total_s / n, "step_times_s": step_times.tolist(),
        "tokens_per_step": tokens / n, "samples_per_step": samples / n,
        "tokens_per_s": tokens / total_s, "tokens_per_s_per_gpu": tokens / total_s / world,
        "samples_per_s": samples / total_s,
        "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
        "flops_per_step": {k: v / n for k, v in flops.items()},
        "packing_efficiency": tokens / (n * t.global_batch_size * t.seq_length),
        "views_per_step": sum(s["views"] for s in stats.summaries) / n,
        "skipped_sub_images_per_step": skipped / n,
        "visual_tokens_saved_per_step": skipped * cfg.vision.tokens_per_view / n,
        "llm_positions_saved_per_step": sum(s["visual_tokens_saved"]
                                            for s in stats.summaries) / n,
        "peak_memory_bytes": float(mem_t.item()),
        "peak_reserved_bytes": float(torch.cuda.max_memory_reserved()) if on_gpu else None,
        "allocator": alloc,
        "breakdown_s": breakdown,
        "breakdown_fraction": {k: breakdown[k] / breakdown["step_time"] for k in breakdown
                               if k != "step_time" and breakdown["step_time"] > 0},
        "breakdown_by_rank_s": per_rank,
        "breakdown_steps_s": stats.steps,
        "losses": losses,
    }


def _allocator_counts(on_gpu: bool) -> dict[str, int]:
    """The CUDA caching allocator's counters (this rank): device allocations and frees it made,
    and retries (a failed allocation that freed every cached block, synchronising the device,
    then tried again). Empty on a CPU."""
    if not on_gpu:
        return {}
    stats = torch.cuda.memory_stats()
    return {"device_allocs": stats.get("num_device_alloc", 0),
            "device_frees": stats.get("num_device_free", 0),
            "alloc_retries": stats.get("num_alloc_retries", 0)}


def _write_trace(prof, path: str) -> None:
    """The profiled step as a Chrome trace; gzip-compressed when ``path`` ends in ``.gz``."""
    import gzip
    import shutil
    import tempfile

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not path.endswith(".gz"):
        prof.export_chrome_trace(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _profile_kernels(args, loader, model, optimizer, scheduler, recorder, pgs, device,
                     seq_length: int) -> None:
    """One more, unmeasured step under ``torch.profiler``; rank 0 writes ``--kernels``."""
    from megatron_sphinx.train.profiler import kernel_report
    from megatron_sphinx.train.step import train_step

    on_gpu = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    micro = loader.next_step()
    recorder.begin_step()
    if on_gpu:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        train_step(model, optimizer, micro, num_microbatches=len(micro),
                   seq_length=seq_length,
                   pg_collection=pgs, device=device, dp_group=pgs.dp)
        if on_gpu:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
    recorder.end_step()
    scheduler.step(increment=1)
    if torch.distributed.get_rank() == 0:
        Path(args.kernels).parent.mkdir(parents=True, exist_ok=True)
        Path(args.kernels).write_text(kernel_report(prof, on_gpu, wall_s=wall_s))
        log.info("kernel profile written to %s", args.kernels)
        if args.trace:
            _write_trace(prof, args.trace)
            log.info("timeline written to %s", args.trace)


def run_profile(args: argparse.Namespace) -> dict | None:
    """Profiles every variant on this rank; returns the report on rank 0 (None elsewhere)."""
    from megatron.core import tensor_parallel

    from megatron_sphinx import cpu_compat, distributed
    from megatron_sphinx.model.llm import ParallelSizes
    from megatron_sphinx.model.specs import choose_backend
    from megatron_sphinx.train.build import build_model, build_optimizer, kernel_choices
    from megatron_sphinx.train.flops import device_peak_tflops
    from megatron_sphinx.train.loop import preflight
    from megatron_sphinx.train.profiler import (PARTS, StepRecorder, instrument,
                                                machine_info)

    cfg, dims, dtype = preflight(_run_config(args))
    on_gpu = torch.cuda.is_available()
    groups = distributed.init_distributed(dims, timeout_s=60.0 * args.timeout_minutes,
                                          seed=cfg.train.seed)
    try:
        with cpu_compat.cpu_device_mode():
            pgs = groups.collection
            device = (torch.device("cuda", torch.cuda.current_device()) if on_gpu
                      else torch.device("cpu"))
            torch.manual_seed(cfg.train.seed)
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
            backend = choose_backend(args.backend)
            model = build_model(cfg, ParallelSizes(dims.tp, dims.pp, dims.ep,
                                                    dims.sequence_parallel, dims.vpp or 1), pgs,
                                backend=backend, dtype=dtype, on_gpu=on_gpu,
                                recompute=args.recompute, fp8=args.fp8,
                                vision=_run_config(args).vision)
            names = _variants(args)
            optimizer, scheduler = build_optimizer(
                cfg, model, pgs, dtype=dtype,
                total_steps=len(names) * (args.warmup + args.steps) + bool(args.kernels),
                adam=args.adam)
            peak = device_peak_tflops(args.peak_tflops)
            images = None  # stream / synthetic: generated pixels, nothing decoded
            if args.data not in ("stream", "synthetic"):
                from megatron_sphinx.data.images import resolve_device
                images = resolve_device()
            kernels = kernel_choices(cfg, backend=backend, dtype=dtype, device=device,
                                     fp8=args.fp8, images=images,
                                     vision=_run_config(args).vision, optimizer=optimizer)
            recorder = StepRecorder(on_gpu)
            variants = []
            with instrument(model, optimizer, recorder, scheduler):
                for name in names:
                    try:
                        variants.append(_profile_variant(name, args, cfg, dims, pgs, model,
                                                         optimizer, scheduler, recorder, device,
                                                         peak))
                    except ValueError as exc:
                        if not args.compare:
                            raise
                        variants.append({"name": name, "error": str(exc)})
                    if torch.distributed.get_rank() == 0:
                        log.info("variant %s done", name)
            if torch.distributed.get_rank() != 0:
                return None
            return {
                "recipe": cfg.name, "machine": machine_info(),
                "layout": {"world_size": dims.world_size, "tp": dims.tp, "pp": dims.pp,
                           "vpp": dims.vpp or 1, "ep": dims.ep, "dp": dims.dp,
                           "sequence_parallel": dims.sequence_parallel},
                "settings": {"seq_length": cfg.train.seq_length,
                             "global_batch_size": cfg.train.global_batch_size,
                             "micro_batch_size": cfg.train.micro_batch_size,
                             "steps": args.steps,
                             "warmup": args.warmup, "data": args.data, "backend": backend,
                             "dtype": str(dtype).replace("torch.", ""),
                             "recompute": args.recompute, "fp8": args.fp8,
                             "peak_tflops": peak},
                "kernels": kernels,
                "parts": list(PARTS),
                "variants": variants,
                "comm_calls": dict(recorder.comm_calls),
                "notes": NOTES,
            }
    finally:
        distributed.shutdown()


NOTES = {
    "breakdown": "mean seconds per step on rank 0 (first pipeline stage); breakdown_by_rank_s "
                 "has every rank. Parts are exclusive; unaccounted = step time minus the parts.",
    "communication": "time inside torch.distributed collectives / p2p calls and Megatron's "
                     "coalesced gradient reduce-scatter, measured on the calling side "
                     "(asynchronous calls: at their wait()); overlapped communication that is "
                     "never waited for is not visible. With PP > 1 the p2p waits include the "
                     "pipeline bubble. The micro-batch's host-to-device copy is in llm_fwd_bwd.",
    "image_decode": "main-thread decoding (inside the data wait); image_decode_background is "
                    "loader-worker time overlapped with training, not part of the step.",
    "flops": "megatron_sphinx.train.flops.step_flops: LLM 6*N_active*tokens, causal attention "
             "from packed sample lengths, projector, frozen encoders forward only.",
    "allocator": "GPU: the caching allocator's cudaMalloc / cudaFree calls and retries (each "
                 "retry frees every cached block after a device synchronisation) during the "
                 "measured steps; counts that grow with the steps mean the "
                 "shapes keep changing (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps).",
    "memory": "GPU: torch.cuda.max_memory_allocated; CPU: process RSS sampled every 10 ms "
              "(includes everything the process holds; does not drop between variants).",
    "skip": "--no-skip encodes every sub-image (image_geometry(skip_padded=False)): padded "
            "sub-images are encoded and take 259 positions each.",
    "data": "stream: one fixed random sample stream, the same samples for every variant (use it "
            "to compare); synthetic: the training command's random data, whose samples change "
            "with packing and skipping; sample / a path: the preprocessed store.",
    "throughput": "samples_per_s compares variants (tokens include padded sub-images under "
                  "--no-skip); tokens exclude padding.",
}


def format_table(report: dict) -> str:
    """One row per variant: throughput figures, then the mean breakdown in ms per step."""
    from megatron_sphinx.train.profiler import PARTS

    short = {"data_wait": "data", "image_decode": "decode", "vision_encode": "vision",
             "pack_kernel": "pack", "llm_fwd_bwd": "llm", "optimizer": "optim",
             "communication": "comm", "other": "other"}
    head = (f"{'variant':<19} {'step_s':>7} {'tok/s':>8} {'tok/s/gpu':>9} {'samp/s':>7} "
            f"{'TFLOP/s':>8} {'MFU':>6} {'pack_eff':>8} {'views':>6} {'skip':>5} "
            f"{'mem_GiB':>7} | " + " ".join(f"{short[p]:>7}" for p in PARTS) + f" {'unacc':>6}")
    lines = [head, "-" * len(head)]
    base = report["variants"][0] if report["variants"] else None
    for v in report["variants"]:
        if "error" in v:
            lines.append(f"{v['name']:<19} not run: {v['error']}")
            continue
        b = v["breakdown_s"]
        mfu = f"{v['mfu']:.3f}" if v["mfu"] is not None else "-"
        lines.append(
            f"{v['name']:<19} {v['step_time_s']:>7.3f} {v['tokens_per_s']:>8.0f} "
            f"{v['tokens_per_s_per_gpu']:>9.0f} {v['samples_per_s']:>7.2f} "
            f"{v['tflops_per_gpu']:>8.4f} {mfu:>6} {v['packing_efficiency']:>8.3f} "
            f"{v['views_per_step']:>6.1f} {v['skipped_sub_images_per_step']:>5.1f} "
            f"{v['peak_memory_bytes'] / 2 ** 30:>7.2f} | "
            + " ".join(f"{1e3 * b[p]:>7.1f}" for p in PARTS) + f" {1e3 * b['unaccounted']:>6.1f}")
    if base is not None and "error" not in base and len(report["variants"]) > 1:
        lines.append("samples/s relative to baseline: " + ", ".join(
            f"{v['name']} {v['samples_per_s'] / base['samples_per_s']:.2f}x"
            for v in report["variants"][1:] if "error" not in v))
    return "\n".join(lines)


def write_plot(report: dict, path: str) -> None:
    """A stacked bar per variant: mean ms per step of every part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in report["variants"] if "error" not in v]
    parts = report["parts"] + ["unaccounted"]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.6 * len(variants)))
    left = [0.0] * len(variants)
    colors = plt.get_cmap("tab10").colors
    for i, part in enumerate(parts):
        widths = [max(0.0, 1e3 * v["breakdown_s"][part]) for v in variants]
        ax.barh([v["name"] for v in variants], widths, left=left, label=part,
                color=colors[i % len(colors)])
        left = [a + w for a, w in zip(left, widths)]
    m = report["machine"]
    where = m["gpu"] or m["cpu"]
    lay = report["layout"]
    ax.set_xlabel("ms per step")
    ax.set_title(f"{report['recipe']} tp{lay['tp']} pp{lay['pp']} ep{lay['ep']} dp{lay['dp']} "
                 f"on {where}", fontsize=9)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_sphinx.cli import fail, launch_rank, quiet_import_notices

    quiet_import_notices()
    args = parse_args(argv)
    try:  # the same on every rank, before any heavy work: the first rank reports it
        _check_args(args)
        from megatron_sphinx.config import get_recipe
        from megatron_sphinx.train.run_config import check_run_inputs

        check_run_inputs(_run_config(args), get_recipe(args.recipe))
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc) if launch_rank() == 0 else 2
    try:
        report = run_profile(args)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc)
    if report is None:
        return 0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        write_plot(report, args.plot)
    m = report["machine"]
    print(f"{report['recipe']} | {report['layout']} | {m['gpu'] or m['cpu']} "
          f"x{m['gpu_count'] or m['cpu_count']} | {report['settings']}")
    print("kernels: " + " | ".join(f"{k} {v}" for k, v in report["kernels"].items()))
    print(format_table(report))
    for v in report["variants"]:
        if v.get("allocator"):
            a = v["allocator"]
            print(f"{v['name']}: CUDA caching allocator in the measured steps: "
                  f"{a['device_allocs']} cudaMalloc, {a['device_frees']} cudaFree, "
                  f"{a['alloc_retries']} retries; peak reserved "
                  f"{v['peak_reserved_bytes'] / 2 ** 30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
