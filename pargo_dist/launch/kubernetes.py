"""Kubernetes manifests for a recipe: `pargo-dist submit --k8s trainjob|pytorchjob` writes them,
`kubectl apply -f FILE` runs them. Nothing here talks to a cluster.

    trainjob    Kubeflow Trainer v2: a namespaced TrainingRuntime (trainer.kubeflow.org/v1alpha1)
                holding the JobSet template with our failure policy, a TrainJob using it, and a
                ConfigMap with the recipe
    pytorchjob  the Kubeflow training-operator v1: a PyTorchJob (kubeflow.org/v1) and the
                ConfigMap, for clusters that still run the older operator

Every pod runs `pargo-dist train --torchrun /etc/pargo/recipe.yaml OVERRIDES run.dir=RUN_DIR`:
torchrun starts this node's ranks (its options come from the PET_* variables the operators set:
nodes, ranks per node, node rank, master address) and the wrapper turns how they ended into our
exit code, which is all a job controller sees. The pods mount the recipe at /etc/pargo, the
run volume at /runs (a ReadWriteMany claim with --pvc; otherwise an emptyDir that dies with the
pod, so checkpoints must reach checkpoint.remote) and a memory-backed /dev/shm (a container's
own is 64 MiB, too small for NCCL and data-loader workers).

What a pod's exit code does to the job (TrainJob: Job podFailurePolicy -> JobSet failurePolicy;
PyTorchJob: replica restartPolicy OnFailure + runPolicy.backoffLimit):

    exit / event                      TrainJob (JobSet)                   PyTorchJob (v1)
    75 saved, retry me                restart all pods, counted           container restarts in place, counted
    124 hang detector                 restart all pods, counted           container restarts in place, counted
    137 / 143 killed, 3 lost a peer   restart all pods, counted           container restarts in place, counted
    1 a bug (same failure twice)      fail the job now                    restarts until backoffLimit
    2 bad recipe or input             fail the job now                    restarts until backoffLimit
    evicted / preempted               restart all pods, NOT counted       pod recreated; its peers' restarts count
    (DisruptionTarget condition)

Why, from the controllers' sources:
- TrainJob. The trainer's pods form one indexed Job (replicated job `node`). `backoffLimit: 0`
  makes any counted pod failure fail that Job; its `podFailurePolicy` (restartPolicy Never)
  fails it at once, first matching rule wins, on the pod's DisruptionTarget condition (rule 0,
  so a preempted pod that saved and exited 75 still counts as a disruption) and on exit codes
  1 and 2 (rule 1). Both end with reason `PodFailurePolicy`; the Job controller's message
  ("Pod NS/NAME has condition DisruptionTarget matching FailJob rule at index 0", "Container
  node for pod NS/NAME failed with exit code 2 matching FailJob rule at index 1") tells them
  apart, and JobSet's failurePolicy rules match reason + message (onJobFailureMessagePatterns,
  JobSet >= 0.10; Trainer v2.3 installs 0.12): DisruptionTarget ->
  RestartJobSetAndIgnoreMaxRestarts, exit 1/2 -> FailJobSet, any other failure (reason
  BackoffLimitExceeded: 75, 124, 137, 143, 3, anything unknown) -> RestartJobSet, which counts
  against maxRestarts (--max-job-restarts). A restart recreates every pod: torchrun's static
  rendezvous cannot take one new pod into a running group. BlockingRecreate starts the new
  pods only after the old ones are gone, i.e. after their saves within the grace period, so
  the next attempt resumes from the newest checkpoint.
- PyTorchJob. training-operator v1 offers a restartPolicy per replica type and a backoffLimit.
  `ExitCode` retries only codes >= 128 (train_util.IsRetryableExitCode) and fails the job on
  every other code, our 75 and 124 included: a preemption would end the run. So `OnFailure`:
  the kubelet restarts a failed container in place whatever its code, the peers lose it, exit
  3 and restart too, and the operator fails the job when the pods' container restarts reach
  runPolicy.backoffLimit (it sums them; one whole-job restart costs about one per pod, hence
  max_job_restarts x nodes). What v1 cannot express: failing at once on 1 or 2 (they retry
  until the limit), restarting all pods together (they follow each other through exit 3), and
  exempting disruptions (an evicted pod is recreated fresh, but its peers' restarts count).

Under Kubernetes, torchrun's agent restarts the ranks inside a pod (PET_MAX_RESTARTS =
run.max_restarts) where our launcher would under SLURM; the job controller's restarts come on
top, after a pod has given up (75). On SIGTERM torchrun gives the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT
(grace - 30 s) to save before it kills them, inside the pod's terminationGracePeriodSeconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from pargo_dist.errors import UserError
from pargo_dist.launch.job_spec import exported, ranks_per_node

KINDS = ("trainjob", "pytorchjob")
RECIPE_DIR = "/etc/pargo"  # the ConfigMap's mount; the pods' recipe is RECIPE_DIR/recipe.yaml
RUNS = "/runs"  # the run volume (--pvc, or an emptyDir) and the containers' working directory
SHM_PER_GPU_GI = 16
SHM_CPU = "1Gi"
# OMP_NUM_THREADS of a GPU rank: the 8 CPUs a GPU gets under SLURM too (submit.CPUS_PER_GPU); a CPU rank 1
OMP_THREADS_GPU = 8
SAVE_MARGIN_S = 30  # of the grace period, what torchrun does not give the ranks to save (its own exit)
# a bug that failed twice, a bad recipe or input: another attempt would repeat it. Every other code
# (75, 124, 3, 137, 143, ...) retries the job
FAIL_EXITS = (1, 2)
TRAINER_NODE = "node"  # Kubeflow Trainer's replicated job and container name (constants.Node)
TRAINER_PORT = 29500  # Trainer v2's PET_MASTER_PORT (constants.ContainerTrainerPort)
PYTORCH_CONTAINER = "pytorch"  # training-operator v1's default container and port names
PYTORCH_PORT_NAME, PYTORCH_PORT = "pytorchjob-port", 23456
SET_BY_OPERATOR = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
CONFIGMAP_LIMIT = 1 << 20  # bytes a ConfigMap holds
# a resource quantity, as the CRDs' schemas give it (16Gi, 512Mi, 1.5G)
_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = re.compile(rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035: TrainJob names, pod host names


@dataclass
class KubeSpec:
    recipe: str
    kind: str = "trainjob"  # trainjob | pytorchjob
    image: str | None = None  # the container image with pargo-dist installed (required)
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1  # pods, one per node
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # ranks per pod; default: one per GPU
    job_name: str | None = None  # default: the recipe's file name
    namespace: str = "default"
    secret: str | None = None  # a Secret whose keys become every rank's environment (object-store credentials)
    pvc: str | None = None  # a ReadWriteMany PersistentVolumeClaim mounted at /runs
    run_dir: str | None = None  # default: /runs/<job name>
    grace: int = 600  # terminationGracePeriodSeconds: SIGTERM -> save -> SIGKILL
    shm_size: str | None = None  # default: 16Gi per GPU, 1Gi for CPU ranks
    max_job_restarts: int = 10  # whole-job restarts on retriable exits (TrainJob: JobSet maxRestarts)
    exports: list[str] = field(default_factory=list)  # KEY=VALUE for every rank

    def ranks_per_node(self) -> int:
        return ranks_per_node(self.nproc_per_node, self.gpus_per_node, where="in each pod")


@dataclass
class _Job:
    """A spec checked against the recipe: what every manifest is built from."""

    spec: KubeSpec
    name: str
    run_dir: str
    nproc: int
    max_restarts: int  # the recipe's run.max_restarts: torchrun's in-pod restarts
    recipe_text: str

    @property
    def labels(self) -> dict:
        return {"app.kubernetes.io/name": "pargo-dist", "app.kubernetes.io/instance": self.name}

    def metadata(self, name: str) -> dict:
        return {"name": name, "namespace": self.spec.namespace, "labels": dict(self.labels)}


def _longest_pod_name(kind: str, name: str, nodes: int) -> str:
    """The longest host name the controller will give one of the job's pods (63 characters at most):
    JobSet checks `<jobset>-<replicated job>-<job index>-<pod index>-<5 random>`, v1 names `<job>-worker-<i>`."""
    if kind == "trainjob":
        return f"{name}-{TRAINER_NODE}-0-{nodes - 1}-abcde"
    return f"{name}-worker-{max(nodes - 2, 0)}"


def _job_name(spec: KubeSpec) -> str:
    if spec.job_name:
        name = spec.job_name
        if not DNS_LABEL.match(name):
            raise UserError(f"--job-name {name!r}: a Kubernetes job name is lowercase letters, digits and '-', "
                            "starting with a letter (RFC 1035)")
    else:  # the recipe's file name, made a valid name: paper_stage1.yaml -> paper-stage1
        name = re.sub(r"[^a-z0-9-]+", "-", Path(spec.recipe).stem.lower()).strip("-")
        if not name[:1].isalpha():
            name = f"pargo-{name}".rstrip("-")
        spare = 63 - len(_longest_pod_name(spec.kind, name, spec.nodes))
        if spare < 0:
            name = name[:spare].rstrip("-")
    longest = _longest_pod_name(spec.kind, name, spec.nodes)
    if len(longest) > 63:
        raise UserError(f"--job-name {name!r} is too long: its pods would be named like {longest!r}, over the 63 "
                        f"characters a host name may have; use at most {len(name) - (len(longest) - 63)}")
    return name


def _durable(run_dir: str, pvc: str | None) -> bool:
    """Whether the run dir outlives its pod: on the claim, which the pods mount at /runs."""
    path = PurePosixPath(run_dir)
    return bool(pvc) and (not path.is_absolute() or path == PurePosixPath(RUNS) or PurePosixPath(RUNS) in path.parents)


def check(spec: KubeSpec) -> _Job:
    """Validate the spec and the recipe with its overrides (as the pods will load it); UserError
    says what to change."""
    from pargo_dist.config import load_config

    if spec.kind not in KINDS:
        raise UserError(f"--k8s {spec.kind!r}: must be one of {list(KINDS)}")
    if not spec.image:
        raise UserError("--k8s needs --image IMAGE: the container image with pargo-dist (and this recipe's "
                        "dependencies) installed, which every pod runs")
    if spec.nodes < 1:
        raise UserError(f"--nodes must be at least 1, not {spec.nodes}")
    nproc = spec.ranks_per_node()
    if spec.grace <= SAVE_MARGIN_S:
        raise UserError(f"--grace {spec.grace}: must be over {SAVE_MARGIN_S} s (torchrun gives the ranks grace - "
                        f"{SAVE_MARGIN_S} s to save after SIGTERM)")
    if spec.max_job_restarts < 0:
        raise UserError(f"--max-job-restarts must be >= 0, not {spec.max_job_restarts}")
    if spec.shm_size is not None and not QUANTITY.match(spec.shm_size):
        raise UserError(f"--shm-size {spec.shm_size!r}: expected a Kubernetes quantity such as 16Gi or 512Mi")
    for key, _ in exported(spec.exports):
        if key in SET_BY_OPERATOR:
            raise UserError(f"--export {key}: the operator sets it for each pod (from --nodes, --nproc-per-node "
                            "and the pod's index)")
    name = _job_name(spec)
    run_dir = spec.run_dir or f"{RUNS}/{name}"
    cfg = load_config(spec.recipe, [*spec.overrides, f"run.dir={run_dir}"])
    if not _durable(run_dir, spec.pvc) and not cfg.checkpoint.remote:
        where = f"run dir {run_dir} is outside the claim's /runs" if spec.pvc else \
            f"without --pvc the run dir {run_dir} is an emptyDir"
        raise UserError(f"{where}: it is lost with its pod, and so would be every checkpoint. Set "
                        "checkpoint.remote=s3://bucket/prefix (an override or in the recipe; the ranks resume from "
                        "there) or mount a ReadWriteMany claim with --pvc NAME (run.dir under /runs)")
    text = Path(spec.recipe).read_text()
    if len(text.encode()) > CONFIGMAP_LIMIT - 4096:
        raise UserError(f"recipe {spec.recipe} is {len(text.encode())} bytes; a ConfigMap holds 1 MiB")
    return _Job(spec=spec, name=name, run_dir=run_dir, nproc=nproc, max_restarts=cfg.run.max_restarts,
                recipe_text=text)


def configmap(job: _Job) -> dict:
    """The recipe file, as the user wrote it; the overrides travel on the command line."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": job.metadata(f"{job.name}-recipe"),
            "data": {"recipe.yaml": job.recipe_text}}


def _env(job: _Job) -> list[dict]:
    spec = job.spec
    env = {"PET_MAX_RESTARTS": str(job.max_restarts),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(spec.grace - SAVE_MARGIN_S),
           "OMP_NUM_THREADS": str(OMP_THREADS_GPU if spec.gpus_per_node else 1)}
    env.update(exported(spec.exports))  # after the defaults: an --export of the same name replaces one
    return [{"name": key, "value": value} for key, value in env.items()]


def pod_spec(job: _Job, container: str, port: dict) -> dict:
    """The pod both kinds run: the command, its environment, the volumes, the GPUs, the grace."""
    spec = job.spec
    main = {"name": container, "image": spec.image,
            "command": ["pargo-dist", "train", "--torchrun", f"{RECIPE_DIR}/recipe.yaml", *spec.overrides,
                        f"run.dir={job.run_dir}"],
            "workingDir": RUNS, "env": _env(job), "ports": [port],
            "volumeMounts": [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
                             {"name": "runs", "mountPath": RUNS},
                             {"name": "dshm", "mountPath": "/dev/shm"}]}
    if spec.secret:
        main["envFrom"] = [{"secretRef": {"name": spec.secret}}]
    if spec.gpus_per_node:
        main["resources"] = {"limits": {"nvidia.com/gpu": spec.gpus_per_node}}
    shm = spec.shm_size or (f"{SHM_PER_GPU_GI * spec.gpus_per_node}Gi" if spec.gpus_per_node else SHM_CPU)
    runs = {"persistentVolumeClaim": {"claimName": spec.pvc}} if spec.pvc else {"emptyDir": {}}
    return {"terminationGracePeriodSeconds": spec.grace, "containers": [main],
            "volumes": [{"name": "recipe", "configMap": {"name": f"{job.name}-recipe"}},
                        {"name": "runs", **runs},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]}


def _codes(codes) -> str:
    return "|".join(str(c) for c in codes)


def pod_failure_policy() -> dict:
    """The Job's rules, first match wins; what they do not match counts, and backoffLimit 0 fails the
    Job on it (reason BackoffLimitExceeded)."""
    return {"rules": [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": TRAINER_NODE, "operator": "In", "values": list(FAIL_EXITS)}}]}


def jobset_failure_policy(max_restarts: int) -> dict:
    """The JobSet's rules over its failed Job's reason and message (see the module docstring)."""
    return {"maxRestarts": max_restarts, "restartStrategy": "BlockingRecreate", "rules": [
        {"name": "Disrupted", "action": "RestartJobSetAndIgnoreMaxRestarts",
         "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": ["has condition DisruptionTarget matching FailJob rule"]},
        {"name": "NotRetriable", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
         "onJobFailureMessagePatterns": [f"failed with exit code ({_codes(FAIL_EXITS)}) matching FailJob rule"]},
        {"name": "Retriable", "action": "RestartJobSet", "onJobFailureReasons": ["BackoffLimitExceeded"]}]}


def trainjob_objects(job: _Job) -> list[dict]:
    """ConfigMap, TrainingRuntime (the JobSet template and its failure policy), TrainJob."""
    spec = job.spec
    pod = {"metadata": {"labels": dict(job.labels)},
           "spec": {"restartPolicy": "Never",  # podFailurePolicy requires it
                    **pod_spec(job, TRAINER_NODE, {"name": "torch", "containerPort": TRAINER_PORT})}}
    node_job = {"name": TRAINER_NODE, "replicas": 1,
                "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                             "spec": {"backoffLimit": 0, "podFailurePolicy": pod_failure_policy(), "template": pod}}}
    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
               "metadata": {**job.metadata(job.name),
                            "labels": {**job.labels, "trainer.kubeflow.org/framework": "torch"}},
               "spec": {"mlPolicy": {"numNodes": spec.nodes, "torch": {}},
                        "template": {"metadata": {"labels": dict(job.labels)},
                                     "spec": {"failurePolicy": jobset_failure_policy(spec.max_job_restarts),
                                              "replicatedJobs": [node_job]}}}}
    trainjob = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                "metadata": job.metadata(job.name),
                # spec.trainer must be there: the torch plugin sets PET_* only for a TrainJob with a trainer
                "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                        "name": job.name},
                         "trainer": {"numNodes": spec.nodes, "numProcPerNode": job.nproc}}}
    return [configmap(job), runtime, trainjob]


def pytorchjob_objects(job: _Job) -> list[dict]:
    """ConfigMap, PyTorchJob: Master is node 0 (PET_MASTER_ADDR points at it), Workers the rest."""
    spec = job.spec

    def replica(count: int) -> dict:  # one pod template each: a shared dict would be a YAML alias
        pod = {"metadata": {"labels": dict(job.labels)},
               "spec": pod_spec(job, PYTORCH_CONTAINER, {"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_PORT})}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": pod}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    pytorchjob = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": job.metadata(job.name),
                  "spec": {"nprocPerNode": str(job.nproc),
                           "runPolicy": {"backoffLimit": spec.max_job_restarts * spec.nodes},
                           "pytorchReplicaSpecs": replicas}}
    return [configmap(job), pytorchjob]


def manifests(spec: KubeSpec) -> list[dict]:
    """The objects to apply, in order (the ConfigMap and runtime before what uses them)."""
    job = check(spec)
    return trainjob_objects(job) if spec.kind == "trainjob" else pytorchjob_objects(job)


class _Dumper(yaml.SafeDumper):
    """safe_dump's dumper, writing multi-line strings (the recipe) as literal blocks a person can read."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render(spec: KubeSpec) -> str:
    """The manifests as one multi-document YAML file for `kubectl apply -f`."""
    objects = manifests(spec)
    header = (f"# pargo-dist submit --k8s {spec.kind}: {spec.recipe}, {spec.nodes} pod(s) x "
              f"{spec.ranks_per_node()} rank(s). Apply with: kubectl apply -f THIS_FILE\n")
    return header + yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
