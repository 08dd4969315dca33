"""Builds a store from a mix: MPI (or single-process) orchestration around :mod:`.preprocess`.

:func:`build_store` is what ``tools/preprocess_data.py`` runs on every rank, and what code can call
in-process (one process, no MPI is initialised unless a launcher started the process)::

    from megatron_sphinx.data.build_store import StoreSpec, build_store
    summary = build_store(StoreSpec(mix="sample/mix.yaml", out="sample.zarr", seq_length=2048))

Steps: every rank validates the settings, the mix and the tokenizer (identically, so all fail
alike); rank 0 checks ``out`` (never overwrites a non-store; a store only with ``overwrite``; a
complete store with the same fingerprint is left as it is), creates the root group and, without a
tokenizer, builds the project tokenizer into ``out/tokenizer``; each rank writes its shard; after a
barrier rank 0 writes the index and returns the summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from megatron_sphinx.data import store as st
from megatron_sphinx.data.conversation import DialogEncoder
from megatron_sphinx.data.mixfile import MixError, load_mix
from megatron_sphinx.data.preprocess import (
    PreprocessSettings, format_summary, preprocess_rank, summarize, timer)
from megatron_sphinx.data.sources import SourceError
from megatron_sphinx.data.tokenizer import (
    PROJECT_VOCAB_SIZE, TokenizerNotFound, build_project_tokenizer, load_tokenizer,
    tokenizer_hash)

logger = logging.getLogger(__name__)
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_MPI_ENV_VARS = _MPI_SIZE_VARS + ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


class BuildError(ValueError):
    """Bad settings or output directory; the message says what to change (nothing written)."""


@dataclass
class StoreSpec:
    """What to build and how."""

    mix: str | os.PathLike
    """Mix YAML."""
    out: str | os.PathLike
    """Store directory to create."""
    tokenizer: str | os.PathLike | None = None
    """Local Hugging Face tokenizer dir; None builds the project tokenizer into ``out``."""
    template: str = "sphinx"
    """Chat template name (``sphinx`` or ``llm``)."""
    seq_length: int = 4096
    """Longest sample after image expansion."""
    image_size: int = 448
    """Padded-square side."""
    grid: int | None = None
    """Sub-images per side; None: ``image_size // 224``."""
    overlong: str = "truncate"
    """``truncate`` or ``drop`` samples over ``seq_length``."""
    overwrite: bool = False
    """Replace an existing store at ``out``."""
    summary_json: str | os.PathLike | None = None
    """Also write the summary here (rank 0)."""
    progress: bool | None = None
    """tqdm bar per rank; None: only on a terminal."""

    def __post_init__(self) -> None:
        if self.grid is None:
            self.grid = max(1, self.image_size // 224)


class Comm:
    """The MPI world when a launcher started the process, else a one-process stand-in (then
    mpi4py is not imported at all, so in-process calls never initialise MPI)."""

    def __init__(self):
        self.comm, self.rank, self.size = None, 0, 1
        if not any(v in os.environ for v in _MPI_ENV_VARS):
            return
        try:
            from mpi4py import MPI
        except ImportError:
            if max(int(os.environ.get(v, "1") or 1) for v in _MPI_SIZE_VARS) > 1:
                raise BuildError("started under MPI with several ranks but mpi4py cannot be "
                                 "imported: install mpi4py (requirements.txt) or run one "
                                 "process") from None
            return
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    @classmethod
    def single(cls) -> "Comm":
        """A one-process stand-in, whatever launcher started this process."""
        comm = cls.__new__(cls)
        comm.comm, comm.rank, comm.size = None, 0, 1
        return comm

    def bcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.comm is not None:
            self.comm.Barrier()


def fingerprint(spec: StoreSpec, mix, tok_id: str) -> str:
    """Hash of everything the store's content depends on (annotation files by size and mtime)."""
    files = []
    for s in mix.sources:
        for f in [s.path] + [v for v in s.options.values() if isinstance(v, Path)]:
            stt = Path(f).stat()
            files.append([str(f), stt.st_size, stt.st_mtime_ns])
    doc = {"mix": mix.path.read_text(), "files": files, "tokenizer": tok_id,
           "template": spec.template, "seq_length": spec.seq_length,
           "image_size": spec.image_size, "grid": spec.grid, "overlong": spec.overlong,
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


def build_store(spec: StoreSpec, comm: Comm | None = None) -> dict | None:
    """Preprocesses ``spec.mix`` into the store ``spec.out`` (call on every rank).

    Returns:
        The summary on rank 0 (``{"uptodate": True, ...}`` if the store was already there),
        None on other ranks.

    Raises:
        BuildError: Bad settings, mix, tokenizer or output directory (on every rank alike);
            nothing was overwritten.
    """
    comm = comm or Comm()
    out = Path(spec.out).resolve()
    try:  # identical on every rank, so every rank fails alike without talking
        settings = PreprocessSettings(spec.seq_length, spec.image_size, spec.grid, spec.overlong)
        mix = load_mix(spec.mix)
        tok = None
        if spec.tokenizer:
            tok = load_tokenizer(spec.tokenizer)
            tok_id = tokenizer_hash(spec.tokenizer)
            DialogEncoder(tok, spec.template)  # checks BOS and the chat template up front
        else:
            tok_id = f"project-bpe-{PROJECT_VOCAB_SIZE}"
        fp = fingerprint(spec, mix, tok_id)
    except (ValueError, TokenizerNotFound, MixError, OSError) as e:
        raise BuildError(str(e)) from None

    status = ("ok", "")
    if comm.rank == 0:
        status = prepare_output(out, fp, spec.overwrite)
        if status[0] == "ok":
            st.create_store(out, st.StoreMeta(spec.image_size, spec.grid, spec.seq_length,
                                              mix.names, template=spec.template, fingerprint=fp))
            if tok is None:
                build_project_tokenizer(out / "tokenizer")
    status = comm.bcast(status)
    if status[0] == "error":
        raise BuildError(status[1])
    if status[0] == "uptodate":
        logger.info("%s: nothing to do", status[1])
        return {"uptodate": True, "store": str(out)} if comm.rank == 0 else None
    tok_dir = Path(spec.tokenizer).resolve() if spec.tokenizer else out / "tokenizer"
    if tok is None:
        tok = load_tokenizer(tok_dir)
    encoder = DialogEncoder(tok, spec.template)

    t0 = timer()
    writer = st.ShardWriter(out, comm.rank, spec.image_size, spec.grid)
    try:
        stats = preprocess_rank(mix, encoder, writer, settings, comm.rank, comm.size,
                                progress=spec.progress)
    except SourceError as e:  # a whole annotation file unreadable: the same on every rank
        raise BuildError(str(e)) from None
    writer.close({"summary": stats, "seconds": timer() - t0})
    comm.barrier()
    if comm.rank != 0:
        return None

    shards = st.zarr.open_group(str(out), mode="r")["shards"]
    per_rank = [dict(shards[n].attrs["summary"]) for n in sorted(shards.group_keys())]
    summary = summarize(per_rank, mix.names, timer() - t0, comm.size)
    meta = st.StoreMeta(spec.image_size, spec.grid, spec.seq_length, mix.names,
                        tokenizer_path=str(tok_dir), tokenizer_hash=tokenizer_hash(tok_dir),
                        template=spec.template, fingerprint=fp,
                        extra={"mix": str(mix.path), "overlong": spec.overlong,
                               "weights": {src.name: src.weight for src in mix.sources},
                               "vocab_size": len(tok), "summary": summary})
    meta = st.write_index(out, meta)
    logger.info("summary:\n%s", format_summary(summary))
    logger.info("store %s: %d samples in %d shard(s)", out, meta.num_samples, meta.num_shards)
    if spec.summary_json:
        Path(spec.summary_json).write_text(json.dumps(summary, indent=2))
    return summary
