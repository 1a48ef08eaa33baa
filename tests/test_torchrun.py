"""torchrun, the engine Kubernetes starts: its elastic agent restarts the ranks, and `train
--torchrun` (the pod's command) turns torchrun's "a worker failed" into our exit codes.

Real torchrun agents and ranks over gloo. Every curve is compared with the uninterrupted 2-rank
reference run of TEST_RECIPE (tests/conftest.py). torchrun's workers import the stack afresh
(the fork server does not take torchrun's environment), so each start costs a few seconds more
than under our launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.training import env, losses, marker, own_shm, sample_ids, write_recipe

from pargo_dist.launch.restarts import replay
from pargo_dist.launch.torchrun import torchrun_command
from pargo_dist.runtime.exits import FAILURE_DIR_ENV, PEER_LOST_EXIT, REQUEUE_EXIT, attempt_outcome, record_exit
from pargo_dist.runtime.rank_env import free_port


def _torchrun(args: list[str], recipe: Path, overrides: list[str], extra_env: dict | None = None,
              wrap: list[str] = ()) -> subprocess.Popen:
    cmd = [*wrap, sys.executable, "-m", "torch.distributed.run", *args, "-m", "pargo_dist.cli", "train",
           str(recipe), *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env(), **(extra_env or {})}, start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Their output once they end; a run that hangs is killed, whole process groups, and fails."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _wrapper(recipe: Path, overrides: list[str], extra_env: dict | None = None, nproc: int = 2) -> subprocess.Popen:
    """`pargo-dist train --torchrun`, as a pod runs it."""
    cmd = [sys.executable, "-m", "pargo_dist.cli", "train", "--torchrun", "--nproc", str(nproc), str(recipe),
           *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env(), **(extra_env or {})}, start_new_session=True)


def _own_shm_ok() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/shm"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.fixture
def recipe(tmp_path, data_dir):
    return write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)


def test_two_torchrun_nodes_restart_together_after_a_killed_worker_and_follow_the_uninterrupted_curve(
        reference, recipe, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous, one worker each; node 1 with a /dev/shm of
    its own, as another machine). Node 1's worker is SIGKILLed at the start of step 3, after the
    step-2 checkpoint. Its agent starts a new round; node 0's agent sees it and restarts its own
    worker; both workers meet again in the agents' store, resume from step 2 and end on the
    uninterrupted run's losses and samples.

    Before: the restarted workers made their own store on the agent's port and reused the first
    attempt's keys, and failed in gloo's connectFullMesh ("Connection refused": the dead workers'
    addresses); the job ended with exit 1."""
    port = free_port()
    common = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
              "--rdzv-id=pargo-test", "--max-restarts=2", "--monitor-interval=0.2"]
    knobs = {"PARGO_TEST_KILL": f"1:3:{tmp_path / 'killed'}"}
    nodes = [_torchrun(common, recipe, [], knobs, wrap=own_shm([]) if n and _own_shm_ok() else ())
             for n in range(2)]
    out = _finish(nodes)
    assert [p.returncode for p in nodes] == [0, 0], out[0][-4000:] + out[1][-4000:]
    assert (tmp_path / "killed").exists()
    both = out[0] + out[1]
    assert "exitcode: -9" in both, both[-4000:]  # the agent saw its worker killed
    assert both.count("torchrun's restart 1 of at most 2: resuming") == 1  # (rank 0 says it)
    assert "resumed from" in both and "step_00000002" in both
    ref, got = losses(reference(3, "finetune")), losses(recipe.parent / "run")
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    assert sample_ids(recipe.parent / "run") == sample_ids(reference(3, "finetune"))


def test_sigterm_to_the_pods_command_saves_and_exits_75_under_static_rendezvous(recipe):
    """`train --torchrun` with the variables Kubeflow sets for one node (PET_NNODES, PET_NODE_RANK,
    PET_MASTER_ADDR/PORT: torchrun's static rendezvous). SIGTERM to it, as the kubelet sends at an
    eviction, once the step-2 checkpoint is complete: torchrun passes it to both ranks, which
    finish their step and save; the command exits 75 (torchrun itself exits 1), and the saved
    step is the newest complete checkpoint."""
    kubeflow = {"PET_NNODES": "1", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(free_port())}
    proc = _wrapper(recipe, ["train.steps=200"], kubeflow)
    deadline = time.monotonic() + 300
    while not marker(recipe.parent / "run", 2).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(_finish([proc], timeout=5)[0][-4000:])
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, = _finish([proc])
    assert proc.returncode == REQUEUE_EXIT, out[-4000:]
    assert "torchrun exited 1 after 1 attempt(s); exiting 75" in out, out[-3000:]
    saved = sorted(int(p.parent.name.split("_")[1]) for p in (recipe.parent / "run" / "checkpoints").glob("*/COMPLETE"))
    assert saved[-1] >= 3 and saved[-1] < 200, saved  # saved where the signal found it, not at the end
    meta = json.loads((recipe.parent / "run" / "checkpoints" / f"step_{saved[-1]:08d}" / "meta.json").read_text())
    assert meta["step"] == saved[-1]


def test_a_bug_that_fails_twice_at_the_same_step_spends_torchruns_restarts_in_seconds_and_exits_1(recipe):
    """The rank raises in step 1 in every attempt (a bug). torchrun restarts any failure; our rank
    sees that attempts 0 and 1 failed alike and refuses to train in attempt 2, so the pod's
    command exits 1 ("not retrying"), not 75: a job controller does not recreate the job for a
    bug. (One rank: what is tested is the decision, not the collectives.)"""
    proc = _wrapper(recipe, ["run.max_restarts=2", "train.micro_batch=8"], {"PARGO_TEST_FAULT": "0:1"}, nproc=1)
    out, = _finish([proc])
    assert proc.returncode == 1, out[-4000:]
    assert out.count("injected fault on rank 0 in step 1") >= 2
    assert "not training in torchrun's attempt 2: the same failure again at step 1" in out, out[-4000:]
    assert "exiting 1 (failed: its traceback is above): not retrying, the same failure again at step 1" in out


def _attempt(root: Path, n: int, codes: dict[int, int], failure: dict | None = None, monkeypatch=None) -> Path:
    where = root / f"attempt_{n:03d}"
    where.mkdir(parents=True)
    for rank, code in codes.items():
        monkeypatch.setenv(FAILURE_DIR_ENV, str(where))
        monkeypatch.setenv("RANK", str(rank))
        record_exit(code)
    if failure:
        (where / f"rank_{failure.pop('rank'):05d}.json").write_text(json.dumps(failure))
    return where


def test_the_outcome_of_each_attempt_and_what_our_policy_makes_of_them(tmp_path, monkeypatch):
    """What the pod's command exits with, attempt by attempt (launch/restarts.replay)."""
    a = _attempt(tmp_path, 0, {0: PEER_LOST_EXIT, 1: 1}, {"rank": 1, "step": 4, "error": "RuntimeError: boom"},
                 monkeypatch)
    assert attempt_outcome(a) == (1, {"step": 4, "error": "RuntimeError: boom"})  # the cause, not the peer
    b = _attempt(tmp_path, 1, {}, None, monkeypatch)  # killed: nobody recorded
    assert attempt_outcome(b) == (None, None)
    c = _attempt(tmp_path, 2, {0: REQUEUE_EXIT, 1: REQUEUE_EXIT}, None, monkeypatch)
    assert attempt_outcome(c) == (REQUEUE_EXIT, None)
    boom = {"step": 4, "error": "RuntimeError: boom"}
    ecc = {"step": 4, "error": "RuntimeError: CUDA error: uncorrectable ECC error encountered"}
    assert replay([(1, boom), (None, None)], 2) == (REQUEUE_EXIT, None)  # faults, restarts spent: retry the job
    assert replay([(1, boom), (1, boom)], 2)[0] == 1  # a bug: the same failure at the same step
    assert replay([(1, ecc), (1, ecc), (1, ecc)], 2) == (REQUEUE_EXIT, None)  # the machine: other nodes
    assert replay([(2, None)], 3) == (2, "a bad recipe, argument or input, or a run that diverged")
    assert replay([(1, boom)], 0) == (1, None)  # no restarts asked for: the code as it is
    assert replay([(REQUEUE_EXIT, None)], 2) == (REQUEUE_EXIT, None)  # saved after a signal


def test_the_torchrun_command_leaves_what_the_operator_set_to_it():
    """Kubeflow's variables (PET_*) are torchrun's own options; the wrapper adds only what they lack."""
    alone = torchrun_command(2, ["r.yaml"], 3, {})
    assert {"--nproc-per-node=2", "--max-restarts=3", "--standalone"} <= set(alone)
    assert "SIGUSR1" in next(a for a in alone if a.startswith("--signals-to-handle"))
    assert alone[-4:] == ["-m", "pargo_dist.cli", "train", "r.yaml"]
    pod = torchrun_command(2, ["r.yaml"], 3, {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_MAX_RESTARTS": "1"})
    assert not any(a.startswith(("--nproc-per-node", "--max-restarts", "--standalone")) for a in pod)
    assert os.path.basename(pod[0]).startswith("python") and pod[1:3] == ["-m", "torch.distributed.run"]
