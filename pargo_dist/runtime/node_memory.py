"""How much memory this node gives the job: the physical RAM, or less where a cgroup caps it.

A SLURM job (`--mem`), a container or a Kubernetes pod sees the whole machine's RAM through
sysconf but is killed at its cgroup's limit: decisions about what fits (whether ZeRO-3 reads a
pretrained LLM partitioned) must use the smaller of the two. Torch-free, so launchers and the
planner can call it.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_limits(root: Path) -> list[int]:
    """Every memory limit set for this process's cgroup: v2 (memory.max of its own group and of
    the root view) or v1 (memory.limit_in_bytes); "max" and v1's huge sentinel are no limit."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: the process's own group below the root
                candidates.append(root / path.lstrip("/") / "memory.max")
            elif "memory" in controllers.split(","):
                candidates.append(root / "memory" / path.lstrip("/") / "memory.limit_in_bytes")
    except (OSError, ValueError):
        pass
    limits = []
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            limits.append(int(text))
    return limits


def node_memory_bytes(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The physical memory, capped by the cgroup limit when one is set."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([physical, *_cgroup_limits(cgroup_root)])
