"""Graceful stops: a preemption / time-limit signal or a wall-time budget ends the run cleanly.

Slurm sends ``SIGUSR1`` (``--signal=B:USR1@120``) or ``SIGTERM`` before killing a job. The handler
only sets a flag; the training loop finishes its step, agrees with every rank that it must stop
(an all-reduce, so all ranks save the same step), saves and exits.
"""
from __future__ import annotations

import logging
import signal
import time

import torch

log = logging.getLogger(__name__)


class StopRequest:
    """Collects stop reasons: signals received and an optional wall-time budget."""

    def __init__(self, exit_after_minutes: float | None = None,
                 signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.signal_received: int | None = None
        self.deadline = (time.monotonic() + 60.0 * exit_after_minutes
                         if exit_after_minutes else None)
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: will save and stop after this step",
                    signal.Signals(signum).name)
        self.signal_received = signum

    def local(self) -> bool:
        """Whether this rank wants to stop."""
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        return self.signal_received is not None or timed_out

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank wants to stop (a collective: every rank must call it)."""
        flag = torch.tensor([1.0 if self.local() else 0.0], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
