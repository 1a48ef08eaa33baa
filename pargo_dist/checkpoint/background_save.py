"""Checkpoint writes off the training loop's critical path (`checkpoint.async_save`).

A save has two parts: copying the state out of the live model and optimizer (fast: memory to
memory, GPU to pinned host memory on a GPU) and writing it to the filesystem (slow: at 2 GB/s
a 70B checkpoint's shards are minutes). Neither needs to stop training: the next step's forward
and backward do not change the weights or the optimizer state, only its optimizer step does.
So `BackgroundWriter` copies (stages) on one thread while the next step computes, and the
backend waits for the staging only before that step's optimizer update (`wait_staged`); a
second thread writes the copies while training goes on. `host_snapshot` makes the copy,
keeping which tensors share storage (torch.save writes a shared storage once: the file is the
one a synchronous save writes).

Completion is the loop's business (pargo_dist/train/trainer.py): a checkpoint gets its COMPLETE marker
only once every rank's writer has finished, so a run killed during a write leaves a directory
resume never picks. A failed write is re-raised on the training thread at the next poll and
ends the run with the file it was writing.

The copies go into one host buffer per rank (`StagingArena`), reused from save to save: torch's
caching host allocator would round each pinned block up to a power of two and keep it for the
whole run, so a 20 GB share could hold 32 GB of pinned memory, uncounted. The arena holds exactly
the largest save seen (pinned by registering it with CUDA, not through that allocator); the
first save, before its size is known, copies into plain memory.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pargo_dist.checkpoint.files import atomic_write

_ALIGN = 64  # bytes: each storage's copy starts on a cache line


class StagingArena:
    """Host memory for the copies of one save, reused by the next (one save is in flight at a
    time, so the copies of the last one are written before the next is staged: `reset`).

    `take` hands out the next slice as a tensor of its own storage (torch.save writes a tensor's
    whole storage: a slice of one big storage would write the arena into every file). What does
    not fit (the first save, a save that grew) gets plain memory of its own, and `reset` then
    grows the arena to the largest save seen, in one allocation. Pinned when a copy came from a
    GPU: registered with CUDA (cudaHostRegister), so exactly its size is locked, never a power of
    two; a copy into registered memory is asynchronous like one into torch's pinned blocks."""

    def __init__(self):
        self.buffer: np.ndarray | None = None
        self.pinned = False
        self._used = self._wanted = 0
        self._pin_wanted = False

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes

    def take(self, nbytes: int, pin: bool) -> torch.Tensor:
        aligned = -(-nbytes // _ALIGN) * _ALIGN
        self._wanted += aligned
        self._pin_wanted |= pin
        if self.buffer is not None and self.pinned >= pin and self._used + aligned <= self.nbytes:
            out = torch.from_numpy(self.buffer[self._used:self._used + nbytes])
            self._used += aligned
            return out
        return torch.empty(nbytes, dtype=torch.uint8)  # plain memory: a non-blocking copy into it still completes

    def reset(self) -> None:
        """The last save's copies are all written: start again at the front, larger if it did not fit."""
        if self._wanted > self.nbytes or self._pin_wanted > self.pinned:
            self.release()
            self.buffer = np.empty(self._wanted, dtype=np.uint8)
            if self._pin_wanted:
                torch.cuda.cudart().cudaHostRegister(self.buffer.ctypes.data, self._wanted, 0)
                self.pinned = True
        self._used = self._wanted = 0

    def release(self) -> None:
        if self.buffer is not None and self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.ctypes.data)
        self.buffer, self.pinned = None, False


def host_snapshot(obj: Any, ready: "torch.cuda.Event | None" = None, arena: StagingArena | None = None) -> Any:
    """`obj` (nested dicts / lists / tuples of tensors and plain values) with every tensor copied
    to host memory, views kept as views of one copied storage. GPU tensors are copied on a side
    stream (into the arena's pinned memory where it has room), after `ready` (an event recorded
    on the training stream when the state was final), and that stream is synchronised once at
    the end. Non-tensor values are kept as they are (training does not change them in place).
    `arena`: where the copies go (default: fresh memory each)."""
    storages: dict[tuple, torch.UntypedStorage] = {}
    side = [None]

    def host_bytes(nbytes: int, pin: bool) -> torch.Tensor:
        if arena is not None:
            return arena.take(nbytes, pin)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def storage_copy(t: torch.Tensor) -> torch.UntypedStorage:
        source = t.untyped_storage()
        key = (str(t.device), source.data_ptr(), source.nbytes())
        if key not in storages:
            if t.device.type == "cuda":
                if side[0] is None:
                    side[0] = torch.cuda.Stream(device=t.device)
                    if ready is not None:
                        side[0].wait_event(ready)
                host = host_bytes(source.nbytes(), pin=True)
                with torch.cuda.stream(side[0]):
                    host.copy_(torch.empty(0, dtype=torch.uint8, device=t.device).set_(source), non_blocking=True)
            else:
                host = host_bytes(source.nbytes(), pin=False)
                host.copy_(torch.empty(0, dtype=torch.uint8).set_(source))
            storages[key] = host.untyped_storage()
        return storages[key]

    def copy(value: Any) -> Any:
        if torch.is_tensor(value):
            if value.device.type == "meta" or value.untyped_storage().nbytes() == 0:
                return value.detach().clone()
            out = torch.empty(0, dtype=value.dtype)
            return out.set_(storage_copy(value), value.storage_offset(), value.size(), value.stride())
        if isinstance(value, dict):
            return type(value)((k, copy(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(copy(v) for v in value)
        return value

    out = copy(obj)
    if side[0] is not None:
        side[0].synchronize()
    return out


class BackgroundWriter:
    """Two threads: one stages (copies state to host memory), one writes the copies, each in
    submission order. `submit` returns at once; `wait_staged` blocks until every submitted state
    is copied (what must precede the next optimizer update); `pending` says whether anything is
    left (and re-raises a failure); `wait` blocks until all is written."""

    def __init__(self, name: str = "checkpoint"):
        self._stage_q: queue.Queue = queue.Queue()
        self._write_q: queue.Queue = queue.Queue()
        self._left = {"stage": 0, "write": 0}  # jobs not yet staged / not yet written
        self._none_left = {kind: threading.Event() for kind in self._left}
        for event in self._none_left.values():
            event.set()
        self._staged, self._idle = self._none_left["stage"], self._none_left["write"]
        self._lock = threading.Lock()
        self.arena = StagingArena()  # reset whenever nothing is left to write (see StagingArena)
        self._error: BaseException | None = None
        self.staged_wait_s = 0.0
        self._threads = [threading.Thread(target=self._stage_loop, name=f"{name}-stage", daemon=True),
                         threading.Thread(target=self._write_loop, name=f"{name}-write", daemon=True)]
        for t in self._threads:
            t.start()

    def submit(self, what: str, state: Any, write: Callable[[Any], None]) -> None:
        """Copy `state` to host memory (on the staging thread), then `write(copy)`."""
        self._raise()
        ready = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            ready = torch.cuda.Event()
            ready.record()  # the state as of now, on the training stream
        with self._lock:
            for kind in self._left:
                self._left[kind] += 1
                self._none_left[kind].clear()
        self._stage_q.put((what, state, write, ready))

    def _one_done(self, kind: str) -> None:
        with self._lock:
            self._left[kind] -= 1
            if kind == "write" and self._left["write"] == 0:
                self.arena.reset()  # every copy is written and dropped: the next save reuses the memory
            if self._left[kind] == 0:
                self._none_left[kind].set()

    def _fail(self, what: str, err: BaseException) -> None:
        if self._error is None:
            self._error = RuntimeError(f"background checkpoint write of {what} failed: {type(err).__name__}: {err}")
            self._error.__cause__ = err

    def _stage_loop(self) -> None:
        while True:
            item = self._stage_q.get()
            if item is None:
                self._write_q.put(None)
                return
            what, state, write, ready = item
            copy = None
            try:
                if self._error is None:
                    copy = host_snapshot(state, ready, self.arena)
            except BaseException as err:  # noqa: BLE001  re-raised on the training thread
                self._fail(what, err)
            finally:
                del state
                self._one_done("stage")
            self._write_q.put((what, copy, write))

    def _write_loop(self) -> None:
        while True:
            item = self._write_q.get()
            if item is None:
                return
            what, copy, write = item
            try:
                if self._error is None:  # after a failure, the rest of that save is moot
                    write(copy)
            except BaseException as err:  # noqa: BLE001  re-raised on the training thread
                self._fail(what, err)
            finally:
                del copy
                self._one_done("write")

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_staged(self) -> None:
        """Block until every submitted state has been copied (raises a failure's error). The
        time spent waiting adds up in `staged_wait_s` (what a background save stops training)."""
        if not self._staged.is_set():
            start = time.perf_counter()
            self._staged.wait()
            self.staged_wait_s += time.perf_counter() - start
        self._raise()

    def pending(self) -> bool:
        """Whether copies or writes are still running or queued. Raises a failed one's error."""
        self._raise()
        return not self._idle.is_set()

    def wait(self) -> None:
        """Block until everything submitted is written. Raises a failed write's error."""
        self._idle.wait()
        self._raise()

    def close(self) -> None:
        self.wait()
        self._stage_q.put(None)
        for t in self._threads:
            t.join()


def save_file(obj: Any, path: str | Path, zipfile: bool = True) -> None:
    """torch.save to `path` through a temporary name (`atomic_write`): a reader never sees half a
    file under the real name. `zipfile`: torch's serialization format (DeepSpeed's checkpoints
    use the legacy one unless configured)."""
    atomic_write(Path(path), lambda f: torch.save(obj, f, _use_new_zipfile_serialization=zipfile), binary=True)
