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

PROBES = ".filesystem_probes"


@dataclass(frozen=True)
class FilesystemGroup:
    """The ranks that see this rank's `directory`, and whether this rank acts for them."""

    ranks: tuple[int, ...]
    rank: int

    @property
    def leader(self) -> bool:
        return self.rank == min(self.ranks)


def filesystem_group(sync, directory: Path) -> FilesystemGroup:
    """Collective over `sync` (pargo_dist.runtime.store_sync): probe files in `directory/.filesystem_probes`,
    named with a token rank 0 draws for this call (so files left by a killed run never count),
    listed after every rank wrote its own, and removed after every rank listed them."""
    directory = Path(directory) / PROBES
    directory.mkdir(parents=True, exist_ok=True)
    token = sync.share("filesystem probe token", lambda: uuid.uuid4().hex)
    mine = directory / f"{token}.{sync.rank}"
    mine.touch()
    sync.barrier("filesystem probes written")
    seen = sorted(int(p.name.rsplit(".", 1)[1]) for p in directory.glob(f"{token}.*"))
    sync.barrier("filesystem probes listed")
    mine.unlink(missing_ok=True)
    return FilesystemGroup(tuple(seen), sync.rank)
