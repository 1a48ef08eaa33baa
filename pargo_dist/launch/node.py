"""Start the ranks of a run on this machine (or on one node of several).

Used by `pargo-dist train --nproc N`, by `make demo`, and inside sbatch (one launcher per
node; `--slurm` derives --nnodes / --node-rank / --master from SLURM's variables, see
pargo_dist/launch/slurm.py). Keeping one entry point means the demo, a laptop and a cluster start
ranks the same way.

    python launchers/launch.py --nproc 2 -- recipes/tiny-cpu.yaml optim.lr=3e-4
    pargo-dist train recipes/tiny-cpu.yaml --nproc 2 optim.lr=3e-4      # the same
    srun --ntasks-per-node=1 python launchers/launch.py --slurm --nproc 8 -- recipes/x.yaml
    python launchers/launch.py --nproc 8 --nnodes 2 --node-rank 1 --master node0:29500 -- recipes/x.yaml

Why not torchrun: its agent answers SIGTERM by terminating the workers itself (and exits with
-15, losing their exit codes), while a preempted job needs the opposite: every rank must get
the signal, finish its step, save, and the launcher must report "requeue me" (exit 75). This
launcher sets the same variables torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...),
forwards SIGTERM / SIGUSR1 / SIGINT to every rank, and returns 75 only if every rank saved
and asked for it, or, under SLURM, when the run's in-job restarts are spent after faults (see
RestartPolicy: the job is requeued onto a fresh allocation); if one rank fails, the others are
stopped and its exit code is returned.
Ranks die with the launcher (PR_SET_PDEATHSIG), so a killed job leaves no orphans.

No signal is lost or fatal during start-up: `hold_signals()` blocks SIGTERM / SIGUSR1 from
the launcher's first line; ranks inherit the mask, so one that arrives while a rank still
imports torch stays pending until the trainer's handler is installed (StopSignal releases it)
and is honoured at the first step, instead of killing the rank with Python's default action.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from pargo_dist.errors import UserError
from pargo_dist.launch.restarts import RestartPolicy, restart_policy
from pargo_dist.runtime.exits import FAILURE_DIR_ENV, recorded_failure
from pargo_dist.runtime.rank_env import free_port, rank_env
from pargo_dist.runtime.signals import hold_signals, release_signals
from pargo_dist.launch.slurm import RESTARTS_SPENT, rendezvous_from_env
from pargo_dist.runtime.exits import EXIT_MEANINGS, PEER_LOST_EXIT, REQUEUE_EXIT

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
KILL_WAIT_S = 30.0  # how long a SIGKILLed rank may take to go (it dies when its kernel call returns)
# how long the other ranks of a failed start get to leave after SIGTERM before SIGKILL: they
# cannot save (a peer is gone) and most have left by themselves (their collective failed);
# what is left is stuck in a collective or a GPU call, or stopped
FAILED_RUN_GRACE_S = 1.5
PEER_GRACE_S = 2.0  # how long a rank that lost its peer waits to be explained by the failing rank


def launch(nproc: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0, master: str | None = None,
           grace: float = 600.0, announce: str | None = None, command: str = "train",
           restarts: RestartPolicy | None = None) -> int:
    """Run `pargo-dist <command> <train_args>` on nproc local ranks; returns the run's exit code.
    After a failure, start every rank again as `restarts` allows (see RestartPolicy), at a
    rendezvous of the new start's own (`start_master`); nodes of a multi-node run meet again,
    each launcher restarting its own ranks when they fail (a peer's death fails them too).
    Once the restarts are spent, under SLURM, it returns REQUEUE_EXIT instead of the failing
    code (RestartPolicy.requeue_instead): the job is requeued onto a fresh allocation."""
    policy = restarts or RestartPolicy()
    first_master, start = master, 0
    while True:
        master = start_master(first_master, start)
        with tempfile.TemporaryDirectory(prefix="pargo-failures-") as failures:
            code, local, received = _run_ranks(nproc, train_args, nnodes, node_rank, master, grace, announce, command,
                                               failures)
            failure = recorded_failure(Path(failures), node_rank * nproc + local if local is not None else None)
        announce = None
        if code in (0, REQUEUE_EXIT) or received or policy.max_restarts < 1:
            return code
        why = policy.refuse(code, failure)
        if why:
            print(f"pargo-dist launch: not restarting: {why}", file=sys.stderr, flush=True)
            if policy.requeue_instead(code, failure):
                print(f"{RESTARTS_SPENT}: exiting {REQUEUE_EXIT} instead of {code} so that "
                      "SLURM requeues the job onto a fresh allocation, where a node that cannot rejoin can be replaced",
                      file=sys.stderr, flush=True)
                return REQUEUE_EXIT
            return code
        n = policy.note(failure)
        start += 1
        print(f"pargo-dist launch: restart {n} of at most {policy.max_restarts} within {policy.window_s:g} s: every "
              "rank of this node starts again and resumes from the newest complete checkpoint", file=sys.stderr,
              flush=True)


def start_master(master: str | None, start: int) -> str:
    """Where start `start` (0, then 1 for the first in-job restart, ...) of the ranks meets: on one
    node a fresh port each time; across nodes the given port plus `start`. Every start has a
    store of its own, so no rank of a start can meet the previous start's store (its rank 0 may
    still be leaving, still serving the old keys); the node launchers restart in step (a failure
    anywhere fails every rank), so they count starts alike and meet at the same port."""
    if master is None:
        return f"127.0.0.1:{free_port()}"
    host, _, port = master.rpartition(":")
    return f"{host}:{int(port) + start}"


def die_with_parent() -> None:
    """In a rank, before it runs: ask the kernel to SIGKILL it when the launcher dies
    (PR_SET_PDEATHSIG), so that a launcher killed by the job's end leaves no rank behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_ranks(nproc: int, train_args: list[str], nnodes: int, node_rank: int, master: str, grace: float,
               announce: str | None, command: str, failures: str) -> tuple[int, int | None, list[int]]:
    """One start of the ranks: (exit code, the local rank that failed or None, signals received)."""
    cmd = [sys.executable, "-m", "pargo_dist.cli", command, *train_args]
    hold_signals()  # the ranks start with them held (see the module docstring)
    procs = [subprocess.Popen(cmd, env={**rank_env(r, nproc, nnodes, node_rank, master), FAILURE_DIR_ENV: failures},
                              preexec_fn=die_with_parent)
             for r in range(nproc)]
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    release_signals()  # one that arrived meanwhile is forwarded now
    if announce:
        print(announce, flush=True)
    first_failure = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, REQUEUE_EXIT)]
            if failed:
                first_failure = first_failure or time.monotonic()
                # a rank that only lost its peer is not the cause: give the cause a moment to show.
                # A rank that asked for a requeue (exit 75: the store unreachable mid-download) is one.
                causes = [(r, c) for r, c in failed if c != PEER_LOST_EXIT]
                causes += [(r, c) for r, c in enumerate(codes) if c == REQUEUE_EXIT and not causes]
                if causes or time.monotonic() - first_failure > PEER_GRACE_S:
                    local, code = (causes or failed)[0]
                    code = code if code > 0 else 128 - code  # killed by signal N: report 128+N, as shells do
                    print(f"pargo-dist launch: rank {node_rank * nproc + local} exited with {code} "
                          f"({EXIT_MEANINGS.get(code, 'see its error above')}); stopping the other ranks of this node",
                          file=sys.stderr, flush=True)
                    if nnodes > 1 and codes[local] < 0:  # killed: it could not tell the other nodes' ranks,
                        # which may wait on the store for this node's work (a rank that raised told them)
                        _abort_peers(master, f"rank {node_rank * nproc + local} on {socket.gethostname()} exited "
                                             f"with {code} ({EXIT_MEANINGS.get(code, 'see its log')})")
                    # the others wait in a collective that cannot finish
                    _stop(procs, grace=FAILED_RUN_GRACE_S, first_rank=node_rank * nproc)
                    return code, local, received
            elif all(c is not None for c in codes):
                return (REQUEUE_EXIT if REQUEUE_EXIT in codes else 0), None, received
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(procs, grace=grace if received else 10.0, first_rank=node_rank * nproc)


def _abort_peers(master: str, reason: str) -> None:
    """Wake the ranks of other nodes that wait on the store (pargo_dist/runtime/store_sync.py)
    for a rank that could not say so itself (killed outright, or out of memory). Best effort,
    a few seconds at most: the store lives in rank 0's process, which may be the one gone."""
    import datetime

    import torch.distributed as dist

    from pargo_dist.runtime.store_sync import NAMESPACE, abort_waits

    host, _, port = master.partition(":")
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=2))
    except Exception:  # noqa: BLE001  no store: no waiter either
        return
    abort_waits(store, NAMESPACE, reason)


def _stop(procs: list[subprocess.Popen], grace: float, first_rank: int = 0) -> None:
    """SIGTERM, then SIGKILL to what is left after `grace` s (a rank stuck in a collective or a
    GPU call, or stopped: SIGTERM stays pending on a stopped process, SIGKILL does not), and
    wait until it is gone, so that no rank outlives its start (a process in the kernel, such as
    a GPU driver call, dies only when the call returns: said, not waited for forever)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for r, p in enumerate(procs, start=first_rank):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"pargo-dist launch: rank {r} (pid {p.pid}) did not stop {grace:g} s after SIGTERM: SIGKILL",
                  file=sys.stderr, flush=True)
            p.kill()
            try:
                p.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                print(f"pargo-dist launch: rank {r} (pid {p.pid}) is still there {KILL_WAIT_S:g} s after SIGKILL "
                      "(stuck in the kernel or a driver); going on without it", file=sys.stderr, flush=True)


def check_layout_fits(cfg, world: int) -> None:
    """What can be refused before any rank starts, once the rank count is known: a megatron
    layout that does not divide the ranks or the LLM (heads, layers). The backend checks the
    built model again; this only spares a job its start-up (and on a cluster, its queue wait)."""
    b = cfg.backend
    if b.name != "megatron":
        return
    model_parallel = b.tensor_parallel * b.pipeline_parallel
    if world % model_parallel:
        raise UserError(f"{world} rank(s) do not divide into tensor_parallel x pipeline_parallel = {b.tensor_parallel} "
                        f"x {b.pipeline_parallel}: launch a multiple of {model_parallel} ranks")
    if (world // model_parallel) % b.expert_parallel:
        raise UserError(f"{world // model_parallel} data-parallel replica(s) do not divide into expert_parallel = "
                        f"{b.expert_parallel}: launch a multiple of {model_parallel * b.expert_parallel} ranks")
    llm = dict(cfg.model.llm.config)
    config_json = Path(cfg.model.llm.path or "") / "config.json"
    if not llm and cfg.model.llm.path and config_json.is_file():
        llm = json.loads(config_json.read_text())
    if llm:
        from pargo_dist.backends.megatron.layout import check_layout

        check_layout(SimpleNamespace(**{"model_type": "llama", **llm}), b.tensor_parallel, b.pipeline_parallel,
                     b.expert_parallel)


def prepare_training(recipe: str | None, overrides: list[str], world: int):
    """Before the ranks of a training run start: read and check the recipe (a bad one is said
    once, here), check its layout against the rank count, and write its synthetic data if it
    asks and it is absent, so that no rank waits on another for it. Returns the config."""
    from pargo_dist.config import load_config
    from pargo_dist.data.synthetic import prepare_for_recipe

    cfg = load_config(recipe, overrides)
    check_layout_fits(cfg, world)
    prepare_for_recipe(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    hold_signals()
    prog = "python -m pargo_dist.launch" if sys.argv[0].endswith("__main__.py") else None  # else the script's name
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1, help="ranks on this node (one per GPU)")
    ap.add_argument("--nnodes", type=int, default=1, help="nodes in the run")
    ap.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    ap.add_argument("--master", help="host:port of node 0's rendezvous (multi-node); after an in-job restart the "
                                     "nodes meet at port + 1, then port + 2, ... (a store of its own per start)")
    ap.add_argument("--slurm", action="store_true",
                    help="take nnodes, node rank and master from SLURM's variables (inside srun)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- recipe.yaml key=value ...")
    args = ap.parse_args(argv)
    rest = [a for a in args.train_args if a != "--"]
    if args.slurm:
        try:
            rdzv = rendezvous_from_env()
        except UserError as err:
            print(f"pargo-dist launch: error: {err}", file=sys.stderr)
            return 2
        args.nnodes, args.node_rank, args.master = rdzv.nnodes, rdzv.node_rank, rdzv.master
    recipe = rest[0] if rest and "=" not in rest[0] else None
    try:
        cfg = prepare_training(recipe, [a for a in rest[1 if recipe else 0:] if not a.startswith("--")],
                               args.nproc * args.nnodes)
    except UserError as err:  # a bad recipe: said once, here, before any rank starts
        print(f"pargo-dist launch: error: {err}", file=sys.stderr)
        return 2
    announce = (f"[pargo-dist] node {args.node_rank}/{args.nnodes} on {socket.gethostname()}: started {args.nproc} "
                f"rank(s), rendezvous {args.master or 'local'}")
    return launch(args.nproc, rest, nnodes=args.nnodes, node_rank=args.node_rank, master=args.master,
                  announce=announce, restarts=restart_policy(cfg))


if __name__ == "__main__":
    sys.exit(main())
