"""Process start-up: launcher environment -> torch.distributed -> Megatron parallel state.

One code path serves torchrun, Slurm (``srun``) and MPI (``mpiexec``) launches, and a plain
single process (world size 1). :func:`init_distributed` is called once at the top of a program;
it returns a :class:`ProcessGroups` object that is the only way groups reach the rest of the code:

    groups = init_distributed(ParallelDims(world_size=ws, tp=2), timeout_s=600)
    model = GPTModel(config, spec, ..., pg_collection=groups.collection)
    ddp = DistributedDataParallel(config, ddp_config, model, pg_collection=groups.collection)
    opt = get_megatron_optimizer(opt_config, [ddp], pg_collection=groups.collection,
                                 use_gloo_process_groups=False)
    ...
    shutdown()

Model code takes a ``ProcessGroupCollection`` (``groups.collection``) or single groups
(``groups.tp``) as constructor arguments and never calls ``parallel_state`` getters. Megatron's
own global parallel state is still initialised (some Megatron internals, e.g. the RNG tracker
seeding and default schedule groups, read it), but our modules do not rely on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from megatron_sphinx.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT_BASE = 20000
"""Slurm launches derive MASTER_PORT as BASE + SLURM_JOB_ID % PORT_SPAN when it is not set."""
PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as told by its launcher."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank among the processes on this node (selects the GPU)."""
    master_addr: str
    """Host of rank 0 (TCP rendezvous)."""
    master_port: int
    """Port of the rendezvous on ``master_addr``."""
    launcher: str
    """Which launcher was detected: torchrun, mpi, slurm or single."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size {self.world_size} < 1: check the launcher variables")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside world size {self.world_size}: check the launcher "
                "variables (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS or the MPI ones)"
            )
        if self.local_rank < 0:
            raise ValueError(f"local rank {self.local_rank} < 0: check LOCAL_RANK/SLURM_LOCALID")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} out of range: set MASTER_PORT")


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise ValueError(f"{name}={value!r} is not an integer: fix the launcher") from exc
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm nodelist: ``scontrol show hostnames``, else a small parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                check=True, capture_output=True, text=True, timeout=30,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError) as exc:
            logger.warning("scontrol show hostnames failed (%s); parsing the nodelist", exc)
    return _parse_nodelist(nodelist)


def _parse_nodelist(nodelist: str) -> list[str]:
    """Expand ``node[01-03,7],gpu5`` style lists (one bracket group per host pattern)."""
    hosts: list[str] = []
    parts: list[str] = []
    depth, current = 0, ""
    for ch in nodelist:
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        current += ch
    parts.append(current)
    for part in filter(None, parts):
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, rest = part.split("[", 1)
        ranges, suffix = rest.split("]", 1)
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def _mpi_world() -> Any:
    from mpi4py import MPI  # imported only under an MPI launch: MPI_Init happens here

    return MPI.COMM_WORLD


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world size, local rank and the rendezvous address from the launcher.

    Order: torchrun (``RANK``/``WORLD_SIZE``), MPI (``OMPI_COMM_WORLD_*``, ``PMI_*``/``PMIX_RANK``
    via mpi4py where a value is missing), Slurm (``SLURM_PROCID``/``SLURM_NTASKS``), else a single
    process. MPI comes before Slurm because ``mpiexec`` inside an ``sbatch`` script inherits the
    batch step's ``SLURM_PROCID=0``. ``MASTER_ADDR``/``MASTER_PORT`` always win when set.

    Args:
        environ: Variables to read; ``os.environ`` by default.

    Returns:
        The launch environment.
    """
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")

    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if rank is not None and world is not None:
        local = _int(env, "LOCAL_RANK")
        return LaunchEnv(rank, world, rank if local is None else local,
                         addr or "127.0.0.1", port or 29500, "torchrun")

    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    if mpi_rank is not None:
        mpi_world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        if local is None and _int(env, "SLURM_PROCID") == mpi_rank:
            # srun started this rank; under mpiexec inside sbatch every rank inherits the batch
            # step's SLURM_LOCALID=0 (and SLURM_PROCID=0), which would put all ranks on GPU 0
            local = _int(env, "SLURM_LOCALID")
        comm = None
        if mpi_world is None or local is None or addr is None or port is None:
            comm = _mpi_world()
            mpi_rank, mpi_world = comm.Get_rank(), comm.Get_size()
            if local is None:
                from mpi4py import MPI

                local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
            if addr is None or port is None:
                ours = (socket.gethostname(), free_port("0.0.0.0")) if mpi_rank == 0 else None
                host0, port0 = comm.bcast(ours, root=0)
                addr, port = addr or host0, port or port0
        return LaunchEnv(mpi_rank, mpi_world, local, addr, port, "mpi")

    slurm_rank = _int(env, "SLURM_PROCID")
    slurm_world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if slurm_rank is not None and slurm_world is not None:
        local = _int(env, "SLURM_LOCALID") or 0
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("Slurm launch without SLURM_JOB_NODELIST: set MASTER_ADDR")
            addr = _expand_nodelist(nodelist)[0]
        if port is None:
            job = _int(env, "SLURM_JOB_ID")
            if job is None:
                raise ValueError("Slurm launch without SLURM_JOB_ID: set MASTER_PORT")
            port = DEFAULT_MASTER_PORT_BASE + job % PORT_SPAN
        return LaunchEnv(slurm_rank, slurm_world, local, addr, port, "slurm")

    return LaunchEnv(0, 1, 0, addr or "127.0.0.1", port or free_port(), "single")


@dataclass(frozen=True)
class ProcessGroups:
    """The process groups of one run, passed explicitly to everything that communicates.

    ``collection`` is Megatron-Core 0.19's ``ProcessGroupCollection`` with every field filled
    from the parallel state: pass it as ``pg_collection=`` to ``GPTModel``,
    ``DistributedDataParallel``, ``get_megatron_optimizer`` (with
    ``use_gloo_process_groups=False``), ``finalize_model_grads`` and the schedules.
    """

    dims: ParallelDims
    """The layout these groups realise."""
    launch: LaunchEnv
    """How this process was launched."""
    collection: Any
    """``megatron.core.process_groups_config.ProcessGroupCollection``."""

    @property
    def tp(self) -> torch.distributed.ProcessGroup:
        """Tensor-parallel group."""
        return self.collection.tp

    @property
    def pp(self) -> torch.distributed.ProcessGroup:
        """Pipeline-parallel group."""
        return self.collection.pp

    @property
    def dp(self) -> torch.distributed.ProcessGroup:
        """Dense data-parallel group."""
        return self.collection.dp

    @property
    def ep(self) -> torch.distributed.ProcessGroup:
        """Expert-parallel group."""
        return self.collection.ep

    @property
    def rank(self) -> int:
        """Global rank."""
        return self.launch.rank

    @property
    def tp_rank(self) -> int:
        """Rank inside the tensor-parallel group."""
        return self.collection.tp.rank()

    @property
    def pp_rank(self) -> int:
        """Pipeline stage of this rank."""
        return self.collection.pp.rank()

    @property
    def dp_rank(self) -> int:
        """Rank inside the dense data-parallel group (which data shard to read)."""
        return self.collection.dp.rank()

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (embeddings, vision encoders, projector)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (output layer and loss)."""
        return self.pp_rank == self.collection.pp.size() - 1


def init_distributed(
    dims: ParallelDims,
    timeout_s: float = 600.0,
    seed: int = 1234,
    environ: Mapping[str, str] | None = None,
    create_gloo_groups: bool = False,
) -> ProcessGroups:
    """Start torch.distributed and Megatron's parallel state for ``dims``.

    nccl with CUDA (the device is chosen from the local rank), else gloo with
    :mod:`megatron_sphinx.cpu_compat` applied. Seeds Megatron's RNG tracker
    (``model_parallel_cuda_manual_seed``) so models can be built right after.

    Args:
        dims: Parallel layout; ``dims.world_size`` must equal the launcher's world size.
        timeout_s: Collective timeout in seconds for every group: a dead or stuck rank turns
            into an error on the others after this long.
        seed: Base seed for Megatron's RNG tracker.
        environ: Launcher variables (``os.environ`` by default).
        create_gloo_groups: Also build Megatron's side gloo groups (only needed for the legacy
            ``dp_zero`` distributed-optimizer checkpoint formats).

    Returns:
        The process groups of this run.

    Raises:
        ValueError: The launcher's world size differs from ``dims.world_size``.
        RuntimeError: torch.distributed is already initialised.
    """
    launch = detect_launch_env(environ)
    if launch.world_size != dims.world_size:
        raise ValueError(
            f"the launcher started {launch.world_size} processes but the layout "
            f"{dims.describe()} needs {dims.world_size}: launch {dims.world_size} ranks or "
            "change tp/pp"
        )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s {timeout_s} <= 0: give a positive collective timeout")
    if torch.distributed.is_initialized():
        raise RuntimeError("torch.distributed is already initialised: call shutdown() first")
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    _prepare_checkpoint_writer()  # forks a manager process: before CUDA and gloo threads start
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(launch.local_rank)
    else:
        backend = "gloo"
        from megatron_sphinx import cpu_compat

        cpu_compat.apply()
    timeout = timedelta(seconds=timeout_s)
    torch.distributed.init_process_group(
        backend=backend,
        init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.expert_tp,
        distributed_timeout_minutes=timeout_s / 60.0,  # timedelta(minutes=) accepts a float
        create_gloo_process_groups=create_gloo_groups,
    )
    model_parallel_cuda_manual_seed(seed)
    from megatron_sphinx import upstream_fixes

    upstream_fixes.apply()
    collection = ProcessGroupCollection.use_mpu_process_groups()
    logger.info("rank %d/%d: %s on %s (%s launch)", launch.rank, launch.world_size,
                dims.describe(), backend, launch.launcher)
    return ProcessGroups(dims=dims, launch=launch, collection=collection)


def _prepare_checkpoint_writer() -> None:
    """Create Megatron's checkpoint write-results queue with a *forked* manager, up front.

    ``dist_checkpointing``'s torch_dist writer otherwise creates it lazily on the first save
    with a *spawned* manager, which costs seconds and re-imports ``__main__`` (scripts without an
    ``if __name__ == "__main__":`` guard run twice). Megatron's own trainer does the same call.

    The manager must survive the stop signal (Slurm and torchrun signal every process of a step,
    and the rank still has to save), and must die with its rank (a ``kill -9`` would otherwise
    orphan it): it is forked with SIGUSR1/SIGTERM ignored and a parent-death signal.
    """
    global _FORKING_WRITER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGUSR1, signal.SIGTERM)}
    _FORKING_WRITER = True
    try:
        filesystem_async.get_write_results_queue(mp_mode="fork")
    finally:
        _FORKING_WRITER = False
        for sig, handler in ignored.items():
            if handler is not None:
                signal.signal(sig, handler)


_FORKING_WRITER = False


def _after_fork_in_child() -> None:
    """The checkpoint-writer manager gets SIGKILL when its rank dies (Linux prctl)."""
    if _FORKING_WRITER and sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown() -> None:
    """Destroy Megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
