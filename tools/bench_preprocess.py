"""Benchmark: preprocessing samples/s at 1 and 2 MPI ranks, and random reads from the store.

    python tools/bench_preprocess.py [--scale 4] [--reads 2000] [--workdir DIR]

Generates the sample mix scaled ``--scale`` times (more records, same kinds), preprocesses it with
1 process and with ``mpiexec -n 2``, and reads random samples back. Prints a table; "in-tool" rates
exclude interpreter start-up and imports (what a long run sees), "wall" rates include them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
#: Marks a --workdir as this benchmark's, so a later run may replace its files.
MARKER = ".bench_preprocess"


def _preprocess(mix: Path, tok: Path, out: Path, ranks: int) -> tuple[float, dict]:
    summary = out.with_suffix(".json")
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--mix", str(mix),
           "--tokenizer", str(tok), "--out", str(out), "--seq-length", "4096",
           "--summary-json", str(summary), "--no-progress", "--log-level", "ERROR"]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        if not mpiexec.is_file():
            raise SystemExit(f"{mpiexec} not found: pip install mpich")
        cmd = [str(mpiexec), "-n", str(ranks)] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"preprocessing failed:\n{proc.stderr[-2000:]}")
    return wall, json.loads(summary.read_text())


def _reads(store: Path, n: int, seed: int = 0) -> tuple[float, float]:
    from megatron_sphinx.data.store import StoreReader

    r = StoreReader(store)
    idx = np.random.default_rng(seed).integers(0, len(r), n)
    r.get(0)  # open the shard
    t0 = time.perf_counter()
    for i in idx:
        r.get(int(i))
    full = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in idx:
        r.get_sample(int(i))
    text = n / (time.perf_counter() - t0)
    return full, text


def main(argv=None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=4, help="sample-mix size multiplier")
    p.add_argument("--reads", type=int, default=2000, help="random reads to time")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temp dir)")
    args = p.parse_args(argv)
    from megatron_sphinx.cli import check_output_dir, fail

    try:
        if args.scale < 1 or args.reads < 1:
            raise ValueError(f"--scale {args.scale} / --reads {args.reads}: give at least 1")
        if args.workdir:
            check_output_dir(args.workdir, "--workdir")
            work = Path(args.workdir)
            if work.is_dir() and any(work.iterdir()) and not (work / MARKER).exists():
                raise ValueError(f"--workdir {args.workdir} holds other files (its data/ and "
                                 "store*.zarr would be replaced): pass a new or empty directory")
    except ValueError as exc:
        return fail(exc)
    from megatron_sphinx.data.sample_data import COUNTS, corpus_from_mix, write_sources
    from megatron_sphinx.data.tokenizer import build_project_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / MARKER).write_text("files of tools/bench_preprocess.py (replaced on each run)\n")
        mix = write_sources(work / "data", counts={k: v * args.scale for k, v in COUNTS.items()})
        tok = build_project_tokenizer(work / "tokenizer", corpus_from_mix(mix))
        rows = []
        for ranks in (1, 2):
            out = work / f"store{ranks}.zarr"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            wall, summ = _preprocess(mix, tok, out, ranks)
            n = summ["total"]["read"]
            rows.append((ranks, n, summ["seconds"], summ["samples_per_s"], wall, n / wall))
        full, text = _reads(work / "store1.zarr", args.reads)
        cores = os.cpu_count()
    print(f"machine: {cores} CPU cores (shared), python {sys.version.split()[0]}")
    print(f"{'ranks':>5} {'records':>8} {'in-tool s':>10} {'in-tool rec/s':>14} "
          f"{'wall s':>8} {'wall rec/s':>11}")
    for ranks, n, sec, rate, wall, wrate in rows:
        print(f"{ranks:>5} {n:>8} {sec:>10.2f} {rate:>14.1f} {wall:>8.2f} {wrate:>11.1f}")
    print(f"random reads (sample + image bytes): {full:,.0f} samples/s")
    print(f"random reads (sample only):          {text:,.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
