"""Stale streaming shared memory is removed; a live process's is not (pargo_dist/data/shared_memory.py).

Streaming's own cleanup removes every registered prefix, so a loader starting beside another
process's (an eval beside a training job on one node) broke that process's loaders."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing import shared_memory

from pargo_dist.data.shared_memory import SHM, remove_stale_shared_memory, stale_prefixes


def free_prefixes(n: int) -> list[int]:
    """The first n prefixes from the first unused one (streaming registers contiguously from 0)."""
    start = 0
    while os.path.exists(os.path.join(SHM, f"{start:06}_locals")):
        start += 1
    return list(range(start, start + n))


def test_a_killed_runs_prefix_is_removed_and_live_ones_are_kept_in_this_process_and_another(tmp_path):
    mine, stale, theirs = free_prefixes(3)
    held = [shared_memory.SharedMemory(f"{mine:06}_{name}", create=True, size=16) for name in ("locals", "barrier")]
    left = [shared_memory.SharedMemory(f"{stale:06}_{name}", create=True, size=16) for name in ("locals", "barrier")]
    for shm in left:  # a killed process: its segments exist, nobody maps them
        shm.close()
    ready = tmp_path / "ready"
    other = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom multiprocessing import shared_memory, resource_tracker\n"
        f"s = shared_memory.SharedMemory('{theirs:06}_locals', create=True, size=16)\n"
        f"open({str(ready)!r}, 'w').close()\ntime.sleep(60)")])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert other.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert [p for p, _ in stale_prefixes(set()) if p in (mine, stale, theirs)] == [mine, stale, theirs]
        remove_stale_shared_memory()
        exists = {p: os.path.exists(os.path.join(SHM, f"{p:06}_locals")) for p in (mine, stale, theirs)}
        assert exists == {mine: True, stale: False, theirs: True}
        assert not os.path.exists(os.path.join(SHM, f"{stale:06}_barrier"))
    finally:
        other.kill()
        other.wait()
        for shm in held:
            shm.close()
            shm.unlink()
        for p in (stale, theirs):
            for name in ("locals", "barrier"):
                try:
                    os.unlink(os.path.join(SHM, f"{p:06}_{name}"))
                except FileNotFoundError:
                    pass
