"""Checkpoint layout and lifecycle, independent of the training backend.

The checkpoint format lives here: the layout, the run-level state, how to find a checkpoint from
a run dir. Reading a checkpoint's weights back into a model, whatever backend wrote them, is
pargo_dist/weights.py (init_from, export and elastic resume all use `load_trained_weights`).

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N:08d>/`:

    ds/ or megatron/     model and optimizer shards, written by the backend (DEEPSPEED_DIR: a
                         DeepSpeed tag dir; MEGATRON_DIR: a megatron distributed checkpoint)
    rank_<r:05d>.pt      per rank: RNG states (python, numpy, torch CPU and CUDA)
    meta.json            rank 0: the run's `TrainState` (step, samples seen, loader position, ...)
    config.yaml          rank 0: the resolved config the run was started with
    COMPLETE             written last, after every rank has finished writing

The one rule that makes crashes harmless: a directory counts as a checkpoint only if it
holds the COMPLETE marker (and a readable meta.json). The marker is written by rank 0 only
after a barrier that every rank reaches when its own files are written, and it is written
atomically (temp file, fsync, rename, fsync of the directory), so whatever moment a job is
killed at, a directory either is a whole checkpoint or is ignored. Deletion runs the same
rule backwards: the marker goes first, then the files, so a crash halfway through deleting
leaves an ignored directory, never a partial one that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pargo_dist.errors import UserError

COMPLETE = "COMPLETE"
META = "meta.json"
CONFIG = "config.yaml"
DEEPSPEED_DIR = "ds"  # DeepSpeed's checkpoint tag: engine.save_checkpoint(step_dir, tag=DEEPSPEED_DIR)
MEGATRON_DIR = "megatron"  # a megatron-core distributed checkpoint (reshards to any TP/PP/DP layout)
_STEP_DIR = re.compile(r"^step_(\d+)$")


# -- small file helpers ----------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[object], None], binary: bool) -> None:
    """Write via a temp file in the same dir, fsync it, then rename over `path`.

    Readers see either the old file, no file, or the whole new one; never a truncated one.
    The temp name carries the pid so two writers never share a temp file.
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), binary=False)


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if it is missing, truncated or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- RNG state -------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every RNG this process draws from, so a resumed run continues the same random stream."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices both the
    saving and the restoring process have (a resume may see a different device count)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[device], device)


# -- the run-level state ---------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run stands at a checkpoint, for every rank alike (meta.json, readable without torch).

    Versioned: `version` says which fields a file has. Files from before versioning (version 0)
    read with the defaults below; a file from a newer pargo_dist is refused rather than half read.
    """

    step: int
    samples_seen: int = 0  # global samples consumed (any rank count): where the data resumes
    tokens_seen: int = 0
    skipped: int = 0  # corrupt samples replaced so far
    stream_samples: dict[str, int] = field(default_factory=dict)  # per dataset of a mixture
    world_size: int = 1  # ranks that wrote it (another count resumes elastically, see Backend.load)
    stage: str = "finetune"
    backend: str = "deepspeed"  # only this backend can resume it
    layout: dict[str, int] = field(default_factory=dict)  # dp / tp / pp / zero_stage
    loader: dict[str, Any] | None = None  # the streaming loader's state_dict
    trackers: dict[str, str] = field(default_factory=dict)  # tracker -> run id (W&B, MLflow), continued on resume
    version: int = 1

    VERSION = 1  # (not a field: no annotation)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, where: Path | str = META) -> "TrainState":
        version = data.get("version", 0)
        if not isinstance(version, int) or version > cls.VERSION:
            raise UserError(f"{where}: train state version {version!r} is newer than this pargo_dist reads "
                            f"({cls.VERSION}): resume with the version that wrote it, or upgrade")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and version == cls.VERSION:
            raise UserError(f"{where}: unknown train state fields {unknown} (a damaged or foreign file?)")
        if "step" not in data:
            raise UserError(f"{where}: no 'step' in the train state")
        return cls(**{k: v for k, v in data.items() if k in names and k != "version"})


# -- the manager -----------------------------------------------------------------------


class CheckpointManager:
    """Creates, commits, finds and prunes checkpoints under `<run_dir>/checkpoints`.

    Every rank constructs one; the collective methods (`begin`, `commit`) must be called by
    all ranks in the same order, since they synchronise through `barrier`. Filesystem
    changes to shared files (creating or deleting a step dir, meta, marker) are made by
    rank 0 only; each rank writes just its own `rank_<r>.pt`.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] | None = None, remote: str | None = None):
        if keep_last < 1:
            raise UserError(f"keep_last must be >= 1 (the newest complete checkpoint is always kept), "
                             f"got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier
        # checkpoint.remote: complete checkpoints are uploaded there, and found there at resume
        self.remote = None
        if remote:
            from pargo_dist.remote_checkpoints import RemoteCheckpoints

            self.remote = RemoteCheckpoints(remote, self.root)

    def barrier(self) -> None:
        if self._barrier is not None:
            self._barrier()

    # -- layout ----------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def _step_dirs(self) -> dict[int, Path]:
        """Every `step_<N>` directory under the root, complete or not, by step."""
        if not self.root.is_dir():
            return {}
        found = {}
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
        return found

    @staticmethod
    def is_complete(step_dir: Path) -> bool:
        """Marker present and meta.json readable. The meta check guards against a directory
        whose files were damaged after the fact (e.g. a truncated copy)."""
        step_dir = Path(step_dir)
        return (step_dir / COMPLETE).is_file() and _read_json(step_dir / META) is not None

    def complete_steps(self) -> list[int]:
        return sorted(step for step, path in self._step_dirs().items() if self.is_complete(path))

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def resolve(self, resume: str) -> Path | None:
        """`checkpoint.resume` -> the directory to load, or None for a fresh start.

        "auto" is the newest complete checkpoint (None if there is none yet); "none" never
        resumes; anything else is a checkpoint directory that must be complete, since
        silently starting from scratch when a named checkpoint is unusable loses work.
        """
        if resume == "auto":
            latest = self.latest()
            if latest is None and self.remote is not None:
                latest = self._fetch_remote()
            return latest
        if resume == "none":
            return None
        path = Path(resume)
        if path.is_dir() and self.is_complete(path):
            return path
        if not path.is_dir():
            problem = "does not exist"
        elif not (path / COMPLETE).is_file():
            problem = f"has no {COMPLETE} marker (an interrupted save)"
        else:
            problem = f"has an unreadable {META}"
        available = [str(self.step_dir(s)) for s in self.complete_steps()]
        listing = ", ".join(available) if available else f"none under {self.root}"
        raise UserError(f"cannot resume from checkpoint {path}: it {problem}. "
                         f"Complete checkpoints available: {listing}")

    def _fetch_remote(self) -> Path | None:
        """Collective: no complete checkpoint here (a job requeued onto new nodes), so the newest
        complete one in checkpoint.remote is downloaded, by one rank per node (LOCAL_RANK 0;
        nodes sharing a filesystem download once), and the others wait."""
        if int(os.environ.get("LOCAL_RANK", self.rank)) == 0:
            fetched = self.remote.fetch_newest()
            if fetched is not None and self.rank == 0:
                print(f"no complete checkpoint under {self.root}: downloaded {fetched.name} from {self.remote.url}",
                      flush=True)
        self.barrier()
        return self.latest()

    # -- writing ---------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """Collective. Start writing checkpoint `step`; returns its (empty) directory.

        A leftover directory of the same step is from an interrupted save (or, if complete,
        an earlier save of the same step, e.g. a save right after resuming): it is deleted,
        marker first, so the new files never mix with old ones.
        """
        path = self.step_dir(step)
        if self.rank == 0:
            if path.exists() or path.is_symlink():
                self._delete(path)
            path.mkdir(parents=True)
        self.barrier()
        return path

    def save_rank_state(self, step_dir: Path, state: dict) -> None:
        """Every rank: its own state (RNG, loader position), atomically."""
        step_dir = Path(step_dir)
        _atomic_write(step_dir / f"rank_{self.rank:05d}.pt", lambda f: torch.save(state, f), binary=True)

    def save_state(self, step_dir: Path, state: TrainState, config_yaml: str | None = None) -> None:
        """Rank 0: the run-level state (JSON, so it can be read without torch) and the
        resolved config, so a checkpoint is reproducible from its own directory."""
        if self.rank != 0:
            return
        step_dir = Path(step_dir)
        _write_text(step_dir / META, state.to_json())
        if config_yaml is not None:
            _write_text(step_dir / CONFIG, config_yaml)

    def commit(self, step_dir: Path, step: int) -> None:
        """Collective. Make the checkpoint count, then prune old ones.

        The first barrier is the point after which every rank (and the backend on every
        rank) has finished writing. Rank 0 then flushes the directory's files to disk and
        only then writes the marker, so the marker can never be durable before the data.
        """
        step_dir = Path(step_dir)
        self.barrier()
        if self.rank == 0:
            self._fsync_tree(step_dir)
            marker = {"step": step, "time": time.time(), "world_size": self.world_size}
            _write_text(step_dir / COMPLETE, json.dumps(marker))
            try:
                self.cleanup()
            except OSError as err:  # a failed prune must not take down the run (or hang the barrier)
                warnings.warn(f"checkpoint cleanup under {self.root} failed: {err}", stacklevel=2)
        self.barrier()
        if self.remote is not None:  # every rank its own files, then the remote marker
            self.remote.upload(step_dir, self.rank, self.world_size, self.barrier, self.keep_last)

    @staticmethod
    def _fsync_tree(step_dir: Path) -> None:
        """fsync every file and directory written into the checkpoint by any rank.

        On a local disk the page cache is shared, so rank 0 can flush the other ranks'
        files; on network filesystems the writers' close() already pushed their data.
        """
        for dirpath, _, filenames in os.walk(step_dir):
            for name in filenames:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(dirpath))

    # -- reading ---------------------------------------------------------------------

    @staticmethod
    def load_state(step_dir: Path) -> TrainState:
        path = Path(step_dir) / META
        meta = _read_json(path)
        if meta is None:
            raise UserError(f"{path} is missing or unreadable")
        return TrainState.from_dict(meta, path)

    def _saved_world_size(self, step_dir: Path) -> int | None:
        marker = _read_json(step_dir / COMPLETE) or {}
        meta = _read_json(step_dir / META) or {}
        return marker.get("world_size", meta.get("world_size"))

    def load_rank_state(self, step_dir: Path, rank: int | None = None) -> dict | None:
        """This rank's (or `rank`'s) saved state.

        None when the checkpoint was written by fewer ranks than `rank + 1` (an elastic
        resume on more ranks): the caller then restores only rank-independent state. A
        file missing for a rank that did save is a damaged checkpoint and raises.
        """
        step_dir = Path(step_dir)
        rank = self.rank if rank is None else rank
        path = step_dir / f"rank_{rank:05d}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)
        saved = self._saved_world_size(step_dir)
        if saved is not None and rank >= saved:
            return None
        raise FileNotFoundError(f"{path} is missing from checkpoint {step_dir} "
                                f"(written by {saved if saved is not None else 'an unknown number of'} ranks)")

    # -- pruning ---------------------------------------------------------------------

    def cleanup(self) -> None:
        """Keep the newest `keep_last` complete checkpoints.

        Deletes older complete ones and every incomplete directory older than the newest
        complete one (leftovers of interrupted saves). An incomplete directory *newer* than
        the newest complete one is left alone: it may be a save in progress. The newest
        complete checkpoint is never deleted, since keep_last >= 1.
        """
        dirs = self._step_dirs()
        complete = sorted(step for step, path in dirs.items() if self.is_complete(path))
        if not complete:
            return
        newest = complete[-1]
        keep = set(complete[-self.keep_last:])
        for step in sorted(dirs):
            if step < newest and step not in keep:
                self._delete(dirs[step])

    def _delete(self, path: Path) -> None:
        """Remove one step dir: marker first (so a crash mid-way leaves an ignored directory,
        not a partial one that looks complete), then the rest.

        Only direct children of the checkpoints dir are touched; a step dir that is a
        symlink is unlinked, never followed, and rmtree itself never follows links.
        """
        if path.parent.resolve() != self.root.resolve() or not _STEP_DIR.match(path.name):
            raise ValueError(f"refusing to delete {path}: not a step dir under {self.root}")
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        marker = path / COMPLETE
        if marker.is_file() or marker.is_symlink():
            marker.unlink()
            _fsync_dir(path)
        shutil.rmtree(path)


# -- finding checkpoints -----------------------------------------------------------------


def run_dir_of(step_dir: Path) -> Path:
    """The run dir a checkpoint belongs to (<run>/checkpoints/step_N)."""
    return Path(step_dir).parent.parent


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a run dir (its newest complete checkpoint), or a run's checkpoint.remote
    URL (s3://...: its newest complete checkpoint, downloaded to a cache dir first)."""
    if "://" in str(path):
        from pargo_dist.remote_checkpoints import RemoteCheckpoints, cache_dir

        fetched = RemoteCheckpoints(str(path), cache_dir(str(path)) / "checkpoints").fetch_newest()
        if fetched is None:
            raise UserError(f"{path} holds no complete checkpoint (no step_*/COMPLETE object)")
        return fetched
    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = CheckpointManager(path).latest()
        if latest is None:
            raise UserError(f"{path} has no complete checkpoint")
        return latest
    return CheckpointManager(run_dir_of(path)).resolve(str(path))
