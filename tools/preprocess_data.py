"""Preprocess a data mix into a zarr store, in parallel over MPI ranks (or as one process).

    mpiexec -n 2 python tools/preprocess_data.py --mix MIX.yaml --tokenizer DIR --out STORE.zarr \\
        --seq-length 4096 --image-size 448 [--summary-json PATH] [--overlong truncate|drop]

Each rank converts and tokenizes records ``k % world == rank`` of every source and writes its own
shard; after a barrier rank 0 writes the index and prints the summary. Without ``--tokenizer`` the
project's offline tokenizer is built from the sample data into ``STORE.zarr/tokenizer``. A
non-empty ``--out`` is never overwritten without ``--overwrite`` (never at all if it is not a
store); a complete store made from the same inputs and settings is left as it is.
See :mod:`megatron_sphinx.data.build_store`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.data.build_store import BuildError, Comm, StoreSpec, build_store  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Preprocess a data mix into a zarr store.")
    p.add_argument("--mix", required=True, help="mix YAML (sources, formats, paths, weights)")
    p.add_argument("--out", required=True, help="store directory to create (STORE.zarr)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer dir of the base LLM; default: build the "
                        "project's offline tokenizer into OUT/tokenizer")
    p.add_argument("--template", default="sphinx", choices=["sphinx", "llm"],
                   help="chat template: SPHINX's ### Human/### Assistant, or the tokenizer's own")
    p.add_argument("--seq-length", type=int, default=4096,
                   help="longest sample (after image expansion)")
    p.add_argument("--image-size", type=int, default=448, help="padded-square side (448 / 672)")
    p.add_argument("--grid", type=int, default=None,
                   help="sub-images per side (default image_size // 224)")
    p.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                   help="samples longer than --seq-length: truncate (cut part's loss dropped) "
                        "or drop (counted)")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar per rank (default: only on a terminal)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        comm = Comm()
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"[rank {comm.rank}] %(levelname)s %(message)s")
    spec = StoreSpec(args.mix, args.out, args.tokenizer, args.template, args.seq_length,
                     args.image_size, args.grid, args.overlong, args.overwrite,
                     args.summary_json, args.progress)
    try:
        build_store(spec, comm)  # logs the summary table on rank 0
    except BuildError as e:
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
