"""Process start-up: launcher detection (torchrun, Slurm, MPI, single), init, and the harness."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import megatron.core.parallel_state  # noqa: F401  (imported before forking: ranks start fast)
import megatron.core.process_groups_config  # noqa: F401
import megatron.core.tensor_parallel  # noqa: F401
import pytest
import torch

from megatron_sphinx import distributed
from megatron_sphinx.distributed import LaunchEnv, detect_launch_env, init_distributed, shutdown
from megatron_sphinx.parallel_dims import ParallelDims
from tests.dist_harness import RankFailure, RankTimeout, run_ranks

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo tests; GPUs use NCCL")


# ---- launcher detection (pure, environment passed in) ----------------------------------------

def test_single_process_defaults():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_torchrun():
    env = detect_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert env == LaunchEnv(5, 8, 1, "node7", 29400, "torchrun")


def test_slurm_with_nodelist_parser(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)  # no scontrol
    env = detect_launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[07-09,12],login1",
                             "SLURM_JOB_ID": "123456"})
    assert env == LaunchEnv(3, 4, 1, "gpu07", distributed.DEFAULT_MASTER_PORT_BASE
                            + 123456 % distributed.PORT_SPAN, "slurm")


def test_slurm_uses_scontrol_and_step_task_count(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="hostB\nhostC\n", stderr="")

    monkeypatch.setattr(distributed.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16",
                             "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "host[B-C]",
                             "SLURM_JOB_ID": "7", "MASTER_PORT": "31000"})
    assert calls == [["scontrol", "show", "hostnames", "host[B-C]"]]
    assert (env.world_size, env.master_addr, env.master_port) == (2, "hostB", 31000)


def test_nodelist_parser():
    parse = distributed._parse_nodelist
    assert parse("a1,b[1-3],c[08-10,15]x") == [
        "a1", "b1", "b2", "b3", "c08x", "c09x", "c10x", "c15x"]


def test_open_mpi_variables():
    env = detect_launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "h0",
                             "MASTER_PORT": "1234",
                             "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # mpiexec in sbatch
    assert env == LaunchEnv(2, 4, 0, "h0", 1234, "mpi")


class _FakeComm:
    """mpi4py's COMM_WORLD as rank 1 of 2, rank 0 answering the rendezvous broadcast."""

    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2

    def bcast(self, value, root):
        assert value is None  # rank 1 sends nothing; rank 0's answer comes back
        return ("rank0-host", 45678)


def test_mpich_variables_take_the_rendezvous_from_rank0_via_mpi(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi_world", lambda: _FakeComm())
    env = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert env == LaunchEnv(1, 2, 1, "rank0-host", 45678, "mpi")


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside world size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, "set MASTER_ADDR"),
])
def test_bad_launcher_variables(environ, message):
    with pytest.raises(ValueError, match=message):
        detect_launch_env(environ)


@pytest.mark.skipif(not (REPO / ".venv/bin/mpiexec").exists(), reason="mpich not installed")
def test_real_mpiexec_launch_rendezvous():
    """mpiexec -n 2: MPICH variables + mpi4py rendezvous, then a gloo all_reduce."""
    script = (
        "import torch, torch.distributed as dist\n"
        "from megatron_sphinx.distributed import detect_launch_env\n"
        "e = detect_launch_env()\n"
        "dist.init_process_group('gloo', init_method=f'tcp://{e.master_addr}:{e.master_port}',"
        " rank=e.rank, world_size=e.world_size)\n"
        "t = torch.tensor([e.rank + 1.0]); dist.all_reduce(t)\n"
        "import os; os.write(1, f'RESULT {e.launcher} {e.rank} {e.world_size} {e.local_rank} "
        "{float(t)};'.encode())\n"
        "dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run([str(REPO / ".venv/bin/mpiexec"), "-n", "2", sys.executable, "-c",
                          script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    # both ranks share the pipe: one write() each, parsed by pattern (lines may interleave)
    results = sorted(re.findall(r"RESULT [^;]*", out.stdout))
    assert results == ["RESULT mpi 0 2 0 3.0", "RESULT mpi 1 2 1 3.0"], out.stdout


# ---- init_distributed / shutdown at world size 2 (forked ranks) ------------------------------

def _init_tp2(rank: int, world_size: int) -> dict:
    groups = init_distributed(ParallelDims(world_size=world_size, tp=2), timeout_s=30)
    t = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(t, group=groups.tp)
    out = {"sum": float(t), "tp": (groups.tp_rank, groups.tp.size()), "dp": groups.dp.size(),
           "pp": groups.pp.size(), "first": groups.is_first_stage, "last": groups.is_last_stage,
           "launcher": groups.launch.launcher, "backend": torch.distributed.get_backend(),
           "has_tp_in_collection": groups.collection.tp is groups.tp}
    with pytest.raises(RuntimeError, match="already initialised"):
        init_distributed(ParallelDims(world_size=world_size, tp=2), timeout_s=30)
    shutdown()
    shutdown()  # idempotent
    out["after_shutdown"] = torch.distributed.is_initialized()
    return out


@CPU_ONLY
def test_init_distributed_tp2():
    results = run_ranks(_init_tp2, 2, timeout=120)
    for rank, r in enumerate(results):
        assert r["sum"] == 3.0
        assert r["tp"] == (rank, 2) and r["dp"] == 1 and r["pp"] == 1
        assert r["first"] and r["last"] and r["has_tp_in_collection"]
        assert r["launcher"] == "torchrun" and r["backend"] == "gloo"
        assert r["after_shutdown"] is False


def _wrong_world(rank: int, world_size: int) -> None:
    init_distributed(ParallelDims(world_size=4, tp=2), timeout_s=30)


@CPU_ONLY
def test_init_distributed_rejects_world_size_mismatch():
    with pytest.raises(RankFailure, match="launcher started 2 processes but the layout"):
        run_ranks(_wrong_world, 2, timeout=60)


def _stuck_peer(rank: int, world_size: int) -> float:
    init_distributed(ParallelDims(world_size=world_size), timeout_s=6)
    if rank == 1:
        time.sleep(11)  # alive but never joins the collective
        return -1.0
    start = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except Exception:  # noqa: BLE001 - gloo raises RuntimeError/DistBackendError
        return time.monotonic() - start
    return float("inf")


@CPU_ONLY
def test_collective_timeout_detects_a_stuck_rank():
    waited = run_ranks(_stuck_peer, 2, timeout=60)[0]
    # generous bounds: init itself runs under the same short timeout on a loaded machine
    assert 5.0 < waited < 10.5, f"all_reduce gave up after {waited:.1f} s, timeout was 6 s"


# ---- the harness itself ----------------------------------------------------------------------

def _echo(rank: int, world_size: int, scale: int) -> tuple:
    return rank, world_size, rank * scale, os.environ["RANK"], os.environ["MASTER_PORT"]


def _raise_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    time.sleep(30)  # must be killed, not waited for


def _die_silently(rank: int, world_size: int) -> None:
    os._exit(3)


def _hang(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_harness_returns_results_in_rank_order():
    out = run_ranks(_echo, 3, 10, timeout=60)
    assert [r[:4] for r in out] == [(0, 3, 0, "0"), (1, 3, 10, "1"), (2, 3, 20, "2")]
    assert len({r[4] for r in out}) == 1  # one MASTER_PORT for all ranks


def test_harness_propagates_a_rank_exception_and_kills_the_rest():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="(?s)rank 1 of 2 raised.*ValueError: boom from rank 1"):
        run_ranks(_raise_on_rank1, 2, timeout=60)
    assert time.monotonic() - start < 20


def test_harness_reports_a_rank_that_died():
    with pytest.raises(RankFailure, match="died without a result \\(exit code 3\\)"):
        run_ranks(_die_silently, 1, timeout=60)


def test_harness_times_out():
    start = time.monotonic()
    with pytest.raises(RankTimeout, match="ranks \\[0, 1\\] did not finish within 1 s"):
        run_ranks(_hang, 2, timeout=1.0)
    assert time.monotonic() - start < 15


# ---- launcher detection: defaults, precedence and validation (mutation audit) ----------------

def test_torchrun_without_local_rank_or_rendezvous_uses_the_rank_and_defaults():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "4"})
    assert env == LaunchEnv(3, 4, 3, "127.0.0.1", 29500, "torchrun")


def test_rank_without_world_size_is_not_a_torchrun_launch():
    env = detect_launch_env({"RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                             "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert env == LaunchEnv(1, 2, 0, "h0", 1234, "slurm")


def test_empty_launcher_variables_count_as_unset():
    env = detect_launch_env({"RANK": "", "WORLD_SIZE": "", "MASTER_PORT": ""})
    assert (env.launcher, env.rank, env.world_size) == ("single", 0, 1)


def test_pmix_rank_is_an_mpi_launch_even_inside_slurm(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi_world", lambda: _FakeComm())
    env = detect_launch_env({"PMIX_RANK": "1", "MPI_LOCALRANKID": "1",
                             "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # batch step's values
    assert env == LaunchEnv(1, 2, 1, "rank0-host", 45678, "mpi")


def test_mpi_keeps_a_given_master_addr_and_takes_only_the_missing_port(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi_world", lambda: _FakeComm())
    env = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
                             "MASTER_ADDR": "given-host"})
    assert (env.master_addr, env.master_port) == ("given-host", 45678)


def test_slurm_step_nodelist_wins_over_the_job_nodelist(monkeypatch):
    """A step on part of the allocation: rank 0 runs on the step's first node."""
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                             "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]",
                             "SLURM_JOB_ID": "5"})
    assert env.master_addr == "n3"


@pytest.mark.parametrize("fields,message", [
    ((0, 0, 0, "h", 1), "world size 0 < 1"),
    ((0, 1, -1, "h", 1), "local rank -1 < 0"),
    ((0, 1, 0, "h", 0), "master port 0 out of range"),
    ((0, 1, 0, "h", 65536), "master port 65536 out of range"),
])
def test_launch_env_rejects_impossible_values(fields, message):
    with pytest.raises(ValueError, match=message):
        LaunchEnv(*fields, "single")
    LaunchEnv(0, 1, 0, "h", 65535, "single")  # the largest port is fine


def test_init_distributed_on_gpus_uses_nccl_and_the_local_rank(monkeypatch):
    """The CUDA path, faked up to the rendezvous: device = local rank (not the global rank)."""
    calls = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        calls["init"] = kwargs
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(distributed, "_prepare_checkpoint_writer", lambda: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
               "MASTER_PORT": "2345"}
    with pytest.raises(Stop):
        init_distributed(ParallelDims(world_size=8), timeout_s=90, environ=environ)
    assert calls["device"] == 1
    init = calls["init"]
    assert (init["backend"], init["init_method"], init["rank"], init["world_size"]) == (
        "nccl", "tcp://n0:2345", 5, 8)
    assert init["timeout"].total_seconds() == 90


@pytest.mark.parametrize("timeout_s", [0, -1])
def test_init_distributed_rejects_a_non_positive_timeout(timeout_s):
    with pytest.raises(ValueError, match="give a positive collective timeout"):
        init_distributed(ParallelDims(world_size=1), timeout_s=timeout_s, environ={})


def test_mpiexec_inside_sbatch_ignores_the_batch_steps_slurm_localid(monkeypatch):
    """Before: a launcher that sets PMI_RANK but no local-rank variable, run by mpiexec inside an
    sbatch script, took the batch step's SLURM_LOCALID=0 on every rank (all ranks on GPU 0)."""
    import types

    class Comm(_FakeComm):
        def Split_type(self, kind):
            assert kind == "shared"
            return types.SimpleNamespace(Get_rank=lambda: 1)

    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(
        MPI=types.SimpleNamespace(COMM_TYPE_SHARED="shared")))
    monkeypatch.setattr(distributed, "_mpi_world", lambda: Comm())
    inherited = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
    env = detect_launch_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "h0",
                             "MASTER_PORT": "1234", **inherited})
    assert (env.rank, env.local_rank, env.launcher) == (1, 1, "mpi")


def test_mpi_ranks_started_by_srun_take_slurm_localid_without_mpi(monkeypatch):
    def no_mpi():
        raise AssertionError("MPI initialised although the launcher said everything")

    monkeypatch.setattr(distributed, "_mpi_world", no_mpi)
    env = detect_launch_env({"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "3",
                             "SLURM_LOCALID": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert env == LaunchEnv(3, 4, 1, "h0", 1234, "mpi")
