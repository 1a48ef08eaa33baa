"""Pruning a run's local checkpoints to `checkpoint.keep_last`, and deleting one safely.

Its own module: it runs once per commit on rank 0 (pargo_dist/checkpoint/manager.py), and deletion is
where a bug costs a run, so its rules sit in one place: the newest complete checkpoint is never
deleted, a directory that may be a save in progress is left alone, and a deletion cut short
leaves an ignored directory, never a partial one that looks complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

from pargo_dist.checkpoint.files import fsync_dir

COMPLETE = "COMPLETE"  # a step directory counts as a checkpoint only with this marker (manager.py)
STEP_DIR = re.compile(r"^step_(\d+)$")
# beside COMPLETE in a step directory a node downloaded only its ranks' share of (remote_checkpoints)
SHARE = "SHARE"


def prune(root: Path, keep_last: int, step_dirs: dict[int, Path], is_complete: Callable[[Path], bool],
          protect: set[int] = frozenset()) -> None:
    """Keep the newest `keep_last` complete checkpoints among `step_dirs` (step -> directory).

    Deletes older complete ones and every incomplete directory older than the newest
    complete one (leftovers of interrupted saves). An incomplete directory *newer* than
    the newest complete one is left alone: it may be a save in progress. The newest
    complete checkpoint is never deleted, since keep_last >= 1; nor is a step in `protect`
    (one whose upload to checkpoint.remote is in flight or queued: upload.UploadMirror).
    """
    complete = sorted(step for step, path in step_dirs.items() if is_complete(path))
    if not complete:
        return
    newest = complete[-1]
    keep = set(complete[-keep_last:]) | set(protect)
    for step in sorted(step_dirs):
        if step < newest and step not in keep:
            delete_step_dir(root, step_dirs[step])


def prune_to(root: Path, step_dirs: dict[int, Path], kept: list[int], protect: set[int] = frozenset()) -> None:
    """A filesystem without the marker (a node with a disk of its own): keep the steps rank 0's
    pruning kept (`kept`), any newer directory (a save in progress), and `protect`."""
    for step, path in step_dirs.items():
        if step < max(kept) and step not in kept and step not in protect:
            delete_step_dir(root, path)


def delete_step_dir(root: Path, path: Path) -> None:
    """Remove one step dir: marker first (so a crash mid-way leaves an ignored directory,
    not a partial one that looks complete), then the rest.

    Only direct children of `root` (the checkpoints dir) are touched; a step dir that is a
    symlink is unlinked, never followed, and rmtree itself never follows links.
    """
    path = Path(path)
    if path.parent.resolve() != Path(root).resolve() or not STEP_DIR.match(path.name):
        raise ValueError(f"refusing to delete {path}: not a step dir under {root}")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    marker = path / COMPLETE
    if marker.is_file() or marker.is_symlink():
        marker.unlink()
        fsync_dir(path)
    shutil.rmtree(path)
