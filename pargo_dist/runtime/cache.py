"""Where pargo_dist keeps what it can fetch again: one root, `PARGO_DIST_CACHE`.

    <root>/streaming/<hash of the remote>   streaming's local copy of a remote dataset's shards
    <root>/remote/<the checkpoint's URL>    a checkpoint `pargo-dist export` / `eval` downloaded

The default root is pargo_dist_cache in the temp dir (TMPDIR: SLURM and most clusters point it at
a node-local disk, where shards are read fastest); set PARGO_DIST_CACHE to a node-local disk with
room for a checkpoint when exporting or evaluating a large run from object storage. The name
PARGO_CACHE, read by earlier versions for the datasets only, is still honoured when
PARGO_DIST_CACHE is not set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV = "PARGO_DIST_CACHE"
_OLD_ENV = "PARGO_CACHE"


def cache_root() -> Path:
    root = os.environ.get(ENV) or os.environ.get(_OLD_ENV)
    return Path(root) if root else Path(tempfile.gettempdir()) / "pargo_dist_cache"


def cache_dir(kind: str) -> Path:
    """`<root>/<kind>`: "streaming" or "remote"."""
    return cache_root() / kind
