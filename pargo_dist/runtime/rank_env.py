"""The environment a rank starts with: the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...), so that DeepSpeed, megatron-core and torch.distributed's `env://`
read the same values whoever started the rank: our launcher, SLURM or a one-process run.
"""

from __future__ import annotations

import os
import socket


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


def single_process_env() -> None:
    """The variables a launcher would set, for a one-rank run started directly."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
