"""Checkpoint layout and lifecycle, independent of the training backend.

The collective steps of a checkpoint's life live here: begin, commit, find (resolve), prune,
and the downloads and uploads of `checkpoint.remote`; what a checkpoint holds besides the
backend's shards is pargo_dist/checkpoint/state.py. Reading a checkpoint's weights back by HF
names, whatever backend wrote them, is pargo_dist/backends/trained_weights.py (`model.init_from`
and export use it; a resume at another layout is the backend's own `load`).

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
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from pargo_dist.checkpoint.pruning import COMPLETE, STEP_DIR, delete_step_dir, prune, prune_to
from pargo_dist.checkpoint.files import atomic_write, fsync_tree, read_json, write_text
from pargo_dist.checkpoint.state import CONFIG, META, TrainState
from pargo_dist.errors import TryAgainLater, UserError
from pargo_dist.runtime.store_sync import SETUP_ALLOWANCE_S, transfer_allowance
from pargo_dist.checkpoint.object_store import NodeShare, RemoteUnavailable, holds, share_of

# -- the manager -----------------------------------------------------------------------


class CheckpointManager:
    """Creates, commits, finds and prunes checkpoints under `<run_dir>/checkpoints`.

    Every rank constructs one; the collective methods (`begin`, `commit`) must be called by
    all ranks in the same order, since they synchronise through `barrier`. Filesystem
    changes to shared files (creating or deleting a step dir, meta, marker) are made by
    rank 0 only; each rank writes just its own `rank_<r>.pt`.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, rank: int = 0, world_size: int = 1,
                 sync=None, remote: str | None = None, say: Callable[[str], None] | None = None,
                 heartbeat: Callable[..., None] | None = None):
        if keep_last < 1:
            raise UserError(f"keep_last must be >= 1 (the newest complete checkpoint is always kept), "
                             f"got {keep_last}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        from pargo_dist.runtime.store_sync import LocalSync

        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        # waits on other ranks' work go through the store (pargo_dist/runtime/store_sync.py), not barriers
        self.sync = sync or LocalSync()
        self._filesystem = None
        self.say = say or (lambda text: print(text, flush=True) if rank == 0 else None)
        # heartbeat(what, allow=seconds): progress of long work for the hang detector (its `beat`)
        self.heartbeat = heartbeat or (lambda what, allow=None: None)
        # checkpoint.remote: complete checkpoints are uploaded there, and found there at resume
        self.remote = self.uploads = None
        if remote:
            from pargo_dist.checkpoint.upload import UploadMirror
            from pargo_dist.checkpoint.object_store import RemoteCheckpoints

            self.remote = RemoteCheckpoints(remote, self.root)
            if rank == 0:
                self.remote.check()  # a missing bucket ends the run now, with exit 2
            self.uploads = UploadMirror(self.remote, rank, world_size, getattr(self.sync, "store", None), keep_last,
                                        say=self.say, key=f"{getattr(self.sync, 'namespace', 'pargo')}/upload",
                                        logs=self.run_dir / "tb" if rank == 0 else None)

    def barrier(self, what: str = "checkpoint") -> None:
        self.sync.barrier(what)

    def join_filesystem_group(self):
        """Collective on the first call (every rank calls it at the same point: begin, resolve):
        which ranks see this rank's checkpoint directory (pargo_dist/runtime/filesystems.py). Later
        calls return the group found then."""
        if self._filesystem is None:
            from pargo_dist.runtime.filesystems import FilesystemGroup, filesystem_group

            if self.world_size == 1:
                self._filesystem = FilesystemGroup((0,), 0)
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                self._filesystem = filesystem_group(self.sync, self.root)
        return self._filesystem

    # -- layout ----------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def _step_dirs(self) -> dict[int, Path]:
        """Every `step_<N>` directory under the root, complete or not, by step."""
        if not self.root.is_dir():
            return {}
        found = {}
        for entry in self.root.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = entry
        return found

    @staticmethod
    def is_complete(step_dir: Path) -> bool:
        """Marker present and meta.json readable. The meta check guards against a directory
        whose files were damaged after the fact (e.g. a truncated copy)."""
        step_dir = Path(step_dir)
        return (step_dir / COMPLETE).is_file() and read_json(step_dir / META) is not None

    def complete_steps(self) -> list[int]:
        return sorted(step for step, path in self._step_dirs().items() if self.is_complete(path))

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def resolve(self, resume: str, loads_with: tuple[str, dict[str, int]] | None = None) -> Path | None:
        """`checkpoint.resume` -> the directory to load, or None for a fresh start. Collective.

        "auto" is the newest complete checkpoint (None if there is none yet), decided by rank 0
        for every rank (`_newest_for_all`); "none" never resumes; anything else is a checkpoint
        directory that must be complete, since silently starting from scratch when a named
        checkpoint is unusable loses work. `loads_with`: the backend's name and layout, which
        decide what a node downloads of a remote checkpoint (remote_checkpoints.NodeShare).
        """
        if resume == "auto":
            return self._newest_for_all(loads_with)
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

    def before(self, step: int, loads_with: tuple[str, dict[str, int]] | None = None) -> Path | None:
        """Collective: the newest complete checkpoint of a step before `step` (None: none), on
        every filesystem, as `resolve("auto")` finds the newest: where a run rolls back to."""
        return self._newest_for_all(loads_with, before=step)

    def _newest_for_all(self, loads_with: tuple[str, dict[str, int]] | None = None,
                        before: int | None = None) -> Path | None:
        """Collective: the step every rank resumes from, and its files on every filesystem.

        Rank 0 decides, from its own complete checkpoints or, with none, the newest in
        checkpoint.remote (a job requeued onto nodes without the run's files), so ranks never
        resume from different steps. A filesystem that lacks the chosen step (a node with its own
        disk) gets it from the store: downloaded once per filesystem, by the lowest rank that
        sees it (pargo_dist/runtime/filesystems.py), while its other ranks wait on the store; only
        the files of that filesystem's ranks and the shared ones where the ranks load nothing
        else (remote_checkpoints.NodeShare)."""
        def choose() -> dict:
            steps = [s for s in self.complete_steps() if before is None or s < before]
            if steps:
                found = self.step_dir(steps[-1])
                size = sum(p.stat().st_size for p in found.rglob("*") if p.is_file())
                return {"step": steps[-1], "where": "local", "bytes": size}
            try:
                remote = self.remote.steps() if self.remote is not None else []
                remote = [s for s in remote if before is None or s < before]
                size = sum(s or 0 for s in self.remote.listing(f"step_{remote[-1]:08d}/").values()) if remote else 0
            except RemoteUnavailable as err:  # unreachable: whether to start afresh cannot be told
                return {"step": None, "where": None, "unreachable": str(err)}
            return {"step": remote[-1], "where": "remote", "bytes": size} if remote else {"step": None, "where": None}

        chosen = self.sync.share("resume step", choose)
        if chosen.get("unreachable"):  # every rank: so that every rank exits 75 alike
            self.sync.leave_together("requeue: the store is unreachable")
            raise TryAgainLater(f"no checkpoint under {self.root}, and checkpoint.remote cannot be listed to see "
                                f"whether it holds one ({chosen['unreachable']})")
        step = chosen["step"]
        if step is None:
            return None
        if self.world_size > 1 or chosen["where"] == "remote":
            group = self.join_filesystem_group()
            share = NodeShare(tuple(group.ranks), self.world_size, *loads_with) if loads_with else None
            here = self.step_dir(step)
            if group.leader and not (self.is_complete(here) and holds(here, share)):
                if self.remote is None:
                    raise UserError(f"rank 0 resumes from {here.name}, which rank {self.rank}'s filesystem lacks "
                                    f"(or holds only some ranks' files of) under {self.root}: give the nodes one "
                                    "shared run.dir, or set checkpoint.remote so that nodes fetch checkpoints from "
                                    "the store")
                def progress(done: int, total: int) -> None:
                    self.heartbeat(f"downloading step {step} ({done / 2**20:,.0f} of {total / 2**20:,.0f} MiB)",
                                   allow=SETUP_ALLOWANCE_S)

                fetched = self.remote.download(step, share, progress=progress)
                files, stored, size, secs = self.remote.last_download
                which = "all" if files == stored else f"{files} of the {stored}"
                print(f"rank {self.rank}: no complete checkpoint of step {step} under {self.root}: downloaded "
                      f"{fetched.name} from {self.remote.url} for ranks {list(group.ranks)}: {which} files, "
                      f"{size / 2**20:,.1f} MiB in {secs:.1f} s ({size / 2**20 / max(secs, 1e-3):,.1f} MiB/s)",
                      flush=True)
            # a download that makes no progress ends at its leader's hang detector, which aborts this wait
            self.sync.barrier("checkpoint downloaded", timeout_s=transfer_allowance(chosen.get("bytes", 0)))
        return self.step_dir(step)

    # -- writing ---------------------------------------------------------------------

    def begin(self, step: int) -> Path:
        """Collective. Start writing checkpoint `step`; returns its (empty) directory.

        A leftover directory of the same step is from an interrupted save (or, if complete,
        an earlier save of the same step, e.g. a save right after resuming): it is deleted,
        marker first, so the new files never mix with old ones.
        """
        path = self.step_dir(step)
        if self.join_filesystem_group().leader:  # on each filesystem: nodes with disks of their own write there
            if path.exists() or path.is_symlink():
                self._delete(path)
            path.mkdir(parents=True)
        self.barrier(f"step {step} begun")
        return path

    def save_rank_state(self, step_dir: Path, state: dict) -> None:
        """Every rank: its own state (RNG, loader position), atomically."""
        step_dir = Path(step_dir)
        atomic_write(step_dir / f"rank_{self.rank:05d}.pt", lambda f: torch.save(state, f), binary=True)

    def save_state(self, step_dir: Path, state: TrainState, config_yaml: str | None = None) -> None:
        """Rank 0: the run-level state (JSON, so it can be read without torch) and the
        resolved config, so a checkpoint is reproducible from its own directory."""
        if self.rank != 0:
            return
        step_dir = Path(step_dir)
        write_text(step_dir / META, state.to_json())
        if config_yaml is not None:
            write_text(step_dir / CONFIG, config_yaml)

    def commit(self, step_dir: Path, step: int) -> None:
        """Collective. Make the checkpoint count, prune old ones, and start its upload.

        The first wait is the point after which every rank (and the backend on every
        rank) has finished writing. Rank 0 then flushes the directory's files to disk and
        only then writes the marker, so the marker can never be durable before the data.
        The waits go through the store: ranks finish writing large shards minutes apart,
        which must not count against the collective timeout. With checkpoint.remote the
        upload then runs in the background (pargo_dist/checkpoint/upload.py).
        """
        step_dir = Path(step_dir)
        self.barrier(f"step {step} written")
        listing = None  # the step's files, from the one walk of each filesystem (for the uploads)
        if self.rank == 0:
            listing = fsync_tree(step_dir)
            marker = {"step": step, "time": time.time(), "world_size": self.world_size}
            write_text(step_dir / COMPLETE, json.dumps(marker))
            self._prune_safely(self.cleanup)
        # rank 0's filesystem holds the marker; others (nodes with disks of their own) keep the steps it kept
        kept = self.sync.share(f"step {step} marked", self.complete_steps)
        if self.rank != 0 and self.join_filesystem_group().leader:
            self._prune_safely(lambda: prune_to(self.root, self._step_dirs(), kept, protect=self._uploading()))
        if self.uploads is not None:
            # one walk of the step directory per filesystem, by its leader, for every rank's upload
            group = self.join_filesystem_group()
            if group.leader and listing is None:
                listing = [str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()]
            elif not group.leader:
                listing = None
            files = self.sync.exchange(f"files of step {step}", listing, src=min(group.ranks))
            self.uploads.submit(step_dir, step, files=files)

    def size_of(self, step_dir: Path) -> int:
        """Collective: a checkpoint's bytes, from one walk (rank 0's): what the waits on work over
        it are allowed (store_sync.transfer_allowance)."""
        return self.sync.share(f"size of {Path(step_dir).name}",
                               lambda: sum(p.stat().st_size for p in Path(step_dir).rglob("*") if p.is_file()))

    def retire(self, from_step: int) -> list[int]:
        """Collective: the checkpoints of `from_step` and later (saved after a divergence began)
        leave every filesystem and the store, so that no restart, requeue or pruning takes them
        for the newest. Uploads in flight finish first (a rollback is rare; it may wait). Returns
        the steps retired here."""
        if self.uploads is not None:
            self.uploads.wait()
        doomed = sorted(s for s in self._step_dirs() if s >= from_step)
        if self.join_filesystem_group().leader:
            for step in doomed:
                self._delete(self.step_dir(step))
        if self.rank == 0 and self.remote is not None:
            try:
                self.remote.delete_from(from_step)
            except RemoteUnavailable as err:  # said; a requeue would resume from a retired step there
                self.say(f"checkpoint.remote: could not retire steps >= {from_step} from {self.remote.url} ({err})")
        self.barrier(f"steps from {from_step} retired")
        return doomed

    def _prune_safely(self, prune_now: Callable[[], object]) -> None:
        try:
            prune_now()
        except OSError as err:  # a failed prune must not take down the run (or leave the others waiting)
            warnings.warn(f"checkpoint cleanup under {self.root} failed: {err}", stacklevel=2)

    def catch_up(self, step_dir: Path, step: int) -> None:
        """Collective, after a resume from a local checkpoint: upload it if the store lacks it
        (a run that ended during an outage and was requeued)."""
        if self.uploads is None:
            return

        def lacks() -> bool:
            try:
                return step not in self.remote.steps()
            except RemoteUnavailable:  # unreachable now: the upload will retry
                return True

        missing = self.sync.share("remote lacks the resumed step", lacks)
        if missing:
            self.say(f"checkpoint.remote: {self.remote.url} lacks step {step}: uploading it")
            self.uploads.submit(step_dir, step)

    def finish_uploads(self) -> int | None:
        """Collective, at the end of a run or on a signal: waits for the upload in flight, then
        returns (on every rank) the newest committed step the store still lacks, or None."""
        if self.uploads is None:
            return None
        self.uploads.wait()
        return self.sync.share("remote lacks the newest step", self.uploads.missing)

    # -- reading ---------------------------------------------------------------------

    @staticmethod
    def load_state(step_dir: Path) -> TrainState:
        path = Path(step_dir) / META
        meta = read_json(path)
        if meta is None:
            raise UserError(f"{path} is missing or unreadable")
        return TrainState.from_dict(meta, path)

    def _saved_world_size(self, step_dir: Path) -> int | None:
        marker = read_json(step_dir / COMPLETE) or {}
        meta = read_json(step_dir / META) or {}
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
        """Keep the newest `keep_last` complete checkpoints (pargo_dist/checkpoint/pruning.py), and
        those whose upload is in flight or queued."""
        prune(self.root, self.keep_last, self._step_dirs(), self.is_complete, protect=self._uploading())

    def _uploading(self) -> set[int]:
        return self.uploads.protected() if self.uploads is not None else set()

    def _delete(self, path: Path) -> None:
        delete_step_dir(self.root, path)


# -- finding checkpoints -----------------------------------------------------------------


def run_dir_of(step_dir: Path) -> Path:
    """The run dir a checkpoint belongs to (<run>/checkpoints/step_N)."""
    return Path(step_dir).parent.parent


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, a run dir (its newest complete checkpoint), or a run's checkpoint.remote
    URL (s3://...: its newest complete checkpoint, downloaded to a cache dir first, once per node:
    the ranks of `pargo-dist eval --nproc N` take turns on a lock in the cache, and those after
    the first find it there)."""
    if "://" in str(path):
        from filelock import FileLock

        from pargo_dist.checkpoint.object_store import RemoteCheckpoints, download_dir

        cache = download_dir(str(path))
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / ".download.lock")):
            fetched = RemoteCheckpoints(str(path), cache / "checkpoints").fetch_newest()
        if fetched is None:
            raise UserError(f"{path} holds no complete checkpoint (no step_*/COMPLETE object)")
        return fetched
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = CheckpointManager(path).latest()
        if found is None:
            raise UserError(f"{path} has no complete checkpoint")
    else:
        found = CheckpointManager(run_dir_of(path)).resolve(str(path))
    held = share_of(found)
    if held is not None:
        raise UserError(f"{found} holds only ranks {held['ranks']}'s files of a {held['world_size']}-rank checkpoint "
                        "(this node's share, downloaded to resume): use the run's checkpoint.remote URL, which "
                        "fetches the whole checkpoint, or the run.dir of rank 0's node")
    return found
