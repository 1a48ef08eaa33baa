"""`pargo-dist doctor`: a healthy tiny recipe passes; each broken thing fails with its fix.

Real components: the recipe loader, this machine's packages, /dev/shm and disk, a moto S3
server that checks credentials like AWS (IAM user and key made in its first requests), and an
LLM directory written by transformers (bf16 safetensors shards), read through its headers only.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from support.pretrained import save_hub_style
from support.s3 import start_moto
from support.training import write_recipe

from pargo_dist.cli import main


def doctor(capsys, recipe, *overrides) -> tuple[int, str]:
    code = main(["doctor", str(recipe), *overrides])
    return code, capsys.readouterr().out


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"{name} "))


def test_a_healthy_tiny_recipe_passes(tmp_path, data_dir, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    code, out = doctor(capsys, recipe)
    assert code == 0, out
    for name in ("torch", "deepspeed", "megatron-core", "mosaicml-streaming", "shm", "data.train", "disk"):
        assert row(out, name).split()[1] == "ok", out
    assert "no CUDA GPU visible: ranks will run on the CPU" in row(out, "gpus")  # a warning, not a failure
    assert "FAIL" not in out and "checks passed" in out


def test_a_missing_data_dir_fails_with_the_convert_command(tmp_path, capsys, data_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    code, out = doctor(capsys, recipe, "data.synthetic.num_samples=0", f"data.train.local={tmp_path / 'nowhere'}",
                       "data.eval=null")
    assert code == 1
    assert row(out, "data.train").split()[1] == "FAIL" and f"{tmp_path / 'nowhere'}/index.json does not exist" in out
    assert f"data.train: convert the data (pargo-dist convert ... --out {tmp_path / 'nowhere'})" in out
    assert out.rstrip().endswith("failed: data.train")


@pytest.fixture(scope="module")
def s3_with_auth():
    """moto checking credentials after its first 6 requests, which make a bucket with an MDS
    index, an IAM user allowed to read it, and that user's key."""
    server = start_moto(auth_after=6)
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="doctor-data")
        s3.put_object(Bucket="doctor-data", Key="train/index.json", Body=b'{"version": 2, "shards": []}')
        iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id="testing",
                           aws_secret_access_key="testing", region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        yield server, key
    finally:
        server.process.kill()


def test_s3_data_is_checked_with_the_environments_credentials_which_are_never_printed(
        tmp_path, capsys, monkeypatch, s3_with_auth, data_dir):
    server, key = s3_with_auth
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    overrides = ["data.synthetic.num_samples=0", "data.train.remote=s3://doctor-data/train", "data.eval=null"]
    monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    code, out = doctor(capsys, recipe, *overrides)
    assert row(out, "data.train").split()[1] == "ok" and "s3://doctor-data/train/index.json" in out, out

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTALEKEY00000000")  # a stale key (moto checks the key id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    code, out = doctor(capsys, recipe, *overrides)
    assert code == 1
    assert "credentials rejected" in row(out, "data.train")
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this endpoint" in out
    assert "wrong-secret" not in out and "AKIASTALEKEY" not in out and key["SecretAccessKey"] not in out


def test_weights_whose_config_is_not_the_recipes_fail_naming_the_key(tmp_path, capsys, data_dir):
    llm = save_hub_style(tmp_path / "llm", "llama")  # hidden 64, 2 layers
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    code, out = doctor(capsys, recipe, f"model.llm.path={llm}")  # the recipe's config block: hidden 64 too
    assert row(out, "model.llm").split()[1] == "ok" and "config agrees" in row(out, "model.llm"), out

    code, out = doctor(capsys, recipe, f"model.llm.path={llm}", "model.llm.config.hidden_size=96")
    assert code == 1
    assert "hidden_size 96 in the recipe, 64 in config.json" in row(out, "model.llm")
    assert "model.llm.path is another model than model.llm.config describes" in out

    config = json.loads((llm / "config.json").read_text())  # a config.json that is not its weights'
    (llm / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    code, out = doctor(capsys, recipe, f"model.llm.path={llm}", "model.llm.config.num_hidden_layers=3")
    assert code == 1 and "2 layers in the weights, 3 in config.json" in row(out, "model.llm")
    (llm / "config.json").write_text(json.dumps(config))

    shards = sorted(llm.glob("model-*.safetensors"))
    shards[-1].unlink()  # an interrupted download
    code, out = doctor(capsys, recipe, f"model.llm.path={llm}")
    assert code == 1 and f"1 of the {len(shards)} weight files its index names are missing" in row(out, "model.llm")
    assert "the download is incomplete: download the model again" in out


def test_in_a_kubernetes_pod_under_torchrun_a_run_dir_that_dies_with_the_pod_fails(
        tmp_path, data_dir, capsys, monkeypatch):
    """In a pod (KUBERNETES_SERVICE_HOST) with the PET_* variables Kubeflow sets, the engine row
    names torchrun and its rendezvous; a run.dir on the container's overlay filesystem without
    checkpoint.remote is a FAIL with both fixes, and plain torchrun's 30 s of grace a warning.
    The mount table is this machine's, with the root made an overlay as in a container."""
    from pargo_dist.launch import doctor as doctor_module

    mounts = tmp_path / "mounts"
    mounts.write_text("overlay / overlay rw,relatime 0 0\n" + "".join(
        line + "\n" for line in doctor_module.MOUNTS.read_text().splitlines() if line.split()[1] != "/"))
    monkeypatch.setattr(doctor_module, "MOUNTS", mounts)
    for key, value in {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "4", "PET_NODE_RANK": "2",
                       "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run_dir = tmp_path / "run"
    points = [line.split()[1] for line in mounts.read_text().splitlines()]
    if any(str(run_dir).startswith(point.rstrip("/") + "/") for point in points if point != "/"):
        run_dir = Path("/var/tmp/pargo-doctor-test-run")  # (a /tmp mounted apart): a path on the root itself
    recipe = write_recipe(tmp_path / "recipe.yaml", run_dir, data_dir)
    code, out = doctor(capsys, recipe)
    assert code == 1, out
    assert "torchrun, node 2 of 4, rendezvous at job-node-0-0.job:29500" in out
    assert "on the container's own filesystem (overlay) and checkpoint.remote is unset" in out
    assert "checkpoint.remote=s3://bucket/prefix" in out and "--pvc NAME" in out
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT is unset" in out
    assert row(out, "slurm").split()[1] == "ok"  # not needed in a pod
    code, out = doctor(capsys, recipe, "checkpoint.remote=s3://bucket/runs")  # checkpoints outlive the pod
    assert "overlay" not in out
