"""pargo_dist/runtime/store_sync.py in-process: ranks are threads, each with its own client of a real
TCPStore, as each rank of a job has. Waits cost O(1) store requests however long they last, end
at their deadline, end within a second on every rank when any rank aborts (itself, or its
launcher for it), and end when the store's host is gone."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from pargo_dist.runtime.store_sync import PeerFailed, StoreSync, StoreWaitTimedOut, abort_waits


class Counting:
    """A store client that counts the requests it sends (the waits among them)."""

    def __init__(self, store):
        self.store, self.requests = store, 0

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def counted(*args, **kwargs):
            self.requests += 1
            return method(*args, **kwargs)
        return counted


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    yield master
    del master


def client(master) -> Counting:
    return Counting(dist.TCPStore("127.0.0.1", master.port, 1, False, timeout=datetime.timedelta(seconds=30)))


def run_ranks(world: int, body, master) -> list:
    """body(rank, sync) on `world` threads; returns each rank's result or exception, and its client.
    Each call is a start of its own: keys under a namespace of its own."""
    import uuid

    out: list = [None] * world
    clients = [client(master) for _ in range(world)]
    namespace = f"start-{uuid.uuid4().hex}"

    def one(rank):
        try:
            out[rank] = body(rank, StoreSync(clients[rank], rank, world, namespace=namespace))
        except BaseException as err:  # noqa: BLE001  returned to the test
            out[rank] = err
    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out, clients


def test_a_long_wait_costs_a_few_requests_not_a_poll(store):
    """Rank 3 arrives at the barrier 1.5 s late and rank 0's share takes 1 s: the ranks waiting on
    them send the same handful of requests as for an instant wait (polling every 50 ms sent 30
    and more per second of waiting)."""
    def body(rank, sync):
        if rank == 3:
            time.sleep(1.5)
        sync.barrier("late rank")
        got = sync.share("slow value", lambda: time.sleep(1.0) or {"step": 7})
        return got, time.monotonic()

    out, clients = run_ranks(4, body, store)
    assert [o[0] for o in out] == [{"step": 7}] * 4
    assert max(o[1] for o in out) - min(o[1] for o in out) < 0.5  # all left the share together
    for rank in (0, 1, 2):
        assert clients[rank].requests <= 12, (rank, clients[rank].requests)


def test_a_wait_ends_at_its_deadline_and_says_how_many_arrived(store):
    def body(rank, sync):
        if rank == 2:
            return "never arrives"
        start = time.monotonic()
        with pytest.raises(StoreWaitTimedOut, match=r"waited 1 s for checkpoint written .*2 of 3 ranks arrived"):
            sync.barrier("checkpoint written", timeout_s=1)
        return time.monotonic() - start

    out, _ = run_ranks(3, body, store)
    assert all(1.0 <= t < 5 for t in out[:2]), out


def test_a_rank_that_fails_wakes_every_waiting_rank_with_its_reason(store):
    """Rank 0 fails while it downloads for the others (in a share): it aborts with its line; the
    other ranks, waiting in that share, and a rank still working that reaches the next wait,
    all stop within a second with rank 0's reason instead of waiting out their deadline."""
    def body(rank, sync):
        if rank == 0:
            def download():
                time.sleep(0.5)
                sync.abort("rank 0 on node-a failed: RemoteError: downloading step 6 failed")
                raise RuntimeError("download failed")
            with pytest.raises(RuntimeError):
                sync.share("resume step", download, timeout_s=60)
            return None
        start = time.monotonic()
        if rank == 3:
            time.sleep(1.0)  # still working when rank 0 fails: meets the abort at its wait
        with pytest.raises(PeerFailed, match=r"rank 0 on node-a failed: RemoteError: downloading step 6"):
            sync.share("resume step", lambda: None, timeout_s=60)
        return time.monotonic() - start

    out, _ = run_ranks(4, body, store)
    assert all(t < 3 for t in out[1:]), out


def test_a_launcher_aborts_for_a_rank_killed_outright(store):
    """A rank killed by SIGKILL cannot abort: its node's launcher, outside the sequence, does it
    for it (abort_waits with the wait index the waiters published)."""
    def body(rank, sync):
        if rank == 1:
            time.sleep(0.5)
            abort_waits(client(store), sync.namespace, "rank 1 on node-b was killed (SIGKILL) at step 3")
            return None
        with pytest.raises(PeerFailed, match="rank 1 on node-b was killed"):
            sync.barrier("step 3 written", timeout_s=60)
        return "woken"

    out, _ = run_ranks(3, body, store)
    assert out == ["woken", None, "woken"]


def test_a_store_whose_host_is_gone_ends_the_wait():
    """Rank 0 hosts the store: when it ends, a rank waiting on the store is told so at once."""
    import gc

    master = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    waiter = StoreSync(client(master), 1, 2)
    said = []

    def wait():
        try:
            waiter.barrier("rank 0's save", timeout_s=30)
        except PeerFailed as err:
            said.append(str(err))
    t = threading.Thread(target=wait)
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    del master  # what rank 0's end does to the store it hosts
    gc.collect()
    t.join(timeout=20)
    assert said and "store is gone" in said[0] and "rank 0's save" in said[0], said
    assert time.monotonic() - start < 5


def test_rank_0_decides_the_filesystem_groups_from_every_ranks_view(store, tmp_path):
    """Four ranks, ranks 0-1 on one run directory and 2-3 on another. Rank 1's listing lags (NFS
    caches directory listings): it does not see rank 0's probe. Alone it would have taken itself
    for a filesystem of its own and led it too (two ranks deleting and downloading one step);
    rank 0 decides from every rank's view: {0, 1} and {2, 3}, one leader each. A rank that cannot
    see its own probe is a named error, on rank 0, which aborts the others' wait."""
    from pargo_dist.runtime.filesystems import FilesystemContradiction, filesystem_group

    dirs = [tmp_path / "a", tmp_path / "a", tmp_path / "b", tmp_path / "b"]

    def lagging(blind: dict[int, set[int]]):
        def listing(rank):
            return lambda d, pattern: [p.name for p in d.glob(pattern)
                                       if int(p.name.rsplit(".", 1)[1]) not in blind.get(rank, set())]
        return listing

    listing = lagging({1: {0}})
    out, _ = run_ranks(4, lambda rank, sync: filesystem_group(sync, dirs[rank], listing(rank)), store)
    assert [g.ranks for g in out] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [g.leader for g in out] == [True, False, True, False]

    listing = lagging({3: {3}})

    def blind_rank(rank, sync):
        try:
            return filesystem_group(sync, dirs[rank], listing(rank))
        except FilesystemContradiction as err:
            sync.abort(f"rank {rank} failed: {err}")  # what runtime.exits.leave_now does
            return err

    out, _ = run_ranks(4, blind_rank, store)
    assert isinstance(out[0], FilesystemContradiction) and "rank(s) [3] could not see the probe" in str(out[0])
    assert all(isinstance(o, PeerFailed) and "could not see the probe" in str(o) for o in out[1:]), out
