"""The sbatch scripts in slurm/ on a real one-node Slurm (scripts/local_slurm.sh, started once
for the module and stopped after it).

What trains: the debug recipe at DP2 (two srun tasks, or one torchrun with two ranks; gloo on the
CPU), 8 steps of 2 packed sequences of 1400 tokens on synthetic data, a checkpoint every 2 steps.
The first test's run is the uninterrupted reference; every interrupted run below must reproduce
its losses exactly. docs/SLURM.md says what each test proves.

The bad-input tests at the end need no cluster: they run the scripts with bash, a job's Slurm
variables and a fake `srun`/`scontrol` that only record.

If Slurm is not installed and cannot be installed (no apt-get, not root), the tests FAIL: CI must
provide it (``bash scripts/local_slurm.sh start`` installs Debian's slurm-wlm and munge).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
TORCHRUN_SBATCH = REPO / "slurm" / "train_torchrun.sbatch"
PREPROCESS_SBATCH = REPO / "slurm" / "preprocess.sbatch"
PROFILE_SBATCH = REPO / "slurm" / "profile.sbatch"
CONVERT_SBATCH = REPO / "slurm" / "convert.sbatch"
EXIT_REQUEUE = 3  # megatron_sphinx.train.loop.EXIT_REQUEUE

STEPS = 8
TIMEOUT_MIN = 0.5  # collective timeout of the test runs
JOB_TIMEOUT_S = 420  # one job, generous: the 2 shared cores are often busy with other work
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
NEVER_RUNS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "ReqNodeNotAvail",
              "InvalidAccount", "InvalidQOS", "PartitionTimeLimit"}
RUN_ENV = {  # the sbatch variables of every training run here
    "RECIPE": "debug", "STEPS": str(STEPS), "DATA": "synthetic", "SAVE_INTERVAL": "2",
    "KEEP_LAST": "2", "GLOBAL_BATCH_SIZE": "2", "SEQ_LENGTH": "1400",
    "TIMEOUT_MINUTES": str(TIMEOUT_MIN), "OMP_NUM_THREADS": "1",
}
SBATCH_ARGS = ["--gpus-per-node=0", "--ntasks-per-node=2"]  # the CPU node has no GPUs
TORCHRUN_ARGS = ["--gpus-per-node=0", "--ntasks-per-node=1"]  # + NPROC_PER_NODE=2


@dataclass
class Cluster:
    """A running local Slurm: its directory and the environment that reaches it."""

    dir: Path
    env: dict

    def run(self, *cmd, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], env=kw.pop("env", self.env), text=True,
                              capture_output=True, check=check, timeout=timeout, **kw)

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.fixture(scope="module")
def root():
    """This module's own scratch directory (not pytest's basetemp: concurrent pytest runs on one
    machine rotate old basetemps away, and these jobs run for minutes)."""
    path = Path(tempfile.mkdtemp(prefix="sphinx_slurm_"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work(root, request) -> Path:
    """A fresh directory per test (the job's working directory: logs/ and save/)."""
    path = root / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def cluster(root):
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests need root (slurmd starts the jobs): run them as root in CI")
    d = root / "cluster"
    start = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(d)], capture_output=True,
                           text=True, timeout=900)
    if start.returncode != 0:
        pytest.fail("could not start a local Slurm (CI must install slurm-wlm and munge): "
                    + (start.stderr.strip().splitlines() or ["no output"])[-1])
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    try:
        yield Cluster(d, env)
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(d)], capture_output=True,
                       timeout=120)
        for pid in job_processes(conf=env["SLURM_CONF"]):  # the tests' own leftovers, if any
            os.kill(pid, signal.SIGKILL)


def submit(cluster: Cluster, workdir: Path, save: Path, script: Path = TRAIN_SBATCH,
           sbatch_args=SBATCH_ARGS, **variables) -> int:
    """sbatch a training script from ``workdir`` (its logs/ gets the job log); the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(cluster.env, REPO=str(REPO), SAVE=str(save), **RUN_ENV)
    env.update({k: str(v) for k, v in variables.items()})
    out = cluster.run("sbatch", "--parsable", *sbatch_args, script, cwd=workdir, env=env)
    return int(out.stdout.strip().split(";")[0])


def log_of(workdir: Path, job_id: int) -> str:
    """The job's log (the #SBATCH --output=logs/%x-%j.out of whichever script ran)."""
    found = list((workdir / "logs").glob(f"*-{job_id}.out"))
    return found[0].read_text(errors="replace") if found else ""


def wait_until(what: str, cond, timeout: float, interval: float = 0.2, on_fail=lambda: ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{on_fail()}")


def wait_job(cluster: Cluster, workdir: Path, job_id: int, timeout=JOB_TIMEOUT_S,
             restarts: int = 0) -> dict:
    """Waits for the job's final state (after ``restarts`` requeues); its scontrol record."""
    def done():
        info = cluster.job(job_id)
        if info.get("JobState") in FINAL_STATES and int(info.get("Restarts", 0)) >= restarts:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_RUNS:
            cluster.run("scancel", job_id, check=False)
            pytest.fail(f"job {job_id} can never run on the local cluster: {info.get('Reason')}")
        return None

    def tail():
        cluster.run("scancel", job_id, check=False)
        return "\n".join(log_of(workdir, job_id).splitlines()[-40:])

    return wait_until(f"job {job_id} did not finish", done, timeout, 0.5, tail)


def read_metrics(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict]) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad norm); a step run twice (before and after a crash) keeps the last."""
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in records}


def latest(save: Path) -> str | None:
    pointer = save / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def rank_pid(job_id: int, rank: int) -> int | None:
    """PID of training rank ``rank`` of ``job_id`` (its main process, not a forked helper).

    The rank is torchrun's ``RANK`` where torchrun started it, else Slurm's ``SLURM_PROCID``.
    """
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"megatron_sphinx.train" not in cmd or b"torch.distributed.run" in cmd:
                continue
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0")
                       if b"=" in item)
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        is_rank = env.get(b"RANK", env.get(b"SLURM_PROCID")) == str(rank).encode()
        if env.get(b"SLURM_JOB_ID") == str(job_id).encode() and is_rank:
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # pid -> ppid
    main = [pid for pid, ppid in found.items() if ppid not in found]
    return main[0] if len(main) == 1 else None


def job_processes(job_id: int | None = None, conf: str | None = None) -> list[int]:
    """PIDs of training processes of ``job_id`` (or of any job of the cluster at ``conf``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"megatron_sphinx.train" not in (entry / "cmdline").read_bytes():
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if job_id is not None and f"SLURM_JOB_ID={job_id}".encode() in env and alive(
                int(entry.name)):
            pids.append(int(entry.name))
        elif conf is not None and f"SLURM_CONF={conf}".encode() in env:
            pids.append(int(entry.name))
    return pids


def assert_nothing_left(job_id: int) -> None:
    """No process of the ended job survives it (a forked helper of a killed rank included)."""
    wait_until(f"processes of job {job_id} to end", lambda: not job_processes(job_id), 30,
               interval=0.5, on_fail=lambda: f"left: {job_processes(job_id)}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_matches_reference(records: list[dict], reference: dict, first_step: int):
    """``records`` (one run's metrics, in order) are steps first_step..STEPS with the
    reference's losses and grad norms, exactly."""
    got = by_step(records)
    assert [r["step"] for r in records] == list(range(first_step, STEPS + 1)), records
    for step, value in got.items():
        assert value == reference[step], (
            f"step {step}: loss/grad norm {value} after the interruption, "
            f"{reference[step]} uninterrupted")


@pytest.fixture(scope="module")
def reference(cluster, root):
    """The uninterrupted run: (workdir, save dir, job record, step -> (loss, grad norm))."""
    work = root / "reference"
    save = work / "save"
    job = submit(cluster, work, save)
    info = wait_job(cluster, work, job)
    losses = by_step(read_metrics(save))
    if info["JobState"] != "COMPLETED" or sorted(losses) != list(range(1, STEPS + 1)):
        pytest.fail(f"the reference run failed: {info['JobState']}\n{log_of(work, job)[-3000:]}")
    return work, save, job, info, losses


def test_sbatch_two_tasks_trains_saves_and_logs(cluster, reference):
    work, save, job, info, losses = reference
    log = log_of(work, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    records = read_metrics(save)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, positive
    # Both ranks ran under srun as one DP2 job (rank and world size from Slurm's variables).
    assert "rank 0/2: tp1.pp1.dp2.ep1" in log and "rank 1/2: tp1.pp1.dp2.ep1" in log, log[-3000:]
    assert "(slurm launch)" in log
    # Saves every 2 steps, the newest 2 kept; `latest` names the final one; meta is complete.
    assert latest(save) == f"iter_{STEPS:07d}"
    kept = sorted(p.name for p in save.glob("iter_*"))
    assert kept == [f"iter_{STEPS - 2:07d}", f"iter_{STEPS:07d}"]
    meta = json.loads((save / f"iter_{STEPS:07d}" / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["recipe"] == "debug"
    assert meta["layout"] == {"tp": 1, "pp": 1, "vpp": 1, "ep": 1, "dp": 2}
    assert (work / "logs" / f"sphinx-train-{job}.out").exists()
    assert_nothing_left(job)


def test_preemption_signal_saves_requeues_and_resumes_exactly(cluster, reference, work):
    _, _, _, ref_info, ref = reference
    assert ref_info["JobState"] == "COMPLETED"
    save = work / "save"
    job = submit(cluster, work, save)
    # Once training runs, deliver what --signal=B:USR1@120 delivers: USR1 to the batch shell.
    wait_until("step 2 of the first run", lambda: len(read_metrics(save)) >= 2, JOB_TIMEOUT_S,
               on_fail=lambda: log_of(work, job)[-3000:])
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = wait_job(cluster, work, job, restarts=1)
    log = log_of(work, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1", "the job was not requeued"
    stopped = re.search(rf"stopped at step (\d+) after a stop request; exit {EXIT_REQUEUE}", log)
    assert stopped, log[-3000:]
    k = int(stopped.group(1))
    assert 2 <= k < STEPS, "the signal must land mid-run"
    assert "requeueing job" in log
    assert re.search(rf"resumed from \S+/iter_{k:07d} at step {k}\b", log), log[-3000:]
    records = read_metrics(save)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # nothing lost or redone
    assert_matches_reference(records, ref, 1)
    assert_nothing_left(job)


def test_kill_9_of_one_rank_ends_job_and_restart_resumes(cluster, reference, work):
    _, _, _, _, ref = reference
    save = work / "save"
    job = submit(cluster, work, save, STEP_WAIT_S=600)  # only the training code may end it
    wait_until("checkpoint 2 and step 3", lambda: latest(save) == "iter_0000002"
               and len(read_metrics(save)) >= 3, JOB_TIMEOUT_S,
               on_fail=lambda: log_of(work, job)[-3000:])
    victim = rank_pid(job, 1)
    assert victim, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    info = wait_job(cluster, work, job)
    ended_after = time.monotonic() - t0
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    # Rank 0 is left alone in a collective: it must error out, not hang (bound: the timeout).
    assert ended_after < TIMEOUT_MIN * 60 + 30, f"job took {ended_after:.0f} s to end"
    assert "requeueing" not in log_of(work, job)  # a crash is not a preemption
    assert_nothing_left(job)  # also the killed rank's forked helper
    resume_from = latest(save)
    done_before = len(read_metrics(save))
    assert resume_from == "iter_0000002"

    job2 = submit(cluster, work, save)
    info2 = wait_job(cluster, work, job2)
    log2 = log_of(work, job2)
    assert info2["JobState"] == "COMPLETED", log2[-3000:]
    assert re.search(rf"resumed from \S+/{resume_from} at step 2\b", log2), log2[-3000:]
    # the killed run's records after its checkpoint (step 3 on) gave way to the redone steps
    assert done_before >= 3
    records = read_metrics(save)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert_matches_reference(records[2:], ref, 3)
    assert_nothing_left(job2)


def test_rank_frozen_during_save_times_out_and_previous_checkpoint_resumes(
        cluster, reference, work):
    """Rank 0 stops (SIGSTOP) inside a checkpoint save, before the rename: rank 1 hits the
    collective timeout and exits; then rank 0 is killed (SIGKILL) mid-save. Run with the
    one-torchrun-per-node variant (slurm/train_torchrun.sbatch), which must give the same
    losses as the srun variant's reference run."""
    _, _, _, _, ref = reference
    save = work / "save"
    torchrun = dict(script=TORCHRUN_SBATCH, sbatch_args=TORCHRUN_ARGS, NPROC_PER_NODE=2)
    job = submit(cluster, work, save, STEP_WAIT_S=600, SHUTDOWN_TIMEOUT_S=600, **torchrun)
    wait_until("checkpoint 2", lambda: latest(save) == "iter_0000002", JOB_TIMEOUT_S,
               on_fail=lambda: log_of(work, job)[-3000:])
    rank0, rank1 = rank_pid(job, 0), rank_pid(job, 1)
    assert rank0 and rank1
    frozen = None
    for step in range(4, STEPS, 2):  # catch a save in progress (retry the next on a lost race)
        tmp, final = save / f"iter_{step:07d}.tmp", save / f"iter_{step:07d}"
        wait_until(f"save {step} starts", tmp.exists, JOB_TIMEOUT_S, interval=0.002,
                   on_fail=lambda: log_of(work, job)[-3000:])
        os.kill(rank0, signal.SIGSTOP)
        if not final.exists() and latest(save) != final.name:
            frozen = step
            break
        os.kill(rank0, signal.SIGCONT)
    assert frozen, "could not stop rank 0 inside a save"
    before = latest(save)
    t0 = time.monotonic()
    wait_until("rank 1 exits on the collective timeout", lambda: not alive(rank1),
               TIMEOUT_MIN * 60 + 60, interval=0.5, on_fail=lambda: log_of(work, job))
    waited = time.monotonic() - t0
    # torchrun puts each rank in its own process group, with the helper process it forked.
    assert os.getpgid(rank0) == rank0
    os.killpg(rank0, signal.SIGKILL)
    info = wait_job(cluster, work, job)
    assert_nothing_left(job)
    log = log_of(work, job)
    assert info["JobState"] == "FAILED", info
    assert TIMEOUT_MIN * 60 - 5 < waited < TIMEOUT_MIN * 60 + 45, (
        f"rank 1 ended {waited:.0f} s after rank 0 froze (timeout {TIMEOUT_MIN * 60:.0f} s)")
    assert latest(save) == before == f"iter_{frozen - 2:07d}"
    assert (save / f"iter_{frozen:07d}.tmp").is_dir()
    assert not (save / f"iter_{frozen:07d}").exists()
    assert not (save / f"iter_{frozen:07d}.tmp" / "meta.json").exists()
    done_before = len(read_metrics(save))

    job2 = submit(cluster, work, save, **torchrun)
    info2 = wait_job(cluster, work, job2)
    log2 = log_of(work, job2)
    assert info2["JobState"] == "COMPLETED", log2[-3000:]
    assert "(torchrun launch)" in log2
    assert re.search(rf"resumed from \S+/{before} at step {frozen - 2}\b", log2), log2[-3000:]
    assert done_before >= frozen - 1  # the frozen run's steps after its last checkpoint ...
    records = read_metrics(save)  # ... gave way to the redone ones
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert_matches_reference(records[frozen - 2:], ref, frozen - 1)
    assert not list(save.glob("*.tmp")), "the restarted run left a partial save behind"
    assert latest(save) == f"iter_{STEPS:07d}"
    assert "timeout" in log.lower() or "timed out" in log.lower(), log[-3000:]
    assert_nothing_left(job2)


def test_preprocess_sbatch_runs_mpi_ranks_under_srun(cluster, work):
    """slurm/preprocess.sbatch: tools/preprocess_data.py on 2 MPI ranks started by srun."""
    from megatron_sphinx.data.sample_data import generate
    from megatron_sphinx.data.store import StoreReader

    mix = generate(work / "raw")
    out, summary = work / "mix.zarr", work / "summary.json"
    (work / "logs").mkdir()
    env = dict(cluster.env, REPO=str(REPO), MIX=str(mix), OUT=str(out), SEQ_LENGTH="4096",
               TOKENIZER=str(work / "raw" / "tokenizer"), SUMMARY_JSON=str(summary))
    job = int(cluster.run("sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1",
                          PREPROCESS_SBATCH, cwd=work, env=env).stdout.strip().split(";")[0])
    info = wait_job(cluster, work, job)
    log = log_of(work, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 rank(s)" in log and "srun --mpi=" in log, log[-3000:]
    written = json.loads(summary.read_text())["total"]["written"]
    store = StoreReader(out, image_size=448, grid=2)
    assert store.meta.num_shards == 2 and len(store) == written > 0


# ---------------------------------------------------------------------------- bad input

def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("variables,expect", [
    ({"TP": "4"}, "TP*PP = 4*1 = 4 does not divide the 2 ranks"),
    ({"DATA": "/nonexistent/mix.zarr"}, "DATA=/nonexistent/mix.zarr does not exist"),
])
def test_sbatch_bad_input_fails_at_once_with_one_line(cluster, work, variables, expect):
    job = submit(cluster, work, work / "save", **variables)
    t0 = time.monotonic()
    info = wait_job(cluster, work, job, timeout=120)
    lines = _error_lines(log_of(work, job))
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, lines)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert time.monotonic() - t0 < 60
    assert not (work / "save" / "metrics.jsonl").exists()


def _fake_job_env(tmp_path: Path, srun_rc: int = 0, **variables) -> tuple[dict, Path]:
    """The batch script run directly with a job's variables and an `srun` that only records.

    The fake `srun` writes its arguments, one a line, to the returned path and exits
    ``srun_rc``; the fake `scontrol` appends its arguments to ``tmp_path/scontrol-calls`` and
    fails (as `scontrol requeue` does outside a real job).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "srun-called"
    (bin_dir / "srun").write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{called}'\nexit {srun_rc}\n")
    (bin_dir / "scontrol").write_text(
        f"#!/bin/sh\necho \"$@\" >> '{tmp_path / 'scontrol-calls'}'\nexit 1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REPO=str(REPO),
               SLURM_JOB_ID="77", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(tmp_path),
               SAVE=str(tmp_path / "save"), **RUN_ENV)
    env.update(variables)
    return env, called


@pytest.mark.parametrize("variables,expect", [
    ({"RECIPE": "nope"}, "unknown recipe 'nope'"),
    ({"GLOBAL_BATCH_SIZE": "3"}, "global batch 3 is not divisible by the data-parallel size 2"),
    ({"VENV": "/nonexistent/venv"}, "no Python at /nonexistent/venv/bin/python"),
    ({"EP": "4"}, "EP=4 does not divide the data-parallel size 2"),
    ({"STEPS": "ten"}, "STEPS=ten must be a positive integer"),
    ({"SLURM_JOB_ID": ""}, "not inside a Slurm job"),
    ({"SLURM_GPUS_ON_NODE": "1"}, "2 ranks per node but only 1 GPUs per node"),
    ({"PP": "2", "VPP": "3"}, "pp*vpp = 2*3 does not divide the 4 layers of debug"),
    ({"VPP": "0"}, "VPP=0 must be a positive integer"),
])
def test_bad_variables_stop_before_srun(tmp_path, variables, expect):
    env, called = _fake_job_env(tmp_path, **variables)
    out = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, text=True, capture_output=True,
                         timeout=60, cwd=tmp_path)
    lines = _error_lines(out.stdout + out.stderr)
    assert out.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not called.exists(), "srun ran despite bad input"


def test_good_variables_reach_srun_with_the_layout(tmp_path):
    """The same fake job with consistent variables does reach srun (the checks can pass)."""
    env, called = _fake_job_env(tmp_path, TP="2")
    out = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, text=True, capture_output=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert called.exists()
    assert "TP=2 PP=1 VPP=1 EP=1" in out.stdout
    called.unlink()
    env, called = _fake_job_env(tmp_path, PP="2", VPP="2")
    out = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, text=True, capture_output=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--vpp\n2\n" in called.read_text()


def _run_script(script: Path, env: dict, cwd: Path) -> tuple[int, list[str]]:
    out = subprocess.run(["bash", str(script)], env=env, text=True, capture_output=True,
                         timeout=60, cwd=cwd)
    return out.returncode, _error_lines(out.stdout + out.stderr)


def _assert_stops_before_srun(rc: int, lines: list[str], expect: str, called: Path) -> None:
    """One `error:` line containing ``expect``, exit code 2, and no `srun`."""
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not called.exists(), "srun ran despite bad input"


@pytest.mark.parametrize("script", [TRAIN_SBATCH, TORCHRUN_SBATCH], ids=["srun", "torchrun"])
@pytest.mark.parametrize("sp", ["yes", "2"])
def test_sp_other_than_0_or_1_stops_before_srun(tmp_path, script, sp):
    """SP=yes used to be ignored in silence (no --sp); now it names SP and its values."""
    env, called = _fake_job_env(tmp_path, TP="2", SP=sp, NPROC_PER_NODE="2")
    env.pop("SLURM_NTASKS_PER_NODE", None)
    rc, lines = _run_script(script, env, tmp_path)
    _assert_stops_before_srun(rc, lines, f"SP={sp} must be 0 or 1", called)


@pytest.mark.parametrize("name,value,expect", [
    ("GLOBAL_BATCH_SIZE", "abc", "must be a positive integer"),
    ("SEQ_LENGTH", "4k", "must be a positive integer"),
    ("LOG_INTERVAL", "0", "must be a positive integer"),
    ("SEED", "-1", "must be an integer >= 0"),
    ("LR", "abc", "must be a number >= 0"),
    ("EXIT_AFTER_MINUTES", "0", "must be a positive number"),
    ("MAX_RESTARTS", "abc", "must be an integer >= 0"),
    ("STOP_REPEAT_S", "abc", "must be an integer >= 0"),
    ("STEP_WAIT_S", "1.5", "must be an integer >= 0"),
])
def test_bad_numbers_are_named_before_srun(tmp_path, name, value, expect):
    """Every numeric variable of the training scripts is checked up front by the one helper
    (sphinx_check_numbers): the line names the variable and says what to give."""
    env, called = _fake_job_env(tmp_path, **{name: value})
    rc, lines = _run_script(TRAIN_SBATCH, env, tmp_path)
    _assert_stops_before_srun(rc, lines, f"{name}={value} {expect}", called)


def test_good_numbers_reach_srun_unchanged(tmp_path):
    """The checks accept what the training command accepts (1e-4, .5, 0 where 0 is allowed)."""
    env, called = _fake_job_env(
        tmp_path, TP="2", SP="1", LR="1e-4", SEED="0", EXIT_AFTER_MINUTES=".5",
        LOG_INTERVAL="10", STOP_REPEAT_S="0", STEP_WAIT_S="600", MAX_RESTARTS="0",
        EXIT_INTERVAL="0", TIMEOUT_MINUTES="1.5")
    rc, lines = _run_script(TRAIN_SBATCH, env, tmp_path)
    assert rc == 0, lines
    argv = " ".join(called.read_text().splitlines())
    for part in ["--wait=600", "--tp 2", "--sp", "--lr 1e-4", "--seed 0",
                 "--exit-after-minutes .5", "--log-interval 10", "--timeout-minutes 1.5"]:
        assert part in argv, argv
    assert "--exit-interval" not in argv


def test_documented_eval_example_reaches_the_training_command(tmp_path):
    """docs/SLURM.md's EXTRA_ARGS for the held-out evaluation arrive on the srun line and parse
    as the training command's flags."""
    from megatron_sphinx.train.__main__ import parse_args

    doc = (REPO / "docs" / "SLURM.md").read_text()
    extra = re.search(r'EXTRA_ARGS="(--eval-[^"]*)"', doc).group(1)
    data = tmp_path / "mix.zarr"
    data.mkdir()
    env, called = _fake_job_env(tmp_path, DATA=str(data), EXTRA_ARGS=extra)
    rc, lines = _run_script(TRAIN_SBATCH, env, tmp_path)
    assert rc == 0, lines
    argv = called.read_text().splitlines()
    train_argv = argv[argv.index("megatron_sphinx.train") + 1:]
    assert train_argv[-len(extra.split()):] == extra.split()
    rc_cfg = parse_args(train_argv)
    assert rc_cfg.evaluates and rc_cfg.eval_split == 0.01 and rc_cfg.eval_interval == 500


@pytest.mark.parametrize("max_restarts,restarts,requeued,exit_code", [
    ("2", 1, True, EXIT_REQUEUE),  # the fake `scontrol requeue` fails: the step's code
    ("2", 2, False, EXIT_REQUEUE),
    ("abc", 5, False, 2),  # used to requeue without limit: [ 5 -ge abc ] is false
])
def test_max_restarts_bounds_the_requeue_after_a_stop(tmp_path, max_restarts, restarts,
                                                      requeued, exit_code):
    env, called = _fake_job_env(tmp_path, srun_rc=EXIT_REQUEUE, MAX_RESTARTS=max_restarts,
                                SLURM_RESTART_COUNT=str(restarts), MASTER_ADDR="localhost")
    rc, lines = _run_script(TRAIN_SBATCH, env, tmp_path)
    calls = tmp_path / "scontrol-calls"
    assert rc == exit_code, lines
    assert ("requeue 77" in (calls.read_text() if calls.exists() else "")) == requeued, lines
    if exit_code == 2:
        _assert_stops_before_srun(rc, lines, f"MAX_RESTARTS={max_restarts} must be", called)
    elif not requeued:
        assert any(f"(MAX_RESTARTS={max_restarts}): not requeueing" in line for line in lines)


def _other_script_env(tmp_path: Path, script: Path, **variables) -> tuple[dict, Path]:
    """The fake job of ``script``: preprocess.sbatch also gets an (empty) MIX file and an OUT."""
    if script == PREPROCESS_SBATCH:
        (tmp_path / "mix.yaml").write_text("sources: []\n")
        variables = dict(MIX=str(tmp_path / "mix.yaml"), OUT=str(tmp_path / "mix.zarr"),
                         **variables)
    return _fake_job_env(tmp_path, **variables)


@pytest.mark.parametrize("script,variables,expect", [
    (PROFILE_SBATCH, {"GLOBAL_BATCH_SIZE": "abc"}, "GLOBAL_BATCH_SIZE=abc must be a positive"),
    (PROFILE_SBATCH, {"PEAK_TFLOPS": "fast"}, "PEAK_TFLOPS=fast must be a positive number"),
    (PROFILE_SBATCH, {"COMPARE": "yes"}, "COMPARE=yes must be 0 or 1"),
    (PREPROCESS_SBATCH, {"SEQ_LENGTH": "4k"}, "SEQ_LENGTH=4k must be a positive integer"),
    (PREPROCESS_SBATCH, {"OVERWRITE": "yes"}, "OVERWRITE=yes must be 0 or 1"),
    (TORCHRUN_SBATCH, {"NPROC_PER_NODE": "2", "SHUTDOWN_TIMEOUT_S": "soon"},
     "SHUTDOWN_TIMEOUT_S=soon must be an integer >= 0"),
], ids=["profile-gbs", "profile-peak", "profile-compare", "preprocess-seq", "preprocess-overwrite",
        "torchrun-shutdown"])
def test_other_scripts_share_the_checks(tmp_path, script, variables, expect):
    env, called = _other_script_env(tmp_path, script, **variables)
    rc, lines = _run_script(script, env, tmp_path)
    _assert_stops_before_srun(rc, lines, expect, called)


_CONVERT_VARIABLES = ("MODE", "OUT", "LOAD", "HF", "RECIPE", "TP", "PP", "EP", "DTYPE",
                      "TOKENIZER", "OVERWRITE", "EXTRA_ARGS", "VENV", "PYTHON", "CONTAINER_IMAGE",
                      "CLIP_CONVNEXT", "DINOV2")


def _convert_env(tmp_path: Path, **variables) -> tuple[dict, Path]:
    """slurm/convert.sbatch's job: only the given conversion variables set."""
    env, called = _fake_job_env(tmp_path)
    for name in _CONVERT_VARIABLES:
        env.pop(name, None)
    env.update(variables)
    return env, called


@pytest.mark.parametrize("variables,expect", [
    ({}, "set MODE=to_hf or MODE=from_hf"),
    ({"MODE": "to_hf"}, "OUT is not set: set OUT to the output directory"),
    ({"MODE": "to_hf", "OUT": "o"}, "LOAD is not set: set LOAD to a checkpoint"),
    ({"MODE": "from_hf", "OUT": "o"}, "HF is not set: set HF to a local Hugging Face"),
    ({"MODE": "from_hf", "OUT": "o", "HF": "h"}, "RECIPE is not set: set RECIPE"),
    ({"MODE": "from_hf", "OUT": "o", "HF": "h", "RECIPE": "debug", "TP": "two"},
     "TP=two must be a positive integer"),
    ({"MODE": "to_hf", "OUT": "o", "LOAD": "l", "OVERWRITE": "yes"},
     "OVERWRITE=yes must be 0 or 1"),
    ({"MODE": "to_hf", "OUT": "o", "LOAD": "l", "PYTHON": "/nonexistent/python"},
     "no Python at /nonexistent/python"),
], ids=["mode", "out", "load", "hf", "recipe", "tp", "overwrite", "python"])
def test_convert_missing_variable_is_one_error_line(tmp_path, variables, expect):
    """convert.sbatch used to end with bash's `line 29: OUT: set OUT ...` and exit code 1."""
    env, called = _convert_env(tmp_path, **variables)
    rc, lines = _run_script(CONVERT_SBATCH, env, tmp_path)
    _assert_stops_before_srun(rc, lines, expect, called)


@pytest.mark.parametrize("variables,argv", [
    ({"MODE": "to_hf", "OUT": "o", "LOAD": "l", "TOKENIZER": "t", "OVERWRITE": "1"},
     ["tools/convert_to_hf.py", "--out", "o", "--overwrite", "--load", "l", "--dtype", "auto",
      "--tokenizer", "t"]),
    ({"MODE": "from_hf", "OUT": "o", "HF": "h", "RECIPE": "debug", "PP": "2",
      "EXTRA_ARGS": "--random-encoders --seed 7"},
     ["tools/convert_from_hf.py", "--out", "o", "--hf", "h", "--recipe", "debug", "--tp", "1",
      "--pp", "2", "--ep", "1", "--dtype", "auto", "--random-encoders", "--seed", "7"]),
], ids=["to_hf", "from_hf"])
def test_convert_good_variables_reach_srun(tmp_path, variables, argv):
    env, called = _convert_env(tmp_path, PYTHON=sys.executable, **variables)
    rc, lines = _run_script(CONVERT_SBATCH, env, tmp_path)
    assert rc == 0, lines
    got = called.read_text().splitlines()
    assert got[:2] == ["--ntasks=1", sys.executable], got
    assert got[2:] == [str(REPO / argv[0]), *argv[1:]], got


def test_scripts_parse():
    tools = [f"tools/{p.name}" for p in sorted((REPO / "tools").glob("*.sh"))]
    assert {"tools/gpu_check.sh", "tools/gpu_bundle.sh", "tools/diag_cpp_glue.sh"} <= set(tools)
    for script in ["slurm/train.sbatch", "slurm/train_torchrun.sbatch", "slurm/preprocess.sbatch",
                   "slurm/profile.sbatch", "slurm/convert.sbatch", "slurm/common.sh",
                   "scripts/local_slurm.sh", *tools]:
        out = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    text = TRAIN_SBATCH.read_text()
    for directive in ["--signal=B:USR1@120", "--requeue", "--output=logs/%x-%j.out",
                      "--open-mode=append"]:
        assert f"#SBATCH {directive}" in text


# ------------------------------------------------------------ the number checks (mutation audit)

@pytest.mark.parametrize("script,variables,expect", [
    (TRAIN_SBATCH, {"STEPS": "010"}, "STEPS=010 must be a positive integer"),  # bash: 8
    (TRAIN_SBATCH, {"SEED": "007"}, "SEED=007 must be an integer >= 0"),
    (TORCHRUN_SBATCH, {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 must be a positive integer"),
], ids=["leading-zero-count", "leading-zero-whole", "nproc-0"])
def test_numbers_bash_would_misread_are_named_before_srun(tmp_path, script, variables, expect):
    env, called = _fake_job_env(tmp_path, **variables)
    env.pop("SLURM_NTASKS_PER_NODE", None)
    rc, lines = _run_script(script, env, tmp_path)
    _assert_stops_before_srun(rc, lines, expect, called)


def test_a_number_check_of_an_unknown_kind_is_an_error():
    """A typo in a script's kind must not pass every value in silence."""
    out = subprocess.run(["bash", "-c", f"source '{REPO / 'slurm' / 'common.sh'}'; X=1; "
                          "sphinx_check_numbers counts X; echo reached"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "reached" not in out.stdout, out.stdout + out.stderr
    assert _error_lines(out.stderr) == [
        "error: sphinx_check_numbers: unknown kind 'counts'"], out.stderr
