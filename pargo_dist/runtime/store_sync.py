"""Waiting for one rank's long work without a collective.

Some work is done by one rank (or one per filesystem) while the others wait: downloading a
checkpoint from the object store, converting a ZeRO checkpoint to the universal format for an
elastic resume, writing a COMPLETE marker. For a 7B-70B model these take minutes to hours. A
`dist.barrier()` around them times out after the collective timeout (NCCL's 10 minutes,
DeepSpeed's 30, `train.collective_timeout_s`), and raising that timeout for the whole run would
also delay the detection of a real hang in training by as much.

So these waits go through the process group's key-value store (the TCPStore every rank already
talks to) instead: a counter per barrier, polled with a growing interval (1 ms to 50 ms). Each
poll is a quick request, so no store or collective timeout applies to the wait itself. A rank
that dies while others wait ends the job through the launcher (it stops every rank when one
fails); a rank that hangs is caught by its own hang watchdog (the worker beats it with an
allowance for its work). Every rank calls the same sequence of `barrier`/`share`, as
with collectives: each call gets the next key.

`StoreSync.default()` uses the default process group's store (torch's private
`distributed_c10d._get_default_store`, listed in docs/architecture.md); `LocalSync` is the
one-process stand-in (tests, single-rank tools).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

_MAX_POLL_S = 0.05  # a store request is a loopback-sized round trip: polling this often costs nothing
_DEFAULT = None  # (the group, its StoreSync)


def wait_until(ready: Callable[[], bool]) -> None:
    """Poll `ready` (a quick store request) with a growing interval, 1 ms to 50 ms, until true."""
    wait = 0.001
    while not ready():
        time.sleep(wait)
        wait = min(_MAX_POLL_S, wait * 2)


class LocalSync:
    """One process: every wait is over at once, `share` computes."""

    rank, world_size = 0, 1

    def barrier(self, what: str) -> None:
        pass

    def share(self, what: str, compute: Callable[[], Any], src: int = 0) -> Any:
        return compute()

    def leave_together(self, what: str) -> None:
        pass


class StoreSync:
    """barrier / share over a c10d Store, by polling (see the module docstring)."""

    def __init__(self, store, rank: int, world_size: int, namespace: str = "pargo"):
        self.store, self.rank, self.world_size = store, rank, world_size
        self._namespace = namespace
        self._calls = 0

    @classmethod
    def default(cls) -> "StoreSync | LocalSync":
        """Over the default process group's store; LocalSync without a group (or with one rank)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return LocalSync()
        from torch.distributed.distributed_c10d import _get_default_store

        global _DEFAULT
        # one per process group: every user shares its call counter, so that keys never repeat
        if _DEFAULT is None or _DEFAULT[0] is not dist.group.WORLD:
            _DEFAULT = (dist.group.WORLD, cls(_get_default_store(), dist.get_rank(), dist.get_world_size()))
        return _DEFAULT[1]

    def _key(self, what: str) -> str:
        self._calls += 1
        return f"{self._namespace}/{self._calls}/{what}"

    def barrier(self, what: str) -> None:
        """Returns once every rank has called it. `what` names the wait (a key part, for debugging)."""
        key = self._key(what)
        self.store.add(key, 1)
        wait_until(lambda: self.store.add(key, 0) >= self.world_size)

    def share(self, what: str, compute: Callable[[], Any], src: int = 0) -> Any:
        """`compute()` on rank `src`, its (JSON-able) value returned on every rank. An exception in
        compute is raised on `src`; the others keep waiting until the launcher stops them."""
        key = self._key(what)
        if self.rank == src:
            value = compute()
            self.store.set(key, json.dumps(value))
            return value
        wait_until(lambda: self.store.check([key]))
        return json.loads(self.store.get(key))

    def leave_together(self, what: str, patience_s: float = 30.0) -> None:
        """Every rank is about to exit (all agreed on it, e.g. through `share`): rank 0, whose
        process hosts the store, leaves last, so that no rank meets a closed store on its way out
        and reports a lost peer instead of the reason. Rank 0 waits at most `patience_s`."""
        key = self._key(what)
        if self.rank != 0:
            self.store.add(key, 1)
            return
        deadline = time.monotonic() + patience_s
        wait_until(lambda: self.store.add(key, 0) >= self.world_size - 1 or time.monotonic() > deadline)
