"""`checkpoint.remote` uploads off the training path, and through outages.

A checkpoint is complete once its local COMPLETE marker is written (pargo_dist/checkpoint/manager.py);
the copy in object storage is for a job that lands on other nodes. So uploading never stops
training, and an unreachable or slow store never ends it:

- after each commit, `submit` hands the step to this rank's upload thread and returns at once:
  the training thread never waits for an upload, however slow the store. Saves that come while
  an upload is in flight queue, and the newest wins: the older ones are skipped (a resume needs
  only the newest); the step in flight and the queued ones are `protected`, so local pruning
  (keep_last) never removes a step before its upload is done with it;
- the ranks upload one step at a time, together, in rounds that rank 0 decides: round r uploads
  the step rank 0 names in the store (its newest queued one); every rank uploads the files it
  wrote of that step and counts itself done (or failed: any exception of the thread counts) in
  round r's own keys, so a step saved again after a rollback starts from nothing; rank 0 then
  uploads the COMPLETE object, last, and prunes the store, or leaves the step without a marker;
- a step whose upload failed is superseded by the next checkpoint's; the failure is said once,
  and the progress lines carry it (`behind`);
- at the end of the run, or on a signal, `wait` lets the queue drain and `missing` says whether
  the store has the newest checkpoint; if not, the run exits 75 so the job is requeued, and the
  requeued job uploads what it resumed from (`catch_up`) before it goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from pargo_dist.checkpoint.object_store import RemoteCheckpoints, RemoteError
from pargo_dist.runtime.store_sync import (SETUP_ALLOWANCE_S, StoreWaitTimedOut, add_to_count, own_connection,
                                          wait_for_count)

_KEY = "pargo/upload"


class UploadMirror:
    """This rank's side of the uploads of one run (see the module docstring). `store`: the
    process group's c10d store (None with one rank); `say`: prints on rank 0; `timeout_s`: how
    long a round may wait for the other ranks (their uploads of one step); `key`: where its
    bookkeeping lives in the store (within the start's namespace under torchrun, whose store
    outlives a start); `logs`: rank 0's TensorBoard directory, uploaded after each checkpoint
    (RemoteCheckpoints.upload_logs)."""

    def __init__(self, remote: RemoteCheckpoints, rank: int, world_size: int, store, keep_last: int,
                 say: Callable[[str], None] = print, timeout_s: float = SETUP_ALLOWANCE_S, key: str = _KEY,
                 logs: Path | None = None):
        # (a connection of the upload thread's own: its waits must never hold up the training thread's)
        self.remote, self.rank, self.world_size, self.store = remote, rank, world_size, own_connection(store)
        self.key, self.logs = key, logs
        self._logs_sent: dict[str, int] = {}
        self.keep_last, self.say, self.timeout_s = keep_last, say, timeout_s
        self._changed = threading.Condition()
        self._queued: list[tuple[int, Path, list[str] | None]] = []  # submitted, not yet uploaded or skipped
        self._in_flight: int | None = None
        self._thread: threading.Thread | None = None
        self._round = 0
        self.newest: int | None = None  # the newest step handed over
        self.uploaded: int | None = None  # rank 0: the newest step whose COMPLETE object is in the store
        self.failure: str | None = None  # rank 0: why the newest upload failed
        self.skipped: list[int] = []  # steps a newer one superseded before their upload began

    # -- the training thread's side ----------------------------------------------------------

    def submit(self, step_dir: Path, step: int, files: list[str] | None = None) -> None:
        """Upload checkpoint `step` (committed locally) in the background; returns at once.
        `files`: the step directory's files, as its filesystem's leader listed them (else this
        rank walks the directory itself)."""
        with self._changed:
            self._queued.append((step, Path(step_dir), files))
            self.newest = step
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
                self._thread.start()

    def protected(self) -> set[int]:
        """The steps local pruning must keep: the one being uploaded and those queued."""
        with self._changed:
            return {s for s, _, _ in self._queued} | ({self._in_flight} if self._in_flight is not None else set())

    def wait(self) -> None:
        """Until every submitted step is uploaded or superseded (the end of a run, a signal)."""
        with self._changed:
            thread = self._thread
        if thread is not None:
            thread.join()

    def busy(self) -> bool:
        with self._changed:
            return self._thread is not None

    def behind(self) -> str | None:
        """Rank 0: what the progress line says while the store lacks the newest checkpoint."""
        if self.rank != 0 or self.failure is None or self.busy():
            return None
        return f"remote: step {self.newest} not uploaded, retried at the next save"

    def missing(self) -> int | None:
        """Rank 0, after `wait`: the newest step handed over that the store does not hold."""
        return self.newest if self.newest is not None and self.uploaded != self.newest else None

    # -- the upload thread -------------------------------------------------------------------

    def _work(self) -> None:
        """Rounds until the queue is empty (the thread ends; the next submit starts another)."""
        while True:
            with self._changed:
                if not self._queued:
                    self._thread = None
                    self._changed.notify_all()
                    return
            self._round += 1
            self._one_round(self._round)

    def _take(self, step: int | None) -> tuple[int, Path, list[str] | None] | None:
        """Out of the queue: `step` (the round's, named by rank 0), or the newest (rank 0's pick);
        what is older is skipped. None when `step` never arrives (a rank that did not save it)."""
        with self._changed:
            if step is not None:
                self._changed.wait_for(lambda: any(s >= step for s, _, _ in self._queued), timeout=self.timeout_s)
            chosen = next((item for item in self._queued if item[0] == step), None) if step is not None \
                else self._queued[-1]
            if chosen is None:
                return None
            self.skipped += [s for s, _, _ in self._queued if s < chosen[0]]
            self._queued = [item for item in self._queued if item[0] > chosen[0]]
            self._in_flight = chosen[0]
            return chosen

    def _one_round(self, r: int) -> None:
        key = f"{self.key}/{r}"
        step = step_dir = files = error = None
        try:
            if self.rank == 0 or self.store is None:
                step, step_dir, files = self._take(None)
                if self.store is not None:
                    self.store.set(f"{key}/step", str(step).encode())
            else:
                self.store.wait([f"{key}/step"], _seconds(self.timeout_s))
                step = int(self.store.get(f"{key}/step"))
                taken = self._take(step)
                if taken is None:
                    raise RuntimeError(f"rank {self.rank} has no checkpoint of step {step} to upload")
                step_dir, files = taken[1], taken[2]
            self.remote.upload_files(step_dir, self.rank, self.world_size, files=files)
        except BaseException as err:  # noqa: BLE001  any failure of this thread is this rank's failure
            error = err
        try:
            if self.store is not None:
                if error is not None:
                    self.store.add(f"{key}/failed", 1)
                add_to_count(self.store, f"{key}/done", self.world_size)
            if self.rank == 0:
                self._finish_round(key, step, step_dir, error)
        finally:
            with self._changed:
                self._in_flight = None
                self._changed.notify_all()

    def _finish_round(self, key: str, step: int | None, step_dir: Path | None, error: BaseException | None) -> None:
        """Rank 0: every rank's files up, then the marker (or the failure said)."""
        if error is None and self.store is not None:
            try:
                wait_for_count(self.store, f"{key}/done", self.world_size, f"every rank's upload of step {step}",
                               timeout_s=self.timeout_s)
                if self.store.add(f"{key}/failed", 0):
                    error = RemoteError(f"another rank could not upload its files of step {step}")
            except StoreWaitTimedOut as err:
                error = err
        if error is None and self.logs is not None:
            # before the marker: a checkpoint in the store comes with the curves up to its step
            try:
                self.remote.upload_logs(self.logs, self._logs_sent)
            except Exception as err:  # noqa: BLE001  the curves wait for the next checkpoint; training goes on
                self.say(f"checkpoint.remote: the TensorBoard files are not in {self.remote.url}/tb ({err}); "
                         "the next checkpoint's upload tries again")
        if error is None:
            try:
                self.remote.upload_marker(step_dir, self.keep_last)
            except Exception as err:  # noqa: BLE001  said below; training goes on
                error = err
        if error is None:
            if self.failure is not None:
                self.say(f"checkpoint.remote: {self.remote.url} is reachable again: step {step} uploaded")
            self.uploaded, self.failure = step, None
        else:
            self.failure = f"{type(error).__name__}: {error}" if not isinstance(error, RemoteError) else str(error)
            self.say(f"checkpoint.remote: step {step} is not in {self.remote.url} ({self.failure}). Training goes "
                     "on: the next checkpoint is uploaded again, and a run that ends without one in the store "
                     "exits 75 (requeue)")


def _seconds(value: float):
    import datetime

    return datetime.timedelta(seconds=max(0.001, value))
