"""Joining the process group, with two timeouts instead of one.

`init_process_group(timeout=T)` uses T both for the rendezvous (connecting to node 0's store)
and for every collective after it. The two want different values: nodes of a job start minutes
apart (image pulls, a slow node, SLURM starting steps one by one), while a collective that waits
minutes in training means a rank is gone. So the store is made here, with the set-up allowance
for connecting (and for the waits that go through it, pargo_dist/runtime/store_sync.py) and for the
set-up's collectives, and the group gets `train.collective_timeout_s` once training begins.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from pargo_dist.runtime import torchrun
from pargo_dist.runtime.hang_detector import SETUP_ALLOWANCE_S


def join_process_group(backend: str) -> None:
    """The default group over the launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT), as
    `init_process_group("env://")` makes it, but with the set-up allowance as its timeout: for the
    rendezvous (the store, gloo's and NCCL's connections to every peer) and for the collectives
    of the set-up, which wait on ranks that build and read at the pace of their node.
    `set_collective_timeout` then gives training its own.

    Under torchrun, MASTER_ADDR:MASTER_PORT is its agent's store, which every attempt of the job
    shares: every rank joins it as a client, and this attempt's keys get a prefix of their own
    (runtime/torchrun.py says why)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    setup = datetime.timedelta(seconds=SETUP_ALLOWANCE_S)
    if torchrun.uses_agent_store():
        store = dist.PrefixStore(torchrun.start_prefix(), dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=setup))
    else:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0,
                              timeout=setup, wait_for_workers=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=setup)


def set_collective_timeout(seconds: float) -> None:
    """From now on, a collective of the default group that waits longer than `seconds` fails
    (train.collective_timeout_s), through torch's private `distributed_c10d._set_pg_timeout`
    (docs/architecture.md lists it). Called once every rank has finished setting up."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if dist.is_initialized() and seconds:
        _set_pg_timeout(datetime.timedelta(seconds=seconds))
