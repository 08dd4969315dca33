"""A small multi-process harness for gloo tests: fork N ranks, run a function, collect results.

    from tests.dist_harness import run_ranks

    def work(rank, world_size, scale):
        groups = init_distributed(ParallelDims(world_size=world_size, tp=2), timeout_s=60)
        ...
        return some_picklable_value

    results = run_ranks(work, 2, 3.0, timeout=120)   # one result per rank, in rank order

Ranks are *forked* from the test process, so they start in well under a second when the parent
has already imported torch and megatron (spawned ones re-import for ~9 s). Each rank gets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (a free port) in its
environment, so :func:`megatron_sphinx.distributed.init_distributed` works unchanged. A rank's
exception is re-raised in the parent with the rank's traceback, and the other ranks are killed
(with their children). Nothing waits longer than ``timeout``: on expiry every rank dumps its
Python stacks to stderr (faulthandler) and is killed, and :class:`RankTimeout` is raised.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from megatron_sphinx.distributed import free_port


class RankFailure(RuntimeError):
    """A rank raised (the message holds its traceback) or died without a result."""


class RankTimeout(TimeoutError):
    """Some ranks did not finish within the timeout."""


_OK, _ERR = "ok", "err"


def _worker(fn: Callable, rank: int, world_size: int, args: tuple, env: dict[str, str],
            conn: multiprocessing.connection.Connection) -> None:
    os.setpgrp()  # own process group: the parent can kill this rank and anything it started
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    code = 0
    try:
        import torch

        torch.set_num_threads(1)
        try:
            payload = pickle.dumps((_OK, rank, fn(rank, world_size, *args)))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            text = "".join(traceback.format_exception(exc))
            payload = pickle.dumps((_ERR, rank, text))
            code = 1
        conn.send_bytes(payload)
        conn.close()
        _quiet_teardown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers inherited through fork


def _quiet_teardown() -> None:
    try:
        import torch

        if torch.distributed.is_initialized():
            from megatron_sphinx.distributed import shutdown

            shutdown()
    except Exception:  # noqa: BLE001 - the result is already sent; teardown is best effort
        pass


def _kill(procs: list[multiprocessing.Process], dump_stacks: bool = False) -> None:
    alive = [p for p in procs if p.is_alive()]
    if dump_stacks:
        for p in alive:
            try:
                os.kill(p.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    for p in procs:  # also ranks that exited: their children (e.g. managers) share the group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        p.join(timeout=5)


def _default_env() -> dict[str, str]:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes.

    Args:
        fn: Module-level or nested function; its return value must be picklable.
        world_size: Number of ranks.
        *args: Extra picklable-or-not arguments (fork copies them, nothing is pickled).
        timeout: Seconds for the whole run before every rank is killed.
        env: Extra environment variables for the ranks.

    Returns:
        The results, indexed by rank.

    Raises:
        RankFailure: A rank raised (first failure, with its traceback) or died silently.
        RankTimeout: Not all ranks finished in time.
    """
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout, env)
        except RankFailure as exc:  # another process took the free port before rank 0 bound it
            if "EADDRINUSE" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float,
              env: dict[str, str] | None) -> list[Any]:
    if world_size < 1:
        raise ValueError(f"world_size {world_size} < 1: run at least one rank")
    ctx = multiprocessing.get_context("fork")
    full_env = _default_env()
    full_env.update(env or {})
    procs, conns = [], {}
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(fn, rank, world_size, args, full_env, child_end),
                           name=f"rank{rank}")
        proc.start()
        child_end.close()
        procs.append(proc)
        conns[parent_end] = rank
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                _kill(procs, dump_stacks=True)
                raise RankTimeout(f"ranks {missing} did not finish within {timeout:.0f} s "
                                  "(stacks dumped to stderr)")
            ready = multiprocessing.connection.wait(list(conns), timeout=min(remaining, 1.0))
            for conn in ready:
                rank = conns.pop(conn)
                try:
                    status, _, value = pickle.loads(conn.recv_bytes())
                except EOFError:
                    procs[rank].join(timeout=5)
                    code = procs[rank].exitcode
                    _kill(procs)
                    raise RankFailure(f"rank {rank} died without a result (exit code {code})")
                if status == _ERR:
                    _kill(procs)
                    raise RankFailure(f"rank {rank} of {world_size} raised:\n{value}")
                results[rank] = value
    finally:
        for conn in conns:
            conn.close()
        _kill(procs)
    return [results[r] for r in range(world_size)]
