"""`pargo-dist submit`: a recipe -> an sbatch script (slurm/train.sbatch filled in) -> a job.

    pargo-dist submit recipes/my-stage1.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00
    pargo-dist submit recipes/tiny-cpu.yaml --nproc-per-node 2 --dry-run      # print the script only

The recipe and overrides are validated here, before anything is queued. The run dir is keyed
by the job (`<run.dir>/slurm-<job id>`): a requeued job keeps its id, so it resumes its own
run, and two submissions of one recipe never write into each other's checkpoints. To go on
from an earlier job's checkpoints, pass that directory as --run-dir. Logs go to
`<run.dir>/logs/<job name>-<job id>.out`, appended across requeues.

Kubernetes (Kubeflow Trainer v2's TrainJob, or the training-operator v1's PyTorchJob): --k8s
writes the manifests instead, to stdout or --out, and applies nothing; pargo_dist/launch/kubernetes.py
says what the pods run and how each exit code retries or fails the job.

    pargo-dist submit recipes/my-stage1.yaml --nodes 4 --gpus-per-node 8 --k8s trainjob --image REGISTRY/pargo:TAG \\
        --pvc runs-rwx --secret s3-creds --out job.yaml
    kubectl apply -f job.yaml                          # kubectl delete -f job.yaml removes it all
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pargo_dist.errors import UserError
from pargo_dist.launch.job_spec import exported, ranks_per_node

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "train.sbatch"
LAUNCHER = REPO / "launchers" / "launch.py"
CPUS_PER_GPU = 8  # data-loader workers and the launcher; --cpus-per-task overrides


@dataclass
class JobSpec:
    recipe: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int | None = None  # ranks per node; default: one per GPU
    cpus_per_task: int | None = None  # CPUs for a node's launcher and all its ranks
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_lead: int = 300  # seconds before the time limit at which the job saves (SIGUSR1)
    max_requeues: int = 10
    run_dir: str | None = None
    log_dir: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)  # KEY=VALUE set for every rank (NCCL_*, HF_HOME, ...)

    def ranks_per_node(self) -> int:
        return ranks_per_node(self.nproc_per_node, self.gpus_per_node)


def _quote_dir(path: str) -> str:
    """A double-quoted word in which ${SLURM_JOB_ID} still expands (and nothing else does)."""
    if re.search(r'["`\\]|\$(?!\{SLURM_JOB_ID\})', path):
        raise UserError(f"run dir {path!r}: quotes, backslashes and $ are not supported in paths")
    return f'"{path}"'


@dataclass
class RenderedJob:
    script: str
    name: str
    log_dir: str
    run_dir: str  # may hold ${SLURM_JOB_ID}


def render(spec: JobSpec, workdir: Path | None = None, python: str | None = None) -> RenderedJob:
    """The sbatch script for a job spec (and where it logs and trains); the recipe is validated."""
    from pargo_dist.config import load_config

    cfg = load_config(spec.recipe, spec.overrides)
    nproc = spec.ranks_per_node()
    if spec.nodes < 1:
        raise UserError(f"--nodes must be at least 1, not {spec.nodes}")
    workdir = (workdir or Path.cwd()).resolve()
    base = Path(cfg.run.dir) if Path(cfg.run.dir).is_absolute() else workdir / cfg.run.dir
    run_dir = spec.run_dir or f"{base}/slurm-${{SLURM_JOB_ID}}"
    if not (run_dir.startswith("/") or run_dir.startswith("$")):
        run_dir = str(workdir / run_dir)
    log_dir = str(Path(spec.log_dir).resolve() if spec.log_dir else base / "logs")
    name = spec.job_name or Path(spec.recipe).stem
    cpus = spec.cpus_per_task or (nproc * CPUS_PER_GPU if spec.gpus_per_node else nproc)
    lines = [f"--job-name={name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}",
             f"--time={spec.time}", f"--output={log_dir}/%x-%j.out", "--open-mode=append",
             f"--signal=B:USR1@{spec.signal_lead}", "--requeue"]
    if spec.gpus_per_node:
        lines.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.partition:
        lines.append(f"--partition={spec.partition}")
    if spec.account:
        lines.append(f"--account={spec.account}")
    lines += spec.sbatch_args
    exports = [f"export {key}={shlex.quote(value)}" for key, value in exported(spec.exports)]
    train_args = [shlex.quote(str(Path(spec.recipe).resolve())), *map(shlex.quote, spec.overrides),
                  _quote_dir(f"run.dir={run_dir}")]
    values = {
        "RECIPE": str(Path(spec.recipe).resolve()), "NODES": str(spec.nodes), "NPROC": str(nproc),
        "WORLD": str(spec.nodes * nproc), "RUN_DIR": run_dir, "SIGNAL_LEAD": str(spec.signal_lead),
        "MAX_REQUEUES": str(spec.max_requeues), "WORKDIR": shlex.quote(str(workdir)),
        "OMP_THREADS": str(max(1, cpus // nproc)), "PYTHON": shlex.quote(python or sys.executable),
        "LAUNCHER": shlex.quote(str(LAUNCHER)),
        "SBATCH_LINES": "\n".join(f"#SBATCH {line}" for line in lines),
        "EXPORTS": "\n".join(exports) or "# (no --export variables)",
        "TRAIN_ARGS": " ".join(train_args),
        "LOG": shlex.quote(f"{log_dir}/{name}-") + '"${SLURM_JOB_ID}.out"',
    }
    script = re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], TEMPLATE.read_text())
    return RenderedJob(script=script, name=name, log_dir=log_dir, run_dir=run_dir)


def submit(spec: JobSpec, dry_run: bool = False, env: dict | None = None) -> int | None:
    """Write the script next to the logs and sbatch it; returns the job id (None for a dry run)."""
    job = render(spec)
    if dry_run:
        print(job.script, end="")
        return None
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)
    path = Path(job.log_dir) / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(job.script)
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise UserError(f"sbatch not found: run this on a SLURM login node (the script is at {path})") from None
    if out.returncode != 0:
        raise UserError(f"sbatch rejected {path}: {out.stderr.strip()}")
    job_id = int(out.stdout.strip().split(";")[0])
    print(f"submitted job {job_id}: {spec.nodes} node(s) x {spec.ranks_per_node()} rank(s)\n"
          f"  script  {path}\n  log     {job.log_dir}/{job.name}-{job_id}.out\n"
          f"  run dir {job.run_dir.replace('${SLURM_JOB_ID}', str(job_id))}", flush=True)
    return job_id


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, validated now")
    ap.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one rank per GPU")
    ap.add_argument("--nproc-per-node", type=int, help="ranks per node (default: --gpus-per-node); CPU runs set it")
    ap.add_argument("--cpus-per-task", type=int,
                    help=f"CPUs per node (default: {CPUS_PER_GPU} per GPU, 1 per CPU rank)")
    ap.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    ap.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    ap.add_argument("--account", help="SLURM account to charge")
    ap.add_argument("--job-name", help="default: the recipe's file name")
    ap.add_argument("--signal-lead", type=int, default=300,
                    help="seconds before the time limit at which ranks save and the job requeues (default 300)")
    ap.add_argument("--max-requeues", type=int, default=10, help="stop requeuing after this many (default 10)")
    ap.add_argument("--run-dir",
                    help="default: <run.dir>/slurm-<job id> (--k8s: /runs/<job name>); an earlier job's dir resumes it")
    ap.add_argument("--log-dir", help="default: <run.dir>/logs")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                    help="extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    ap.add_argument("--export", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for every rank, e.g. --export NCCL_IB_HCA=mlx5 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    k8s = ap.add_argument_group("Kubernetes (--k8s: write manifests, then `kubectl apply -f FILE`)")
    k8s.add_argument("--k8s", choices=["trainjob", "pytorchjob"],
                     help="write manifests instead of submitting to SLURM: trainjob (Kubeflow Trainer v2: "
                          "TrainingRuntime + TrainJob) or pytorchjob (training-operator v1), each with a ConfigMap "
                          "holding the recipe")
    k8s.add_argument("--image", help="container image with pargo-dist installed (required with --k8s)")
    k8s.add_argument("--namespace", default="default", help="namespace of every object (default: default)")
    k8s.add_argument("--secret", metavar="NAME",
                     help="Secret whose keys become the ranks' environment (AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL for checkpoint.remote and s3:// data)")
    k8s.add_argument("--pvc", metavar="NAME",
                     help="ReadWriteMany PersistentVolumeClaim mounted at /runs (run dir default /runs/<job name>); "
                          "without it the run dir dies with its pod and checkpoint.remote must be set")
    k8s.add_argument("--grace", type=int, default=600,
                     help="seconds from SIGTERM to SIGKILL (terminationGracePeriodSeconds); the ranks get 30 s "
                          "less to save (default 600)")
    k8s.add_argument("--shm-size", help="size of the memory-backed /dev/shm (default: 16Gi per GPU, 1Gi for CPU ranks)")
    k8s.add_argument("--max-job-restarts", type=int, default=10,
                     help="times the whole job is recreated after a retriable exit (75, 124, a killed pod); "
                          "evictions do not count with trainjob (default 10)")
    k8s.add_argument("--out", metavar="FILE", help="write the manifests here (default: stdout)")


# flags that mean something to one of the two paths only: (dest, flag, the default that says "not given")
SLURM_ONLY = (("cpus_per_task", "--cpus-per-task", None), ("time", "--time", "24:00:00"),
              ("partition", "--partition", None), ("account", "--account", None),
              ("signal_lead", "--signal-lead", 300), ("max_requeues", "--max-requeues", 10),
              ("log_dir", "--log-dir", None), ("sbatch_arg", "--sbatch-arg", []))
K8S_ONLY = (("image", "--image", None), ("namespace", "--namespace", "default"), ("secret", "--secret", None),
            ("pvc", "--pvc", None), ("grace", "--grace", 600), ("shm_size", "--shm-size", None),
            ("max_job_restarts", "--max-job-restarts", 10), ("out", "--out", None))


def _refuse_other_flags(args: argparse.Namespace) -> None:
    """A SLURM flag on a Kubernetes submission (or the reverse) would be dropped without a word."""
    if args.k8s:
        given = [flag for dest, flag, default in SLURM_ONLY if getattr(args, dest) != default]
        if given:
            raise UserError(f"{', '.join(given)}: SLURM only, not used with --k8s (--max-job-restarts is "
                            "the job's retry budget there)")
    else:
        given = [flag for dest, flag, default in K8S_ONLY if getattr(args, dest) != default]
        if given:
            raise UserError(f"{', '.join(given)}: for Kubernetes manifests only; add --k8s trainjob (or pytorchjob)")


def run_k8s(args: argparse.Namespace) -> int:
    """Write the manifests (stdout or --out); the recipe is validated first, nothing is applied."""
    from pargo_dist.launch.kubernetes import KubeSpec, render

    spec = KubeSpec(recipe=args.recipe, kind=args.k8s, image=args.image, overrides=args.overrides, nodes=args.nodes,
                    gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node, job_name=args.job_name,
                    namespace=args.namespace, secret=args.secret, pvc=args.pvc, run_dir=args.run_dir,
                    grace=args.grace, shm_size=args.shm_size, max_job_restarts=args.max_job_restarts,
                    exports=args.export)
    text = render(spec)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; start the job with: kubectl apply -f {args.out}", flush=True)
    else:
        print(text, end="")
    return 0


def run(args: argparse.Namespace) -> int:
    _refuse_other_flags(args)
    if args.k8s:
        return run_k8s(args)
    spec = JobSpec(recipe=args.recipe, overrides=args.overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
                   partition=args.partition, account=args.account, job_name=args.job_name,
                   signal_lead=args.signal_lead, max_requeues=args.max_requeues, run_dir=args.run_dir,
                   log_dir=args.log_dir, sbatch_args=args.sbatch_arg, exports=args.export)
    submit(spec, dry_run=args.dry_run)
    return 0
