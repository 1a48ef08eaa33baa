"""pargo_dist/checkpoint/upload.py in-process: two ranks' upload threads over one c10d HashStore,
each with its own view of a store that a test can hold (a slow store) or break. Uploads never
block a training step, the newest queued save wins, pruning keeps what is still to upload, any
failure of a thread counts, and a step saved again starts its bookkeeping afresh."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import pargo_dist.checkpoint.object_store as rc
from pargo_dist.checkpoint.manager import CheckpointManager
from pargo_dist.checkpoint.upload import UploadMirror

FILES = ("meta.json", "rank_00000.pt", "rank_00001.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "COMPLETE")


class Store:
    """One rank's view of the object store: holds each upload until `gate` is set, raises `fail`
    (an exception instance) while it is set; records what it got in `objects` (shared)."""

    def __init__(self, objects: list[str]):
        self.objects, self.fail = objects, None
        self.gate = threading.Event()
        self.gate.set()

    def upload_file(self, name):
        self.gate.wait(timeout=60)
        if self.fail is not None:
            raise self.fail
        self.objects.append(name)


@pytest.fixture
def ranks(tmp_path, monkeypatch):
    """Two ranks' mirrors of one run (root: the checkpoints dir), their stores and what was said."""
    monkeypatch.setattr(rc.time, "sleep", lambda s: None)  # (the retries' back-off)
    root = tmp_path / "checkpoints"
    objects: list[str] = []
    stores, kv, said = [Store(objects), Store(objects)], dist.HashStore(), []
    mirrors = []
    for rank in (0, 1):
        remote = rc.RemoteCheckpoints("s3://bucket/run", root)
        monkeypatch.setattr(remote, "_uploader", lambda rank=rank: stores[rank])
        monkeypatch.setattr(remote, "prune", lambda keep_last: None)
        mirrors.append(UploadMirror(remote, rank, 2, kv, keep_last=3, say=said.append, timeout_s=30))
    return root, mirrors, stores, objects, said


def save(root: Path, step: int) -> Path:
    step_dir = root / f"step_{step:08d}"
    (step_dir / "ds").mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (step_dir / name).write_text(f"{step}")
    return step_dir


def submit_all(mirrors, step_dir: Path, step: int) -> None:
    """Both ranks' commits hand the step over; fails if a submit waits (on an upload in flight)."""
    calls = [threading.Thread(target=m.submit, args=(step_dir, step)) for m in mirrors]
    for c in calls:
        c.start()
    for c in calls:
        c.join(timeout=5)
    assert not any(c.is_alive() for c in calls), f"submit of step {step} waited for an upload"


def finish(mirrors) -> None:
    joins = [threading.Thread(target=m.wait) for m in mirrors]
    for j in joins:
        j.start()
    for j in joins:
        j.join(timeout=60)
    assert not any(j.is_alive() for j in joins), "an upload thread never finished"


def marked(objects: list[str]) -> list[int]:
    return sorted(int(o.split("/")[0][5:]) for o in objects if o.endswith("/COMPLETE"))


def test_a_slow_store_never_blocks_a_save_and_the_newest_queued_save_wins(ranks):
    root, mirrors, stores, objects, _ = ranks
    for store in stores:
        store.gate.clear()  # the store answers nothing for now
    submit_all(mirrors, save(root, 2), 2)
    submit_all(mirrors, save(root, 4), 4)  # while step 2's upload hangs: queued, no wait
    submit_all(mirrors, save(root, 6), 6)  # and step 4 is superseded
    assert all(m.protected() == {2, 4, 6} for m in mirrors)
    for store in stores:
        store.gate.set()
    finish(mirrors)
    assert marked(objects) == [2, 6] and objects[-1] == "step_00000006/COMPLETE"
    assert mirrors[0].uploaded == 6 and mirrors[0].missing() is None and mirrors[0].skipped == [4]
    assert all(m.protected() == set() for m in mirrors)


def test_an_outage_is_retried_at_the_next_save_and_the_marker_waits_for_every_rank(ranks):
    """Two ranks' upload threads, uploading at once as in a run: while the store is down a step is
    left without its COMPLETE object and said on the progress line; rank 0 marks a step only
    after every rank's files are up: it waits while rank 1 is still uploading, and a rank whose
    files failed keeps it from marking the step; once the store is back, the next save uploads
    whole."""
    root, mirrors, stores, objects, said = ranks
    down = ConnectionError("Connection refused")
    stores[0].fail = stores[1].fail = down
    submit_all(mirrors, save(root, 2), 2)
    finish(mirrors)
    assert marked(objects) == [] and mirrors[0].missing() == 2
    assert mirrors[0].behind() == "remote: step 2 not uploaded, retried at the next save"
    assert mirrors[1].behind() is None  # rank 0 speaks for the run
    assert "Training goes on" in said[-1] and "exits 75" in said[-1]

    # rank 0's files go up at once; rank 1's upload is still in flight: rank 0 waits for it
    stores[0].fail = None
    stores[1].gate.clear()
    submit_all(mirrors, save(root, 4), 4)
    mine = {"step_00000004/" + n for n in ("meta.json", "rank_00000.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt")}
    deadline = time.monotonic() + 30
    while not mine <= set(objects) and time.monotonic() < deadline:
        threading.Event().wait(0.01)  # (time.sleep is the retries' no-op here)
    threading.Event().wait(0.3)  # time enough for rank 0 to mark the step, had it not waited
    assert mine <= set(objects) and "step_00000004/COMPLETE" not in objects and mirrors[0].busy()
    stores[1].gate.set()  # ...and then rank 1's files fail: no marker
    finish(mirrors)
    assert "step_00000004/COMPLETE" not in objects and mirrors[0].missing() == 4
    assert "step_00000004/rank_00001.pt" not in objects

    stores[1].fail = None
    submit_all(mirrors, save(root, 6), 6)
    finish(mirrors)
    assert mirrors[0].missing() is None and mirrors[0].behind() is None
    assert {n for n in objects if n.startswith("step_00000006/")} == {"step_00000006/" + n for n in FILES}
    assert objects[-1] == "step_00000006/COMPLETE" and "reachable again" in said[-1]


def test_pruning_keeps_a_step_until_its_upload_is_done(tmp_path, monkeypatch):
    """keep_last=1: committing step 4 while step 2 is still uploading leaves step 2 on disk (it
    used to be deleted before its upload was joined); the next commit prunes both."""
    monkeypatch.setattr(rc.time, "sleep", lambda s: None)
    store = Store([])
    monkeypatch.setattr(rc.RemoteCheckpoints, "_uploader", lambda self: store)
    monkeypatch.setattr(rc.RemoteCheckpoints, "prune", lambda self, keep_last: None)
    manager = CheckpointManager(tmp_path / "run", keep_last=1, remote="s3://bucket/run")
    store.gate.clear()
    for step in (2, 4):
        step_dir = manager.begin(step)
        (step_dir / "meta.json").write_text('{"step": %d}' % step)
        manager.commit(step_dir, step)
    assert manager.complete_steps() == [2, 4]  # 2 is in flight, kept
    store.gate.set()
    manager.uploads.wait()
    step_dir = manager.begin(6)
    (step_dir / "meta.json").write_text('{"step": 6}')
    manager.commit(step_dir, 6)
    assert manager.complete_steps() == [6]  # nothing queued any more: keep_last applies
    manager.uploads.wait()
    assert marked(store.objects)[-1] == 6


def test_any_exception_in_an_upload_thread_counts_as_its_ranks_failure(ranks):
    """A bug on rank 1's thread (not a store error) is still counted: rank 0 does not wait for
    ever, leaves the step without its marker and says why."""
    root, mirrors, stores, objects, said = ranks
    stores[1].fail = ValueError("a bug in the upload code")
    submit_all(mirrors, save(root, 2), 2)
    finish(mirrors)
    assert marked(objects) == [] and mirrors[0].missing() == 2
    assert "another rank could not upload its files of step 2" in said[-1]


def test_a_step_saved_again_counts_afresh(ranks):
    """After a rollback a step is saved again: its upload round has keys of its own, so the first
    attempt's failure does not fail the second."""
    root, mirrors, stores, objects, said = ranks
    stores[1].fail = ConnectionError("Connection refused")
    submit_all(mirrors, save(root, 4), 4)
    finish(mirrors)
    assert marked(objects) == [] and "step 4 is not in" in said[-1]
    stores[1].fail = None
    submit_all(mirrors, save(root, 4), 4)  # the rollback's save of the same step
    finish(mirrors)
    assert marked(objects) == [4] and "reachable again" in said[-1]


def test_a_commit_walks_the_step_directory_once_per_filesystem(tmp_path, monkeypatch):
    """Two ranks on one filesystem commit a checkpoint with checkpoint.remote: the step directory
    is walked once (rank 0's flush, whose listing serves both ranks' uploads), not once more by
    every rank's upload: on Lustre, 8 ranks a node walking a checkpoint of thousands of files at
    every save is metadata load for nothing."""
    import datetime
    import os as os_module
    import pathlib

    from pargo_dist.runtime.store_sync import StoreSync

    monkeypatch.setattr(rc.time, "sleep", lambda s: None)
    objects: list[str] = []
    store = Store(objects)
    monkeypatch.setattr(rc.RemoteCheckpoints, "_uploader", lambda self: store)
    monkeypatch.setattr(rc.RemoteCheckpoints, "prune", lambda self, keep_last: None)
    walks: list[str] = []
    walk, rglob = os_module.walk, pathlib.Path.rglob
    monkeypatch.setattr(os_module, "walk", lambda top, *a, **k: (walks.append(str(top)), walk(top, *a, **k))[1])
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, *a, **k: (walks.append(str(self)), rglob(self, *a, **k))[1])
    master = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    managers = [CheckpointManager(tmp_path / "run", rank=r, world_size=2, remote="s3://bucket/run",
                                  sync=StoreSync(dist.TCPStore("127.0.0.1", master.port, 1, False), r, 2))
                for r in (0, 1)]

    def commit(m):
        step_dir = m.begin(2)
        (step_dir / f"rank_{m.rank:05d}.pt").write_text("x")
        if m.rank == 0:
            (step_dir / "meta.json").write_text('{"step": 2}')
        m.commit(step_dir, 2)
        m.uploads.wait()
    threads = [threading.Thread(target=commit, args=(m,)) for m in managers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    step_walks = [w for w in walks if "step_00000002" in w]
    assert len(step_walks) == 1, step_walks
    assert sorted(objects) == ["step_00000002/COMPLETE", "step_00000002/meta.json", "step_00000002/rank_00000.pt",
                               "step_00000002/rank_00001.pt"]


def test_an_upload_waiting_on_a_real_store_never_holds_up_the_training_threads_store_calls(tmp_path, monkeypatch):
    """Over a real TCPStore (the ranks' own): rank 1's upload thread waits for rank 0 to name the
    round, for as long as rank 0's upload of an older step takes. A TCPStore client runs one
    request at a time, so with one client for both threads rank 1's training thread could not
    even arrive at the next save's barrier while rank 0's training thread waited there, and rank
    0's upload thread could not name the round: a deadlock that an outage during an upload made
    (1 run in 3 on 2 loaded cores). The upload thread has a connection of its own
    (store_sync.own_connection): the training thread's store calls return at once."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    root = tmp_path / "checkpoints"
    remote = rc.RemoteCheckpoints("s3://bucket/run", root)
    monkeypatch.setattr(remote, "_uploader", lambda: Store([]))
    mirror = UploadMirror(remote, 1, 2, client, keep_last=3, say=print, timeout_s=6)
    mirror.submit(save(root, 2), 2)  # rank 0 never names the round: the thread waits up to 6 s
    time.sleep(0.5)
    began = time.monotonic()
    client.add("pargo/1/arrived", 1)  # what the training thread's next barrier does first
    took = time.monotonic() - began
    for r in (1, 2, 3):  # rank 0 names the round (whichever the thread is in): it uploads and ends
        client.set(f"pargo/upload/{r}/step", b"2")
    mirror.wait()
    assert took < 2.0, f"the training thread's store call waited {took:.1f} s for the upload thread's wait"
