"""Start N real ranks of a script on this machine (gloo over loopback), like torchrun does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import forkserver
from pargo_dist.runtime.rank_env import free_port, rank_env


def run_ranks(script: str | Path, args: list[str], world_size: int, env: dict[str, str] | None = None,
              timeout: float = 300) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world_size):
        env_r = {**rank_env(rank, world_size, 1, 0, f"127.0.0.1:{port}"), **(env or {}),
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                             os.environ.get("PYTHONPATH")]))}
        procs.append(forkserver.Popen([sys.executable, str(script), *args], env=env_r,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    for r in results:
        if r.returncode:
            raise AssertionError(f"rank failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
    return results


def read_rank_results(out_prefix: str | Path, world_size: int) -> list[dict]:
    return [json.load(open(f"{out_prefix}.rank{r}.json")) for r in range(world_size)]
