"""Where a training process spends its time before the first step, phase by phase.

A job's start-up is paid once per launch, and again at every requeue: on one H100, bench_train
measured ~25 s per run outside the steps (run 4, `docs/PERFORMANCE.md`), as long as twenty
steps. :class:`StartupClock` splits it: the time since the process began until the clock starts
(the interpreter, the imports, the argument checks) and then each named phase, logged in one
line before the first step.
"""
from __future__ import annotations

import os
import time


def process_age_s() -> float | None:
    """Seconds since this process began (Linux ``/proc``); None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:  # field 22: start time, clock ticks after boot
            started = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Phases of the start-up, timed one after another.

    Example::

        clock = StartupClock()      # before: the interpreter and the imports
        ...; clock.lap("model")
        ...; clock.lap("optimizer")
        log.info(clock.summary())   # start-up 9.1 s: imports 6.5 | model 2.1 | optimizer 0.5
    """

    def __init__(self) -> None:
        self.before = process_age_s()  # the clock's own start, counted from the process's
        self.phases: list[tuple[str, float]] = []
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Ends the phase ``name`` now (a name given twice adds up)."""
        now = time.perf_counter()
        for i, (known, seconds) in enumerate(self.phases):
            if known == name:
                self.phases[i] = (name, seconds + now - self._last)
                break
        else:
            self.phases.append((name, now - self._last))
        self._last = now

    def total_s(self) -> float:
        """Seconds from the process's start (or, where unknown, the clock's) to the last lap."""
        return (self.before or 0.0) + sum(s for _, s in self.phases)

    def summary(self) -> str:
        """One line: the total, then each phase's seconds (``imports`` before the clock)."""
        parts = ([("imports", self.before)] if self.before is not None else []) + self.phases
        return f"start-up {self.total_s():.1f} s: " + " | ".join(
            f"{name} {seconds:.1f}" for name, seconds in parts)
