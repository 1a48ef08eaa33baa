"""The launcher's restart policy: which failures start every rank again, which requeue the job,
which end it (docs/slurm.md has the table by exit code).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

NO_RESTART_EXITS = {2: "a bad recipe, argument or input, or a run that diverged", 130: "interrupted"}

# What a failing rank's error says when the machine is at fault, not the code or the recipe: the
# same error at the same step again is then no proof of a bug (a GPU with failing memory fails
# there again), and a requeue onto other nodes is the cure. Matched case-insensitively against the
# one line the rank recorded (runtime.exits.record_failure): CUDA's and NCCL's own texts.
HARDWARE = ("ecc error", "uncorrectable ecc", "cudaerroreccuncorrectable", "no cuda-capable device",
            "cuda-capable device(s) is/are busy or unavailable", "cudaerrordevicesunavailable", "gpu is lost",
            "fallen off the bus", "xid", "cuda error: unspecified launch failure", "cuda error: unknown error",
            "cuda driver initialization failed", "nccl error", "unhandled system error", "unhandled cuda error",
            "nvlink", "infiniband", "ibv_", "hardware error")


def looks_like_hardware(failure: dict | None) -> bool:
    """Whether a recorded failure's error reads as the machine's fault (HARDWARE)."""
    error = (failure or {}).get("error", "").lower()
    return any(text in error for text in HARDWARE)


@dataclass
class RestartPolicy:
    """When the launcher starts every rank again after a failure (`run.max_restarts` within
    `run.restart_window_s`): a rank that died (killed, a lost peer, a crash, the hang detector)
    restarts the run from its newest complete checkpoint. Never for a bad input (exit 2), an
    interruption, a signal the launcher itself got (preemption: the exit-75 path), or the same
    failure again: the same error at the same step is a bug, not a fault, and ends the run.

    Under SLURM (`requeue_when_spent`, set where SLURM_JOB_ID is in the environment), a run whose
    restarts are spent after faults exits 75 instead of the failing code (`requeue_instead`),
    and the batch script requeues the job onto a fresh allocation: a node that cannot rejoin
    fails its peers' rendezvous again and again until the restarts are spent, and the requeued
    job gets a node in its place. Only with run.max_restarts >= 1; what `not_a_fault` names
    still ends the job."""

    max_restarts: int = 0
    window_s: float = 3600.0
    requeue_when_spent: bool = False
    times: list[float] = field(default_factory=list)
    last: dict | None = None

    def refuse(self, code: int, failure: dict | None) -> str | None:
        """Why not to restart after exit `code` (failure: what the failing rank recorded), or None."""
        return self.not_a_fault(code, failure) or self.spent()

    def not_a_fault(self, code: int, failure: dict | None) -> str | None:
        """Why exit `code` is not a fault that starting again can cure (a bad input, an
        interruption, the same failure at the same step again: a bug), or None. An error that
        reads as the machine's fault (`looks_like_hardware`) is a fault however often it repeats:
        restarted while restarts are left, then requeued onto other nodes."""
        if code in NO_RESTART_EXITS:
            return NO_RESTART_EXITS[code]
        if failure is not None and self.last is not None and not looks_like_hardware(failure) and \
                (failure["step"], failure["error"]) == (self.last["step"], self.last["error"]):
            return f"the same failure again at step {failure['step']} ({failure['error']})"
        return None

    def spent(self) -> str | None:
        """Why no restart is left within the window, or None."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < self.window_s]
        if len(self.times) >= self.max_restarts:
            return f"{len(self.times)} restart(s) within run.restart_window_s={self.window_s:g} s already " \
                   f"(run.max_restarts={self.max_restarts})"
        return None

    def requeue_instead(self, code: int, failure: dict | None) -> bool:
        """After `refuse` said no: whether the run exits REQUEUE_EXIT rather than `code`, for
        SLURM to requeue it (see the class docstring): the restarts are spent and this failure
        is a fault too."""
        return self.requeue_when_spent and self.max_restarts >= 1 and self.not_a_fault(code, failure) is None \
            and self.spent() is not None

    def note(self, failure: dict | None) -> int:
        """Count a restart; returns its number within the window."""
        self.times.append(time.monotonic())
        self.last = failure
        return len(self.times)


def restart_policy(cfg) -> RestartPolicy:
    """The recipe's restart policy; under SLURM (SLURM_JOB_ID set) spent restarts requeue the job."""
    return RestartPolicy(max_restarts=cfg.run.max_restarts, window_s=cfg.run.restart_window_s,
                         requeue_when_spent="SLURM_JOB_ID" in os.environ)


def replay(outcomes: list[tuple[int | None, dict | None]], max_restarts: int) -> tuple[int, str | None]:
    """Under torchrun, whose agent restarts every failure: what our policy says of the attempts so
    far, in order (each `runtime.exits.attempt_outcome` of one node: its cause's code, None when
    killed, and failure record). Returns (the code to end with, why) at the first attempt our
    launcher would not have restarted after (a bad input, an interruption, the same failure
    again at the same step); else (the last attempt's code, None), where a fault after
    max_restarts >= 1 restarts ends with REQUEUE_EXIT, as SLURM's spent restarts do
    (RestartPolicy.requeue_instead): the job controller recreates the job elsewhere."""
    from pargo_dist.runtime.exits import REQUEUE_EXIT

    policy = RestartPolicy(max_restarts=max_restarts, requeue_when_spent=True)
    code = 0
    for code, failure in outcomes:
        code = 137 if code is None else code
        if code in (0, REQUEUE_EXIT):
            continue
        why = policy.not_a_fault(code, failure)
        if why:
            return code, why
        policy.last = failure
    if code not in (0, REQUEUE_EXIT) and max_restarts >= 1:
        return REQUEUE_EXIT, None
    return code, None
