"""`pargo-dist doctor`: check a node and a recipe before a job, with the fix for each failure.

    pargo-dist doctor recipes/paper-stage1-align.yaml              # on the node the job will use
    pargo-dist doctor recipes/llama3-70b-stage2.yaml --gpus 256    # the whole job's GPU count

One table, one row per check: ok, warn (the run works, but read this) or FAIL (the run would
fail or go wrong; the fix is printed under the table). Exit 0 without a FAIL, 1 with one.

- gpus       CUDA GPUs visible, and their memory against what `pargo-dist plan` says the recipe
             needs per GPU on --gpus GPUs (default: the ones on this node)
- versions   torch, transformers, DeepSpeed, megatron-core, mosaicml-streaming against the pins
             the project was tested with (constraints.txt; else the package's requirements);
             CUDA and NCCL as torch sees them
- shm        /dev/shm, where streaming and the data loader workers hand batches over (containers
             often give 64 MiB)
- data       each split of the recipe: a local dir has its MDS index.json; an s3:// one answers
             a HEAD of its index.json with the environment's endpoint and credentials (never
             printed: an error names the variable to check)
- weights    model.vision.path / model.llm.path exist, their config.json agrees with the recipe's
             `config:` block, and the safetensors headers (no tensor is read) hold the embedding
             width and the layer count that config says
- disk       free space at run.dir for checkpoint.keep_last + 1 checkpoints of the planner's size
             (the one being written included)
- engine     what starts the ranks here: SLURM, torchrun (Kubeflow's PET_* variables or its own),
             Kubernetes; in a pod, whether checkpoints outlive it (checkpoint.remote, or a run.dir
             that is not the container's own overlay filesystem) and whether torchrun gives the
             ranks time to save after SIGTERM (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
- slurm      sbatch, squeue, scontrol on PATH (for `pargo-dist submit`; not needed in a pod)
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pargo_dist.errors import UserError

GiB = 2**30
OK, WARN, FAIL = "ok", "warn", "FAIL"
PINNED = ("torch", "transformers", "deepspeed", "megatron-core", "mosaicml-streaming")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


# ----------------------------------------------------------------------------- the checks


def check_gpus(cfg, gpus: int | None, shapes) -> list[Check]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if cfg.train.precision == "bf16":
            return [Check("gpus", FAIL, "no CUDA GPU visible, and the recipe trains in bf16 (a GPU recipe)",
                          "run on a GPU node; check `nvidia-smi` and CUDA_VISIBLE_DEVICES")]
        return [Check("gpus", WARN, "no CUDA GPU visible: ranks will run on the CPU (gloo)")]
    from pargo_dist.plan import Hardware, estimate, layout_of

    mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GiB
    world = gpus or count
    need = estimate(cfg, Hardware(gpus=world, gpu_mem_gib=mem, gpus_per_node=count), layout_of(cfg),
                    shapes()).total_gib()
    detail = f"{count} x {torch.cuda.get_device_name(0)} ({mem:.0f} GiB); the plan needs {need:.1f} GiB per GPU on {world}"
    if need > mem:
        return [Check("gpus", FAIL, detail, f"pargo-dist plan <recipe> --gpus {world} --gpu-mem {mem:.0f} --fit "
                      "names a layout that fits (or use more GPUs)")]
    return [Check("gpus", OK, detail)]


def _pins() -> tuple[dict[str, str], str]:
    """{package: specifier} from the source tree's constraints.txt, else the installed package's
    own requirements; and where they came from."""
    constraints = Path(__file__).resolve().parents[2] / "constraints.txt"
    if constraints.is_file():
        pins = {}
        for line in constraints.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep and not line.startswith("#"):
                pins[re.sub(r"[-_.]+", "-", name).lower()] = f"=={version}"
        return pins, str(constraints)
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in importlib.metadata.requires("pargo_dist") or [] if "extra ==" not in r]
    return {re.sub(r"[-_.]+", "-", r.name).lower(): str(r.specifier) for r in reqs}, "pargo_dist's requirements"


def check_versions() -> list[Check]:
    from packaging.specifiers import SpecifierSet

    pins, source = _pins()
    out = []
    for name in PINNED:
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(Check(f"{name}", FAIL, "not installed", f"pip install -c constraints.txt -e . ({source})"))
            continue
        want = pins.get(name, "")
        local = have.split("+")[0]  # 2.13.0+cu128 is the 2.13.0 pin
        if want and local not in SpecifierSet(want, prereleases=True):
            out.append(Check(name, FAIL, f"{have}, tested with {want} ({source})",
                             f"pip install '{name}{want}' (or reinstall with -c constraints.txt)"))
        else:
            out.append(Check(name, OK, have))
    import torch

    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        out.append(Check("cuda / nccl", OK, f"CUDA {torch.version.cuda}, NCCL {nccl}"))
    return out


def check_shm(cfg, path: str = "/dev/shm") -> list[Check]:
    if not os.path.isdir(path):
        return [Check("shm", WARN, f"{path} does not exist: streaming falls back to its own files")]
    total = shutil.disk_usage(path).total
    need = GiB if cfg.data.train.num_workers else GiB // 4
    detail = f"{path} {total / GiB:.1f} GiB ({cfg.data.train.num_workers} loader workers per rank)"
    if total < need:
        return [Check("shm", FAIL, detail, f"give {path} at least {need / GiB:.2g} GiB (docker: --shm-size=16g; "
                      "a SLURM container: its shm option)")]
    return [Check("shm", OK, detail)]


def _splits(cfg) -> list[tuple[str, object]]:
    out = []
    for key, data in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if data is None:
            continue
        if data.streams:
            out += [(f"{key}.streams[{i}]", s) for i, s in enumerate(data.streams)]
        else:
            out.append((key, data))
    return out


def check_s3(key: str, remote: str, split: str | None) -> Check:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    index = "/".join(p for p in (prefix.strip("/"), split or "", "index.json") if p)
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    where = f"s3://{bucket}/{index}" + (f" at {endpoint}" if endpoint else "")
    try:
        # a fresh session: the environment's credentials now, not ones a default session cached
        boto3.session.Session().client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key=index)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "Forbidden"):
            return Check(key, FAIL, f"{where}: credentials rejected ({code})",
                         "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this endpoint, "
                         "and that they may read the bucket")
        if code in ("404", "NoSuchKey", "NotFound"):
            return Check(key, FAIL, f"{where}: no index.json there",
                         f"check the prefix, or convert the data there first (pargo-dist convert ... --out {remote})")
        if code == "NoSuchBucket":
            return Check(key, FAIL, f"{where}: no such bucket", "check the bucket name (and S3_ENDPOINT_URL)")
        return Check(key, FAIL, f"{where}: {code}", "check the endpoint, bucket and credentials")
    except BotoCoreError as err:
        return Check(key, FAIL, f"{where}: {type(err).__name__}",
                     "check S3_ENDPOINT_URL and the network (and that credentials are configured)")
    return Check(key, OK, f"{where} readable")


def check_data(cfg) -> list[Check]:
    out = []
    for key, data in _splits(cfg):
        remote, local, split = data.remote, data.local, data.split
        if remote and remote.startswith("s3://"):
            out.append(check_s3(key, remote, split))
        elif remote:
            out.append(Check(key, WARN, f"{remote}: only s3:// is checked here"))
        else:
            index = Path(local or "") / (split or "") / "index.json"
            if index.is_file():
                out.append(Check(key, OK, f"{index}"))
            elif cfg.data.synthetic.num_samples and key in ("data.train", "data.eval"):
                out.append(Check(key, OK, f"{local}: the synthetic data is generated there on the first run"))
            else:
                out.append(Check(key, FAIL, f"{index} does not exist",
                                 f"convert the data (pargo-dist convert ... --out {local}), or point {key}.local "
                                 "at an MDS directory"))
    return out


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers of a HF directory (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def check_weights(cfg) -> list[Check]:
    out = []
    for key, part in (("model.vision", cfg.model.vision), ("model.llm", cfg.model.llm)):
        if not part.path:
            continue
        path = Path(part.path)
        if not (path / "config.json").is_file():
            out.append(Check(key, FAIL, f"{path}: no config.json there",
                             f"download the model into {path} (the recipe's comment names its hub id)"))
            continue
        found = json.loads((path / "config.json").read_text())
        if key == "model.vision" and "vision_config" in found:  # a full CLIP / SigLIP checkpoint
            found = {**found["vision_config"], "model_type": found.get("model_type")}
        wrong = [f"{k} {v!r} in the recipe, {found.get(k)!r} in config.json" for k, v in part.config.items()
                 if k != "model_type" and k in found and found[k] != v]
        if wrong:
            out.append(Check(key, FAIL, f"{path}: " + "; ".join(wrong[:3]),
                             f"{key}.path is another model than {key}.config describes: fix the path or the config"))
            continue
        index = path / "model.safetensors.index.json"
        if index.is_file():
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in named if not (path / f).is_file()]
            if missing:
                out.append(Check(key, FAIL, f"{path}: {len(missing)} of the {len(named)} weight files its index names "
                                 f"are missing ({missing[0]}, ...)", "the download is incomplete: download the model again"))
                continue
        shapes = _tensor_shapes(path)
        if not shapes:
            out.append(Check(key, FAIL, f"{path}: no *.safetensors weights",
                             "download the weights (safetensors) next to config.json"))
            continue
        problems = []
        if key == "model.llm":
            layers = {m.group(1) for n in shapes if (m := re.search(r"\.layers\.(\d+)\.", n))}
            if len(layers) != found.get("num_hidden_layers"):
                problems.append(f"{len(layers)} layers in the weights, {found.get('num_hidden_layers')} in config.json")
            embed = next((s for n, s in shapes.items() if n.endswith("embed_tokens.weight")), None)
            if embed is not None and embed[-1] != found.get("hidden_size"):
                problems.append(f"embedding width {embed[-1]}, hidden_size {found.get('hidden_size')}")
        if problems:
            out.append(Check(key, FAIL, f"{path}: " + "; ".join(problems),
                             "the weights do not belong to this config.json: download the model again"))
        else:
            out.append(Check(key, OK, f"{path}: {len(shapes)} tensors, config agrees"))
    return out


def check_disk(cfg, shapes) -> list[Check]:
    from pargo_dist.plan import checkpoint_bytes

    where = Path(cfg.run.dir).resolve()
    while not where.exists():
        where = where.parent
    one = checkpoint_bytes(shapes(), cfg.train.stage, cfg.train.precision, bool(cfg.model.lora.r))
    need = one * (cfg.checkpoint.keep_last + 1)
    free = shutil.disk_usage(where).free
    detail = (f"{_size(free)} free at {where}; {cfg.checkpoint.keep_last} + 1 checkpoints of "
              f"{_size(one)} need {_size(need)}")
    if free < need:
        return [Check("disk", FAIL, detail, "free space, lower checkpoint.keep_last, point run.dir at a bigger "
                      "filesystem, or add checkpoint.remote (s3://) and keep fewer locally")]
    return [Check("disk", OK, detail)]


def _size(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


MOUNTS = Path("/proc/mounts")


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest matching mount point of MOUNTS)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    best, kind = "", "unknown"
    try:
        for line in MOUNTS.read_text().splitlines():
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if len(fields) > 2 and (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) \
                    and len(point) >= len(best):
                best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def check_engine(cfg, env=os.environ) -> list[Check]:
    """What starts the ranks on this node, and in a Kubernetes pod what a pod's end would lose."""
    from pargo_dist.launch.torchrun import GRACE_S

    if "SLURM_JOB_ID" in env:
        return [Check("engine", OK, f"SLURM job {env['SLURM_JOB_ID']}: one launcher per node, run.max_restarts "
                      "in-job restarts, then requeue (docs/slurm.md)")]
    pod = "KUBERNETES_SERVICE_HOST" in env
    if "PET_NNODES" in env or "TORCHELASTIC_RUN_ID" in env:
        where = f"{env.get('PET_MASTER_ADDR', env.get('MASTER_ADDR', '?'))}:" \
                f"{env.get('PET_MASTER_PORT', env.get('MASTER_PORT', '?'))}"
        engine = f"torchrun, node {env.get('PET_NODE_RANK', env.get('GROUP_RANK', '?'))} of " \
                 f"{env.get('PET_NNODES', '?')}, rendezvous at {where}: its agent restarts the ranks " \
                 "(`pargo-dist train --torchrun` keeps our exit codes)"
    elif pod:
        engine = "a Kubernetes pod without torchrun's PET_* variables (pargo-dist submit --k8s writes manifests " \
                 "that set them)"
    else:
        return [Check("engine", OK, "no scheduler: `pargo-dist train --nproc N` starts the ranks")]
    checks = [Check("engine", OK, engine)]
    if pod:
        fs = _filesystem_type(Path(cfg.run.dir))
        if not cfg.checkpoint.remote and fs == "overlay":
            checks.append(Check("engine", FAIL, f"run.dir {cfg.run.dir} is on the container's own filesystem "
                                "(overlay) and checkpoint.remote is unset: every checkpoint is lost with the pod",
                                fix="set checkpoint.remote=s3://bucket/prefix, or mount a ReadWriteMany volume "
                                "and put run.dir on it (pargo-dist submit --k8s ... --pvc NAME)"))
        if "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env:
            checks.append(Check("engine", WARN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT is unset: plain torchrun kills the "
                                f"ranks 30 s after SIGTERM (`train --torchrun` gives {GRACE_S} s); set it to the "
                                "pod's terminationGracePeriodSeconds less 30"))
    return checks


def check_slurm(env=os.environ) -> list[Check]:
    if "KUBERNETES_SERVICE_HOST" in env:
        return [Check("slurm", OK, "not needed in a Kubernetes pod")]
    missing = [c for c in ("sbatch", "squeue", "scontrol") if shutil.which(c) is None]
    if missing:
        return [Check("slurm", WARN, f"{', '.join(missing)} not on PATH: `pargo-dist submit` needs them "
                      "(train --nproc runs without)")]
    return [Check("slurm", OK, "sbatch, squeue, scontrol found")]


# ----------------------------------------------------------------------------- the command


def diagnose(cfg, gpus: int | None = None) -> list[Check]:
    from pargo_dist.plan import shapes_of

    shapes = functools.cache(lambda: shapes_of(cfg))  # the recipe's model traced once, if a check needs it
    return [*check_gpus(cfg, gpus, shapes), *check_versions(), *check_shm(cfg), *check_data(cfg),
            *check_weights(cfg), *check_disk(cfg, shapes), *check_engine(cfg), *check_slurm()]


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{c.name:<{width}}  {c.status:<4}  {c.detail}" for c in checks]
    fixes = [f"  {c.name}: {c.fix}" for c in checks if c.status == FAIL and c.fix]
    if fixes:
        lines += ["", "to fix:"] + fixes
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML (default: the embedded tiny-cpu recipe)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    parser.add_argument("--gpus", type=int, help="GPUs the job will use in all (default: this node's)")


def run(args: argparse.Namespace) -> int:
    from pargo_dist.config import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except UserError as err:
        print(f"recipe  {FAIL}  {err}")
        return 1
    checks = diagnose(cfg, args.gpus)
    print(format_table(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
