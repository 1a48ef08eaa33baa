"""`pargo-dist train --torchrun`: the ranks of this node started by torchrun's elastic agent, and
our exit code for the job controller.

Kubernetes (Kubeflow Trainer's TrainJob, the training-operator's PyTorchJob, plain JobSet) starts
one pod per node and, inside it, torchrun: its agent meets the other nodes (c10d or static
rendezvous), starts the ranks, and restarts all of them when one dies (`--max-restarts`). What
torchrun does not do is tell the job controller why it ended: it exits 1 whenever a worker
failed or a signal stopped it. A pod failure policy needs our codes (75: saved, retry the job; 2:
a bad recipe, do not; docs/kubernetes.md), so this wrapper is the pod's command:

    pargo-dist train --torchrun recipes/x.yaml --nproc 8          # torchrun's options from PET_*

It runs `python -m torch.distributed.run ... -m pargo_dist.cli train RECIPE ...` with
  - torchrun's options from the environment (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...: the
    operators set them; torchrun reads them itself), `--standalone` on one machine without them,
    `--nproc-per-node` from --nproc, `--max-restarts` from the recipe's run.max_restarts (under
    torchrun its agent restarts the ranks, and our launcher is not there: the number is the same,
    the actor differs), SIGUSR1 added to the signals torchrun forwards, and the ranks' grace
    after a signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, default `GRACE_S`) before torchrun kills them;
  - SIGTERM / SIGUSR1 / SIGINT passed on to torchrun, which passes them to every rank: each
    finishes its step, saves and exits 75;
  - afterwards, the code our launcher would have returned, from what each rank of this node
    recorded per attempt (runtime/exits.record_exit, runtime/torchrun.records_dir), replayed
    through our restart policy (launch/restarts.replay): 0; 75 when the ranks saved after a
    signal, or when torchrun's restarts are spent after faults (the job is recreated on other
    nodes); 2 for a bad input; the failing code for a bug that failed twice at the same step.

A rank that torchrun restarts after an attempt our launcher would not have restarted after (a
bad input, the same failure at the same step again) does not train: it exits at once with that
attempt's code (cli.cmd_train), so that the agent's remaining restarts cost seconds, not hours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pargo_dist.launch.restarts import replay
from pargo_dist.runtime.exits import EXIT_MEANINGS, REQUEUE_EXIT, attempt_outcome
from pargo_dist.runtime.signals import hold_signals, release_signals

GRACE_S = 300  # seconds torchrun gives the ranks to save after a signal (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
RECORDS_ENV = "PARGO_DIST_TORCHRUN_RECORDS"  # read by runtime/torchrun.records_root


def torchrun_command(nproc: int, train_args: list[str], max_restarts: int, env: dict[str, str]) -> list[str]:
    """torchrun's command line for this node; options the environment already gives (PET_*) are
    left to it."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if "PET_NPROC_PER_NODE" not in env:
        cmd.append(f"--nproc-per-node={nproc}")
    if "PET_MAX_RESTARTS" not in env:
        cmd.append(f"--max-restarts={max_restarts}")
    if "PET_SIGNALS_TO_HANDLE" not in env:
        cmd.append("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    if not any(key in env for key in ("PET_NNODES", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT", "PET_STANDALONE")):
        cmd.append("--standalone")  # one machine: a c10d rendezvous on a free local port
    return [*cmd, "-m", "pargo_dist.cli", "train", *train_args]


def run_under_torchrun(nproc: int, train_args: list[str], max_restarts: int) -> int:
    """Run torchrun for this node (see the module docstring); returns our exit code."""
    with tempfile.TemporaryDirectory(prefix="pargo-torchrun-") as records:
        env = {**os.environ, RECORDS_ENV: records}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(GRACE_S))
        env.setdefault("OMP_NUM_THREADS", "1")
        hold_signals()  # (torchrun starts with them open: its handler passes them on to the ranks)
        proc = subprocess.Popen(torchrun_command(nproc, train_args, max_restarts, env), env=env,
                                preexec_fn=release_signals)
        received: list[int] = []

        def forward(signum, _frame):
            received.append(signum)
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        release_signals()
        try:
            torchrun_code = proc.wait()  # (a signal runs `forward` and the wait goes on)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if torchrun_code == 0:
            return 0
        attempts = sorted(Path(records).glob("attempt_*"))
        if not attempts:  # no rank started: torchrun's own error (its log above), or a signal before the ranks
            code = REQUEUE_EXIT if received else torchrun_code
            print(f"pargo-dist train --torchrun: torchrun exited {torchrun_code} before any rank started; "
                  f"exiting {code}", file=sys.stderr, flush=True)
            return code
        code, why = replay([attempt_outcome(a) for a in attempts], max_restarts)
        print(f"pargo-dist train --torchrun: torchrun exited {torchrun_code} after {len(attempts)} attempt(s); "
              f"exiting {code} ({EXIT_MEANINGS.get(code, 'failed')})" + (f": not retrying, {why}" if why else ""),
              file=sys.stderr, flush=True)
        return code
