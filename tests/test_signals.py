"""Stop requests: SIGUSR1/SIGTERM and a wall-time budget set a flag; ranks agree on stopping."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from megatron_sphinx.train import signals
from megatron_sphinx.train.signals import StopRequest
from tests.dist_harness import run_ranks

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_each_stop_signal_is_caught_and_recorded(sig):
    stop = StopRequest()
    assert signal.getsignal(sig) == stop._handle  # else the kill below ends pytest itself
    assert not stop.local() and not stop.agreed(CPU)
    os.kill(os.getpid(), sig)  # the handler runs before kill() returns to Python code
    assert stop.signal_received == sig
    assert stop.local() and stop.agreed(CPU)


def test_exit_after_minutes_counts_minutes(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: now[0])
    stop = StopRequest(exit_after_minutes=2, signals=())
    now[0] = 1000.0 + 119.0
    assert not stop.local()
    now[0] = 1000.0 + 120.0
    assert stop.local()  # the budget alone is enough: no signal came
    assert stop.signal_received is None


def test_no_budget_and_no_signal_never_stops(monkeypatch):
    monkeypatch.setattr(signals.time, "monotonic", lambda: 1e12)
    assert not StopRequest(signals=()).local()


def _agree(rank: int, world_size: int, wanting: tuple[int, ...]) -> bool:
    from megatron_sphinx.distributed import detect_launch_env

    e = detect_launch_env()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://{e.master_addr}:"
                                         f"{e.master_port}", rank=rank, world_size=world_size)
    try:
        stop = StopRequest(signals=())
        if rank in wanting:
            stop.signal_received = signal.SIGUSR1
        return stop.agreed(CPU)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks; GPUs use NCCL")
def test_ranks_stop_together_when_any_one_asks():
    """Slurm may signal one rank only: every rank must still stop (and save) the same step."""
    assert run_ranks(_agree, 2, (1,), timeout=120) == [True, True]
    assert run_ranks(_agree, 2, (), timeout=120) == [False, False]
