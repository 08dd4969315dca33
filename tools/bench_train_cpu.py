"""CPU training benchmark: step time of a recipe at TP1 and TP2, and the launch overhead.

Runs the real training command (``python -m megatron_sphinx.train`` under torchrun) on synthetic
data for each layout in one invocation and prints one table:

* step time: median over the steps after the first (which pays one-off set-up costs);
* launch overhead: process wall time minus the time spent in steps (imports, process groups,
  model and optimizer construction, the first step's one-off costs, checkpoint-free exit).

Usage: python tools/bench_train_cpu.py [--recipe debug] [--steps 8] [--layouts tp1 tp2]
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
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tp", "2"]), "dp2": (2, []), "pp2": (2, ["--pp", "2"])}


def run_layout(recipe: str, name: str, steps: int, extra: list[str]) -> dict:
    nproc, args = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=29577", "-m", "megatron_sphinx.train", "--recipe", recipe,
               "--data", "synthetic", "--steps", str(steps), "--save", tmp, *args, *extra]
        env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS=str(max(1, 2 // nproc)))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    times = [r["step_time_s"] for r in rows]
    return {"layout": name, "processes": nproc, "first_step_s": times[0],
            "step_s": statistics.median(times[1:]), "tokens_per_step": rows[-1]["tokens"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "wall_s": wall, "launch_overhead_s": wall - sum(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layouts", nargs="+", default=["tp1", "tp2"], choices=list(LAYOUTS))
    p.add_argument("--json", default=None, help="also write the rows here")
    args, extra = p.parse_known_args()
    rows = [run_layout(args.recipe, name, args.steps, extra) for name in args.layouts]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"recipe {args.recipe}, synthetic data, {args.steps} steps")
    print(f"{'layout':8} {'procs':>5} {'step s (median)':>16} {'first step s':>13} "
          f"{'tokens/s':>9} {'launch overhead s':>18} {'wall s':>7}")
    for r in rows:
        print(f"{r['layout']:8} {r['processes']:>5} {r['step_s']:>16.3f} {r['first_step_s']:>13.2f}"
              f" {r['tokens_per_s']:>9.0f} {r['launch_overhead_s']:>18.1f} {r['wall_s']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
