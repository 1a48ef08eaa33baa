"""`pargo-dist submit --k8s`: the manifests against the published CRD schemas (tests/data/k8s), and
what they make the controllers do with each of our exit codes.

No cluster: the schemas are validated with jsonschema the way the API server would with strict
field validation (an unknown field is an error, as `kubectl apply` reports it), and the
failure policy is evaluated with the two controllers' documented rules: the Job controller's
podFailurePolicy (first matching rule; its message formats, from kubernetes
pkg/controller/job/pod_failure_policy.go) and JobSet's failurePolicy (reason + message regex,
first matching rule, default RestartJobSet; jobset pkg/controllers/failure_policy.go).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from pargo_dist import cli
from pargo_dist.errors import UserError
from pargo_dist.launch.kubernetes import KubeSpec, manifests, render
from pargo_dist.runtime.exits import HANG_EXIT, PEER_LOST_EXIT, REQUEUE_EXIT

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
SCHEMAS = Path(__file__).parent / "data" / "k8s"
REMOTE = "checkpoint.remote=s3://bucket/prefix"


def spec(**kw) -> KubeSpec:
    kw.setdefault("image", "registry.example/pargo:1")
    kw.setdefault("nproc_per_node", None if kw.get("gpus_per_node") else 2)
    return KubeSpec(recipe=kw.pop("recipe", RECIPE), **kw)


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


# -- the schemas ---------------------------------------------------------------------------------

def _as_api_server(node):
    """A CRD's structural schema as jsonschema should read it: an object with `properties` takes no
    other fields (the API server prunes them, or rejects them under strict field validation, which
    kubectl asks for), and `x-kubernetes-int-or-string` admits both (jsonschema ignores `x-` keys)."""
    if isinstance(node, list):
        return [_as_api_server(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_api_server(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in out and "additionalProperties" not in out and \
            not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@cache
def validator(name: str) -> jsonschema.Draft7Validator:
    schema = _as_api_server(json.loads((SCHEMAS / f"{name}.json").read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(obj: dict) -> list[str]:
    name = {"TrainJob": "trainjob", "TrainingRuntime": "trainingruntime", "PyTorchJob": "pytorchjob"}[obj["kind"]]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(obj)]


def check_configmap(obj: dict) -> None:
    assert obj["apiVersion"] == "v1" and obj["kind"] == "ConfigMap"
    assert set(obj) == {"apiVersion", "kind", "metadata", "data"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in obj["data"].items())


VARIANTS = {
    "cpu, pvc": dict(pvc="runs-rwx"),
    "gpus, remote, secret, 3 nodes": dict(gpus_per_node=8, nodes=3, overrides=[REMOTE], secret="s3-creds",
                                          exports=["NCCL_DEBUG=INFO"]),
    "one node, shm, grace": dict(pvc="runs-rwx", nodes=1, shm_size="2Gi", grace=120, namespace="ml"),
}


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manifests_fit_the_published_schemas(kind, variant):
    objects = manifests(spec(kind=kind, **VARIANTS[variant]))
    assert [o["kind"] for o in objects] == (["ConfigMap", "TrainingRuntime", "TrainJob"] if kind == "trainjob"
                                            else ["ConfigMap", "PyTorchJob"])
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            check_configmap(obj)
        else:
            assert schema_errors(obj) == []
        assert obj["metadata"]["namespace"] == VARIANTS[variant].get("namespace", "default")


def test_the_schema_check_catches_a_wrong_field_and_a_wrong_type():
    """The check above can fail: the same objects, broken as a typo in the generator would break them."""
    runtime = by_kind(manifests(spec(pvc="runs-rwx")))["TrainingRuntime"]
    job = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    job["podFailurePolicies"] = job.pop("podFailurePolicy")
    job["backoffLimit"] = "0"
    job["template"]["spec"]["volumes"][2]["emptyDir"]["sizeLimit"] = "16 GiB"  # int-or-string, but a quantity
    errors = schema_errors(runtime)
    path = "spec.template.spec.replicatedJobs.0.template.spec"
    assert any("'podFailurePolicies' was unexpected" in e for e in errors)
    assert any(e.startswith(f"{path}.backoffLimit") for e in errors)
    assert any(e.startswith(f"{path}.template.spec.volumes.2.emptyDir.sizeLimit") for e in errors)
    pytorchjob = by_kind(manifests(spec(kind="pytorchjob", pvc="runs-rwx")))["PyTorchJob"]
    pytorchjob["spec"]["nprocPerNode"] = 2  # a string in v1
    assert [e for e in schema_errors(pytorchjob) if e.startswith("spec.nprocPerNode")]


def test_job_names_pass_the_crds_own_name_rule(tmp_path):
    """TrainJob's CEL rule (x-kubernetes-validations, which jsonschema does not run), read from the
    stored schema; the default name comes from the recipe's file name."""
    rules = json.loads((SCHEMAS / "trainjob.json").read_text())["x-kubernetes-validations"]
    (pattern,) = [re.search(r"matches\('(.+)'\)", r["rule"]).group(1) for r in rules if "matches" in r["rule"]]
    for file, expected in [("Paper_Stage1.yaml", "paper-stage1"), ("7b-finetune.yaml", "pargo-7b-finetune"),
                           (f"{'long-' * 12}.yaml", None)]:
        recipe = tmp_path / file
        recipe.write_text(Path(RECIPE).read_text())
        name = by_kind(manifests(spec(recipe=str(recipe), pvc="x", nodes=16)))["TrainJob"]["metadata"]["name"]
        assert re.fullmatch(pattern, name) and name == (expected or name)
        assert len(f"{name}-node-0-15-abcde") <= 63  # JobSet's check of its longest pod name
    with pytest.raises(UserError, match="RFC 1035"):
        manifests(spec(job_name="Stage_1", pvc="x"))
    with pytest.raises(UserError, match="63 characters"):
        manifests(spec(job_name="a" * 50, pvc="x", nodes=16))


# -- what each exit code does --------------------------------------------------------------------

def job_failure(job_spec: dict, exit_code: int, disrupted: bool) -> tuple[str, str] | None:
    """The Job controller on one failed pod whose container exited with `exit_code`: its
    podFailurePolicy rules in order, else the default count against backoffLimit. Returns the Job's
    failure (reason, message), or None when the Job goes on (an Ignore rule, or failures left under
    backoffLimit)."""
    (container,) = [c["name"] for c in job_spec["template"]["spec"]["containers"]]
    for index, rule in enumerate(job_spec.get("podFailurePolicy", {}).get("rules", [])):
        message = None
        if "onPodConditions" in rule and disrupted and any(
                c["type"] == "DisruptionTarget" and c.get("status", "True") == "True" for c in rule["onPodConditions"]):
            message = f"Pod ns/p-0 has condition DisruptionTarget matching {rule['action']} rule at index {index}"
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName") in (None, container) and exit_code != 0 and \
                (exit_code in codes["values"]) == (codes["operator"] == "In"):
            message = (f"Container {container} for pod ns/p-0 failed with exit code {exit_code} matching "
                       f"{rule['action']} rule at index {index}")
        if message is None:
            continue
        if rule["action"] == "FailJob":
            return "PodFailurePolicy", message
        if rule["action"] == "Ignore":
            return None
        break  # Count: the default below
    if 1 > job_spec.get("backoffLimit", 6):
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(policy: dict, failure: tuple[str, str]) -> str:
    """JobSet's failurePolicy on a failed child Job: the first rule whose reasons and message patterns
    (Go regexp.MatchString: a search) both match; none: RestartJobSet."""
    reason, message = failure
    for rule in policy.get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"


def trainjob_outcome(runtime: dict, exit_code: int, disrupted: bool = False) -> str:
    jobset = runtime["spec"]["template"]["spec"]
    failure = job_failure(jobset["replicatedJobs"][0]["template"]["spec"], exit_code, disrupted)
    assert failure is not None, "a failed pod must end its attempt: the others cannot take a replacement in"
    return jobset_action(jobset["failurePolicy"], failure)


def test_trainjob_retries_saved_hung_and_killed_pods_and_fails_on_bad_input():
    runtime = by_kind(manifests(spec(pvc="runs-rwx", max_job_restarts=7)))["TrainingRuntime"]
    jobset = runtime["spec"]["template"]["spec"]
    assert jobset["failurePolicy"]["maxRestarts"] == 7
    assert jobset["failurePolicy"]["restartStrategy"] == "BlockingRecreate"  # old pods saved and gone first
    for code in (REQUEUE_EXIT, HANG_EXIT, PEER_LOST_EXIT, 137, 143, 139):  # 139: any other code

        assert trainjob_outcome(runtime, code) == "RestartJobSet", code
    for code in (1, 2):
        assert trainjob_outcome(runtime, code) == "FailJobSet", code
    for code in (75, 143, 1):  # preempted or evicted: whatever it exited with, a free restart
        assert trainjob_outcome(runtime, code, disrupted=True) == "RestartJobSetAndIgnoreMaxRestarts", code
    pod = jobset["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires


def test_trainjob_fails_without_the_policy():
    """The evaluator above is not vacuous: without our rules a bad recipe is retried, and with the
    Job's default backoffLimit the pod is replaced alone (the attempt goes on)."""
    runtime = by_kind(manifests(spec(pvc="runs-rwx")))["TrainingRuntime"]
    jobset = runtime["spec"]["template"]["spec"]
    job = jobset["replicatedJobs"][0]["template"]["spec"]
    policy = job.pop("podFailurePolicy")
    assert trainjob_outcome(runtime, 2) == "RestartJobSet"
    job["podFailurePolicy"], jobset["failurePolicy"]["rules"][1]["onJobFailureMessagePatterns"] = policy, ["code 2$"]
    assert trainjob_outcome(runtime, 2) == "RestartJobSet"
    del job["backoffLimit"]
    assert job_failure(job, 75, disrupted=False) is None


def test_pytorchjob_restarts_on_failure_within_a_budget_per_pod():
    objects = by_kind(manifests(spec(kind="pytorchjob", pvc="runs-rwx", nodes=4, max_job_restarts=5)))
    job = objects["PyTorchJob"]["spec"]
    replicas = job["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 3}
    # ExitCode would retry only codes >= 128 (training-operator's IsRetryableExitCode): 75 and 124 not
    assert {v["restartPolicy"] for v in replicas.values()} == {"OnFailure"}
    assert job["runPolicy"]["backoffLimit"] == 5 * 4  # the operator sums the pods' container restarts
    assert job["nprocPerNode"] == "2"
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
    one = by_kind(manifests(spec(kind="pytorchjob", pvc="runs-rwx", nodes=1)))["PyTorchJob"]
    assert list(one["spec"]["pytorchReplicaSpecs"]) == ["Master"]


# -- the pods ------------------------------------------------------------------------------------

def pod(kind: str = "trainjob", **kw) -> dict:
    objects = by_kind(manifests(spec(kind=kind, **kw)))
    if kind == "trainjob":
        return objects["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
            "template"]["spec"]
    return objects["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def mounts(p: dict) -> dict[str, dict]:
    volumes = {v["name"]: v for v in p["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in p["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_the_pod_runs_torchrun_on_the_mounted_recipe(kind):
    p = pod(kind, pvc="runs-rwx", overrides=["optim.lr=3e-4", "run.max_restarts=3"], grace=300,
            exports=["OMP_NUM_THREADS=4", "NCCL_IB_HCA=mlx5"])
    (c,) = p["containers"]
    assert c["command"] == ["pargo-dist", "train", "--torchrun", "/etc/pargo/recipe.yaml", "optim.lr=3e-4",
                            "run.max_restarts=3", "run.dir=/runs/tiny-cpu"]
    assert {e["name"]: e["value"] for e in c["env"]} == {
        "PET_MAX_RESTARTS": "3", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "270", "OMP_NUM_THREADS": "4", "NCCL_IB_HCA": "mlx5"}
    assert p["terminationGracePeriodSeconds"] == 300
    volumes = mounts(p)
    assert volumes["/runs"]["persistentVolumeClaim"] == {"claimName": "runs-rwx"} and c["workingDir"] == "/runs"
    assert volumes["/etc/pargo"]["configMap"]["name"] == "tiny-cpu-recipe"
    assert "envFrom" not in c and "resources" not in c  # no Secret, no GPU asked for


def test_gpus_shared_memory_and_the_secret():
    p = pod(gpus_per_node=8, overrides=[REMOTE], secret="s3-creds")
    (c,) = p["containers"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 8}}
    assert mounts(p)["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {e["name"]: e["value"] for e in c["env"]}["OMP_NUM_THREADS"] == "8"
    assert mounts(p)["/runs"] == {"name": "runs", "emptyDir": {}}
    assert mounts(pod(pvc="r"))["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert mounts(pod(pvc="r", shm_size="3Gi"))["/dev/shm"]["emptyDir"]["sizeLimit"] == "3Gi"


def test_the_trainjob_uses_its_runtime_and_gets_the_torch_variables():
    objects = by_kind(manifests(spec(pvc="runs-rwx", nodes=3, gpus_per_node=4, namespace="ml")))
    runtime, trainjob = objects["TrainingRuntime"], objects["TrainJob"]
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": runtime["metadata"]["name"]}
    # the torch plugin sets PET_NNODES / PET_NPROC_PER_NODE from these, and only when spec.trainer is set
    assert trainjob["spec"]["trainer"] == {"numNodes": 3, "numProcPerNode": 4}
    rjob = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    assert rjob["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert rjob["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {}}


# -- what is refused before anything is written --------------------------------------------------

def test_a_run_dir_that_dies_with_its_pod_needs_checkpoint_remote():
    with pytest.raises(UserError) as err:
        manifests(spec())
    assert "checkpoint.remote=s3://bucket/prefix" in str(err.value) and "--pvc NAME" in str(err.value)
    with pytest.raises(UserError, match="outside the claim"):
        manifests(spec(pvc="runs-rwx", run_dir="/scratch/run"))
    assert manifests(spec(overrides=[REMOTE]))  # either fix is enough
    assert manifests(spec(pvc="runs-rwx", run_dir="/runs/earlier-job"))


def test_missing_image_and_other_bad_flags():
    with pytest.raises(UserError, match="--image"):
        manifests(spec(image=None, pvc="x"))
    for bad, match in [(dict(grace=30), "--grace"), (dict(shm_size="lots"), "--shm-size"),
                       (dict(exports=["PET_NNODES=2"]), "PET_NNODES"), (dict(nodes=0), "--nodes"),
                       (dict(nproc_per_node=None), "--gpus-per-node"), (dict(overrides=["optim.lrr=1"]), "optim.lr")]:
        with pytest.raises(UserError, match=match):
            manifests(spec(pvc="x", **bad))


# -- the command ---------------------------------------------------------------------------------

def test_submit_k8s_writes_the_file_end_to_end(tmp_path, capsys):
    out = tmp_path / "job.yaml"
    code = cli.main(["submit", RECIPE, "optim.lr=3e-4", "--nodes", "2", "--nproc-per-node", "2", "--k8s", "trainjob",
                     "--image", "registry.example/pargo:1", "--pvc", "runs-rwx", "--out", str(out)])
    assert code == 0 and f"kubectl apply -f {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "&id" not in text and "*id" not in text  # no YAML aliases: kubectl would read them, people less so
    objects = list(yaml.safe_load_all(text))
    assert [o["kind"] for o in objects] == ["ConfigMap", "TrainingRuntime", "TrainJob"]
    assert objects[0]["data"]["recipe.yaml"] == Path(RECIPE).read_text()
    assert all(schema_errors(o) == [] for o in objects[1:])
    same = render(spec(pvc="runs-rwx", nodes=2, overrides=["optim.lr=3e-4"]))
    assert same.split("\n", 1)[1] == text.split("\n", 1)[1]  # the command renders what the function does


def test_submit_refuses_flags_of_the_other_path(tmp_path, capsys):
    out = tmp_path / "job.yaml"
    assert cli.main(["submit", RECIPE, "--nproc-per-node", "2", "--k8s", "trainjob", "--pvc", "r",
                     "--out", str(out)]) == 2
    assert "--image" in capsys.readouterr().err and not out.exists()
    assert cli.main(["submit", RECIPE, "--nproc-per-node", "2", "--k8s", "pytorchjob", "--image", "i", "--pvc", "r",
                     "--partition", "gpu"]) == 2
    assert "--partition" in capsys.readouterr().err
    assert cli.main(["submit", RECIPE, "--nproc-per-node", "2", "--image", "i", "--dry-run"]) == 2
    assert "--k8s" in capsys.readouterr().err
