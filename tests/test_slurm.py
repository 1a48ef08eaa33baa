"""SLURM: rendezvous derivation, requeue decisions, the launcher's signals and hang detector,
two "nodes" on loopback, and real sbatch jobs on a one-machine cluster (slurmctld, slurmd,
munge) started by this module.

Every curve is compared with the uninterrupted 2-rank reference run of TEST_RECIPE: a job
under SLURM, a requeued job and a two-node run compute the same thing, so the losses agree
to 1e-6 (the same ranks in the same order) or, for two nodes, to 1e-5.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import forkserver
from support.slurm_cluster import SlurmCluster, unavailable
from support.training import env, losses, marker, sample_ids, write_recipe

from pargo_dist import cli
from pargo_dist.launch.restarts import RestartPolicy, restart_policy
from pargo_dist.launch.slurm import RESTARTS_SPENT, after_step, asked_for_requeue, expand_hostlist, port_for_job, rendezvous_from_env
from pargo_dist.runtime.exits import HANG_EXIT, PEER_LOST_EXIT, REQUEUE_EXIT

LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "launch.py"


def inject(**faults: str) -> dict[str, str]:
    """Fault knobs (tests/support/inject/sitecustomize.py, on every test process's PYTHONPATH)."""
    return dict(faults)


# -- what every node derives on its own ------------------------------------------------------

@pytest.mark.parametrize("expr,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],b7,c[1,3]", ["a8", "a9", "a10", "b7", "c1", "c3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
])
def test_host_list_expands_like_slurm(expr, hosts):
    assert expand_hostlist(expr) == hosts


def test_every_node_derives_the_same_rendezvous():
    base = {"SLURM_JOB_ID": "81234", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_NUM_NODES": "4"}
    views = [rendezvous_from_env({**base, "SLURM_NODEID": str(n)}) for n in range(4)]
    assert {(v.master_addr, v.master_port, v.nnodes) for v in views} == {("gpu07", port_for_job("81234", 0), 4)}
    assert [v.node_rank for v in views] == [0, 1, 2, 3]
    requeued = rendezvous_from_env({**base, "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": "1"})
    assert requeued.master_port != views[0].master_port  # not the old incarnation's socket
    assert 20000 <= requeued.master_port < 60000
    pinned = rendezvous_from_env({**base, "SLURM_NODEID": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"})
    assert pinned.master == "10.0.0.7:29500"
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        rendezvous_from_env({k: v for k, v in base.items()})
    with pytest.raises(ValueError, match="names 4 hosts"):
        rendezvous_from_env({**base, "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "2"})


def test_each_start_of_the_ranks_meets_at_a_store_of_its_own():
    """An in-job restart never meets the previous start's store (whose rank 0 may still be leaving,
    serving the old keys, or be told to abort by a node that lost its rank): the nodes meet at the
    job's port plus the start's number; one node alone takes a fresh port each time."""
    from pargo_dist.launch.node import start_master

    assert [start_master("10.0.0.7:29500", k) for k in range(3)] == ["10.0.0.7:29500", "10.0.0.7:29501",
                                                                      "10.0.0.7:29502"]
    assert start_master("[::1]:29500", 1) == "[::1]:29501"
    alone = {start_master(None, 0) for _ in range(5)}
    assert len(alone) > 1 and all(m.startswith("127.0.0.1:") for m in alone)


def test_only_a_saved_checkpoint_requeues_and_only_up_to_the_cap():
    assert after_step(REQUEUE_EXIT, restarts=0, max_requeues=3)[0]
    assert after_step(REQUEUE_EXIT, restarts=2, max_requeues=3)[0]
    capped, message = after_step(REQUEUE_EXIT, restarts=3, max_requeues=3)
    assert not capped and "already requeued 3 times" in message and "--run-dir" in message
    for rc in (0, 1, 2, HANG_EXIT, 137):
        requeue, message = after_step(rc, restarts=0, max_requeues=3)
        assert not requeue and f"exit {rc}" in message
    assert "hang detector" in after_step(HANG_EXIT, 0, 3)[1]


def test_a_nodes_request_to_requeue_counts_even_when_another_nodes_exit_code_hides_it(tmp_path):
    """On several nodes srun reports the highest exit code: node 0's launcher exits 75 (restarts
    spent), srun's --kill-on-bad-exit ends node 1's, which reports 137. The batch script passes its
    log: the launcher's line in this start of the job (not an earlier one) requeues it."""
    log = tmp_path / "job.out"
    earlier = f"[pargo-dist] job 77 start\n{RESTARTS_SPENT}: exiting 75 instead of 124 so that SLURM requeues\n"
    log.write_text(earlier + "[pargo-dist] job 77 start\npargo-dist launch: rank 1 exited with 137\n")
    assert not asked_for_requeue(log, "77") and not after_step(137, 1, 3)[0]
    log.write_text(earlier + f"[pargo-dist] job 77 start\n{RESTARTS_SPENT}: exiting 75 instead of 3 so that ...\n")
    assert asked_for_requeue(log, "77") and not asked_for_requeue(tmp_path / "absent.out", "77")
    requeue, message = after_step(137, 1, 3, restarts_spent=True)
    assert requeue and "exit 75 (srun's exit 137 is another node's; a node's in-job restarts are spent)" in message
    assert not after_step(2, 1, 3, restarts_spent=True)[0] and not after_step(75, 3, 3, restarts_spent=True)[0]


def test_spent_in_job_restarts_requeue_under_slurm_only_after_faults(monkeypatch):
    """The launcher's choice once its restarts are spent (RestartPolicy.requeue_instead): under
    SLURM, exit 75 instead of the failing code after faults (a hang, a kill, a lost peer, a
    crash); never for a bad input, an interruption or the same failure again; never outside
    SLURM or with run.max_restarts=0 (the failure ends the job, as before)."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cfg = SimpleNamespace(run=SimpleNamespace(max_restarts=1, restart_window_s=60.0))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not restart_policy(cfg).requeue_when_spent
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    policy = restart_policy(cfg)
    assert policy.requeue_when_spent
    assert policy.refuse(HANG_EXIT, None) is None and not policy.requeue_instead(HANG_EXIT, None)  # restarts left
    policy.note(None)
    for code in (HANG_EXIT, 137, PEER_LOST_EXIT, 1):
        assert "1 restart(s) within" in policy.refuse(code, None) and policy.requeue_instead(code, None), code
    for code in (2, 130):
        assert policy.refuse(code, None) and not policy.requeue_instead(code, None), code
    failure = {"step": 3, "error": "RuntimeError: boom"}
    policy.last = failure
    assert "same failure again" in policy.refuse(1, failure) and not policy.requeue_instead(1, failure)
    assert policy.requeue_instead(1, {"step": 4, "error": "RuntimeError: boom"})  # it got further: a fault
    clock[0] += 60  # the restart leaves the window: restart again rather than requeue
    assert policy.refuse(HANG_EXIT, None) is None and not policy.requeue_instead(HANG_EXIT, None)
    outside = RestartPolicy(max_restarts=1, requeue_when_spent=False)
    outside.note(None)
    assert outside.refuse(HANG_EXIT, None) and not outside.requeue_instead(HANG_EXIT, None)
    never = RestartPolicy(max_restarts=0, requeue_when_spent=True)
    assert never.refuse(HANG_EXIT, None) and not never.requeue_instead(HANG_EXIT, None)


# -- pargo-dist submit -----------------------------------------------------------------------

@pytest.mark.parametrize("error,hardware", [
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", True),
    ("RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error", True),
    ("RuntimeError: CUDA error: no CUDA-capable device is detected", True),
    ("ValueError: shapes (4, 8) and (16,) do not match", False),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", False),
])
def test_the_same_error_twice_ends_a_bug_but_requeues_a_machine_fault(monkeypatch, error, hardware):
    """The same error at the same step twice: our code's (a traceback that repeats is a bug, or a
    batch too large: the run ends with it) or the machine's (a GPU with failing memory, a lost
    device, NCCL's system errors fail there again: restarted while restarts are left, then, under
    SLURM, requeued onto other nodes). docs/slurm.md has the table."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("SLURM_JOB_ID", "81234")
    policy = restart_policy(SimpleNamespace(run=SimpleNamespace(max_restarts=2, restart_window_s=600.0)))
    failure = {"step": 5, "error": error}
    assert policy.refuse(1, failure) is None
    policy.note(failure)
    again = policy.refuse(1, dict(failure))
    if not hardware:
        assert again == f"the same failure again at step 5 ({error})" and not policy.requeue_instead(1, failure)
        return
    assert again is None  # restarted again
    policy.note(failure)
    assert "2 restart(s) within" in policy.refuse(1, failure) and policy.requeue_instead(1, failure)


def test_submit_dry_run_writes_the_sbatch_script(tmp_path, data_dir, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", Path("runs/x"), data_dir)
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["submit", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--account", "vision", "--time", "2:00:00", "--signal-lead", "120", "--dry-run",
                   "optim.lr=1e-4", "--export", "NCCL_DEBUG=WARN"])
    script = capsys.readouterr().out
    assert rc == 0
    sbatch = re.findall(r"^#SBATCH (\S+)", script, re.M)
    for line in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--cpus-per-task=64", "--partition=gpu",
                 "--account=vision", "--time=2:00:00", "--signal=B:USR1@120", "--requeue", "--open-mode=append",
                 f"--output={tmp_path}/runs/x/logs/%x-%j.out"):
        assert line in sbatch, (line, sbatch)
    assert "--slurm --nproc 8" in script and "optim.lr=1e-4" in script and "export NCCL_DEBUG=WARN" in script
    assert f'"run.dir={tmp_path}/runs/x/slurm-${{SLURM_JOB_ID}}"' in script
    assert f'--log {tmp_path}/runs/x/logs/r-"${{SLURM_JOB_ID}}.out"' in script  # where --output writes (%x-%j)
    assert script.index("#SBATCH") < script.index("set -uo")  # sbatch reads directives before any command
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_submit_rejects_a_bad_recipe_before_queueing(tmp_path, data_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", data_dir)
    assert cli.main(["submit", str(recipe), "--gpus-per-node", "8", "--dry-run", "train.stpes=5"]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "train.steps" in err and str(recipe) in err
    assert cli.main(["submit", str(recipe), "--dry-run"]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err


# -- the launcher: signals at start-up, two nodes ----------------------------------------------

def _launch(recipe: Path, overrides: list[str], nproc: int, extra_env: dict | None = None,
            wrap: list[str] = ()) -> subprocess.Popen:
    cmd = [*wrap, sys.executable, str(LAUNCHER), "--nproc", str(nproc), *(["--slurm"] if extra_env else []),
           "--", str(recipe), *overrides]
    return forkserver.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env(), **(extra_env or {})}, start_new_session=True)


def test_a_signal_during_start_up_is_honoured_at_the_first_step(recipe):
    """SIGUSR1 while the ranks still import torch: held, then saved at step 1 and exit 75."""
    proc = _launch(recipe, [], nproc=2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, out[-3000:]
    run_dir = recipe.parent / "run"
    assert marker(run_dir, 1).exists() and sorted(losses(run_dir)) == [1]


def _unshare_ok() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/shm"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


def test_two_nodes_on_loopback_restart_together_after_a_killed_rank_and_follow_the_single_node_curve(
        reference, recipe, tmp_path):
    """Two launchers with --slurm, node ranks 0 and 1, rendezvous derived from the same variables
    an sbatch job sets. Node 1 gets a private /dev/shm (a mount namespace), as a second machine
    would: streaming keeps per-node state there.

    Node 1's rank is SIGKILLed at the start of step 3 (after the step-2 checkpoint), as a dead GPU
    would end it (a fault knob). Before, the run ended with exit 137. Now node 1's launcher starts
    its rank again; node 0's rank, whose collective lost its peer, exits 3 and its launcher starts
    it again too; both meet at the same rendezvous, resume from step 2 and finish on the
    uninterrupted run's curve and samples. Rank 1 is also a straggler (0.3 s more per batch, a
    fault knob): it is named with its host at the logging intervals, never rank 0, and TensorBoard
    gets its rank (pargo_dist/train/stragglers.py)."""
    if not _unshare_ok():
        pytest.skip("needs `unshare -m` and mount (root) to give the second node its own /dev/shm")
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_NUM_NODES": "2",
           **inject(PARGO_TEST_KILL=f"1:3:{tmp_path / 'killed'}", PARGO_TEST_SLOW_BATCH="1:0.3")}
    private_shm = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev/shm && exec "$0" "$@"']
    nodes = [_launch(recipe, ["run.max_restarts=2"], nproc=1, extra_env={**job, "SLURM_NODEID": str(n)},
                     wrap=private_shm if n else ())
             for n in range(2)]
    node0, node1 = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], node0[-3000:] + node1[-3000:]
    assert "node 1/2" in node1 and "rendezvous 127.0.0.1:" in node1
    assert (tmp_path / "killed").exists()
    assert "rank 1 exited with 137" in node1 and "restart 1 of at most 2" in node1, node1[-3000:]
    assert "rank 0 exited with 3" in node0 and "restart 1 of at most 2" in node0, node0[-3000:]
    assert "restart 2" not in node0 + node1 and "resumed from" in node0 and "step_00000002" in node0
    # (the first step of each start, which waits for the loader's warm-up, is not timed: rank 1 is
    # named at steps 2, 4, 5 and 6 but for a hiccup of the machine, rank 0 never)
    named = [line for line in node0.splitlines() if line.startswith("straggler: rank 1 on ")]
    assert len(named) >= 3 and not any(line.startswith("straggler: rank 0") for line in node0.splitlines())
    flagged = losses(recipe.parent / "run", "perf/straggler_rank")
    assert set(flagged.values()) <= {1.0, -1.0} and sum(v == 1.0 for v in flagged.values()) >= 3, flagged
    ref, got = losses(reference(3, "finetune")), losses(recipe.parent / "run")
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    assert sample_ids(recipe.parent / "run") == sample_ids(reference(3, "finetune"))


@pytest.fixture
def recipe(tmp_path, data_dir):
    return write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)


# -- real sbatch jobs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def submit(cluster: SlurmCluster, recipe: Path, *args: str,
           extra_env: dict[str, str] | None = None) -> tuple[int, Path, Path]:
    """`pargo-dist submit` for 2 CPU ranks on the one node; returns (job id, run dir, log). The job
    gets the submitting environment (sbatch's --export=ALL), extra_env included."""
    out = subprocess.run([sys.executable, "-m", "pargo_dist.cli", "submit", str(recipe), "--nproc-per-node", "2",
                          "--time", "15:00", *args], capture_output=True, text=True,
                         env={**env(), **cluster.env, **(extra_env or {})}, cwd=recipe.parent)
    assert out.returncode == 0, out.stderr
    job = int(re.search(r"submitted job (\d+)", out.stdout).group(1))
    log = Path(re.search(r"log +(\S+)", out.stdout).group(1))
    return job, recipe.parent / "run" / f"slurm-{job}", log


def wait_job(cluster: SlurmCluster, job: int, log: Path, until=lambda info: info.get("JobState") in FINAL,
             timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if until(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)], env=cluster.env)
    text = log.read_text() if log.exists() else "(no log)"
    raise AssertionError(f"job {job} did not get there in {timeout}s: {cluster.job(job)}\n{text[-4000:]}")


def test_usr1_saves_requeues_and_the_job_finishes_on_the_reference_curve(cluster, reference, recipe):
    """A submitted job, run to completion on the reference curve, through a preemption: the batch
    script gets USR1 (what --signal=B:USR1@N sends before the time limit) once its ranks are
    starting; they hold it until the trainer can act, save at step 1 and exit 75; the script
    requeues its own job, which comes back with the same id, resumes the run and finishes."""
    job, run_dir, log = submit(cluster, recipe, "checkpoint.every=100")
    wait_job(cluster, job, log, until=lambda _: log.exists() and "node 0/1" in log.read_text())
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env, check=True)
    wait_job(cluster, job, log, until=lambda info: info.get("Restarts") == "1" and info.get("JobState") == "PENDING")
    assert marker(run_dir, 1).exists()
    info = wait_job(cluster, job, log)  # eligible again once its old credential expires (AuthInfo)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-3000:]
    assert marker(run_dir, 6).exists()
    assert "got SIGUSR1" in text and "requeuing (requeue 1 of at most 10)" in text
    assert "restart 1" in text and "resumed from" in text and "training finished" in text
    ref, got = losses(reference(3, "finetune")), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)


def _state(pid: str) -> str | None:
    """A process's state (T: stopped, Z: exited, not reaped), None when it is gone."""
    try:
        return Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_rank_that_hangs_twice_spends_the_restarts_and_the_job_requeues_onto_the_reference_curve(
        cluster, reference, recipe, tmp_path):
    """Rank 1 stops itself (SIGSTOP, as a rank whose GPU hangs would) at the start of step 4, the
    second after the step-2 checkpoint (the first step of a start may take the set-up allowance),
    twice. Rank 0 waits in step 4's collective until the hang detector ends it (exit 124, its
    stack dumped); the launcher SIGKILLs the frozen rank (SIGTERM stays pending on a stopped
    process) and restarts both (run.max_restarts=1). Rank 1 freezes again, the hang detector
    fires again, the restarts are spent: the launcher exits 75 instead of 124, the batch script
    requeues the job, and the requeued job resumes from step 2 and finishes on the uninterrupted
    curve. No frozen rank outlives its start."""
    frozen = tmp_path / "frozen"  # one line per freeze: the frozen rank's pid
    job, run_dir, log = submit(cluster, recipe, "train.hang_timeout_s=3", "run.max_restarts=1",
                               extra_env=inject(PARGO_TEST_FREEZE=f"1:4:{frozen}:2"))
    try:
        wait_job(cluster, job, log, until=lambda _: frozen.exists() and len(frozen.read_text().split()) == 2)
        first, second = frozen.read_text().split()
        deadline = time.monotonic() + 5  # (the rank writes its pid, then stops itself)
        while _state(second) != "T" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first != second and _state(first) is None and _state(second) == "T"  # the first killed and reaped
        info = wait_job(cluster, job, log)
    finally:  # a failed test leaves no job that holds the node for the next ones
        subprocess.run(["scancel", str(job)], env=cluster.env, capture_output=True)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text[-5000:]
    assert frozen.read_text().split() == [first, second]
    assert _state(second) is None
    # twice: the waiting rank says what it waited in and dumps its stack, its launcher kills the frozen one
    hangs = re.findall(r"rank 0 made no progress for \d+s \(limit 3s, .*\) while training step (\d+)", text)
    assert hangs == ["4", "4"], text[-5000:]
    assert len(re.findall(r'File ".*pargo_dist/train/trainer\.py", line \d+ in run', text)) >= 2, text[-5000:]
    assert text.count(f"rank 0 exited with {HANG_EXIT}") == 2
    assert re.findall(r"rank 1 \(pid (\d+)\) did not stop 1.5 s after SIGTERM: SIGKILL", text) == [first, second]
    assert "restart 1 of at most 1 within" in text and "restart 2 of" not in text
    assert "not restarting: 1 restart(s) within run.restart_window_s=3600 s already (run.max_restarts=1)" in text
    assert f"in-job restarts spent: exiting {REQUEUE_EXIT} instead of {HANG_EXIT} so that SLURM requeues" in text
    assert f"job step ended with exit code {REQUEUE_EXIT}" in text and "requeuing (requeue 1 of at most 10)" in text
    # the in-job restart and the requeued job both resume from the step-2 checkpoint
    assert len(re.findall(r"resumed from \S+/step_00000002 at step 2", text)) == 2, text[-5000:]
    assert "training finished" in text and marker(run_dir, 6).exists()
    ref, got = losses(reference(3, "finetune")), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)


def test_a_job_that_fails_for_a_real_error_is_not_requeued(cluster, recipe, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    job, _, log = submit(cluster, recipe, "data.synthetic.num_samples=0", f"data.train.local={empty}")
    info = wait_job(cluster, job, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-3000:]
    assert info["ExitCode"] == "2:0"  # a bad input: the user's to fix, said in one line
    assert f"{empty} holds no MDS dataset (no index.json)" in text and "Traceback" not in text
    assert "exit 2 (a bad recipe, argument or input: the line above says what to change): not requeued" in text


def test_host_list_expansion_agrees_with_scontrol(cluster):
    for expr in ("gpu[01-03,07]", "a[8-10],b7,c[1,3]", "rack[1-2]-n[1-2]"):
        out = subprocess.run(["scontrol", "show", "hostnames", expr], env=cluster.env, capture_output=True,
                             text=True, check=True)
        assert expand_hostlist(expr) == out.stdout.split()
