"""The multi-node protocol with four emulated nodes: one rank each, each its own run.dir (no
shared disk: the object store is all they share) and its own /dev/shm, a 3 s collective timeout,
over real launchers (`python -m pargo_dist.launch --nnodes 4`). Two nodes cannot show what these
show: a node that dies while others wait on the store for their own downloads, and a store that
goes away while several nodes are mid-transfer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support.s3 import OutageProxy
from support.training import (can_emulate_nodes, finish_nodes, losses, marker, run_nodes, start_nodes,
                              write_recipe)

pytestmark = pytest.mark.skipif(not can_emulate_nodes(),
                                reason="emulating nodes needs `unshare -m` (root) for a /dev/shm per node")

NODES = 4


def said(out: str, lines: int = 40) -> str:
    """A node's output without the C++ stack frames torch logs with a store error: its last lines."""
    return "\n".join([line for line in out.splitlines() if "frame #" not in line][-lines:])


def staging_dirs(run_dirs: list[Path]) -> list[Path]:
    return [p for d in run_dirs for p in (d / "checkpoints").glob(".step_*")]


def test_four_nodes_resume_from_the_store_through_an_outage_and_a_node_killed_mid_download(
        s3_server, tmp_path, data_dir):
    """1. Four nodes train 4 steps with checkpoint.remote (checkpoints at steps 2 and 4): the
       reference curve. The store then loses step 4 (that job died before uploading it).
    2. Requeued onto four fresh nodes, each downloads step 2 one file at a time. When the first
       download begins, the store goes away for 1.5 s (a TCP proxy drops every connection): the
       downloads retry and go on. Node 3 dies (SIGKILL) after its first file: its launcher tells
       the other nodes through the store, and every node's launcher exits within seconds of it,
       instead of waiting out the set-up allowance (30 minutes) on the store.
    3. Requeued again on the same nodes: what node 3's killed download left is removed, the
       nodes that finished their download resume from it, node 3 downloads again, and steps 3-4
       follow the reference curve."""
    bucket = s3_server.make_bucket("ckpt-four")
    proxy = OutageProxy(int(s3_server.endpoint.rsplit(":", 1)[1]))
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "unused", data_dir)
    common = [f"checkpoint.remote={bucket}/run", "data.eval=null", "train.collective_timeout_s=3", "train.steps=4",
              "backend.zero_stage=1"]  # (the protocol is the same at every stage; stage 1 sets up fastest)
    store = {"S3_ENDPOINT_URL": proxy.endpoint, "AWS_MAX_ATTEMPTS": "1"}  # botocore's own retries off: ours count

    first = [tmp_path / "job1" / f"node{i}" for i in range(NODES)]
    run_nodes(recipe, common, first, extra_env=store)
    ref = losses(first[0])
    assert sorted(ref) == [1, 2, 3, 4] and marker(first[0], 4).exists()
    client = s3_server.client()
    doomed = [k for k in s3_server.list_keys("ckpt-four", "run/step_00000004/")]
    client.delete_objects(Bucket="ckpt-four", Delete={"Objects": [{"Key": k} for k in doomed]})

    nodes = [tmp_path / "job2" / f"node{i}" for i in range(NODES)]
    killed = tmp_path / "killed"
    procs = start_nodes(recipe, common, nodes, extra_env={**store, "PARGO_TEST_SLOW_DOWNLOAD_FILE_S": "0.3"},
                        node_env={3: {"PARGO_TEST_KILL_IN_DOWNLOAD": f"3:{killed}"}})

    def stop_the_store_mid_download():
        deadline = time.monotonic() + 300
        while not staging_dirs(nodes) and time.monotonic() < deadline:
            time.sleep(0.02)
        proxy.outage(1.5)
    threading.Thread(target=stop_the_store_mid_download, daemon=True).start()
    outs = finish_nodes(procs, timeout=300)
    ended = time.monotonic()
    codes = [p.returncode for p in procs]
    assert killed.exists() and proxy.dropped > 0, outs
    assert codes[3] == 137 and codes[:3] == [3, 3, 3], (codes, "\n====\n".join(said(o) for o in outs))
    for i in range(3):  # told by node 3's launcher, through the store, naming the cause
        assert "rank 3 on" in outs[i] and "exited with 137" in outs[i], said(outs[i])
    assert "stopped waiting" in "".join(outs[:3]), "\n====\n".join(said(o) for o in outs)
    downloaded = [i for i in range(3) if "downloaded step_00000002" in outs[i]]
    assert downloaded, outs  # through the outage: the nodes that got to the end of their download
    assert any(p.name.startswith(".step_00000002.") for p in staging_dirs(nodes[3:]))  # the killed one's
    assert ended - min(p.stat().st_mtime for p in [killed]) < 30, "the other nodes waited for the dead one"

    outs = run_nodes(recipe, common, nodes, extra_env=store)
    assert not staging_dirs(nodes), staging_dirs(nodes)
    assert "downloaded step_00000002" in outs[3], said(outs[3])
    got = losses(nodes[0])
    assert sorted(got) == [3, 4]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got, ref)
