"""Start the ranks of a run on this machine (or on one node of several).

Used by `pargo-dist train --nproc N`, by `make demo`, and inside sbatch (one launcher per
node, with --nnodes / --node-rank / --master from SLURM's variables). Keeping one entry point
means the demo, a laptop and a cluster start ranks the same way.

    python launchers/local.py --nproc 2 -- recipes/tiny-cpu.yaml optim.lr=3e-4
    pargo-dist train recipes/tiny-cpu.yaml --nproc 2 optim.lr=3e-4      # the same

Why not torchrun: its agent answers SIGTERM by terminating the workers itself (and exits with
-15, losing their exit codes), while a preempted job needs the opposite: every rank must get
the signal, finish its step, save, and the launcher must report "requeue me" (exit 75). This
launcher sets the same variables torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...),
forwards SIGTERM / SIGUSR1 / SIGINT to every rank, and returns 75 only if every rank saved
and asked for it; if one rank fails, the others are stopped and its exit code is returned.
Ranks die with the launcher (PR_SET_PDEATHSIG), so a killed job leaves no orphans.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

REQUEUE_EXIT = 75
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(local_rank: int, nproc: int, nnodes: int, node_rank: int, master: str) -> dict[str, str]:
    host, _, port = master.partition(":")
    return {**os.environ, "RANK": str(node_rank * nproc + local_rank), "WORLD_SIZE": str(nnodes * nproc),
            "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(node_rank),
            "NODE_RANK": str(node_rank), "MASTER_ADDR": host, "MASTER_PORT": port,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch(nproc: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0, master: str | None = None,
           grace: float = 600.0) -> int:
    """Run `pargo-dist train <train_args>` on nproc local ranks; returns the run's exit code."""
    master = master or f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "pargo_dist.cli", "train", *train_args]
    procs = [subprocess.Popen(cmd, env=rank_env(r, nproc, nnodes, node_rank, master), preexec_fn=_die_with_parent)
             for r in range(nproc)]
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0, REQUEUE_EXIT)]
            if failed:
                _stop(procs, grace=10.0)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c is not None for c in codes):
                return REQUEUE_EXIT if REQUEUE_EXIT in codes else 0
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(procs, grace=grace if received else 10.0)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def single_process_env() -> None:
    """The variables a launcher would set, for a one-rank run started directly."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--master", help="host:port of node 0's rendezvous (multi-node)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- recipe.yaml key=value ...")
    args = ap.parse_args()
    rest = [a for a in args.train_args if a != "--"]
    return launch(args.nproc, rest, nnodes=args.nnodes, node_rank=args.node_rank, master=args.master)


if __name__ == "__main__":
    sys.exit(main())
