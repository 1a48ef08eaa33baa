"""Which ranks share a filesystem, so that per-filesystem work is done once on each.

A run directory may be one shared filesystem for every node (Lustre, NFS), or a local disk per
node (no shared disk: each node has its own `run.dir`), or anything between (racks sharing a
filer). Work on files (downloading a checkpoint, converting it for an elastic resume, writing a
COMPLETE marker, pruning) must happen once per filesystem: on every one that needs it, and on no
filesystem twice. Hostnames do not tell: two nodes may share a filer, and one host may hold
several run directories. So it is asked of the filesystem itself: every rank writes a probe file
into the directory, and the ranks whose files it can see are on the same filesystem. The lowest
of them is that filesystem's leader.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pargo_dist.errors import UserError

PROBES = ".filesystem_probes"


@dataclass(frozen=True)
class FilesystemGroup:
    """The ranks that see this rank's `directory`, and whether this rank acts for them."""

    ranks: tuple[int, ...]
    rank: int

    @property
    def leader(self) -> bool:
        return self.rank == min(self.ranks)


def filesystem_group(sync, directory: Path, listing: Callable[[Path, str], list[str]] | None = None) -> FilesystemGroup:
    """Collective over `sync` (pargo_dist.runtime.store_sync): every rank writes a probe file into
    `directory/.filesystem_probes`, named with a token rank 0 draws for this call (so files left by
    a killed run never count), and lists which ranks' probes it sees; rank 0 decides the groups
    from every rank's view and shares them, so that every rank acts on one decision.

    Seeing another rank's probe proves a shared filesystem; not seeing it does not prove the
    opposite (NFS caches directory listings for up to a minute). So ranks are grouped by who
    sees whom, in either direction and through others (connected components), and two ranks of
    one filesystem never both lead because one listing lagged. A rank that cannot see its own
    probe has a run directory it cannot trust: a named error. `listing(directory, pattern)`: the
    probe names a rank sees (a test stands in a lagging filesystem)."""
    listing = listing or (lambda d, pattern: [p.name for p in d.glob(pattern)])
    directory = Path(directory) / PROBES
    directory.mkdir(parents=True, exist_ok=True)
    token = sync.share("filesystem probe token", lambda: uuid.uuid4().hex)
    mine = directory / f"{token}.{sync.rank}"
    mine.touch()
    sync.barrier("filesystem probes written")
    seen = sorted(int(name.rsplit(".", 1)[1]) for name in listing(directory, f"{token}.*"))
    views = sync.gather("filesystem probes seen", seen)
    sync.barrier("filesystem probes listed")
    mine.unlink(missing_ok=True)
    groups = sync.share("filesystem groups", lambda: decide_groups(views, directory))
    return FilesystemGroup(tuple(groups[sync.rank]), sync.rank)


def decide_groups(views: list[list[int]], directory: Path) -> list[list[int]]:
    """Rank -> the ranks of its filesystem, from every rank's view (rank r's list of the ranks
    whose probes it saw): the connected components of "saw", in either direction."""
    blind = [r for r, seen in enumerate(views) if r not in seen]
    if blind:
        raise FilesystemContradiction(
            f"rank(s) {blind} could not see the probe file each wrote into {directory}: the run directory "
            "does not show a rank its own writes (a full disk, a read-only or inconsistent mount); fix the "
            "mount, or give those nodes a run.dir of their own")
    parent = list(range(len(views)))

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for r, seen in enumerate(views):
        for other in seen:
            parent[root(other)] = root(r)
    members: dict[int, list[int]] = {}
    for r in range(len(views)):
        members.setdefault(root(r), []).append(r)
    return [sorted(members[root(r)]) for r in range(len(views))]


class FilesystemContradiction(UserError):
    """The ranks' views of their run directory cannot all be true."""
