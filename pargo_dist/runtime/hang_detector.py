"""The hang detector: a rank that makes no progress for too long ends the run, loudly.

A rank stuck in a collective (a peer died, a node lost its network, one rank took another
branch) otherwise waits for NCCL's or gloo's own timeout, or forever, while the allocation
burns. The loop calls `beat(what)` at every step, eval batch and checkpoint; a thread checks
the time since the last beat and, past `timeout_s`, prints what the rank was last doing,
dumps the Python stack of every thread (faulthandler: works while the main thread is blocked
in C) and exits with HANG_EXIT. The launcher then stops the other ranks and the batch script
does not requeue: a hang is a bug or a broken node to look at, not a preemption.

Start-up (rendezvous, building and loading a model that may be 70B, the first shard
downloads) legitimately takes long and has no step to beat on: its beats pass `allow`, at
least SETUP_ALLOWANCE_S, so a tight step timeout does not kill a slow but healthy start.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time

from pargo_dist.runtime.exits import HANG_EXIT, record_exit
from pargo_dist.runtime.store_sync import SETUP_ALLOWANCE_S, abort_default  # noqa: F401  (re-exported)


class HangWatchdog:
    def __init__(self, timeout_s: float, rank: int, poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self._last = time.monotonic()
        self._what = "starting"
        self._limit = self.timeout_s
        self._stop = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            self._poll = poll_s or min(5.0, self.timeout_s / 4)
            self._thread = threading.Thread(target=self._watch, name="pargo-hang-watchdog", daemon=True)
            self._thread.start()

    def beat(self, what: str, allow: float | None = None) -> None:
        """Progress: `what` is what the rank does next (shown if it never finishes); `allow`:
        seconds it may take, when more than the step timeout (start-up)."""
        self._limit = max(self.timeout_s, allow or 0.0)
        self._last, self._what = time.monotonic(), what

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            idle = time.monotonic() - self._last
            if idle > self._limit:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        print(f"pargo-dist: rank {self.rank} made no progress for {idle:.0f}s (limit {self._limit:g}s, "
              f"train.hang_timeout_s={self.timeout_s:g}) while {self._what}. A peer rank has probably died "
              "or hung in a collective; "
              f"ending the run with exit {HANG_EXIT} instead of waiting. Python stacks of this rank follow.",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        abort_default(f"rank {self.rank} on {socket.gethostname()}: the hang detector fired after {idle:.0f} s "
                      f"without progress while {self._what}")
        record_exit(HANG_EXIT)
        os._exit(HANG_EXIT)
