"""Shared start-up and input checks of the command-line tools.

Logging and quiet libraries for one-process tools (:func:`setup_cpu_tool`), and the checks every
entry point runs on its paths before any heavy import or any write: output locations that can be
written (:func:`check_output_dir`, :func:`check_output_file`), input files and directories
(:func:`check_input_file`, :func:`check_input_dir`) and preprocessed stores with samples
(:func:`check_store`); checkpoints are checked by :mod:`megatron_sphinx.train.checkpoint`. Each
raises :class:`UsageError`, a ``ValueError`` whose message is one line saying what to change;
:func:`fail` prints it as ``error: ...`` on stderr and returns exit code 2. Argument errors
(:class:`ArgumentParser`) take the same one-line form.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NoReturn

#: Exit code of every entry point on bad input.
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input; the message is one line that says what to change."""


class SameOnEveryRank(ValueError):
    """An error that every rank of a launch meets alike, as it depends only on the arguments
    and the launch (e.g. a parallel layout that does not fit the world size): rank 0 prints it,
    the other ranks exit quietly with the same code."""


def setup_cpu_tool() -> None:
    """Logging for a tool that runs in one CPU process (the checkpoint converters).

    Hides GPUs (the conversion runs on the CPU), disables torch.compile and hub access, and
    silences the deprecation / no-CUDA notices megatron, torch and transformers print on import.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for quiet in ("megatron", "torch.utils.cpp_extension"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
    for noisy in ("torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(megatron|torch|transformers)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)  # ShardedTensor deprecation
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    no_compiler_when_disabled()


def quiet_import_notices() -> None:
    """Prepares a process for Megatron's import: hides the notices Megatron prints at import
    about optional packages it lacks (Apex, Transformer Engine, absl) and torch's "no CUDA
    runtime" extension notice (the kernel choices are logged once by the training command), and
    skips torch's compiler where compiling is off (:func:`no_compiler_when_disabled`)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"(Apex|Transformer Engine|absl\.logging)[^.]* not installed")
    no_compiler_when_disabled()


def no_compiler_when_disabled() -> None:
    """Where ``TORCH_COMPILE_DISABLE`` is set (the training command's default), makes
    ``torch.compile`` return the function or module it is given, unwrapped.

    torch.compile is a no-op then anyway (what it returns runs eagerly), but building that
    no-op imports torch's compiler (Inductor's ``compile_fx`` and its passes), and Megatron
    decorates its fusions with ``torch.compile`` when they are imported
    (``megatron.core.jit.jit_fuser``): ~1.5 s of every process's start-up on the 2-core CPU
    machine, for nothing. Megatron's own switch, ``megatron.core.jit.disable_jit_fuser``, cannot
    run before those imports. Call before Megatron is imported; does nothing where compiling is
    on (``--compile-fusions``, ``bench_vision --variants compiled``).
    """
    if os.environ.get("TORCH_COMPILE_DISABLE", "0") in ("", "0"):
        return
    import torch

    if getattr(torch.compile, "is_disabled_compile", False):
        return

    def compile(model=None, **options):  # noqa: A001 - torch.compile's stand-in
        return (lambda fn: fn) if model is None else model

    compile.is_disabled_compile = True
    torch.compile = compile


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one space."""
    return " ".join(str(text).split())


def fail(exc: object) -> int:
    """Prints ``error: <one line>`` on stderr; returns :data:`EXIT_BAD_INPUT`."""
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return EXIT_BAD_INPUT


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors follow the project's format: one ``error:`` line
    that ends by pointing at ``--help`` (argparse prints its whole usage first), printed by the
    launch's rank 0 only, and exit code :data:`EXIT_BAD_INPUT`."""

    def error(self, message: str) -> NoReturn:
        if launch_rank() == 0:
            print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        self.exit(EXIT_BAD_INPUT)


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 for a single process).

    Read from the environment only (torchrun, MPI, then Slurm), without starting anything;
    ``RANK`` counts only beside ``WORLD_SIZE``, as in :func:`distributed.detect_launch_env`.
    """
    torchrun = ("RANK",) if os.environ.get("WORLD_SIZE", "").isdigit() else ()
    for name in torchrun + ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, flag: str, target: str | os.PathLike) -> None:
    """Creates and removes one empty temporary file in ``folder`` (``os.access`` cannot tell
    for root or for read-only file systems)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as exc:
        raise UsageError(f"{flag} {target}: cannot write in {folder} ({exc.strerror}): choose a "
                         "writable location") from None
    os.close(fd)
    os.unlink(name)


def check_writable_location(path: str | os.PathLike, flag: str) -> None:
    """``path`` (which may not exist yet) can be created: its nearest existing ancestor is a
    directory this process can write in.

    Raises:
        UsageError: An ancestor is a file, or the location is not writable.
    """
    p = Path(path)
    anchor = _nearest_existing(p if not p.exists() else p.parent)
    if not anchor.is_dir():
        raise UsageError(f"{flag} {path}: {anchor} is a file, not a directory: choose another "
                         "path")
    _probe_writable(anchor, flag, path)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """An output directory: absent or a directory, and writable (nothing is created).

    Whether a non-empty directory may be used is each tool's own rule.

    Raises:
        UsageError: ``path`` is a file, lies under a file, or cannot be written.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file: pass a directory path")
    if p.is_dir():
        _probe_writable(p, flag, path)
    else:
        check_writable_location(p, flag)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """An output file (replaced if it exists): not a directory, and its folder writable.

    Raises:
        UsageError: ``path`` is a directory, lies under a file, or cannot be written.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory: give a file path")
    check_writable_location(p, flag)


def _check_input(path: str | os.PathLike, flag: str, what: str, want_dir: bool) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path} does not exist: pass an existing {what}")
    if p.is_dir() != want_dir:
        raise UsageError(f"{flag} {path} is a {'file' if want_dir else 'directory'}: pass a "
                         f"{what}")
    try:
        if want_dir:
            next(iter(p.iterdir()), None)
        else:
            with open(p, "rb") as f:
                f.read(1)
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be read ({exc.strerror}): fix its "
                         "permissions") from None
    return p


def check_input_file(path: str | os.PathLike, flag: str, what: str = "file") -> Path:
    """An existing, readable file.

    Raises:
        UsageError: Missing, a directory, or unreadable.
    """
    return _check_input(path, flag, what, want_dir=False)


def check_input_dir(path: str | os.PathLike, flag: str, what: str = "directory") -> Path:
    """An existing, listable directory.

    Raises:
        UsageError: Missing, a file, or unreadable.
    """
    return _check_input(path, flag, what, want_dir=True)


def same_or_inside(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether path ``a`` is ``b`` or lies inside it (after resolving links)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or rb in ra.parents


def check_store(path: str | os.PathLike, flag: str = "--data", *, image_size: int | None = None,
                grid: int | None = None) -> int:
    """A preprocessed store that a run can read; returns its number of samples.

    Raises:
        UsageError: Missing, not a store, incomplete, for another image layout, or empty.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path} does not exist: pass a store written by "
                         "tools/preprocess_data.py")
    if not (p / "zarr.json").is_file():  # before importing the store reader (and torch)
        raise UsageError(f"{flag} {path} is not a megatron_sphinx store (no zarr.json): pass "
                         "the --out directory of tools/preprocess_data.py")
    from megatron_sphinx.data.store import StoreReader

    try:
        n = len(StoreReader(p, image_size=image_size, grid=grid))
    except ValueError as exc:  # StoreError
        raise UsageError(f"{flag} {one_line(exc)}") from None
    if n == 0:
        raise UsageError(f"{flag} {path} holds no samples (preprocessing dropped every record; "
                         "its summary says why): fix the mix and preprocess again")
    return n
