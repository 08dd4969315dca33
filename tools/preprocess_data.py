"""Preprocess a data mix into a zarr store, in parallel over MPI ranks (or as one process).

    mpiexec -n 2 python tools/preprocess_data.py --mix MIX.yaml --tokenizer DIR --out STORE.zarr \\
        --seq-length 4096 --image-size 448 [--summary-json PATH] [--overlong truncate|drop]

Each rank converts and tokenizes records ``k % world == rank`` of every source and writes its own
shard; after a barrier rank 0 writes the index. Without ``--tokenizer`` the project's offline
tokenizer is built from the sample data into ``STORE.zarr/tokenizer``. A non-empty ``--out`` is
never overwritten without ``--overwrite`` (and never at all if it is not a store); a complete store
made from the same inputs and settings is left as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sphinx.data import store as st  # noqa: E402
from megatron_sphinx.data.conversation import DialogEncoder  # noqa: E402
from megatron_sphinx.data.mixfile import MixError, load_mix  # noqa: E402
from megatron_sphinx.data.preprocess import (  # noqa: E402
    PreprocessSettings, format_summary, preprocess_rank, summarize, timer)
from megatron_sphinx.data.sources import SourceError  # noqa: E402
from megatron_sphinx.data.tokenizer import (  # noqa: E402
    PROJECT_VOCAB_SIZE, TokenizerNotFound, build_project_tokenizer, load_tokenizer, tokenizer_hash)

logger = logging.getLogger("preprocess_data")
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_MPI_ENV_VARS = _MPI_SIZE_VARS + ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


class _Comm:
    """MPI world when started by an MPI launcher, else a stand-in for one process (mpi4py is then
    not imported at all, so an in-process call never initialises MPI)."""

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        if not any(v in os.environ for v in _MPI_ENV_VARS):
            return
        try:
            from mpi4py import MPI
        except ImportError:
            if max(int(os.environ.get(v, "1") or 1) for v in _MPI_SIZE_VARS) > 1:
                raise SystemExit("error: started under MPI with several ranks but mpi4py cannot "
                                 "be imported: install mpi4py (requirements.txt) or run one "
                                 "process") from None
            return
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Preprocess a data mix into a zarr store.")
    p.add_argument("--mix", required=True, help="mix YAML (sources, formats, paths, weights)")
    p.add_argument("--out", required=True, help="store directory to create (STORE.zarr)")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer dir of the base LLM; default: build the "
                        "project's offline tokenizer into OUT/tokenizer")
    p.add_argument("--template", default="sphinx", choices=["sphinx", "llm"],
                   help="chat template: SPHINX's ### Human/### Assistant, or the tokenizer's own")
    p.add_argument("--seq-length", type=int, default=4096, help="longest sample (after image "
                   "expansion)")
    p.add_argument("--image-size", type=int, default=448, help="padded-square side (448 / 672)")
    p.add_argument("--grid", type=int, default=None, help="sub-images per side (default "
                   "image_size // 224)")
    p.add_argument("--overlong", default="truncate", choices=["truncate", "drop"],
                   help="samples longer than --seq-length: truncate (cut part's loss dropped) "
                        "or drop (counted)")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar per rank (default: only on a terminal)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def fingerprint(args, mix, tok_id: str, grid: int) -> str:
    """Hash of everything the store's content depends on (annotation files by size and mtime)."""
    files = []
    for s in mix.sources:
        for f in [s.path] + [v for v in s.options.values() if isinstance(v, Path)]:
            stt = Path(f).stat()
            files.append([str(f), stt.st_size, stt.st_mtime_ns])
    doc = {"mix": mix.path.read_text(), "files": files, "tokenizer": tok_id,
           "template": args.template, "seq_length": args.seq_length,
           "image_size": args.image_size, "grid": grid, "overlong": args.overlong,
           "format": st.STORE_FORMAT}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def prepare_output(out: Path, fp: str, overwrite: bool) -> tuple[str, str]:
    """Rank 0: ``("ok" | "uptodate" | "error", message)``; removes an old store on overwrite."""
    if out.exists() and not out.is_dir():
        return "error", f"--out {out} exists and is not a directory: choose another --out"
    if out.exists() and any(out.iterdir()):
        if not st.is_store(out):
            return "error", (f"--out {out} is not empty and is not a store: choose another "
                             "--out (nothing was changed)")
        meta, complete = st.read_meta(out)
        if complete and meta.fingerprint == fp and not overwrite:
            return "uptodate", f"{out} already holds this store (same inputs and settings)"
        if not overwrite:
            what = "an incomplete store" if not complete else "a store made from other inputs"
            return "error", (f"--out {out} holds {what}: pass --overwrite to replace it or "
                             "choose another --out (nothing was changed)")
        shutil.rmtree(out)
    return "ok", ""


def main(argv=None) -> int:
    args = parse_args(argv)
    comm = _Comm()
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"[rank {comm.rank}] %(levelname)s %(message)s")
    out = Path(args.out).resolve()
    grid = args.grid or max(1, args.image_size // 224)

    def fail(msg: str) -> int:
        if comm.rank == 0:
            print(f"error: {msg}", file=sys.stderr)
        return 2

    try:  # identical on every rank, so every rank fails alike without talking
        settings = PreprocessSettings(args.seq_length, args.image_size, grid, args.overlong)
        mix = load_mix(args.mix)
        tok = None
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
            tok_id = tokenizer_hash(args.tokenizer)
            DialogEncoder(tok, args.template)  # checks BOS and the chat template up front
        else:
            tok_id = f"project-bpe-{PROJECT_VOCAB_SIZE}"
    except (ValueError, TokenizerNotFound, MixError, OSError) as e:
        return fail(str(e))
    fp = fingerprint(args, mix, tok_id, grid)

    status = ("ok", "")
    if comm.rank == 0:
        status = prepare_output(out, fp, args.overwrite)
        if status[0] == "ok":
            meta = st.StoreMeta(args.image_size, grid, args.seq_length, mix.names,
                                template=args.template, fingerprint=fp)
            st.create_store(out, meta)
            if tok is None:
                build_project_tokenizer(out / "tokenizer")
    status = comm.bcast(status)
    if status[0] == "error":
        return fail(status[1])
    if status[0] == "uptodate":
        if comm.rank == 0:
            logger.info("%s: nothing to do", status[1])
        return 0
    tok_dir = Path(args.tokenizer).resolve() if args.tokenizer else out / "tokenizer"
    if tok is None:
        tok = load_tokenizer(tok_dir)
    encoder = DialogEncoder(tok, args.template)

    t0 = timer()
    writer = st.ShardWriter(out, comm.rank, args.image_size, grid)
    try:
        stats = preprocess_rank(mix, encoder, writer, settings, comm.rank, comm.size,
                                progress=args.progress)
    except SourceError as e:  # a whole annotation file unreadable: same on every rank
        return fail(str(e))
    writer.close({"summary": stats, "seconds": timer() - t0})
    comm.barrier()
    if comm.rank != 0:
        return 0

    root = st.zarr.open_group(str(out), mode="r")
    shards = root["shards"]
    per_rank = [dict(shards[n].attrs["summary"]) for n in sorted(shards.group_keys())]
    summary = summarize(per_rank, mix.names, timer() - t0, comm.size)
    meta = st.StoreMeta(args.image_size, grid, args.seq_length, mix.names,
                        tokenizer_path=str(tok_dir), tokenizer_hash=tokenizer_hash(tok_dir),
                        template=args.template, fingerprint=fp,
                        extra={"mix": str(mix.path), "overlong": args.overlong,
                               "vocab_size": len(tok), "summary": summary})
    meta = st.write_index(out, meta)
    print(format_summary(summary), file=sys.stderr)
    logger.info("store %s: %d samples in %d shard(s)", out, meta.num_samples, meta.num_shards)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
