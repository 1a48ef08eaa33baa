"""Start the ranks of a run on this machine: torchrun for N > 1, in-process env for N = 1.

Used by `pargo-dist train --nproc N`, by `make demo`, and inside sbatch (one call per node,
with --nnodes / --node-rank / --master from SLURM's variables). Keeping one entry point
means the demo, a laptop and a cluster start ranks the same way.

    python launchers/local.py --nproc 2 -- recipes/tiny-cpu.yaml optim.lr=3e-4
    pargo-dist train recipes/tiny-cpu.yaml --nproc 2 optim.lr=3e-4      # the same
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0,
                     master: str | None = None) -> list[str]:
    """The torchrun command line that runs `pargo-dist train <train_args>` on nproc ranks per node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes == 1 and master is None:
        cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    else:
        host, _, port = (master or "127.0.0.1:29500").partition(":")
        cmd += [f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port or 29500}"]
    return cmd + ["-m", "pargo_dist.cli", "train", *train_args]


def single_process_env() -> None:
    """The variables torchrun would set, for a one-rank run started directly."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def launch(nproc: int, train_args: list[str], **kw) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(torchrun_command(nproc, train_args, **kw), env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--master", help="host:port of node 0 (multi-node)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = [a for a in args.train_args if a != "--"]
    return launch(args.nproc, rest, nnodes=args.nnodes, node_rank=args.node_rank, master=args.master)


if __name__ == "__main__":
    sys.exit(main())
