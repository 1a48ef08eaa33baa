"""Run `pargo-dist train` for real (torchrun ranks over gloo) on a tiny recipe, and read what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import forkserver
TEST_RECIPE = """
run: {{dir: {run_dir}, seed: 0}}
model:
  vision:
    config: {{model_type: clip_vision_model, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,
             num_attention_heads: 4, image_size: 32, patch_size: 8}}
    feature_layer: -1
  llm:
    config: {{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
             num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}}
  projector: {{num_partial: 8, num_global: 2, depth: 1, width: 32, heads: 4, ffn: 64}}
  tokenizer: synthetic
data:
  synthetic: {{num_samples: 512, held_out: 32, image_size: 48}}
  train: {{local: {data_dir}/train, max_len: 128, num_canonical_nodes: 1}}
  eval: {{local: {data_dir}/val, max_len: 128, shuffle: false}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
train: {{stage: finetune, steps: 6, micro_batch: 4, eval_every: 0, eval_batches: 8, sample_count: 1,
        max_new_tokens: 8}}
backend: {{zero_stage: 3}}
checkpoint: {{every: 2, keep_last: 5}}
logging: {{every: 1, sample_ids: true}}
"""


def write_recipe(path: Path, run_dir: Path, data_dir: Path) -> Path:
    path.write_text(TEST_RECIPE.format(run_dir=run_dir, data_dir=data_dir))
    return path


def crash_copy(run: Path, tmp_path: Path, data_dir: Path, after: int) -> Path:
    """A copy of a finished run (at tmp_path / "run") as a crash after step `after` would leave
    it: later checkpoints and log lines gone. Returns its recipe. (What a SIGKILL leaves is
    tested with DeepSpeed in test_train.py; the checkpoint rules are the backend's own.)"""
    import shutil

    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    shutil.copytree(run, tmp_path / "run")
    for step_dir in (tmp_path / "run" / "checkpoints").glob("step_*"):
        if int(step_dir.name.split("_")[1]) > after:
            shutil.rmtree(step_dir)
    for log in (tmp_path / "run").glob("*.jsonl"):
        log.write_text("".join(line for line in log.read_text().splitlines(True) if json.loads(line).get("step", 0) <= after))
    return recipe


def train_cmd(recipe: Path, overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "pargo_dist.cli", "train", str(recipe), *overrides, "--nproc", str(nproc)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_train(recipe: Path, overrides: list[str] = (), nproc: int = 2, timeout: float = 600,
              expect: int = 0, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = forkserver.run(train_cmd(recipe, list(overrides), nproc), capture_output=True, text=True,
                         timeout=timeout, env={**env(), **(extra_env or {})})
    if out.returncode != expect:
        raise AssertionError(f"train exited {out.returncode} (expected {expect}):\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def start_train(recipe: Path, overrides: list[str] = (), nproc: int = 2,
                extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Started in its own process group, so the test can signal or kill every rank."""
    return forkserver.Popen(train_cmd(recipe, list(overrides), nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**env(), **(extra_env or {})},
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared:\n{proc.stdout.read()[-5000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """step -> value from train_log.jsonl; a resumed step's later entry wins."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out


def sample_ids(run_dir: Path) -> dict[int, list[str]]:
    """step -> the global batch's sample ids (all ranks), last entry per (rank, step) wins."""
    per = {}
    for f in sorted(run_dir.glob("sample_ids.rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            per[(f.name, row["step"])] = row["ids"]
    steps = {}
    for (_, step), ids in sorted(per.items(), key=lambda kv: kv[0][1]):
        steps.setdefault(step, []).extend(ids)
    return steps


def marker(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE"


def own_shm(cmd: list[str]) -> list[str]:
    """`cmd` in a mount namespace of its own with a fresh /dev/shm, as on another host: streaming
    registers each dataset in /dev/shm by local leader, and two nodes' leaders on one host collide."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh", *cmd]


def can_emulate_nodes() -> bool:
    """Whether this machine lets a test give a process its own /dev/shm (root, `unshare`)."""
    import shutil

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(own_shm(["true"]), capture_output=True).returncode == 0


def start_nodes(recipe: Path, overrides: list[str], run_dirs: list[Path], extra_env: dict[str, str] | None = None,
                node_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """One launcher per "node" (`python -m pargo_dist.launch --nnodes N --node-rank i`, one rank
    each), all on this machine, node i writing to run_dirs[i]: nodes with disks of their own when
    the directories differ, a shared filesystem when they are the same. Nodes after the first
    get a /dev/shm of their own (`own_shm`). `node_env`: variables for one node only. Each
    launcher is started in a process group of its own; their output is a pipe."""
    from pargo_dist.runtime.rank_env import free_port

    master = f"127.0.0.1:{free_port()}"
    cmds = [[sys.executable, "-m", "pargo_dist.launch", "--nproc", "1", "--nnodes", str(len(run_dirs)),
             "--node-rank", str(i), "--master", master, "--", str(recipe), *overrides, f"run.dir={run_dir}"]
            for i, run_dir in enumerate(run_dirs)]
    return [forkserver.Popen(own_shm(cmd) if i else cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**env(), **(extra_env or {}), **(node_env or {}).get(i, {})},
                             start_new_session=True)
            for i, cmd in enumerate(cmds)]


def finish_nodes(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Each node's output once its launcher ended (all of them killed at `timeout`)."""
    deadline = time.monotonic() + timeout
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            outs.append(proc.communicate()[0])
    return outs


def run_nodes(recipe: Path, overrides: list[str], run_dirs: list[Path], extra_env: dict[str, str] | None = None,
              timeout: float = 600) -> list[str]:
    """`start_nodes`, then each node's output; every launcher must exit 0."""
    procs = start_nodes(recipe, overrides, run_dirs, extra_env)
    outs = finish_nodes(procs, timeout)
    for i, (proc, out) in enumerate(zip(procs, outs)):
        if proc.returncode != 0:
            raise AssertionError(f"node {i} exited {proc.returncode}:\n" + "\n".join(o[-3000:] for o in outs))
    return outs


def exported_eval_loss(run_dir: Path, out: Path):
    """`pargo-dist export` of a run into `out`, loaded back as plain transformers loads it: its
    mean token loss on the run's held-out split (what the run logged as eval/loss), and the model."""
    import torch

    from pargo_dist import build
    from pargo_dist.config import load_config
    from pargo_dist.constants import IGNORE_INDEX
    from pargo_dist.evaluation.generate import load_exported

    forkserver.run([sys.executable, "-m", "pargo_dist.cli", "export", str(run_dir), "--out", str(out)],
                   check=True, env=env(), capture_output=True)
    model, tok, _ = load_exported(out)
    cfg = load_config(out / "config.yaml")
    total = n = 0.0
    with torch.no_grad():
        for batch in build.loader(cfg, cfg.data.eval, model, tok, batch_size=4):
            res = model(**batch.model_inputs())
            k = float((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            total, n = total + res.loss.item() * k, n + k
    return total / n, model
