"""W&B (offline) and MLflow (a local file store) get what TensorBoard gets, and a resumed run
appends to the same tracker run.

A real run (one rank: only rank 0 talks to the trackers) trains 3 steps and stops; a second
launch with train.steps=6 resumes from the step-3 checkpoint (as a requeued job does) and
finishes. Read back: every scalar of every step in W&B's offline run files and in MLflow equals
TensorBoard's (float32 there: 1e-6), the W&B run id and the MLflow run are the ones the first
launch created, and the recipe and the sample captions are there.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from support.training import run_train, write_recipe

from pargo_dist.observe.report import read_scalars

# `make install` puts wandb and mlflow-skinny here, apart from the stack (see the Makefile: beside
# it, megatron-core and DeepSpeed import them in every process); the runs below get it on their path.
TRACKERS = Path(sys.prefix) / "trackers"
if not TRACKERS.is_dir():
    pytest.skip(f"{TRACKERS} is missing: `make install` (or make test) installs wandb and mlflow-skinny there",
                allow_module_level=True)
sys.path.append(str(TRACKERS))  # last: the stack's own packages come first
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(path):
    """The records of a W&B run file (.wandb): a 7-byte header, then LevelDB-log framing (32 KiB
    blocks of [crc32 u32, length u16, type u8] chunks; a record may span chunks) of protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir, run_id):
    """{key: {step: value}} from every offline run file of `run_id` (one per launch)."""
    files = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    out = {}
    for f in files:
        for r in wandb_records(f):
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for key, value in row.items():
                    if not key.startswith("_"):
                        out.setdefault(key, {})[row["_step"]] = value
    return files, out


def test_wandb_and_mlflow_log_what_tensorboard_logs_and_a_resume_continues_their_runs(tmp_path, data_dir,
                                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # (for the reading client here)
    store = f"file://{tmp_path / 'mlruns'}"
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    trackers = ["logging.wandb.project=pargo-test", "logging.wandb.mode=offline",
                f"logging.mlflow.tracking_uri={store}", "logging.mlflow.experiment=trackers"]
    env = {"PYTHONPATH": os.pathsep.join([str(TRACKERS), os.environ["PYTHONPATH"]])}  # (keeps the fault knobs)
    first = run_train(recipe, [*trackers, "train.steps=3", "checkpoint.every=3", "train.eval_every=3"], nproc=1,
                      extra_env=env)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "meta.json").read_text())
    ids = meta["trackers"]
    assert set(ids) == {"wandb", "mlflow"} and f"wandb (run {ids['wandb']})" in first.stdout
    second = run_train(recipe, [*trackers, "train.steps=6", "checkpoint.every=3", "train.eval_every=3"], nproc=1,
                       extra_env=env)
    assert "resumed from" in second.stdout and f"mlflow (run {ids['mlflow']})" in second.stdout

    tb = {k: dict(v) for k, v in read_scalars(tmp_path / "run" / "tb").items()}
    assert sorted(tb["train/loss"]) == list(range(1, 7)) and sorted(tb["eval/loss"]) == [3, 6]

    files, wb = wandb_history(tmp_path / "run", ids["wandb"])
    assert len(files) == 2  # one offline run file per launch, both for the same run id
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("trackers").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # the resume did not start a second run
    for key, points in tb.items():
        assert set(wb[key]) == set(points), key  # (W&B's own keys start with _; its HTML has nested keys)
        mlflow_points = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], key)}
        assert set(mlflow_points) == set(points), key
        for step, value in points.items():
            assert wb[key][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)
            assert mlflow_points[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)

    run = client.get_run(ids["mlflow"])
    assert run.data.params["train.micro_batch"] == "4" and run.data.params["backend.zero_stage"] == "3"
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert "config.yaml" in artifacts
    captions = {a.path for a in client.list_artifacts(ids["mlflow"], "samples/captions")}
    assert captions == {"samples/captions/step_00000003.md", "samples/captions/step_00000006.md"}
    assert wb["samples/captions/_type"] == {3: "html-file", 6: "html-file"}  # W&B: an HTML panel, same steps


def test_a_tracker_that_is_not_installed_is_a_recipe_error_naming_the_extra(monkeypatch):
    import importlib.util

    from pargo_dist.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"mlflow is not installed: pip install 'pargo_dist\[mlflow\]'"):
        load_config(None, ["logging.mlflow.tracking_uri=file:///tmp/x"])
    with pytest.raises(ConfigError, match="logging.wandb.mode='cloud': must be online, offline or disabled"):
        load_config(None, ["logging.wandb.project=p", "logging.wandb.mode=cloud"])
