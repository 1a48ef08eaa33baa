"""`checkpoint.remote` uploads off the training path, and through outages.

A checkpoint is complete once its local COMPLETE marker is written (pargo_dist/checkpoint/manager.py);
the copy in object storage is for a job that lands on other nodes. So uploading never stops
training, and an unreachable store never ends it:

- after each commit, every rank's `UploadMirror` uploads the files that rank wrote, on a thread
  of its own, while training goes on; one upload is in flight at a time (the next commit waits
  for the previous one, as the next save waits for a background write);
- ranks tell each other through the process group's store (not a collective: the thread runs
  beside training) that their files are up or failed; rank 0's thread then uploads the COMPLETE
  object, last, and prunes, or leaves the step without a marker;
- a step whose upload failed is superseded by the next checkpoint's (only the newest matters
  for a resume); the failure is said once, and the progress lines carry it (`behind`);
- at the end of the run, or on a signal, `finish` waits for the upload in flight and says
  whether the store has the newest checkpoint; if not, the run exits 75 so the job is requeued,
  and the requeued job uploads what it resumed from (`catch_up`) before it goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from pargo_dist.checkpoint.object_store import RemoteCheckpoints, RemoteError
from pargo_dist.runtime.store_sync import StoreWaitTimedOut, add_to_count, wait_for_count

_KEY = "pargo/upload"


class UploadMirror:
    """This rank's side of the uploads of one run (see the module docstring). `store`: the
    process group's c10d store (None with one rank); `say`: prints on rank 0."""

    def __init__(self, remote: RemoteCheckpoints, rank: int, world_size: int, store, keep_last: int,
                 say: Callable[[str], None] = print):
        self.remote, self.rank, self.world_size, self.store = remote, rank, world_size, store
        self.keep_last, self.say = keep_last, say
        self._thread: threading.Thread | None = None
        self.newest: int | None = None  # the newest step handed over
        self.uploaded: int | None = None  # rank 0: the newest step whose COMPLETE object is in the store
        self.failure: str | None = None  # rank 0: why the newest upload failed

    # -- the training thread's side ----------------------------------------------------------

    def submit(self, step_dir: Path, step: int) -> None:
        """Upload checkpoint `step` (committed locally) in the background."""
        self.wait()
        self.newest = step
        self._thread = threading.Thread(target=self._upload, args=(Path(step_dir), step),
                                        name=f"checkpoint-upload-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def behind(self) -> str | None:
        """Rank 0: what the progress line says while the store lacks the newest checkpoint."""
        if self.rank != 0 or self.failure is None or self.busy():
            return None
        return f"remote: step {self.newest} not uploaded, retried at the next save"

    def missing(self) -> int | None:
        """Rank 0, after `wait`: the newest step handed over that the store does not hold."""
        return self.newest if self.newest is not None and self.uploaded != self.newest else None

    # -- the upload thread -------------------------------------------------------------------

    def _upload(self, step_dir: Path, step: int) -> None:
        error = None
        try:
            self.remote.upload_files(step_dir, self.rank, self.world_size)
        except (RemoteError, OSError) as err:
            error = err
        if self.store is not None:
            if error is not None:
                self.store.add(f"{_KEY}/{step}/failed", 1)
            add_to_count(self.store, f"{_KEY}/{step}/done", self.world_size)
        if self.rank != 0:
            return
        if error is None and self.store is not None:
            try:
                wait_for_count(self.store, f"{_KEY}/{step}/done", self.world_size, f"every rank's upload of step {step}")
                if self.store.add(f"{_KEY}/{step}/failed", 0):
                    error = RemoteError(f"another rank could not upload its files of step {step}")
            except StoreWaitTimedOut as err:
                error = err
        if error is None:
            try:
                self.remote.upload_marker(step_dir, self.keep_last)
            except (RemoteError, OSError) as err:
                error = err
        if error is None:
            if self.failure is not None:
                self.say(f"checkpoint.remote: {self.remote.url} is reachable again: step {step} uploaded")
            self.uploaded, self.failure = step, None
        else:
            self.failure = str(error)
            self.say(f"checkpoint.remote: step {step} is not in {self.remote.url} ({error}). Training goes on: the "
                     "next checkpoint is uploaded again, and a run that ends without one in the store exits 75 "
                     "(requeue)")
