"""Training benchmark: step time, tokens/s, TFLOP/s and MFU of the real training command.

Runs ``python -m megatron_sphinx.train`` under torchrun on synthetic data for each layout and
variant in one invocation and prints one table:

* step time: median over the steps after the ``--warmup`` first ones (default 1: the first step
  pays one-off set-up costs; on a GPU the next two were still ~1.6x slower in H100 run 4, with
  new shapes' kernel choices and the allocator filling up);
* tokens/s: real (non-padding) LLM tokens per second; TFLOP/s and MFU as the training command
  counts them (megatron_sphinx/train/flops.py); all three over the same steps as totals (tokens
  or FLOPs over their summed time), so that they describe the same steps (the FLOPs of a step
  change with its views; medians taken apart came from different steps);
* on a GPU, the peak memory allocated and the allocator's retries (cache flushes when an
  allocation did not fit) by the end of the run;
* launch overhead: the run's wall time minus the time spent in steps (torchrun, the training
  process's start-up, its exit), and of it ``start s``: the training process's start-up up to
  its first step as it counts it (``startup_s``; its phases, the ``start-up`` line of its log, are
  printed under each variant's progress line with its ``kernels:`` line; see
  ``megatron_sphinx/train/startup.py``). No checkpoint is written (``--no-final-save``): saving a
  full-size model would dominate it.

Variants: ``packed`` (the default: packing and skip tokens), ``packed-sdpa`` (the same with the
local spec's packed attention forced to one SDPA call per segment instead of one FlashAttention
varlen call, see ``megatron_sphinx/model/attention.py``), ``packed-unfused`` (RoPE, SwiGLU and
the cross-entropy in torch ops instead of the fused Triton kernels GPUs run by default,
``kernels/fused_layers.py``, weight gradients added by the hook,
``megatron_sphinx/model/wgrad_fusion.py``, and torch's AdamW in multi-tensor ops; on CPUs only
the optimizer differs from ``packed``), ``packed-foreach`` (``--adam foreach``: the optimizer
step as torch's multi-tensor ops instead of one fused kernel, ``megatron_sphinx/train/adam.py``),
``packed-compiled``
(``--compile-fusions``: Megatron's torch.compile'd fusions, SwiGLU and bias-dropout-add, off by
default), ``packed-mbs1`` / ``packed-mbs2`` / ``packed-mbs4`` (1, 2, 4 packed rows per forward
pass, one THD sequence; the recipe sets the default, sphinx-tiny's is two),
``packed-mbs4-expandable`` (four rows, the CUDA allocator's expandable segments: less
fragmentation), ``packed-overlap`` (``--overlap-vision``: the next micro-batch's views encoded
on a second CUDA stream while this one trains, with 8 hardware queues so that the streams can
run side by side; GPU only), ``packed-vb32`` (``--vision-batch 32``: the step's views encoded
as one stream, 32 per call), ``packed-graphs`` (the same replayed as CUDA graphs,
``--cuda-graph-vision``; GPU only), ``packed-graphs-mbs1`` / ``packed-graphs-mbs2`` (with one /
two rows), ``packed-graphs-overlap`` / ``packed-graphs-overlap-mbs4`` (graphs, overlapped; two /
four rows), ``packed-tanh`` / ``packed-graphs-overlap-tanh`` (``--vision-gelu tanh``: ConvNeXt's
GELU in its first GEMM's epilogue) and ``packed-graphs-overlap-tanh-mbs4`` (the same at four
rows), ``packed-dwconv`` (``--vision-dwconv triton``: ConvNeXt's
depthwise convolution and norm as one Triton kernel; GPU only), ``packed-cudnn`` /
``packed-graphs-cudnn`` (``--vision-cudnn-benchmark``: cuDNN times its convolution algorithms
per shape; per micro-batch / in calls of 32 as graphs; GPU only), ``packed-local``
(``--backend local``: the local layer spec where Transformer Engine would be chosen),
``packed-fp8`` (``--fp8``: TE's FP8 GEMMs; Hopper-class GPUs with TE) and ``reference``
(``--no-packing --no-skip``: one padded sample per sequence and every sub-image encoded, as the
reference implementation does).

Arguments it does not know itself (``--seq-length``, ``--global-batch-size``,
``--micro-batch-size``, ``--backend``, ...) are passed on to ``python -m megatron_sphinx.train``
in every run, after the training command's own checks.

Usage::

    python tools/bench_train.py --recipe debug --layouts tp1 tp2                       # CPU
    python tools/bench_train.py --recipe sphinx-tiny --layouts tp1 \\
        --variants packed reference --seq-length 4096 --global-batch-size 8          # one GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tp", "2"]), "dp2": (2, []), "pp2": (2, ["--pp", "2"])}
#: The default of 8 hardware queues, so that the overlap variants' two CUDA streams can run side
#: by side (tools/gpu_check.sh and slurm/common.sh export 1, which serialises them).
QUEUES = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
#: variant -> (extra training arguments, extra environment)
VARIANTS = {"packed": ([], {}), "packed-sdpa": ([], {"MEGATRON_SPHINX_ATTENTION": "sdpa"}),
            "packed-compiled": (["--compile-fusions"], {}),
            "packed-unfused": (["--adam", "foreach"],
                               {"MEGATRON_SPHINX_ROPE": "torch", "MEGATRON_SPHINX_SWIGLU": "torch",
                                "MEGATRON_SPHINX_CE": "torch",
                                "MEGATRON_SPHINX_WGRAD_FUSION": "torch"}),
            "packed-foreach": (["--adam", "foreach"], {}),
            "packed-mbs1": (["--micro-batch-size", "1"], {}),
            "packed-mbs2": (["--micro-batch-size", "2"], {}),
            "packed-mbs4": (["--micro-batch-size", "4"], {}),
            "packed-mbs4-expandable": (["--micro-batch-size", "4"],
                                       {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
            "packed-overlap": (["--overlap-vision"], QUEUES),
            "packed-graphs-overlap": (["--vision-batch", "32", "--cuda-graph-vision",
                                       "--overlap-vision"], QUEUES),
            "packed-graphs-overlap-mbs4": (["--vision-batch", "32", "--cuda-graph-vision",
                                            "--overlap-vision", "--micro-batch-size", "4"],
                                           QUEUES),
            "packed-tanh": (["--vision-gelu", "tanh"], {}),
            "packed-graphs-overlap-tanh": (["--vision-batch", "32", "--cuda-graph-vision",
                                            "--overlap-vision", "--vision-gelu", "tanh"], QUEUES),
            "packed-graphs-overlap-tanh-mbs4": (["--vision-batch", "32", "--cuda-graph-vision",
                                                 "--overlap-vision", "--vision-gelu", "tanh",
                                                 "--micro-batch-size", "4"], QUEUES),
            "packed-dwconv": (["--vision-dwconv", "triton"], {}),
            "packed-cudnn": (["--vision-cudnn-benchmark"], {}),
            "packed-local": (["--backend", "local"], {}),
            "packed-fp8": (["--fp8"], {}),
            "packed-graphs-overlap-fp8": (["--vision-batch", "32", "--cuda-graph-vision",
                                           "--overlap-vision", "--fp8"], QUEUES),
            "packed-graphs-cudnn": (["--vision-batch", "32", "--cuda-graph-vision",
                                     "--vision-cudnn-benchmark"], {}),
            "packed-vb32": (["--vision-batch", "32"], {}),
            "packed-graphs": (["--vision-batch", "32", "--cuda-graph-vision"], {}),
            "packed-graphs-mbs1": (["--vision-batch", "32", "--cuda-graph-vision",
                                    "--micro-batch-size", "1"], {}),
            "packed-graphs-mbs2": (["--vision-batch", "32", "--cuda-graph-vision",
                                    "--micro-batch-size", "2"], {}),
            "reference": (["--no-packing", "--no-skip"], {})}


def run_layout(recipe: str, name: str, variant: str, steps: int, extra: list[str],
               warmup: int = 1) -> dict:
    from megatron_sphinx.distributed import free_port  # not a fixed port: runs may overlap

    nproc, args = LAYOUTS[name]
    variant_args, variant_env = VARIANTS[variant]
    args = args + variant_args
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "megatron_sphinx.train", "--recipe", recipe,
               "--data", "synthetic", "--steps", str(steps), "--save", tmp, "--no-final-save",
               *args, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), **variant_env}
        env.pop("TORCH_COMPILE_DISABLE", None)  # the training command's own default
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:  # reported, and the other rows still measured
            said = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
            detail = f" {said[0]}" if said else f"\n{proc.stderr[-3000:]}"  # a crash: its tail
            print(f"{name}/{variant} failed (exit {proc.returncode}):{detail}", file=sys.stderr)
            return {"layout": name, "variant": variant, "processes": nproc,
                    "error": f"exit {proc.returncode}"}
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    said = {}  # the first rank's start-up split and kernel choices, as its log says them
    for line in proc.stderr.splitlines():
        if " INFO " not in line:
            continue
        message = line.split(" INFO ", 1)[1]
        for key in ("start-up", "kernels"):
            if message.startswith(key):
                said.setdefault(key, message)
    times = [r["step_time_s"] for r in rows]
    measured = rows[warmup:]  # the first steps pay one-off costs
    seconds = sum(r["step_time_s"] for r in measured)
    tflops = sum(r["tflops_per_gpu"] * r["step_time_s"] for r in measured) / seconds
    peak = next((r["tflops_per_gpu"] / r["mfu"] for r in measured if r.get("mfu")), None)
    return {"layout": name, "variant": variant, "processes": nproc, "first_step_s": times[0],
            "warmup_steps": warmup, "step_s": statistics.median(times[warmup:]),
            "tokens_per_step": rows[-1]["tokens"],
            "tokens_per_s": sum(r["tokens"] for r in measured) / seconds,
            "tflops_per_gpu": tflops, "mfu": tflops / peak if peak else None,
            "packing_efficiency": statistics.median(r["packing_efficiency"] for r in rows),
            "step_times_s": times, "step_tflops": [r["tflops_per_gpu"] for r in rows],
            "max_memory_gib": rows[-1].get("max_memory_gib"),
            "alloc_retries": rows[-1].get("alloc_retries"),
            "wall_s": wall, "launch_overhead_s": wall - sum(times),
            "startup_s": rows[0].get("startup_s"), "startup": said.get("start-up"),
            "kernels": said.get("kernels")}


def machine() -> str:
    """The device the benchmark ran on."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (1 of {torch.cuda.device_count()})"
    except ImportError:
        pass
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def check_args(args: argparse.Namespace, extra: list[str]) -> None:
    """The benchmark's own arguments and the training arguments it passes on, checked in this
    process before any launch (the training command's own checks, on its parser).

    Raises:
        ValueError: One line saying what to change.
    """
    import contextlib
    import io

    if args.warmup < 0:
        raise ValueError(f"--warmup {args.warmup}: give 0 or more steps")
    if args.steps <= args.warmup:
        raise ValueError(f"--steps {args.steps}: give more than --warmup ({args.warmup}) steps, "
                         "which are left out of the figures")
    if args.json:
        from megatron_sphinx.cli import check_output_file

        check_output_file(args.json, "--json")
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.__main__ import parse_args as train_args
    from megatron_sphinx.train.run_config import check_run_inputs

    cfg = get_recipe(args.recipe)
    checked = []
    for name in args.layouts:
        for variant in args.variants:
            argv = ["--recipe", args.recipe, "--data", "synthetic", "--steps", str(args.steps),
                    *LAYOUTS[name][1], *VARIANTS[variant][0], *extra]
            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said):
                    rc = train_args(argv)
            except SystemExit:  # the training parser's one "error: ..." line on stderr
                why = said.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
                raise ValueError(f"training argument of {name}/{variant} (bench_train passes "
                                 "the arguments it does not know on to python -m "
                                 f"megatron_sphinx.train): {why}") from None
            check_run_inputs(rc, cfg)
            checked.append((f"{name}/{variant}", LAYOUTS[name][0], rc))
    from megatron_sphinx.train.loop import preflight  # imports Megatron: after the cheap checks

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    try:
        for what, nproc, rc in checked:
            os.environ.update(RANK="0", WORLD_SIZE=str(nproc))  # as torchrun will set them
            try:
                preflight(rc)  # the layout against the launch and the model
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0],
                       epilog="Other arguments (e.g. --seq-length 4096 --global-batch-size 8) "
                              "are passed on to python -m megatron_sphinx.train.")
    p.add_argument("--recipe", default="debug", help="recipe name (default: debug)")
    p.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=1,
                   help="first steps of each run left out of the figures (default 1)")
    p.add_argument("--layouts", nargs="+", default=["tp1", "tp2"], choices=list(LAYOUTS),
                   help="process layouts, each its own torchrun (default: tp1 tp2)")
    p.add_argument("--variants", nargs="+", default=["packed"], choices=list(VARIANTS),
                   help="what each layout runs (default: packed)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args, extra = p.parse_known_args(argv)
    from megatron_sphinx.cli import fail, quiet_import_notices

    quiet_import_notices()
    try:
        check_args(args, extra)
    except ValueError as exc:
        return fail(exc)
    runs = [(name, variant) for name in args.layouts for variant in args.variants]
    rows = []
    for i, (name, variant) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {name} {variant}: {args.steps} steps ...", file=sys.stderr,
              flush=True)
        rows.append(run_layout(args.recipe, name, variant, args.steps, extra, args.warmup))
        r = rows[-1]
        if args.json:  # the rows so far: a run cut by a time limit keeps them for the summary
            Path(args.json).write_text(json.dumps(rows, indent=1))
        if "error" not in r:  # each result as soon as it is known (a cut-off run keeps it)
            print(f"[{i}/{len(runs)}] {name} {variant}: {r['step_s']:.3f} s/step, "
                  f"{r['tokens_per_s']:.0f} tokens/s"
                  + (f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""),
                  file=sys.stderr, flush=True)
            for key in ("startup", "kernels"):
                if r[key]:
                    print(f"    {r[key]}", file=sys.stderr, flush=True)
    print(f"\nmachine: {machine()}; recipe {args.recipe}, synthetic data, {args.steps} steps "
          f"(figures over the last {args.steps - args.warmup}), extra args "
          f"{' '.join(extra) or '-'}")
    print(f"{'layout':7} {'variant':18} {'procs':>5} {'step s':>8} {'1st step s':>10} "
          f"{'tokens/s':>9} {'TFLOP/s/gpu':>11} {'MFU':>6} {'packing':>7} {'launch s':>8} "
          f"{'start s':>7} {'peak GiB':>8} {'retries':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:7} {r['variant']:18} {r['processes']:>5} failed ({r['error']})")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['layout']:7} {r['variant']:18} {r['processes']:>5} {r['step_s']:>8.3f} "
              f"{r['first_step_s']:>10.2f} {r['tokens_per_s']:>9.0f} {r['tflops_per_gpu']:>11.2f} "
              f"{mfu:>6} {r['packing_efficiency']:>7.3f} {r['launch_overhead_s']:>8.1f} "
              + (f"{r['startup_s']:>7.1f} " if r["startup_s"] is not None else f"{'-':>7} ")
              + (f"{r['max_memory_gib']:>8.1f} {r['alloc_retries']:>7d}"
                 if r["max_memory_gib"] is not None else f"{'-':>8} {'-':>7}"))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
