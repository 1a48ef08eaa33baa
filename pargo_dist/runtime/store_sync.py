"""Waiting for one rank's long work without a collective, and never for ever.

Some work is done by one rank (or one per filesystem) while the others wait: downloading a
checkpoint from the object store, converting a ZeRO checkpoint to the universal format for an
elastic resume, writing a COMPLETE marker. For a 7B-70B model these take minutes to hours. A
`dist.barrier()` around them times out after the collective timeout (NCCL's 10 minutes,
DeepSpeed's 30, `train.collective_timeout_s`), and raising that timeout for the whole run would
also delay the detection of a real hang in training by as much.

So these waits go through the process group's key-value store (the TCPStore every rank already
talks to) instead. Every rank calls the same sequence of `barrier` / `share`, as with
collectives: call n of the sequence has its own keys, `<namespace>/<n>/...`, and ends when its
`done` key exists. A barrier's (or a gather's) last arriver (the rank whose `add` makes the count
whole) sets it; a share's source sets the value, then `done`. Waiting is one `store.wait` on that key: the
store answers when the key is set, so a wait costs O(1) requests per rank, however long it
lasts (polling rank 0's store every 50 ms from 1,000 ranks was 20,000 requests a second, served
inside the process doing the long work: `benchmarks/store_waits.py`).

A wait ends in one of three ways besides success:
- its deadline passes (`timeout_s`, the set-up allowance by default): `StoreWaitTimedOut`,
  naming the wait and how many ranks arrived;
- another rank fails (`abort`, called by `runtime.exits.leave_now`, the hang detector, and a
  node's launcher for a rank killed outright): it writes its one-line reason to the abort key
  and sets the `done` key of the wait in progress and of the next one to ABORTED, which wakes
  every waiter at once; each raises `PeerFailed` with that line (exit 3: not the cause);
- the store itself is gone (rank 0, which hosts it, has ended): `PeerFailed` too.
Each rank publishes the index of the wait it is in (`<namespace>/at`), so that an aborting
process that is not in the sequence (the launcher) knows which keys to set, and looks at the
abort key before it waits (an abort that came before the wait set none of its keys).

`StoreSync.default()` uses the default process group's store (torch's private
`distributed_c10d._get_default_store`, listed in docs/architecture.md); `LocalSync` is the
one-process stand-in (tests, single-rank tools).
"""

from __future__ import annotations

import contextlib
import datetime
import json
from typing import Any, Callable

NAMESPACE = "pargo"  # the default group's keys
ABORTED = b"aborted"
# How long set-up work may take (rendezvous, building a 70B model, a first shard download): the
# default deadline of a wait here, and what the hang detector allows set-up beats.
SETUP_ALLOWANCE_S = 1800.0
SLOWEST_DISK_BPS = 20e6  # bytes a second that a filesystem or a store under load still gives


def transfer_allowance(nbytes: float) -> float:
    """How long work on `nbytes` of checkpoint (a download, a conversion) may take: the set-up
    allowance, or longer for more than 36 GB at SLOWEST_DISK_BPS."""
    return max(SETUP_ALLOWANCE_S, nbytes / SLOWEST_DISK_BPS)
_DEFAULT = None  # (the group, its StoreSync)


class PeerFailed(RuntimeError):
    """Another rank failed while this one waited on it (its reason is the message), or the store
    went away with rank 0. Not this rank's fault: it leaves with PEER_LOST_EXIT."""


class StoreWaitTimedOut(RuntimeError):
    """A wait outlasted its deadline without any rank failing: a rank is stuck or far too slow."""


class LocalSync:
    """One process: every wait is over at once, `share` computes."""

    rank, world_size = 0, 1

    def barrier(self, what: str, timeout_s: float | None = None) -> None:
        pass

    def share(self, what: str, compute: Callable[[], Any], src: int = 0, timeout_s: float | None = None) -> Any:
        return compute()

    def gather(self, what: str, value: Any, dst: int = 0, timeout_s: float | None = None) -> list[Any] | None:
        return [value]

    def exchange(self, what: str, value: Any, src: int, timeout_s: float | None = None) -> Any:
        return value

    def leave_together(self, what: str) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(0.001, value))


class StoreSync:
    """barrier / share over a c10d Store (see the module docstring)."""

    def __init__(self, store, rank: int, world_size: int, namespace: str = NAMESPACE):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.namespace = namespace
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
            store = _get_default_store()
            while isinstance(store, dist.PrefixStore):  # the TCPStore itself: a node's launcher, which
                store = store.underlying_store          # knows only its address, aborts with these keys
            _DEFAULT = (dist.group.WORLD, cls(store, dist.get_rank(), dist.get_world_size(), start_namespace()))
        return _DEFAULT[1]

    # -- the sequence ---------------------------------------------------------------------

    def _next(self) -> str:
        self._calls += 1
        return f"{self.namespace}/{self._calls}"

    def barrier(self, what: str, timeout_s: float | None = None) -> None:
        """Returns once every rank has called it. `what` names the wait in errors."""
        key = self._next()
        with self._store_of(what):
            if self.store.add(f"{key}/arrived", 1) == self.world_size:
                self.store.set(f"{key}/done", b"1")
            self._wait(key, what, timeout_s)

    def share(self, what: str, compute: Callable[[], Any], src: int = 0, timeout_s: float | None = None) -> Any:
        """`compute()` on rank `src`, its (JSON-able) value returned on every rank. An exception in
        compute is raised on `src`, whose leaving (runtime.exits.leave_now) aborts the others' wait."""
        key = self._next()
        if self.rank == src:
            value = compute()
            with self._store_of(what):
                self.store.set(f"{key}/value", json.dumps(value))
                self.store.set(f"{key}/done", b"1")
            return value
        with self._store_of(what):
            self._wait(key, what, timeout_s)
            return json.loads(self.store.get(f"{key}/value"))

    def gather(self, what: str, value: Any, dst: int = 0, timeout_s: float | None = None) -> list[Any] | None:
        """Every rank's (JSON-able) `value`, in rank order, on rank `dst` (None on the others, which
        do not wait). Rank `dst` reads the N values once: O(N) requests on one rank, O(1) on each
        other (rank 0 deciding from everyone's view: runtime/filesystems.py)."""
        key = self._next()
        with self._store_of(what):
            self.store.set(f"{key}/value/{self.rank}", json.dumps(value))
            if self.store.add(f"{key}/arrived", 1) == self.world_size:
                self.store.set(f"{key}/done", b"1")
            if self.rank != dst:
                return None
            self._wait(key, what, timeout_s)
            return [json.loads(self.store.get(f"{key}/value/{r}")) for r in range(self.world_size)]

    def exchange(self, what: str, value: Any, src: int, timeout_s: float | None = None) -> Any:
        """Collective: the ranks that pass a `value` (not None) publish it; every rank gets that of
        rank `src` (e.g. its filesystem's leader: one value per group, each read by its own
        members, at O(1) requests per rank)."""
        key = self._next()
        with self._store_of(what):
            if value is not None:
                self.store.set(f"{key}/value/{self.rank}", json.dumps(value))
            if self.store.add(f"{key}/arrived", 1) == self.world_size:
                self.store.set(f"{key}/done", b"1")
            self._wait(key, what, timeout_s)
            return json.loads(self.store.get(f"{key}/value/{src}"))

    def leave_together(self, what: str, patience_s: float = 30.0) -> None:
        """Every rank is about to exit (all agreed on it, e.g. through `share`): rank 0, whose
        process hosts the store, leaves last, so that no rank meets a closed store on its way out
        and reports a lost peer instead of the reason. Rank 0 waits at most `patience_s`."""
        key = self._next()
        with self._store_of(what):
            if self.store.add(f"{key}/arrived", 1) == self.world_size:
                self.store.set(f"{key}/done", b"1")
            if self.rank == 0:
                try:
                    self._wait(key, what, patience_s)
                except StoreWaitTimedOut:
                    pass

    @contextlib.contextmanager
    def _store_of(self, what: str):
        """A store that is gone (rank 0, which hosts it, has ended) is a peer's failure here."""
        import torch.distributed as dist

        try:
            yield
        except dist.DistNetworkError:
            raise PeerFailed(f"the process group's store is gone while rank {self.rank} waited for {what}: "
                             "rank 0, which hosts it, has ended (its own error is in its log)") from None

    def _wait(self, key: str, what: str, timeout_s: float | None) -> None:
        """One store.wait on `key/done` until the deadline (see the module docstring)."""
        import torch.distributed as dist

        timeout_s = SETUP_ALLOWANCE_S if timeout_s is None else timeout_s
        try:
            self.store.set(f"{self.namespace}/at", str(self._calls).encode())
            if self.aborted() is None:  # (an abort before this wait began may have set no key of it)
                self.store.wait([f"{key}/done"], _seconds(timeout_s))
                if self.store.get(f"{key}/done") != ABORTED:
                    return
        except dist.DistStoreError:  # the deadline
            reason = self.aborted()
            if reason is None:
                arrived = self.store.add(f"{key}/arrived", 0)
                raise StoreWaitTimedOut(
                    f"rank {self.rank} waited {timeout_s:g} s for {what} (store wait {self._calls}; "
                    f"{arrived} of {self.world_size} ranks arrived, if it is a barrier): no rank failed, so one "
                    "is stuck or far slower than its allowance") from None
        reason = self.aborted() or "another rank failed"
        add_to_count(self.store, f"{self.namespace}/abort/seen", self.world_size - 1)  # (see linger)
        raise PeerFailed(f"rank {self.rank} stopped waiting for {what}: {reason}")

    # -- failing --------------------------------------------------------------------------

    def aborted(self) -> str | None:
        """The reason another rank aborted the waits, or None."""
        key = f"{self.namespace}/abort"
        return self.store.get(key).decode(errors="replace") if self.store.check([key]) else None

    def abort(self, reason: str) -> None:
        """Wake every rank waiting in this sequence, now and at its next wait, with `reason` (see
        the module docstring). Best effort: a store that is gone has no waiter left."""
        abort_waits(self.store, self.namespace, reason, self._calls)


def own_connection(store):
    """A client of `store`'s server of its own, for a thread that waits on the store (the uploads):
    a TCPStore client runs one request at a time, so one thread's long `store.wait` would hold up
    every other store call of the process, the training thread's barriers included, until it
    returns; two ranks can then each wait for what the other's blocked thread would set. Other
    stores (and None) are returned as they are."""
    import torch.distributed as dist

    if not isinstance(store, dist.TCPStore):
        return store
    return dist.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)


def start_namespace() -> str:
    """The keys of this start's waits: NAMESPACE, or under torchrun, whose agent keeps one store
    for every attempt, NAMESPACE within the attempt's prefix (runtime/torchrun.py)."""
    from pargo_dist.runtime import torchrun

    return f"{torchrun.start_prefix()}/{NAMESPACE}" if torchrun.uses_agent_store() else NAMESPACE


def abort_waits(store, namespace: str, reason: str, at: int | None = None) -> None:
    """Set the abort key (the first reason stays: it names the cause) and the `done` keys of the
    wait in progress and the next one (the aborting process's own count `at`, or the index the
    waiters published) to ABORTED."""
    try:
        if not store.check([f"{namespace}/abort"]):
            store.set(f"{namespace}/abort", reason.encode())
        published = int(store.get(f"{namespace}/at")) if store.check([f"{namespace}/at"]) else 0
        for n in sorted({published, published + 1, *(() if at is None else (at, at + 1))} - {0}):
            if not store.check([f"{namespace}/{n}/done"]):
                store.set(f"{namespace}/{n}/done", ABORTED)
    except Exception:  # noqa: BLE001  the store or its host is gone: nobody waits on it any more
        pass


def abort_default(reason: str) -> None:
    """`abort` on this process's default StoreSync, if it made one (runtime.exits.leave_now and
    the hang detector call it on their way out), then `linger`."""
    if _DEFAULT is not None:
        _DEFAULT[1].abort(reason)
        linger()


def linger(linger_s: float = 5.0) -> None:
    """Rank 0 hosts the store and takes it along when it exits: after an abort it stays until
    every other rank has read the reason (or `linger_s`), so that they print it rather than "the
    store is gone". Other ranks, and a process without a group, return at once."""
    if _DEFAULT is None or _DEFAULT[1].rank != 0:
        return
    sync = _DEFAULT[1]
    try:
        if sync.aborted() is not None:
            wait_for_count(sync.store, f"{sync.namespace}/abort/seen", sync.world_size - 1, "the others to leave",
                           timeout_s=linger_s)
    except Exception:  # noqa: BLE001  a rank still at its own work: it learns it at its next wait
        pass


def wait_for_count(store, key: str, count: int, what: str, timeout_s: float = SETUP_ALLOWANCE_S) -> int:
    """Wait until the counter `key` (counted with `add_to_count`) reaches `count`, for threads
    outside the sequence (checkpoint uploads): one store.wait on `key/done`, which the adder that
    completes the count sets. Returns the count; raises StoreWaitTimedOut after `timeout_s`."""
    import torch.distributed as dist

    try:
        store.wait([f"{key}/done"], _seconds(timeout_s))
    except dist.DistStoreError:
        raise StoreWaitTimedOut(f"waited {timeout_s:g} s for {what}: {store.add(key, 0)} of {count}") from None
    return store.add(key, 0)


def add_to_count(store, key: str, count: int, n: int = 1) -> int:
    """store.add(key, n), setting `key/done` when the counter reaches `count`."""
    total = store.add(key, n)
    if total >= count > total - n:
        store.set(f"{key}/done", b"1")
    return total
