"""Stale streaming shared memory, removed without touching the loaders of live processes.

mosaicml-streaming registers each dataset a process opens under a numbered prefix in /dev/shm
(`000003_locals`, `000003_barrier`, ...). A process killed without cleaning up leaves its prefix
behind, and the next dataset on the same local dir is refused ("Reused local directory"), so a
loader must clear stale prefixes before it starts. Streaming's `clean_stale_shared_memory()`
removes every prefix it finds, the live ones of other processes on the node included: a
`pargo-dist eval` started beside a training job would pull the shared memory from under the
job's loaders (and the test suite's two sessions had to get a /dev/shm each for this reason).

`remove_stale_shared_memory` removes a prefix only when no process maps any of its segments
(/proc/PID/maps): a live dataset keeps its segments mapped for as long as it exists. Processes
of other users cannot be read, and cannot map these segments either (0600, created by us).
"""

from __future__ import annotations

import os

SHM = "/dev/shm"


def mapped_shm_names() -> set[str]:
    """The /dev/shm names that some process (of ours) has mapped now."""
    names: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find(SHM + "/")
                    if at >= 0:
                        names.add(line[at + len(SHM) + 1:].split()[0])
        except OSError:  # gone meanwhile, or another user's
            continue
    return names


def stale_prefixes(live: set[str]) -> list[tuple[int, list[str]]]:
    """(prefix, its segment names) for each registered prefix, from 0 to the first unused one
    (where streaming stops looking too), whose segments no process maps (`live`: an empty set
    gives every registered prefix)."""
    from streaming.base.constant import SHM_TO_CLEAN

    stale, prefix = [], 0
    while True:
        present = [n for n in (f"{prefix:06}_{name}" for name in SHM_TO_CLEAN) if os.path.exists(os.path.join(SHM, n))]
        if not present:
            return stale
        if not live.intersection(present):
            stale.append((prefix, present))
        prefix += 1


def remove_stale_shared_memory() -> int:
    """Collective where a process group exists (or streaming would start one): local rank 0
    removes the stale prefixes, then every rank waits, as streaming's own cleanup does. Returns
    how many prefixes this rank removed."""
    import torch.distributed as dist
    from streaming.base.distributed import get_local_rank, maybe_init_dist

    started = maybe_init_dist()
    removed = 0
    registered = stale_prefixes(set()) if get_local_rank() == 0 and os.path.isdir(SHM) else []
    if registered:  # (every process's maps are read only when there is something to decide)
        live = mapped_shm_names()
        for names in (names for _, names in registered if not live.intersection(names)):
            for name in names:
                try:
                    os.unlink(os.path.join(SHM, name))
                except (FileNotFoundError, PermissionError):
                    pass
            removed += 1
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if started:
        dist.destroy_process_group()
    return removed
