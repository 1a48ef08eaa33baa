"""What a rank started by torchrun's elastic agent knows of its start, and what it must do
differently from a rank of our own launcher.

torchrun (the engine Kubeflow's TrainJob and PyTorchJob start) keeps one TCPStore for the whole
job: on node 0's agent (the c10d rendezvous' shared store, or the static rendezvous' master
port), and MASTER_ADDR/MASTER_PORT name it (TORCHELASTIC_USE_AGENT_STORE=True). When a worker
dies the agent starts every worker again (TORCHELASTIC_RESTART_COUNT + 1) against the same store.
So a rank must (a) join that store as a client, never serve its own on the agent's port, and (b)
keep every key of its start apart from the previous start's: gloo's addresses, our waits
(runtime/store_sync.py). Without (b) a restarted worker reads the dead workers' addresses and
fails in connectFullMesh ("Connection refused"). Our own launcher needs neither: each start
meets at a store of its own (launch/node.start_master).

The records a failing rank leaves for the restart decision (runtime/exits.record_failure) go,
under torchrun, to a directory per attempt on the node, kept across attempts (`records_dir`), so
that a restarted rank can see what the previous attempts ended with (launch/restarts.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def under_torchrun() -> bool:
    """Whether torchrun's elastic agent started this process (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def uses_agent_store() -> bool:
    """Whether MASTER_ADDR:MASTER_PORT is the agent's store, shared by every attempt."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def attempt() -> int:
    """This start's number under torchrun: 0, then 1 after the agent's first restart, ..."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    """torchrun's --max-restarts (0 when not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def start_prefix() -> str:
    """The key prefix of this start in the agent's store: the run id and the attempt."""
    return f"pargo/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/attempt_{attempt()}"


def records_root() -> Path:
    """The node-local directory of this torchrun job's failure records, one subdirectory per
    attempt (`records_dir`). Named by the run id and the agent's store address, which every
    attempt of one job shares and no other job on the node has; our `--torchrun` wrapper names
    it itself (PARGO_DIST_TORCHRUN_RECORDS), so that it can read the ranks' exits afterwards."""
    given = os.environ.get("PARGO_DIST_TORCHRUN_RECORDS")
    if given:
        return Path(given)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    where = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}"
    return Path(tempfile.gettempdir()) / f"pargo-torchrun-{os.getuid()}-{run}-{where}"


def records_dir(n: int | None = None) -> Path:
    """Where the ranks of attempt `n` (default: this one) record how they ended."""
    return records_root() / f"attempt_{attempt() if n is None else n:03d}"
