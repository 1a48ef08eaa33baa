"""Files that are whole or absent: atomic writes, fsync of files and directories, tolerant reads.

The checkpoint's crash rule (pargo_dist/checkpoint/manager.py) rests on these: a marker is never durable
before the data it vouches for, and a reader never sees half a file under its real name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """Where `atomic_write` writes `path` before the rename: a hidden name with the writer's pid,
    so two writers never share a temp file."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def being_written(name: str) -> bool:
    """Whether a file name is an `atomic_write` temp file (a write in flight, or one a killed
    process left): never part of a checkpoint, never uploaded."""
    head, sep, pid = name.rpartition(".tmp.")
    return bool(sep) and head.startswith(".") and pid.isdigit()


def atomic_write(path: Path, write: Callable[[object], None], binary: bool) -> None:
    """Write via a temp file in the same dir, fsync it, then rename over `path`.

    Readers see either the old file, no file, or the whole new one; never a truncated one.
    """
    tmp = temp_name(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing, truncated or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def fsync_tree(step_dir: Path) -> list[str]:
    """fsync every file and directory under `step_dir`, whoever wrote them; returns the files'
    paths relative to `step_dir` (the walk is done: its listing serves the uploads too).

    On a local disk the page cache is shared, so one rank can flush the other ranks'
    files; on network filesystems the writers' close() already pushed their data.
    """
    found = []
    for dirpath, _, filenames in os.walk(step_dir):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            found.append(os.path.relpath(os.path.join(dirpath, name), step_dir))
        fsync_dir(Path(dirpath))
    return found
