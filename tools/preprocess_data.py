"""Preprocess a data mix into a zarr store, in parallel over MPI ranks (or as one process).

    mpiexec -n 2 python tools/preprocess_data.py --mix MIX.yaml --tokenizer DIR --out STORE.zarr \\
        --seq-length 4096 --image-size 448 [--summary-json PATH] [--overlong truncate|drop]

Each rank converts and tokenizes records ``k % world == rank`` of every source and writes its own
shard; after a barrier rank 0 writes the index and prints the summary. Without ``--tokenizer`` the
project's offline tokenizer is built from the sample data into ``STORE.zarr/tokenizer``. A
non-empty ``--out`` is never overwritten without ``--overwrite`` (never at all if it is not a
store); a complete store made from the same inputs and settings is left as it is.

Bad input ends with one ``error:`` line and exit code 2, before any rank has written anything
where possible (settings, the mix file and its paths, the output locations). A run that fails
later, or whose records all get dropped, removes the store it began and puts back the store that
``--overwrite`` was replacing: the old store goes only once the new one is complete (all of it
done by :func:`megatron_sphinx.data.build_store.build_store`). SIGTERM and SIGHUP (a Slurm time
limit, ``scancel``) roll back the same way and exit with 128 + the signal's number. An unexpected
error on one rank ends every rank (``MPI_Abort``) rather than leaving the others waiting.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description="Preprocess a data mix into a zarr store.")
    p.add_argument("--mix", required=True, help="mix YAML (sources, formats, paths, weights)")
    p.add_argument("--out", required=True, help="store directory to create (STORE.zarr)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer dir of the base LLM; default: build the "
                        "project's offline tokenizer into OUT/tokenizer")
    p.add_argument("--template", default="sphinx", choices=["sphinx", "llm"],
                   help="chat template: SPHINX's ### Human/### Assistant (sphinx, the default), or "
                        "the tokenizer's own (llm)")
    p.add_argument("--seq-length", type=int, default=4096,
                   help="longest sample (after image expansion; default 4096)")
    p.add_argument("--image-size", type=int, default=448,
                   help="padded-square side: 448 (default) or 672 (-2K)")
    p.add_argument("--grid", type=int, default=None,
                   help="sub-images per side (default image_size // 224)")
    p.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                   help="samples longer than --seq-length: truncate (cut part's loss dropped) "
                        "or drop (counted); default truncate")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar per rank (default: only on a terminal; without it, "
                        "INFO lines per source)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The settings and paths, checked before any rank starts and before the heavy imports
    (nothing is written).

    Raises:
        ValueError: One line saying what to change (a ``UsageError``, or the settings' own).
    """
    from megatron_sphinx.cli import (UsageError, check_input_dir, check_input_file,
                                     check_output_dir, check_output_file)
    from megatron_sphinx.data.preprocess import PreprocessSettings

    PreprocessSettings(args.seq_length, args.image_size, args.grid, args.overlong)
    check_input_file(args.mix, "--mix", "mix YAML file")
    from megatron_sphinx.data.mixfile import load_mix

    load_mix(args.mix)  # YAML, keys, formats, weights and annotation paths (a MixError)
    if args.tokenizer is not None:
        check_input_dir(args.tokenizer, "--tokenizer", "Hugging Face tokenizer directory")
    check_output_dir(args.out, "--out")
    if args.summary_json:
        check_output_file(args.summary_json, "--summary-json")
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        raise UsageError(f"--log-level {args.log_level}: choose DEBUG, INFO, WARNING or ERROR")


class Interrupted(KeyboardInterrupt):
    """A termination signal (Slurm's time limit, ``scancel``, a closed terminal) turned into an
    exception, so that rank 0 rolls ``--out`` back as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_ROLLED_BACK = 7301  # MPI tag: rank 0 has put --out back


def _interrupt(signum, frame) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the roll-back short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _wait_for_roll_back(comm, timeout_s: float = 60.0) -> None:
    """Other ranks: wait (bounded) until rank 0 says --out is rolled back, so that the abort
    below does not kill rank 0 half-way through it."""
    req = comm.comm.irecv(source=0, tag=_ROLLED_BACK)
    deadline = time.monotonic() + timeout_s
    while not req.test()[0] and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv=None) -> int:
    """Entry point: 0 on success, 2 with one line on stderr on bad input (nothing lost)."""
    from megatron_sphinx.cli import fail, launch_rank

    args = parse_args(argv)
    try:
        check_args(args)  # before the heavy imports: a mistake costs a fraction of a second
        from megatron_sphinx.data.build_store import BuildError, Comm, StoreSpec, build_store

        comm = Comm()
    except ValueError as e:  # UsageError, MixError, BuildError: the same on every rank
        return fail(e) if launch_rank() == 0 else 2
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"[rank {comm.rank}] %(levelname)s %(message)s")
    spec = StoreSpec(args.mix, args.out, args.tokenizer, args.template, args.seq_length,
                     args.image_size, args.grid, args.overlong, args.overwrite,
                     args.summary_json, args.progress)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        build_store(spec, comm)  # logs the summary table on rank 0
    except BuildError as e:  # raised on every rank alike, --out already rolled back
        return fail(e) if comm.rank == 0 else 2
    except Interrupted as e:  # --out already rolled back on rank 0
        if comm.rank == 0:
            print(f"error: stopped by {signal.Signals(e.signum).name}: the store this run began "
                  "was removed and a store it was replacing put back; run it again to build "
                  "the store", file=sys.stderr)
        if comm.size > 1:
            if comm.rank == 0:
                for r in range(1, comm.size):
                    comm.comm.isend(None, dest=r, tag=_ROLLED_BACK)
            else:
                _wait_for_roll_back(comm)
            comm.abort(128 + e.signum)
        return 128 + e.signum
    except BaseException:  # a bug on one rank: the others would wait for it forever
        if comm.size > 1:
            traceback.print_exc()
            sys.stderr.flush()
            comm.abort(1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
