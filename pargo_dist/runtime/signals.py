"""SIGTERM / SIGUSR1: "save and requeue", never a sudden death, in training and evaluation alike.

SLURM sends SIGUSR1 (sbatch --signal) or SIGTERM before a time limit or a preemption. Python's
default for both is to die on the spot, which loses the step in flight and, on a shared
filesystem, can leave half-written files. So:

- `hold_signals()` blocks both from a process's first line (the CLI and the launcher call it);
  children inherit the mask, so a signal that arrives while a rank still imports torch stays
  pending instead of killing it.
- `StopSignal` installs a handler that only notes the signal, then releases the mask (a pending
  one is delivered now). The loop checks `requested`: evaluation per batch, training once per step
  in `Trainer._agree` (every rank must stop after the same step, so they agree by all-reduce).
"""

from __future__ import annotations

import signal

HELD = {signal.SIGTERM, signal.SIGUSR1}  # the "save and requeue" signals


def hold_signals() -> None:
    """Keep SIGTERM / SIGUSR1 pending until `release_signals()` (inherited by child processes)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def release_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)


class StopSignal:
    """Notes SIGTERM / SIGUSR1 instead of dying; `close()` gives the previous handlers back (for
    callers that run a command in-process, such as tests)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in HELD}
        release_signals()  # one that came during start-up is delivered now, to the handler above

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
