"""Builds a store from a mix: MPI (or single-process) orchestration around :mod:`.preprocess`.

:func:`build_store` is what ``tools/preprocess_data.py`` runs on every rank, and what code can call
in-process (one process, no MPI is initialised unless a launcher started the process)::

    from megatron_sphinx.data.build_store import StoreSpec, build_store
    summary = build_store(StoreSpec(mix="sample/mix.yaml", out="sample.zarr", seq_length=2048))

Steps: every rank validates the settings, the mix and the tokenizer (identically, so all fail
alike); rank 0 checks ``out`` (never touches a non-store; replaces a store only with
``overwrite``; a complete store with the same fingerprint is left as it is), creates the root
group and, without a tokenizer, builds the project tokenizer into ``out/tokenizer``; each rank
writes its shard; after a barrier rank 0 writes the index and returns the summary.

Nothing is lost when a build fails: a store that ``overwrite`` replaces is renamed aside (into a
hidden ``.NAME.old-*`` folder next to ``out``) and deleted only once the new store is complete and
holds at least one sample. A failed build (a :class:`BuildError`, raised alike on every rank, or
any other exception on rank 0, an interruption included: ``tools/preprocess_data.py`` turns
SIGTERM and SIGHUP into one) removes the store it began and renames the old one back; an empty
directory that was at ``out`` stays. A build in which no record became a sample is a failure.
A build killed outright (SIGKILL) leaves the old store aside: the next build names it, and the
next ``--overwrite`` deletes it once its new store is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_sphinx.cli import one_line
from megatron_sphinx.data import store as st
from megatron_sphinx.data.conversation import DialogEncoder
from megatron_sphinx.data.mixfile import MixError, load_mix
from megatron_sphinx.data.preprocess import (
    VIEW_SIZE, PreprocessSettings, format_summary, preprocess_rank, summarize, timer)
from megatron_sphinx.data.sources import SourceError
from megatron_sphinx.data.tokenizer import (
    PROJECT_VOCAB_SIZE, TokenizerNotFound, build_project_tokenizer, load_tokenizer,
    tokenizer_hash)

logger = logging.getLogger(__name__)
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
_MPI_ENV_VARS = _MPI_SIZE_VARS + ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
_KEPT = " (the previous store at --out was kept)"
_REMOVED = " (the store this run began was removed)"


class BuildError(ValueError):
    """Bad settings, mix, output directory, or a build that failed or yielded no sample.

    Raised alike on every rank; the message says what to change and, for a build that had
    begun, what became of ``out`` (nothing of the user's is lost).
    """


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
        if self.grid is None:  # checked with the other settings by build_store
            self.grid = max(1, self.image_size // VIEW_SIZE)


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

    def allgather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank (waits for all of them)."""
        return [obj] if self.comm is None else self.comm.allgather(obj)

    def barrier(self) -> None:
        """Waits for every rank."""
        if self.comm is not None:
            self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        """Ends every rank at once (after an unexpected error on one rank, which would otherwise
        leave the others waiting forever); does nothing without MPI or with one rank."""
        if self.comm is not None and self.size > 1:
            self.comm.Abort(code)


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


def set_aside(out: Path) -> list[Path]:
    """Stores that a build replacing ``out`` set aside and never finished with: the
    ``.NAME.old-*/NAME`` folders next to ``out`` (a build killed with SIGKILL, or a node that
    died, cannot put them back)."""
    if not out.parent.is_dir():
        return []
    return sorted(h / out.name for h in out.parent.glob(f".{out.name}.old-*")
                  if (h / out.name).is_dir())


def prepare_output(out: Path, fp: str, overwrite: bool) -> tuple[str, str]:
    """Rank 0: what to do with ``out``; changes nothing.

    Returns:
        ``(status, message)``: ``"ok"`` (absent or an empty directory), ``"replace"`` (a store
        that ``overwrite`` replaces), ``"uptodate"`` (a complete store of the same fingerprint)
        or ``"error"`` with a one-line message.
    """
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
            # only a complete store is worth putting back (two killed builds leave two)
            aside = ([a for a in set_aside(out) if st.is_store(a) and st.read_meta(a)[1]]
                     if not complete else [])
            if aside:  # an interrupted --overwrite: say where the store it replaced is
                return "error", (f"--out {out} holds an incomplete store, and the store an "
                                 f"interrupted build replaced is at {aside[-1]}: move that back "
                                 f"(rm -r {out} && mv {aside[-1]} {out}) or pass --overwrite "
                                 "to build anew (nothing was changed)")
            return "error", (f"--out {out} holds {what}: pass --overwrite to replace it or "
                             "choose another --out (nothing was changed)")
        return "replace", ""
    return "ok", ""


class _Output:
    """Rank 0's care of ``out`` during one build, so that a failed build loses nothing.

    Args:
        out: The store directory (absent, an empty directory, or a store to replace).
        replace: ``out`` holds a store to replace: rename it aside now, delete it on
            :meth:`commit`, rename it back on :meth:`roll_back`.
    """

    def __init__(self, out: Path, replace: bool):
        self.out, self.was_dir, self.aside, self.done = out, out.is_dir(), None, False
        # stores earlier interrupted builds set aside: replaced for good with this one
        aside = set_aside(out)
        self.stale = aside if replace else []
        if aside and not replace:
            logger.warning("an interrupted build left the store it replaced at %s: it is kept "
                           "(delete it, or it is deleted by the next --overwrite of %s)",
                           aside[-1], out)
        if replace:
            holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.rename(out, holder / out.name)
            except OSError:
                holder.rmdir()
                raise
            self.aside = holder / out.name
            logger.info("moved the store at %s aside to %s until the new one is complete", out,
                        self.aside)

    def commit(self) -> None:
        """The new store stands: delete the replaced one."""
        self.done = True
        if self.aside is not None:
            shutil.rmtree(self.aside.parent, ignore_errors=True)
            self.aside = None
        for old in self.stale:
            logger.info("deleted %s, set aside by an interrupted build (--overwrite replaced it)",
                        old)
            shutil.rmtree(old.parent, ignore_errors=True)
        self.stale = []

    def roll_back(self) -> str:
        """Removes what this build wrote at ``out`` and renames a replaced store back.

        Returns:
            What became of ``out``, to append to the error message (may be empty).
        """
        if self.done:
            return ""
        self.done = True
        began = st.is_store(self.out)
        if self.out.exists():
            shutil.rmtree(self.out, ignore_errors=True)
        if self.aside is not None:
            try:
                os.rename(self.aside, self.out)
            except OSError as e:
                logger.error("could not put the previous store back (%s): it is at %s", e,
                             self.aside)
                return f" (the previous store could not be put back: it is at {self.aside})"
            shutil.rmtree(self.aside.parent, ignore_errors=True)
            self.aside = None
            return _KEPT
        if self.was_dir:
            self.out.mkdir(exist_ok=True)
        return _REMOVED if began else ""


def _check_inputs(spec: StoreSpec):
    """``(settings, mix, tokenizer or None, fingerprint)``, identical on every rank.

    Raises:
        BuildError: Bad settings, mix or tokenizer.
    """
    try:
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
    return settings, mix, tok, fp


def build_store(spec: StoreSpec, comm: Comm | None = None) -> dict | None:
    """Preprocesses ``spec.mix`` into the store ``spec.out`` (call on every rank).

    Returns:
        The summary on rank 0 (``{"uptodate": True, ...}`` if the store was already there),
        None on other ranks.

    Raises:
        BuildError: On every rank alike: bad settings, mix, tokenizer or output directory
            (nothing written); or, once the build began, an unreadable annotation file, an
            exception on any rank while writing (chained to it where it happened), or no record
            became a sample: then the store this build began is removed and a replaced store is
            put back, and the message says so. An interruption on rank 0 rolls back the same
            way before it propagates.
    """
    comm = comm or Comm()
    out = Path(spec.out).resolve()
    settings, mix, tok, fp = _check_inputs(spec)

    status, output = ("ok", ""), None
    if comm.rank == 0:
        status = prepare_output(out, fp, spec.overwrite)
        if status[0] in ("ok", "replace"):
            status, output = _begin(spec, out, mix, tok, fp, status[0] == "replace")
    status = comm.bcast(status)
    if status[0] == "error":
        raise BuildError(status[1])
    if status[0] == "uptodate":
        logger.info("%s: nothing to do", status[1])
        return {"uptodate": True, "store": str(out)} if comm.rank == 0 else None
    try:
        summary = _write(spec, comm, out, mix, settings, tok, fp)
    except BuildError as e:  # raised on every rank alike: roll back once they all stopped
        comm.barrier()
        note = output.roll_back() if output is not None else ""
        raise BuildError(f"{e}{note}") from e.__cause__
    except BaseException:  # interrupted (KeyboardInterrupt, SystemExit): still put it back
        if output is not None:
            output.roll_back()
        raise
    if output is not None:
        output.commit()
    return summary


def _begin(spec: StoreSpec, out: Path, mix, tok, fp: str,
           replace: bool) -> tuple[tuple[str, str], _Output | None]:
    """Rank 0: sets a replaced store aside and creates the new store's root (and tokenizer)."""
    output = None
    try:
        output = _Output(out, replace)
        st.create_store(out, st.StoreMeta(spec.image_size, spec.grid, spec.seq_length,
                                          mix.names, template=spec.template, fingerprint=fp))
        if tok is None:
            build_project_tokenizer(out / "tokenizer")
    except OSError as e:
        note = output.roll_back() if output is not None else ""
        return ("error", f"--out {out}: cannot write the store ({e.strerror or e}): choose a "
                         f"writable --out{note}"), None
    except BaseException:
        if output is not None:
            output.roll_back()
        raise
    return ("ok", ""), output


def _write(spec: StoreSpec, comm: Comm, out: Path, mix, settings: PreprocessSettings, tok,
           fp: str) -> dict | None:
    """Every rank writes its shard, then rank 0 the index; the summary on rank 0.

    An exception on one rank while it writes its shard (a bug, a full disk) is logged there with
    its traceback and reported to every rank, so that all stop alike and rank 0 can roll back.

    Raises:
        BuildError: Alike on every rank (an unreadable source, a rank that failed, no sample, an
            unwritable index or summary file); chained to the exception on the rank it happened.
    """
    t0, failure, cause = timer(), None, None
    tok_dir = Path(spec.tokenizer).resolve() if spec.tokenizer else out / "tokenizer"
    try:
        if tok is None:
            tok = load_tokenizer(tok_dir)
        encoder = DialogEncoder(tok, spec.template)
        t0 = timer()
        writer = st.ShardWriter(out, comm.rank, settings.image_size, settings.grid)
        stats = preprocess_rank(mix, encoder, writer, settings, comm.rank, comm.size,
                                progress=spec.progress)
        writer.close({"summary": stats, "seconds": timer() - t0})
    except SourceError as e:  # a whole annotation file unreadable: the same on every rank
        failure = str(e)
    except Exception as e:  # noqa: BLE001 - reported to every rank, re-raised as a BuildError
        logger.exception("rank %d: writing its shard failed", comm.rank)
        failure, cause = (f"rank {comm.rank} failed while writing its shard ({type(e).__name__}: "
                          f"{one_line(e)}; its traceback is in the log)"), e
    failure = next((f for f in comm.allgather(failure) if f), None)  # also the barrier
    if failure:
        raise BuildError(failure) from cause
    summary, problem = None, ""
    if comm.rank == 0:
        try:
            summary, problem = _finish(spec, out, mix, tok, tok_dir, fp, timer() - t0,
                                       comm.size)
        except Exception as e:  # noqa: BLE001 - the other ranks wait for the outcome
            logger.exception("writing the index of %s failed", out)
            problem, cause = (f"writing the store's index failed ({type(e).__name__}: "
                              f"{one_line(e)}; its traceback is in the log)"), e
    problem = comm.bcast(problem)
    if problem:
        raise BuildError(problem) from cause
    return summary


def _finish(spec: StoreSpec, out: Path, mix, tok, tok_dir: Path, fp: str, seconds: float,
            world: int) -> tuple[dict, str]:
    """Rank 0: the index, the summary (logged, and written to ``spec.summary_json``).

    Returns:
        ``(summary, problem)``: a non-empty problem (one line) fails the build on every rank.
    """
    shards = st.zarr.open_group(str(out), mode="r")["shards"]
    per_rank = [dict(shards[n].attrs["summary"]) for n in sorted(shards.group_keys())]
    summary = summarize(per_rank, mix.names, seconds, world)
    meta = st.StoreMeta(spec.image_size, spec.grid, spec.seq_length, mix.names,
                        tokenizer_path=str(tok_dir), tokenizer_hash=tokenizer_hash(tok_dir),
                        template=spec.template, fingerprint=fp,
                        extra={"mix": str(mix.path), "overlong": spec.overlong,
                               "weights": {src.name: src.weight for src in mix.sources},
                               "vocab_size": len(tok), "summary": summary})
    try:
        meta = st.write_index(out, meta)
    except OSError as e:
        return summary, (f"--out {out}: cannot write the store's index ({e.strerror or e}): "
                         "free some space or choose another --out")
    logger.info("summary:\n%s", format_summary(summary))
    if meta.num_samples == 0:  # a store without samples trains nothing
        return summary, (f"no record of --mix {spec.mix} became a sample (the summary above "
                         "counts why each was dropped): fix the mix or its files")
    logger.info("store %s: %d samples in %d shard(s)", out, meta.num_samples, meta.num_shards)
    for name, stats in summary["sources"].items():
        if not stats.get("written"):
            logger.warning("source %s contributed no sample (see the summary)", name)
    if spec.summary_json:
        path = Path(spec.summary_json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=2))
        except OSError as e:
            return summary, (f"--summary-json {path}: cannot write it ({e.strerror or e}): "
                             "choose another path")
    return summary, ""
