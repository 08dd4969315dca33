"""Mutation audit of the preprocessing interruption handling (build_store.set_aside, _Output's
stale stores, tools/preprocess_data.py's signal handler): what tests/test_preprocess.py let
through."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_sphinx.data.build_store import BuildError, prepare_output, set_aside
from megatron_sphinx.data.sample_data import generate
from megatron_sphinx.data.store import StoreReader, create_store, read_meta
from tests.files import snapshot
from tests.test_preprocess import (ROOT, _build, _hidden, _old_store, _overwrite_args,
                                   _text_mix)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample mix and its tokenizer."""
    out = tmp_path_factory.mktemp("sample") / "data"
    generate(out)
    return out


def _killed_overwrite(tmp_path, tok):
    """What a SIGKILLed ``--overwrite`` of ``s.zarr`` leaves: the old store aside in
    ``.s.zarr.old-killed``, a new store begun (no index) at ``s.zarr``."""
    out = _old_store(tmp_path, tok)
    holder = tmp_path / ".s.zarr.old-killed"
    holder.mkdir()
    os.rename(out, holder / "s.zarr")
    create_store(out, read_meta(holder / "s.zarr")[0])
    return out, holder / "s.zarr"


def test_a_failed_overwrite_keeps_the_store_an_earlier_build_set_aside(tmp_path, sample):
    """The store a killed build set aside goes only once a new store is complete: an
    --overwrite that fails (no record became a sample) leaves it where it was, untouched."""
    tok = sample / "tokenizer"
    out, aside = _killed_overwrite(tmp_path, tok)
    kept, begun = snapshot(aside), snapshot(out)
    with pytest.raises(BuildError, match="no record"):
        _build(_text_mix(tmp_path / "bad", records=0, broken=4), out, tok, overwrite=True)
    assert aside.is_dir() and snapshot(aside) == kept
    assert snapshot(out) == begun  # the incomplete store it replaced was put back
    assert set_aside(out) == [aside]


def test_an_empty_holder_is_not_named_as_a_set_aside_store(tmp_path, sample):
    """A ``.NAME.old-*`` folder without the store in it (a build killed between making the
    holder and renaming into it, or after renaming back) is no store to move back: the
    message must not tell the user to ``mv`` a path that does not exist."""
    tok = sample / "tokenizer"
    out = _old_store(tmp_path, tok)
    create_store(tmp_path / "other.zarr", read_meta(out)[0])  # an incomplete store
    (tmp_path / ".other.zarr.old-empty").mkdir()
    assert set_aside(tmp_path / "other.zarr") == []
    status, msg = prepare_output(tmp_path / "other.zarr", "fp", overwrite=False)
    assert status == "error" and "incomplete store" in msg and "old-empty" not in msg


def test_a_plain_build_next_to_a_set_aside_store_warns_and_keeps_it(tmp_path, sample, caplog):
    """The user removed the incomplete store a killed --overwrite left and builds again
    without --overwrite: the build says where the old store still is and does not touch it."""
    tok = sample / "tokenizer"
    out, aside = _killed_overwrite(tmp_path, tok)
    kept = snapshot(aside)
    shutil.rmtree(out)
    caplog.set_level(logging.WARNING)
    assert _build(_text_mix(tmp_path / "new", records=4), out, tok)["total"]["written"] == 4
    assert len(StoreReader(out)) == 4 and snapshot(aside) == kept
    assert f"left the store it replaced at {aside}" in caplog.text


# ------------------------------------------------------- real bugs the audit found (fixed)
# Each test below failed on the code before the fix.

def test_after_two_killed_overwrites_the_message_names_the_complete_store(tmp_path, sample):
    """Two --overwrite builds killed in a row: the first set the original (complete) store
    aside, the second set aside the incomplete store the first had begun. The message must
    tell the user to move back the complete one, whatever the random holder names."""
    tok = sample / "tokenizer"
    out, original = _killed_overwrite(tmp_path, tok)
    os.rename(original.parent, tmp_path / ".s.zarr.old-a")  # the names sort the wrong way
    second = tmp_path / ".s.zarr.old-z"
    second.mkdir()
    os.rename(out, second / "s.zarr")  # the second build set the first one's store aside
    create_store(out, read_meta(second / "s.zarr")[0])  # and began its own
    with pytest.raises(BuildError, match=r"interrupted build replaced is at \S+old-a/s\.zarr"):
        _build(_text_mix(tmp_path / "new"), out, tok)


STALL_EVERY_RANK = """
import os, pathlib, runpy, sys, time
from megatron_sphinx.data import build_store as bs
folder = pathlib.Path(sys.argv[1])
def stall(*args, **kwargs):
    (folder / f"pid-{os.environ.get('PMI_RANK', '0')}").write_text(str(os.getpid()))
    time.sleep(120)
bs.preprocess_rank = stall
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "mpiexec").exists(),
                    reason="mpich's mpiexec not installed in .venv")
def test_sigterm_to_every_mpi_rank_rolls_back(tmp_path, sample):
    """Slurm's time limit and scancel signal every task at once: with two MPI ranks the
    replaced store must still be put back at --out (the existing test runs one process)."""
    tok = sample / "tokenizer"
    out = _old_store(tmp_path, tok)
    before = snapshot(out)
    (tmp_path / "stall.py").write_text(STALL_EVERY_RANK)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "mpiexec"), "-n", "2", sys.executable,
         str(tmp_path / "stall.py"), str(pids), *_overwrite_args(tmp_path, tok, out)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while len(list(pids.iterdir())) < 2 and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(pids.iterdir())) == 2, proc.stdout.read() if proc.poll() else "no start"
        for f in pids.iterdir():
            os.kill(int(f.read_text()), signal.SIGTERM)
        log = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert out.is_dir() and snapshot(out) == before, log[-2000:]
    assert _hidden(tmp_path) == []
