"""Exit codes, what they mean, and how a rank that fails leaves.

The launcher, the SLURM batch script and a Kubernetes job controller decide from a rank's exit
code alone whether to restart, requeue or end a run, so the codes are one table, here, below
everything that exits. A rank that raises leaves at once with its code (`leave_now`), never
waiting in a collective its peers will not join, and writes what failed at which step
(`record_failure`) where its launcher reads it (`recorded_failure`): the same error at the same
step twice is a bug, not a fault, and is not restarted.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from pathlib import Path

from pargo_dist.errors import TryAgainLater, UserError
from pargo_dist.runtime.store_sync import PeerFailed, abort_default, linger

REQUEUE_EXIT = 75  # the trainer's "saved, run me again" (EX_TEMPFAIL)
HANG_EXIT = 124  # the hang detector's "no progress" (as timeout(1) reports a timeout)
PEER_LOST_EXIT = 3  # a rank whose collective failed because another rank went away (not the cause)

EXIT_MEANINGS = {0: "finished",
                 REQUEUE_EXIT: "asks to be requeued (saved after a signal, the store lacks the newest checkpoint, "
                               "or the in-job restarts are spent)",
                 HANG_EXIT: "hang detector: a rank made no progress", 1: "failed: its traceback is above",
                 2: "a bad recipe, argument or input: the line above says what to change",
                 PEER_LOST_EXIT: "lost a peer rank: the failing rank's own error is above, or in another node's log",
                 137: "killed (SIGKILL: out of memory, or the job was cancelled)"}

FAILURE_DIR_ENV = "PARGO_DIST_FAILURE_DIR"  # where a failing rank writes what failed, for the restart decision


# What gloo and NCCL say when the other end of a collective has gone away.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "remote process exited", "NCCL communicator was aborted", "ncclRemoteError")


def lost_a_peer(err: BaseException) -> bool:
    """Whether `err` only says that another rank went away (a collective's peer, or a wait on the
    store that another rank aborted): not this rank's own failure."""
    return isinstance(err, PeerFailed) or (isinstance(err, RuntimeError) and any(t in str(err) for t in _PEER_GONE))


def record_failure(step: int, err: BaseException) -> None:
    """What failed, at which step (0: in set-up), for the launcher's restart decision
    (launch.restarts.RestartPolicy: the same error at the same step again is not restarted).
    Written where the launcher says (FAILURE_DIR_ENV), only for what a restart could cure: not a
    UserError or a lost peer."""
    where = os.environ.get(FAILURE_DIR_ENV)
    if not where or isinstance(err, (UserError, TryAgainLater, KeyboardInterrupt)) or lost_a_peer(err):
        return
    error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    rank = int(os.environ.get("RANK", "0"))
    path = Path(where) / f"rank_{rank:05d}.json"
    try:  # whole or absent: the launcher may read it at any moment
        path.with_suffix(".tmp").write_text(json.dumps({"step": step, "error": error}))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError:
        pass


def record_exit(code: int) -> None:
    """How this rank ended (its exit code), beside its failure record, where the launcher says
    (FAILURE_DIR_ENV). torchrun reports only "a worker failed" (exit 1), so our `--torchrun`
    wrapper, and a rank restarted by torchrun, read the ranks' own codes from these files
    (`attempt_outcome`)."""
    where = os.environ.get(FAILURE_DIR_ENV)
    if not where:
        return
    path = Path(where) / f"exit_{int(os.environ.get('RANK', '0')):05d}"
    try:
        path.with_suffix(".tmp").write_text(str(code))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError:
        pass


def attempt_outcome(where: Path) -> tuple[int | None, dict | None]:
    """What one start of a node's ranks ended with, from their records (`record_exit`,
    `record_failure`): the code of the rank that caused it (the lowest rank whose code is neither
    0, 75 nor PEER_LOST_EXIT), else 75 if every rank that recorded asked for a requeue, else
    PEER_LOST_EXIT if one lost a peer (the cause is on another node); None when no rank recorded
    (killed: out of memory, SIGKILL). With the cause's failure record, if it wrote one."""
    codes = {}
    for path in sorted(where.glob("exit_*")):
        try:
            codes[int(path.name.split("_")[1])] = int(path.read_text())
        except (OSError, ValueError):
            continue
    causes = [rank for rank, code in sorted(codes.items()) if code not in (0, REQUEUE_EXIT, PEER_LOST_EXIT)]
    if causes:
        return codes[causes[0]], recorded_failure(where, causes[0])
    if codes and all(code == REQUEUE_EXIT for code in codes.values()):
        return REQUEUE_EXIT, None
    if PEER_LOST_EXIT in codes.values():
        return PEER_LOST_EXIT, recorded_failure(where, None)
    return (0 if codes else None), recorded_failure(where, None)


def leave_now(err: BaseException) -> None:
    """A rank that raises must not wait in a collective (the teardown barrier, the next step's
    all-reduce) that its peers will never join: print why and end this process now. The
    launcher sees the exit code, names the rank and stops the others within seconds.

    A rank whose collective failed only because another rank died says so in one line and exits
    with PEER_LOST_EXIT, so that the launcher reports the rank that caused it, with its traceback."""
    rank = os.environ.get("RANK", "0")
    if not lost_a_peer(err):  # every rank waiting on the store, on every node, stops now with this line
        first = (str(err).splitlines() or [""])[0][:300]
        abort_default(f"rank {rank} on {socket.gethostname()} failed: {type(err).__name__}: {first}")
    elif isinstance(err, PeerFailed):
        linger()  # (rank 0: the store stays until the others have read why)
    if isinstance(err, UserError):
        print(f"pargo-dist train: rank {rank}: error: {err}", file=sys.stderr)
        code = 2
    elif isinstance(err, TryAgainLater):
        print(f"pargo-dist train: rank {rank}: {err}; exiting with {REQUEUE_EXIT} for requeue", file=sys.stderr)
        code = REQUEUE_EXIT
    elif isinstance(err, KeyboardInterrupt):
        code = 130
    elif isinstance(err, PeerFailed):
        print(f"pargo-dist train: rank {rank}: {err}", file=sys.stderr)
        code = PEER_LOST_EXIT
    elif lost_a_peer(err):
        print(f"pargo-dist train: rank {rank}: a peer rank went away during a collective "
              f"({str(err).splitlines()[0][:200]})", file=sys.stderr)
        code = PEER_LOST_EXIT
    else:
        print(f"pargo-dist train: rank {rank} failed:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        code = 1
    record_exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def recorded_failure(where: Path, rank: int | None) -> dict | None:
    """What the failing rank wrote before it exited (record_failure); None if it could not
    (killed, or no exception: the hang detector)."""
    files = [where / f"rank_{rank:05d}.json"] if rank is not None else []
    files += sorted(where.glob("rank_*.json"))
    for path in files:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None
