"""The sbatch scripts in slurm/ on a real one-node Slurm (scripts/local_slurm.sh, started once
for the module and stopped after it).

What trains: the debug recipe at DP2 (two srun tasks, or one torchrun with two ranks; gloo on the
CPU), 8 steps of 2 packed sequences of 1400 tokens on synthetic data, a checkpoint every 2 steps.
The first test's run is the uninterrupted reference; every interrupted run below must reproduce
its losses exactly. docs/SLURM.md says what each test proves.

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
    assert meta["layout"] == {"tp": 1, "pp": 1, "ep": 1, "dp": 2}
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
    assert_matches_reference(read_metrics(save)[done_before:], ref, 3)
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
    assert_matches_reference(read_metrics(save)[done_before:], ref, frozen - 1)
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


def _fake_job_env(tmp_path: Path, **variables) -> tuple[dict, Path]:
    """The batch script run directly with a job's variables and an `srun` that only records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "srun-called"
    (bin_dir / "srun").write_text(f"#!/bin/sh\ntouch {called}\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
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
    assert "TP=2 PP=1 EP=1" in out.stdout


def test_scripts_parse():
    for script in ["slurm/train.sbatch", "slurm/train_torchrun.sbatch", "slurm/preprocess.sbatch",
                   "slurm/common.sh", "scripts/local_slurm.sh"]:
        out = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
    text = TRAIN_SBATCH.read_text()
    for directive in ["--signal=B:USR1@120", "--requeue", "--output=logs/%x-%j.out",
                      "--open-mode=append"]:
        assert f"#SBATCH {directive}" in text
