"""Checkpoint lifecycle: complete-marker semantics, resume selection, pruning, RNG state,
and the two things only real processes show: ranks synchronising through a gloo barrier,
and a SIGKILL in the middle of a save."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pargo_dist.checkpoint.manager import COMPLETE, CheckpointManager
from pargo_dist.checkpoint.state import TrainState, capture_rng_state, restore_rng_state
from pargo_dist.errors import UserError


def save(mgr: CheckpointManager, step: int, **state) -> Path:
    """One full single-process save, as the training loop does it."""
    path = mgr.begin(step)
    (path / "model_shard.bin").write_bytes(b"x" * 64)  # stands in for the backend's files
    mgr.save_rank_state(path, {"rng": capture_rng_state(), "loader": {"pos": step}})
    mgr.save_state(path, TrainState(step=step, samples_seen=10 * step, world_size=mgr.world_size, **state),
                   config_yaml=f"train:\n  steps: {step}\n")
    mgr.commit(path, step)
    return path


def crashed_save(mgr: CheckpointManager, step: int) -> Path:
    """A save interrupted before commit: files written, no marker."""
    path = mgr.begin(step)
    mgr.save_rank_state(path, {"loader": {"pos": step}})
    mgr.save_state(path, TrainState(step=step))
    return path


# -- single process --------------------------------------------------------------------


def test_round_trip_marker_written_last(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = save(mgr, 42, tokens_seen=7, layout={"dp": 1, "zero_stage": 3})

    assert path == tmp_path / "checkpoints" / "step_00000042"
    assert mgr.step_dir(42) == path
    names = {p.name for p in path.iterdir()}
    assert names == {"model_shard.bin", "rank_00000.pt", "meta.json", "config.yaml", COMPLETE}  # no temp files
    marker = path / COMPLETE
    assert all(marker.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in path.iterdir())
    assert json.loads(marker.read_text())["step"] == 42
    assert json.loads(marker.read_text())["world_size"] == 1

    state = mgr.load_state(path)
    assert state == TrainState(step=42, samples_seen=420, tokens_seen=7, layout={"dp": 1, "zero_stage": 3})
    assert (path / "config.yaml").read_text() == "train:\n  steps: 42\n"
    state = mgr.load_rank_state(path)
    assert state["loader"] == {"pos": 42} and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert mgr.complete_steps() == [42] and mgr.latest() == path
    assert mgr.resolve("auto") == path and mgr.resolve(str(path)) == path and mgr.resolve("none") is None


def test_empty_run_dir_resolves_to_fresh_start(tmp_path):
    mgr = CheckpointManager(tmp_path / "never_created")
    assert mgr.complete_steps() == [] and mgr.latest() is None and mgr.resolve("auto") is None
    with pytest.raises(ValueError, match="does not exist"):
        mgr.resolve(str(tmp_path / "nope"))


def test_incomplete_dir_is_never_picked(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = save(mgr, 10)
    partial = crashed_save(mgr, 20)

    assert (partial / "rank_00000.pt").is_file() and not (partial / COMPLETE).exists()
    assert mgr.complete_steps() == [10]
    assert mgr.latest() == good and mgr.resolve("auto") == good
    with pytest.raises(ValueError) as err:
        mgr.resolve(str(partial))
    message = str(err.value)
    assert str(partial) in message and COMPLETE in message and str(good) in message


def test_corrupt_meta_counts_as_incomplete(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = save(mgr, 1)
    damaged = save(mgr, 2)
    meta = damaged / "meta.json"
    meta.write_text(meta.read_text()[:5])  # truncated

    assert mgr.complete_steps() == [1] and mgr.latest() == good
    with pytest.raises(ValueError, match="meta.json"):
        mgr.resolve(str(damaged))


def test_train_state_is_versioned(tmp_path):
    """meta.json says which fields it has: a file from before versioning reads with defaults, a
    newer version or a foreign field is refused with the file named, not half read."""
    mgr = CheckpointManager(tmp_path)
    path = save(mgr, 3)
    meta = path / "meta.json"
    assert json.loads(meta.read_text())["version"] == TrainState.VERSION == 3
    legacy = {"step": 3, "samples_seen": 30, "tokens_seen": 9, "world_size": 2, "stage": "align",
              "layout": {"dp": 2, "zero_stage": 3}, "loader": {"sample_in_epoch": 30}}  # no version, backend, skipped
    meta.write_text(json.dumps(legacy))
    state = mgr.load_state(path)
    assert (state.step, state.world_size, state.backend, state.skipped, state.stream_samples) == (3, 2, "deepspeed",
                                                                                                  0, {})
    assert state.loader == {"sample_in_epoch": 30} and state.skipped_steps == 0
    meta.write_text(json.dumps({**legacy, "version": 1}))  # version 1: no skipped_steps yet
    assert mgr.load_state(path).skipped_steps == 0
    meta.write_text(json.dumps({**legacy, "version": 2, "skipped_steps": 1}))  # 2: no rollbacks yet
    state = mgr.load_state(path)
    assert (state.skipped_steps, state.rollbacks, state.excluded_samples) == (1, 0, {})
    meta.write_text(json.dumps({**legacy, "version": 4}))
    with pytest.raises(UserError, match=f"{meta}: train state version 4 is newer"):
        mgr.load_state(path)
    meta.write_text(json.dumps({**legacy, "version": 3, "sheduler": {}}))
    with pytest.raises(ValueError, match=r"unknown train state fields \['sheduler'\]"):
        mgr.load_state(path)


def test_begin_replaces_a_stale_dir_of_the_same_step(tmp_path):
    mgr = CheckpointManager(tmp_path)
    stale = crashed_save(mgr, 5)
    (stale / "old_shard.bin").write_bytes(b"old")
    path = save(mgr, 5)
    assert path == stale and not (path / "old_shard.bin").exists()
    assert mgr.complete_steps() == [5]


def test_keep_last_prunes_old_and_keeps_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    crashed_save(mgr, 0)  # leftover older than everything
    for step in range(1, 6):
        save(mgr, step)
    in_flight = crashed_save(mgr, 9)  # newer than the newest complete: maybe a save in progress
    mgr.cleanup()

    assert mgr.complete_steps() == [4, 5]
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert remaining == ["step_00000004", "step_00000005", "step_00000009"]
    assert in_flight.is_dir()

    # An incomplete dir between complete ones is a dead leftover and goes at the next commit.
    crashed_save(mgr, 6)
    save(mgr, 7)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000005", "step_00000007", "step_00000009"]


def test_keep_last_one_never_deletes_the_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        newest = save(mgr, step)
        assert mgr.complete_steps() == [step] and newest.is_dir()
    crashed_save(mgr, 4)
    mgr.cleanup()
    assert mgr.latest() == newest and mgr.complete_steps() == [3]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_cleanup_does_not_follow_symlinks(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep me")
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000001").symlink_to(outside, target_is_directory=True)
    save(mgr, 2)

    assert not (tmp_path / "run" / "checkpoints" / "step_00000001").exists()
    assert (outside / "data.bin").read_bytes() == b"keep me"
    assert mgr.complete_steps() == [2]


def test_missing_rank_file_of_a_saving_rank_is_an_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = save(mgr, 1)
    (path / "rank_00000.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rank_00000.pt"):
        mgr.load_rank_state(path)
    assert mgr.load_rank_state(path, rank=1) is None  # written by 1 rank: rank 1 never had one


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(3)  # move away from the seeded start
    state = capture_rng_state()
    first = (random.random(), np.random.rand(4), torch.rand(5))
    random.random(), np.random.rand(), torch.rand(3)  # advance further

    # Through a checkpoint file, as a resume would see it.
    mgr = CheckpointManager(tmp_path)
    path = mgr.begin(1)
    mgr.save_rank_state(path, {"rng": state})
    restore_rng_state(mgr.load_rank_state(path)["rng"])
    again = (random.random(), np.random.rand(4), torch.rand(5))

    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], again[1])
    assert torch.equal(first[2], again[2])


# -- real processes ---------------------------------------------------------------------
# Forked, not spawned: the children need nothing but torch, which this process has already
# imported, and a fresh interpreter importing torch costs seconds per process. Every wait
# has a timeout, so a wedged child fails the test instead of hanging the suite.

FORK = mp.get_context("fork")


def _rank_worker(run_dir: str, store: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from pargo_dist.runtime.store_sync import StoreSync

    mgr = CheckpointManager(run_dir, keep_last=2, rank=rank, world_size=world, sync=StoreSync.default())
    for step in (1, 2, 3):
        path = mgr.begin(step)
        if rank == 1:
            time.sleep(0.2)  # the slow rank: rank 0 must not write the marker before this file exists
        mgr.save_rank_state(path, {"rank": rank, "loader": {"pos": 100 * rank + step}})
        mgr.save_state(path, TrainState(step=step, world_size=world))
        mgr.commit(path, step)
    dist.destroy_process_group()


def test_two_ranks_over_gloo(tmp_path):
    run_dir = tmp_path / "run"
    procs = [FORK.Process(target=_rank_worker, args=(str(run_dir), str(tmp_path / "store"), r, 2))
             for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0, f"rank process exited with {proc.exitcode}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

    mgr = CheckpointManager(run_dir)  # a later single-process reader (elastic resume, export)
    assert mgr.complete_steps() == [2, 3]  # keep_last=2 applied by rank 0 under the barrier
    path = mgr.latest()
    rank_files = [path / "rank_00000.pt", path / "rank_00001.pt"]
    assert all(f.is_file() for f in rank_files)
    marker = path / COMPLETE
    assert json.loads(marker.read_text())["world_size"] == 2
    assert marker.stat().st_mtime_ns >= max(f.stat().st_mtime_ns for f in rank_files)

    assert mgr.load_rank_state(path, rank=1) == {"rank": 1, "loader": {"pos": 103}}
    assert mgr.load_rank_state(path) == {"rank": 0, "loader": {"pos": 3}}
    assert mgr.load_rank_state(path, rank=3) is None  # 4-rank resume of a 2-rank checkpoint


def _killed_worker(run_dir: str, written) -> None:
    mgr = CheckpointManager(run_dir)
    for step in (1, 2):
        path = mgr.begin(step)
        (path / "model_shard.bin").write_bytes(b"x" * 1024)
        mgr.save_rank_state(path, {"rng": capture_rng_state(), "loader": {"pos": step}})
        mgr.save_state(path, TrainState(step=step))
        if step == 2:
            written.set()
            time.sleep(120)  # SIGKILLed here, before commit
        mgr.commit(path, step)


def test_sigkill_before_commit_leaves_previous_checkpoint_latest(tmp_path):
    run_dir = tmp_path / "run"
    written = FORK.Event()
    proc = FORK.Process(target=_killed_worker, args=(str(run_dir), written))
    proc.start()
    try:
        assert written.wait(timeout=60), f"worker never reached the crash point (exit {proc.exitcode})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL

    mgr = CheckpointManager(run_dir)
    killed = mgr.step_dir(2)
    assert (killed / "rank_00000.pt").is_file() and (killed / "meta.json").is_file()
    assert not (killed / COMPLETE).exists()
    assert mgr.complete_steps() == [1] and mgr.latest() == mgr.step_dir(1) == mgr.resolve("auto")
    assert mgr.load_rank_state(mgr.latest())["loader"] == {"pos": 1}

    # The rerun saves the same step again over the dead leftover.
    path = save(mgr, 2)
    assert mgr.complete_steps() == [1, 2] and mgr.latest() == path
    assert (path / "model_shard.bin").stat().st_size == 64  # new files, not the killed save's
