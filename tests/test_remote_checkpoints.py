"""checkpoint.remote: complete checkpoints uploaded to object storage (a moto S3 server on loopback),
marker last, keep_last applied there, found there by a job that lands on a node without the
run's files, read by `pargo-dist export`; an outage of the store costs retries, not the run.
References: the uninterrupted 2-rank run's loss curve (conftest.reference) and the local files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import time

import pytest
from safetensors.torch import load_file
from support.s3 import OutageProxy
from support.training import (can_emulate_nodes, losses, marker, run_nodes, run_train, start_train, wait_for,
                              write_recipe)

from pargo_dist import cli
from pargo_dist.checkpoint.upload import UploadMirror

SECRET = "s3cret-that-must-never-be-printed"


def remote_steps(s3, bucket: str, prefix: str) -> dict[int, set[str]]:
    """step -> the file names under <prefix>/step_<N>/ (COMPLETE included; not the run's tb/)."""
    out: dict[int, set[str]] = {}
    for key in s3.list_keys(bucket, prefix + "/"):
        step_dir, name = key[len(prefix) + 1:].split("/", 1)
        if not step_dir.startswith("step_"):
            continue
        out.setdefault(int(step_dir.split("_")[1]), set()).add(name)
    return out


def local_files(step_dir) -> set[str]:
    return {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}


def test_uploads_survive_an_outage_keep_the_newest_and_print_no_secret(s3_server, tmp_path, data_dir):
    bucket = s3_server.make_bucket("ckpt-outage")
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    env = {"S3_ENDPOINT_URL": proxy.endpoint, "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = start_train(recipe, [f"checkpoint.remote={bucket}/run", "checkpoint.keep_last=2"], nproc=2, extra_env=env)
    wait_for(tmp_path / "run" / "train_log.jsonl", proc)  # step 1 done: the store goes away for step 2's upload
    proxy.outage(3.0)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert proxy.dropped >= 1  # the upload hit the outage and was retried through it
    assert SECRET not in out
    remote = remote_steps(s3_server, "ckpt-outage", "run")
    # keep_last=2 there too, the newest always among them; a save that came while step 2's upload
    # retried through the outage was queued, and a newer one superseded it (the newest wins)
    assert len(remote) == 2 and 6 in remote and set(remote) <= {2, 4, 6}, sorted(remote)
    assert remote[6] == local_files(tmp_path / "run" / "checkpoints" / "step_00000006")
    for step, names in remote.items():  # every file of the checkpoint, and the marker
        assert names == remote[6] and "COMPLETE" in names, step


def test_a_requeued_job_on_a_new_node_resumes_from_the_store_and_export_reads_it(s3_server, tmp_path, data_dir,
                                                                              reference, monkeypatch):
    """Killed after the step-4 checkpoint is in the store, the run's directory deleted (a new node,
    a new pod): the rerun downloads step 4, resumes on the uninterrupted curve, and export reads
    the store. The run's TensorBoard curves went up with each checkpoint: TensorBoard's own reader,
    pointed at the store, finds every step, 1-4 from the lost disk and 5-6 from the rerun."""
    bucket = s3_server.make_bucket("ckpt-resume")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", run_dir, data_dir)
    args = [f"checkpoint.remote={bucket}/run"]
    proc = start_train(recipe, args, nproc=2)
    deadline = time.monotonic() + 300
    while 4 not in {s for s, names in remote_steps(s3_server, "ckpt-resume", "run").items() if "COMPLETE" in names}:
        assert proc.poll() is None and time.monotonic() < deadline, "no complete remote checkpoint of step 4"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(run_dir)  # the requeued job lands on nodes without the run's files

    out = run_train(recipe, args, nproc=2)
    assert f"downloaded step_00000004 from {bucket}/run" in out.stdout and "resumed from" in out.stdout
    assert marker(run_dir, 6).exists()
    ref, got = losses(reference(3, "finetune")), losses(run_dir)
    assert sorted(got) == [5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.compat.tensorflow_stub.io import gfile

    # TensorBoard's S3 reader takes S3_ENDPOINT when it is imported (the command line: S3_ENDPOINT=... tensorboard)
    monkeypatch.setattr(gfile.get_filesystem("s3://b/k"), "_s3_endpoint", s3_server.endpoint)
    curves = EventMultiplexer().AddRunsFromDirectory(f"{bucket}/run/tb").Reload()
    from_store = {e.step: e.value for run in curves.Runs() for e in curves.Scalars(run, "train/loss")}
    assert sorted(from_store) == list(range(1, 7)), sorted(from_store)
    assert all(from_store[step] == pytest.approx(ref[step], rel=1e-6) for step in from_store)

    os.environ["PARGO_DIST_CACHE"] = str(tmp_path / "cache")
    try:
        assert cli.main(["export", f"{bucket}/run", "--out", str(tmp_path / "from_s3")]) == 0
    finally:
        del os.environ["PARGO_DIST_CACHE"]
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "from_disk")]) == 0
    a = {k: v for f in sorted((tmp_path / "from_s3").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "from_disk").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_an_upload_that_fails_through_every_retry_names_the_object_and_leaves_no_marker(tmp_path, monkeypatch):
    """In-process, the store replaced by one that refuses one shard: five retries (backoff
    skipped here), then an error naming that object; the COMPLETE object is never sent."""
    import pargo_dist.checkpoint.object_store as rc

    step_dir = tmp_path / "checkpoints" / "step_00000002"
    (step_dir / "ds").mkdir(parents=True)
    for name in ("meta.json", "rank_00000.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "COMPLETE"):
        (step_dir / name).write_text("x")
    sent, tries = [], []

    class Refusing:
        def upload_file(self, name):
            if name.endswith("optim_states.pt"):
                tries.append(name)
                raise ConnectionError("Connection refused")
            sent.append(name)

    remote = rc.RemoteCheckpoints("s3://bucket/run", tmp_path / "checkpoints")
    monkeypatch.setattr(remote, "_uploader", lambda: Refusing())
    monkeypatch.setattr(rc.time, "sleep", lambda s: None)
    said = []
    mirror = UploadMirror(remote, 0, 1, None, keep_last=3, say=said.append)
    mirror.submit(step_dir, 2)
    mirror.wait()
    assert re.fullmatch(r"uploading s3://bucket/run/step_00000002/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt "
                        r"failed after 6 attempts: ConnectionError.*", mirror.failure), mirror.failure
    assert mirror.missing() == 2 and "step 2 is not in s3://bucket/run" in said[-1]
    assert len(tries) == 6 and not any(n.endswith("COMPLETE") for n in sent)
    assert rc.owner_of("rank_00003.pt", 4) == 3 and rc.owner_of("__1_0.distcp", 2) == 1 and rc.owner_of("meta.json", 4) == 0


def test_a_run_sees_only_its_own_checkpoints_in_a_shared_bucket(s3_server, tmp_path):
    """One bucket, many runs: the run at s3://bkt/exp lists, downloads and prunes only
    exp/step_<N>/..., never a run under its prefix (exp/ablation), beside it (exp2) or at the
    bucket's root, even when theirs are newer."""
    from pargo_dist.checkpoint.object_store import RemoteCheckpoints

    bucket = s3_server.make_bucket("ckpt-shared")
    client = s3_server.client()
    ours = {2: ["COMPLETE", "meta.json", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"],
            4: ["COMPLETE", "meta.json", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"]}
    others = ["exp/ablation/step_00000010/COMPLETE", "exp/ablation/step_00000010/meta.json",
              "exp/ablation/step_00000003/COMPLETE", "exp2/step_00000008/COMPLETE", "exp2/step_00000001/COMPLETE",
              "step_00000009/COMPLETE", "step_00000001/COMPLETE"]
    for step, names in ours.items():
        for name in names:
            client.put_object(Bucket="ckpt-shared", Key=f"exp/step_{step:08d}/{name}", Body=f"{step}/{name}".encode())
    for key in others:
        client.put_object(Bucket="ckpt-shared", Key=key, Body=b"another run's")

    remote = RemoteCheckpoints(f"{bucket}/exp", tmp_path / "checkpoints")
    assert remote.steps() == [2, 4]
    newest = remote.fetch_newest()
    assert newest == tmp_path / "checkpoints" / "step_00000004"
    assert local_files(newest) == set(ours[4])
    assert (newest / "meta.json").read_text() == "4/meta.json"
    remote.prune(keep_last=1)
    assert s3_server.list_keys("ckpt-shared") == sorted(
        [f"exp/step_00000004/{n}" for n in ours[4]] + others)  # only our step 2 went
    at_root = RemoteCheckpoints(bucket, tmp_path / "root")
    assert at_root.steps() == [1, 9]  # the run at the bucket's root: its own step_<N>/ only


def test_a_node_downloads_only_what_its_ranks_load(s3_server, tmp_path):
    """A node fetches its own ranks' files and the shared ones where its ranks read nothing else
    (a DeepSpeed checkpoint loaded by the layout that saved it), and says so in a SHARE file. A
    share that does not cover what a later load needs (other ranks, an elastic resume on
    another ZeRO stage) is completed from the store; megatron's distributed checkpoints are read
    by tensor piece, whoever wrote it, so a node fetches all of them; and `export` refuses a
    share with a message that says where the whole checkpoint is."""
    import json

    from pargo_dist.checkpoint.manager import resolve_checkpoint
    from pargo_dist.errors import UserError
    from pargo_dist.checkpoint.object_store import NodeShare, RemoteCheckpoints, holds

    bucket = s3_server.make_bucket("ckpt-share")
    client = s3_server.client()
    layout = {"dp": 4, "zero_stage": 3}
    shards = [f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)] + \
             [f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4)] + [f"rank_{r:05d}.pt" for r in range(4)]
    shared = ["COMPLETE", "meta.json", "config.yaml", "ds/latest"]
    runs = {"ds": {"backend": "deepspeed", "world_size": 4, "layout": layout},
            "mg": {"backend": "megatron", "world_size": 4, "layout": {"dp": 2, "tp": 2, "pp": 1}}}
    for run, meta in runs.items():
        for name in shared + shards:
            body = json.dumps({"step": 2, **meta}) if name == "meta.json" else name
            client.put_object(Bucket="ckpt-share", Key=f"{run}/step_00000002/{name}", Body=body.encode())

    remote = RemoteCheckpoints(f"{bucket}/ds", tmp_path / "node" / "checkpoints")
    node = NodeShare((2, 3), 4, "deepspeed", layout)
    got = remote.download(2, node)
    mine = {name for r in (2, 3) for name in (f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                               f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"rank_{r:05d}.pt")}
    assert local_files(got) == set(shared) | mine | {"SHARE"}
    fetched = sum((got / name).stat().st_size for name in set(shared) | mine)
    assert remote.last_download[:3] == (10, 16, fetched)
    assert holds(got, node) and holds(got, NodeShare((3,), 4, "deepspeed", layout))
    for wider in (NodeShare((1, 2, 3), 4, "deepspeed", layout), NodeShare((0, 1), 2, "deepspeed", {"dp": 2}),
                  NodeShare((2, 3), 4, "deepspeed", {"dp": 4, "zero_stage": 2}), None):
        assert not holds(got, wider)
    with pytest.raises(UserError, match=r"holds only ranks \[2, 3\]'s files of a 4-rank checkpoint.*checkpoint.remote"):
        resolve_checkpoint(got)
    elastic = remote.download(2, NodeShare((2, 3), 4, "deepspeed", {"dp": 4, "zero_stage": 2}))
    assert elastic == got and local_files(got) == set(shared + shards)  # completed: every shard converts

    megatron = RemoteCheckpoints(f"{bucket}/mg", tmp_path / "mg" / "checkpoints")
    got = megatron.download(2, NodeShare((0, 1), 4, "megatron", runs["mg"]["layout"]))
    assert local_files(got) == set(shared + shards) and megatron.last_download[:2] == (16, 16)


def test_every_rank_uploads_the_shards_it_wrote_in_bf16_too(tmp_path, monkeypatch):
    """Under bf16 (every GPU recipe) DeepSpeed names a rank's optimizer shard bf16_zero_pp_rank_<r>_...
    (its own naming function gives the names here): that rank uploads it, not rank 0 for all."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    import pargo_dist.checkpoint.object_store as rc

    world = 2
    step_dir = tmp_path / "checkpoints" / "step_00000002"
    (step_dir / "ds").mkdir(parents=True)
    written = {"meta.json": 0, "config.yaml": 0, "ds/mp_rank_00_model_states.pt": 0}
    for rank in range(world):
        for bf16 in (True, False):  # DeepSpeed's name for this rank's shard, in bf16 and in fp32
            prefix = DeepSpeedEngine._get_zero_ckpt_prefix(None, rank, bf16_mode=bf16)
            written[f"ds/{prefix}_mp_rank_00_optim_states.pt"] = rank
        written[f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = rank
        written[f"rank_{rank:05d}.pt"] = rank
    for name in written:
        (step_dir / name).write_text("x")
    (step_dir / ".rank_00001.pt.tmp.4242").write_text("half")  # what a rank killed mid-write leaves: never sent
    (step_dir / "ds" / ".mp_rank_00_model_states.pt.tmp.77").write_text("half")
    assert "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in written
    sent: dict[int, list[str]] = {}

    class Recording:
        def __init__(self, rank):
            self.rank = rank

        def upload_file(self, name):
            sent.setdefault(self.rank, []).append(name.split("step_00000002/", 1)[1])

    remote = rc.RemoteCheckpoints("s3://bucket/run", tmp_path / "checkpoints")
    monkeypatch.setattr(remote, "prune", lambda keep_last: None)
    for rank in range(world):
        monkeypatch.setattr(remote, "_uploader", lambda rank=rank: Recording(rank))
        remote.upload_files(step_dir, rank, world)
    monkeypatch.setattr(remote, "_uploader", lambda: Recording(0))
    remote.upload_marker(step_dir, keep_last=3)  # rank 0, once every rank's files are up
    for rank in range(world):
        assert sorted(sent[rank]) == sorted([n for n, r in written.items() if r == rank]
                                            + (["COMPLETE"] if rank == 0 else [])), rank


def forget_steps(s3, bucket: str, prefix: str, steps: list[int]) -> None:
    """Delete those checkpoints from the store: as if the job had died before uploading them."""
    keys = [k for k in s3.list_keys(bucket, prefix + "/")
            if k[len(prefix) + 1:].startswith("step_") and int(k[len(prefix) + 1:].split("/")[0][5:]) in steps]
    s3.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})


@pytest.mark.skipif(not can_emulate_nodes(), reason="emulating nodes needs `unshare -m` (root) for a /dev/shm per node")
def test_nodes_without_a_shared_disk_resume_from_the_store_once_per_filesystem_past_a_short_timeout(
        s3_server, tmp_path, data_dir, reference):
    """Two "nodes" of one rank each and a collective timeout of 3 s. The store holds the
    uninterrupted 2-rank run's step-2 checkpoint (that job died before step 4):
    - requeued onto nodes with a run.dir each (no shared disk), each node downloads it once, into
      its own run.dir, and only what its rank reads (its own ZeRO shards and rank state, and the
      shared files); the curve after the resume is the uninterrupted run's; each node uploads
      the files its rank wrote, and only rank 0's disk holds a COMPLETE marker;
    - requeued again (the store losing step 6) onto two nodes sharing one run.dir and on another
      ZeRO stage (an elastic resume), with the work one rank does for the other (the download,
      the elastic conversion) slowed to 4 s each by a fault knob: step 4 is downloaded once and
      converted once for both ranks while the other waits past the timeout, and the curve
      follows the uninterrupted run's."""
    ref_dir = reference(3, "finetune")
    ref = losses(ref_dir)
    bucket = s3_server.make_bucket("ckpt-nodes")
    client = s3_server.client()
    step2 = ref_dir / "checkpoints" / "step_00000002"
    for name in sorted(local_files(step2), key=lambda n: n == "COMPLETE"):  # marker last
        client.upload_file(str(step2 / name), "ckpt-nodes", f"run/step_00000002/{name}")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", data_dir)
    common = [f"checkpoint.remote={bucket}/run", "data.eval=null", "train.collective_timeout_s=3"]
    slow = {"PARGO_TEST_SLOW_SINGLE_RANK_S": "4"}  # a fault knob (tests/support/inject/sitecustomize.py)

    nodes = [tmp_path / "job2" / "node0", tmp_path / "job2" / "node1"]
    outs = run_nodes(recipe, common, nodes)
    stored2 = local_files(step2)
    for rank, out in enumerate(outs):  # each filesystem downloaded it, once: its rank's files and the shared ones
        assert out.count("downloaded step_00000002") == 1, out[-3000:]
        assert f"rank {rank}: no complete checkpoint of step 2" in out, out[-3000:]
        held = local_files(nodes[rank] / "checkpoints" / "step_00000002") - {"SHARE"}
        other = 1 - rank  # the other node's rank: its ZeRO-3 shards and rank state stay in the store
        theirs = {f"ds/zero_pp_rank_{other}_mp_rank_00_model_states.pt", f"ds/zero_pp_rank_{other}_mp_rank_00_optim_states.pt",
                  f"rank_0000{other}.pt"}
        assert theirs <= stored2 and held == stored2 - theirs, (held, out[-3000:])
        assert f"{len(held)} of the {len(stored2)} files" in out, out[-3000:]
    got = losses(nodes[0])
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    stored = remote_steps(s3_server, "ckpt-nodes", "run")
    assert sorted(stored) == [2, 4, 6]
    on_node1 = nodes[1] / "checkpoints" / "step_00000006"
    assert stored[6] == local_files(nodes[0] / "checkpoints" / "step_00000006") | local_files(on_node1)
    assert "rank_00001.pt" in local_files(on_node1) and "COMPLETE" not in local_files(on_node1)  # rank 1 wrote it there
    assert "rank_00001.pt" not in local_files(nodes[0] / "checkpoints" / "step_00000006")

    forget_steps(s3_server, "ckpt-nodes", "run", [6])
    shared = tmp_path / "job3"
    outs = run_nodes(recipe, [*common, "backend.zero_stage=2"], [shared, shared], extra_env=slow)
    said = [line for out in outs for line in out.splitlines() if "downloaded step_00000004" in line]
    assert len(said) == 1 and "for ranks [0, 1]" in said[0], said
    converted = [line for out in outs for line in out.splitlines() if "to the universal format" in line]
    assert len(converted) == 1 and "ranks [0, 1] share it" in converted[0], converted
    got = losses(shared)
    assert sorted(got) == [5, 6]
    for step in got:  # ZeRO-2 after ZeRO-3: the same math in another float order
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, ref, got)


def test_a_run_that_ends_during_an_outage_exits_75_and_its_requeue_uploads_it(s3_server, tmp_path, data_dir):
    """The store goes away after the first step and stays away: training still runs to its last
    step (the checkpoint is complete on disk), and the run exits 75 (requeue) saying the store lacks
    it. The requeued job, with the store back, uploads what it resumed from and exits 0."""
    bucket = s3_server.make_bucket("ckpt-down")
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", run_dir, data_dir)
    fast = {"PARGO_TEST_FAST_RETRIES": "1", "S3_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1"}
    args = [f"checkpoint.remote={bucket}/run", "train.steps=2", "data.eval=null"]

    proc = start_train(recipe, args, nproc=2, extra_env=fast)
    wait_for(run_dir / "train_log.jsonl", proc)  # step 1 done: the store goes away for good
    proxy.outage(600)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert marker(run_dir, 2).exists()
    assert "still lacks step 2" in out and "Exiting with 75" in out, out[-3000:]
    assert remote_steps(s3_server, "ckpt-down", "run") == {}

    proxy._restore()
    out = run_train(recipe, args, nproc=2, extra_env=fast)  # requeued: resumes from disk, uploads it
    assert f"{bucket}/run lacks step 2: uploading it" in out.stdout, out.stdout[-3000:]
    assert remote_steps(s3_server, "ckpt-down", "run")[2] == local_files(run_dir / "checkpoints" / "step_00000002")


def test_at_start_an_unreachable_store_is_a_requeue_and_a_missing_bucket_exit_2(s3_server, tmp_path, monkeypatch):
    """In-process, at a run's start. With no local checkpoint and the store unreachable, whether to
    start afresh cannot be told: TryAgainLater (exit 75), naming why. A bucket that does not
    exist is refused at once, not retried, with its hint said once (a UserError: exit 2)."""
    import pargo_dist.checkpoint.object_store as rc
    from pargo_dist.checkpoint.manager import CheckpointManager
    from pargo_dist.errors import TryAgainLater

    monkeypatch.setattr(rc.retried, "__defaults__", (2, 0.0))  # each attempt makes a boto3 client: ~0.5 s
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: ours are the ones under test
    bucket = s3_server.make_bucket("ckpt-start")
    proxy.outage(600)
    manager = CheckpointManager(tmp_path / "run", remote=f"{bucket}/run")  # an unreachable store is no error yet
    with pytest.raises(TryAgainLater, match=r"checkpoint.remote cannot be listed to see whether it holds one"):
        manager.resolve("auto")
    proxy._restore()
    assert manager.resolve("auto") is None  # reachable and empty: a fresh start

    with pytest.raises(rc.RemoteError) as refused:
        CheckpointManager(tmp_path / "other", remote="s3://no-such-bucket/run")
    message = str(refused.value)
    assert "was refused" in message and message.count("Check that the bucket") == 1 and "attempts" not in message


def test_a_store_that_goes_away_mid_download_is_a_requeue_and_leaves_nothing(s3_server, tmp_path, monkeypatch):
    """In-process: a new node resumes from the store, and the store goes away after the first file
    of the download and stays away past the retries. That is not a bad input (exit 2) but a fault
    a requeue cures: TryAgainLater (exit 75), naming the object; the half-downloaded directory is
    removed, and one that a killed attempt on this host left behind is removed by the next one."""
    import pargo_dist.checkpoint.object_store as rc
    from pargo_dist.checkpoint.manager import CheckpointManager
    from pargo_dist.errors import TryAgainLater, UserError

    monkeypatch.setattr(rc.retried, "__defaults__", (2, 0.0))
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = s3_server.make_bucket("ckpt-mid")
    client = s3_server.client()
    for name in ("meta.json", "config.yaml", "rank_00000.pt", "ds/mp_rank_00_model_states.pt", "COMPLETE"):
        body = '{"step": 2, "world_size": 1, "backend": "deepspeed"}' if name == "meta.json" else "x" * 1000
        client.put_object(Bucket="ckpt-mid", Key=f"run/step_00000002/{name}", Body=body.encode())
    root = tmp_path / "run" / "checkpoints"
    left = root / f".step_00000002.{socket.gethostname()}.999999999"  # a killed attempt's (no such pid)
    (left / "ds").mkdir(parents=True)
    fetcher = rc.RemoteCheckpoints._fetcher

    def outage_after_the_first_file(self, *args, **kwargs):
        fetch = fetcher(self, *args, **kwargs)

        def first_then_outage(items):
            fetch(items[:1])
            proxy.outage(600)
            fetch(items[1:])
        return first_then_outage

    monkeypatch.setattr(rc.RemoteCheckpoints, "_fetcher", outage_after_the_first_file)
    manager = CheckpointManager(tmp_path / "run", remote=f"{bucket}/run")
    with pytest.raises(TryAgainLater) as stopped:
        manager.resolve("auto")
    assert not isinstance(stopped.value, UserError)
    assert re.search(r"downloading s3://ckpt-mid/run/step_00000002/\S+ failed after 2 attempts", str(stopped.value))
    assert not list(root.glob(".step_*")) and not (root / "step_00000002").exists()
    proxy._restore()
    monkeypatch.setattr(rc.RemoteCheckpoints, "_fetcher", fetcher)
    got = manager.resolve("auto")
    assert got == root / "step_00000002" and CheckpointManager.is_complete(got)


def test_a_rollback_retires_the_steps_after_the_divergence_here_and_in_the_store(s3_server, tmp_path):
    """CheckpointManager.retire(4) after steps 2, 4 and 6 are committed and uploaded: steps 4 and 6
    leave the run's disk and the store, markers first, so that a requeue on new nodes (which
    resumes from the store) cannot take them for the newest."""
    from pargo_dist.checkpoint.manager import CheckpointManager

    bucket = s3_server.make_bucket("ckpt-retire")
    manager = CheckpointManager(tmp_path / "run", keep_last=5, remote=f"{bucket}/run")
    for step in (2, 4, 6):
        step_dir = manager.begin(step)
        (step_dir / "meta.json").write_text('{"step": %d}' % step)
        (step_dir / "rank_00000.pt").write_text("x")
        manager.commit(step_dir, step)
        manager.uploads.wait()  # (each uploaded: a save that came during an upload would be superseded)
    assert sorted(remote_steps(s3_server, "ckpt-retire", "run")) == [2, 4, 6]
    assert manager.retire(4) == [4, 6]
    assert manager.complete_steps() == [2]
    assert sorted(remote_steps(s3_server, "ckpt-retire", "run")) == [2]
    assert manager.remote.steps() == [2]


def test_export_and_eval_from_a_url_download_once_per_node(s3_server, tmp_path, monkeypatch):
    """`pargo-dist eval s3://... --nproc N`: every rank resolves the URL at once; the ranks of a
    node take turns on a lock in the cache, the first downloads, the others find it there."""
    import pargo_dist.checkpoint.object_store as rc
    from pargo_dist.checkpoint.manager import resolve_checkpoint

    monkeypatch.setenv("PARGO_DIST_CACHE", str(tmp_path / "cache"))
    bucket = s3_server.make_bucket("ckpt-once")
    client = s3_server.client()
    for name in ("meta.json", "config.yaml", "rank_00000.pt", "COMPLETE"):
        client.put_object(Bucket="ckpt-once", Key=f"run/step_00000003/{name}", Body=b"{}")
    fetched: list[str] = []
    fetcher = rc.RemoteCheckpoints._fetcher

    def counting(self, *args, **kwargs):
        fetch = fetcher(self, *args, **kwargs)

        def counted(items):
            fetched.extend(name for name, _ in items)
            return fetch(items)
        return counted

    monkeypatch.setattr(rc.RemoteCheckpoints, "_fetcher", counting)
    got: list = [None] * 4

    def rank(r: int) -> None:
        got[r] = resolve_checkpoint(f"{bucket}/run")
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(set(got)) == 1 and got[0].name == "step_00000003" and (got[0] / "COMPLETE").is_file()
    assert sorted(fetched) == sorted(["meta.json", "config.yaml", "rank_00000.pt", "COMPLETE"]), fetched
