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


def _up_from(base: Path, path: str) -> list[Path]:
    """base/path and every directory above it up to base: a cgroup and its ancestors."""
    parts = [p for p in path.strip("/").split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _cgroup_limits(root: Path, proc_cgroup: Path = Path("/proc/self/cgroup")) -> list[int]:
    """Every memory limit on this process's cgroup and its ancestors (a limit on any of them
    applies): v2's memory.max, v1's memory.limit_in_bytes; "max" and v1's huge sentinel are no
    limit. SLURM's cgroup v2 plugin sets the job's limit on the job's and the step's groups,
    above the task's own, and a container sees a cgroup namespace's root."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: the process's own group and its ancestors
                candidates += [d / "memory.max" for d in _up_from(root, path)]
            elif "memory" in controllers.split(","):
                candidates += [d / "memory.limit_in_bytes" for d in _up_from(root / "memory", path)]
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


def node_memory_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The physical memory, capped by the lowest cgroup limit on the way up when one is set."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([physical, *_cgroup_limits(cgroup_root, proc_cgroup)])
