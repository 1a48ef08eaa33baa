"""Start-up of a pretrained backbone: peak host memory per rank and the time to the first step.

What a new user does at scale, shrunk to a CPU: a random Llama of a chosen size is saved by
transformers as bf16 safetensors (as the hub ships checkpoints), named as `model.llm.path` of a
small recipe, and trained for one step by `pargo-dist train` on 1 and 2 ranks with each
backend: megatron TP=1 / TP=2, DeepSpeed ZeRO-3 in fp32 and bf16, the LLM built whole on each
rank (`backend.zero_init=false`) or partitioned as it is read (`true`). Per case:

  load GiB   the largest rank's peak resident memory (VmHWM, polled from /proc) until the run
             says "model built and loaded": what building the model and reading the checkpoint
             cost, before the backend allocates its own state (on a GPU node that goes to the
             GPU; on these CPU ranks it is host memory too)
  set-up GiB the same until "set up in": the backend's set-up included (DeepSpeed's flat
             partitions and fp32 master copies, megatron's grad buffers)
  x model    the load peak minus the baseline, divided by the whole model in fp32 (4 bytes x
             params): how many copies of the whole model one rank held while loading
  baseline   the same case with a 2-layer toy LLM instead of the checkpoint: imports, tower,
             projector, buffers (what a rank holds without the model)
  first step seconds from the launch to the first progress line (model build and load included)

Then (--export) a 1-step ZeRO-3 bf16 run of the same checkpoint is trained to its end and
exported with `pargo-dist export --dtype fp32|bf16 --max-shard-size 200MB` (shards smaller than
the model, as 5GB shards are for a 70B model): the export
process's peak RSS (ru_maxrss), its peak anonymous memory (RssAnon, polled: what it allocated,
without the pages of memory-mapped checkpoint files, which the kernel can drop at any time),
each less the toy LLM's export and divided by the whole fp32 model, and its time.

    .venv/bin/python benchmarks/startup.py                        # ~300M parameters, every case
    .venv/bin/python benchmarks/startup.py --hidden 512 --layers 8 --cases megatron-tp2 zero3-bf16-2

A case that fails prints its last error line in the table instead of figures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30

RECIPE = """
run: {{dir: {run}, seed: 0}}
model:
  vision:
    config: {{model_type: clip_vision_model, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
             num_attention_heads: 4, image_size: 32, patch_size: 8}}
    feature_layer: -1
  llm: {llm}
  projector: {{num_partial: 8, num_global: 2, depth: 1, width: 64, heads: 4, ffn: 128}}
  tokenizer: synthetic
data:
  synthetic: {{num_samples: 64, image_size: 48}}
  train: {{local: {data}, max_len: 96, num_canonical_nodes: 1}}
train: {{stage: finetune, steps: 2, micro_batch: 1, eval_every: 0, sample_every: 0, hang_timeout_s: 0}}
checkpoint: {{every: 0}}
logging: {{every: 1, tensorboard: false}}
"""
TOY_LLM = ("{config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
           "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256}}")

# name -> (ranks, overrides)
CASES = {
    "megatron-tp1": (1, ["backend.name=megatron", "backend.tensor_parallel=1"]),
    "megatron-tp2": (2, ["backend.name=megatron", "backend.tensor_parallel=2"]),
    "zero3-fp32-1": (1, ["backend.zero_stage=3", "train.precision=fp32", "backend.zero_init=false"]),
    "zero3-fp32-2": (2, ["backend.zero_stage=3", "train.precision=fp32", "backend.zero_init=false"]),
    "zero3-bf16-1": (1, ["backend.zero_stage=3", "train.precision=bf16", "backend.zero_init=false"]),
    "zero3-bf16-2": (2, ["backend.zero_stage=3", "train.precision=bf16", "backend.zero_init=false"]),
    "zero3-fp32-2-init": (2, ["backend.zero_stage=3", "train.precision=fp32", "backend.zero_init=true"]),
    "zero3-bf16-2-init": (2, ["backend.zero_stage=3", "train.precision=bf16", "backend.zero_init=true"]),
}


def save_llama(out: Path, hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """A random Llama saved by transformers in bf16 safetensors; returns its parameter count."""
    import torch

    import pargo_dist  # noqa: F401  (its torchvision shim, before transformers imports torchvision)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(hidden // 64, 2)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), vocab_size=vocab,
                         max_position_embeddings=512, torch_dtype="bfloat16")
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="200MB")
    del model
    return params


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def status_bytes(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status (VmHWM:, RssAnon:) in bytes; 0 once the process is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_hwm(pid: int) -> int:
    return status_bytes(pid, "VmHWM:")


def run_case(recipe: Path, ranks: int, overrides: list[str], timeout: float, env: dict | None = None) -> dict:
    """Launch; poll every rank's peak RSS until the set-up line, then time the first step; then
    each rank's peak RSS over the first two steps (`step`)."""
    cmd = [sys.executable, "-m", "pargo_dist.cli", "train", str(recipe), *overrides, "--nproc", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # line by line
    reader.start()
    peaks: dict[int, int] = {}
    step_peaks: dict[int, int] = {}
    load = None
    first = None
    set_up = False
    def rank_pids() -> list[int]:
        return children(proc.pid) if ranks > 1 else [proc.pid]

    def poll(into: dict[int, int]) -> None:
        for pid in rank_pids():
            into[pid] = max(into.get(pid, 0), vm_hwm(pid))

    while time.monotonic() - start < timeout:
        seen = list(lines)
        if not set_up:
            poll(peaks)  # after reading the lines: a peak reached before a line was printed is counted
        else:
            poll(step_peaks)
        if load is None and any(line.startswith("model built and loaded") for line in seen):
            load = max(peaks.values(), default=0)
        if not set_up and any(line.startswith("set up in") for line in seen):
            set_up = True
            for pid in rank_pids():  # the peak from here on is the first step's (proc(5): clear_refs)
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                except OSError:
                    pass
        if first is None and any(line.startswith("step 1/") for line in seen):
            first = time.monotonic() - start
        if any(line.startswith("step 2/") for line in seen):
            poll(step_peaks)
            break
        if proc.poll() is not None:
            reader.join(timeout=5)
            break
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if first is None:
        errors = [line for line in lines if "Error" in line or "error" in line] or lines[-1:] or ["timed out"]
        return {"error": errors[-1].strip()[:90]}
    return {"load": load or 0, "peak": max(peaks.values(), default=0), "first": first,
            "step": max(step_peaks.values(), default=0)}


WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)")


def run_export(recipe: Path, run: Path, out: Path, dtype: str, timeout: float, pretrained: bool,
               export_from: Path | None = None) -> dict:
    """Train the recipe to its end (a checkpoint), then time `pargo-dist export` of it and take
    its peak RSS (ru_maxrss, from a fresh wrapper process whose only child is the export)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    train = [sys.executable, "-m", "pargo_dist.cli", "train", str(recipe), "backend.zero_stage=3",
             "train.precision=bf16", "train.steps=1", "--nproc", "2"]
    # the toy baseline's LLM is a config: nothing to partition as it is read
    train.insert(-2, f"backend.zero_init={str(pretrained).lower()}")
    done = subprocess.run(train, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-1][:90]}
    start = time.monotonic()
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "pargo_dist.cli", "export", str(run), "--out", str(out)]
    if export_from is None:  # (an older checkout has neither option: it writes fp32 in 5GB files)
        cmd += ["--dtype", dtype, "--max-shard-size", "200MB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=export_from)  # python -m imports pargo_dist from the working directory
    anon = 0
    while proc.poll() is None and time.monotonic() - start < timeout:
        for pid in children(proc.pid):
            anon = max(anon, status_bytes(pid, "RssAnon:"))
        time.sleep(0.02)
    output = proc.communicate()[0]
    if proc.returncode:
        return {"error": output.strip().splitlines()[-1][:90]}
    rss = next(int(line.split()[1]) for line in output.splitlines() if line.startswith("MAXRSS"))
    return {"peak": rss * 1024, "anon": anon, "seconds": time.monotonic() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per case")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every case (e.g. train.micro_batch=2)")
    ap.add_argument("--export", nargs="*", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                    help="also export a 1-step ZeRO-3 run in these dtypes and take the export's peak RSS "
                    "(none: skip)")
    ap.add_argument("--export-from", type=Path, metavar="CHECKOUT",
                    help="run the export with the pargo_dist of another checkout (a before measurement; the runs "
                    "are trained by this one)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pargo-startup-") as tmp:
        tmp = Path(tmp)
        params = save_llama(tmp / "llama", args.hidden, args.layers, args.intermediate, args.vocab)
        fp32 = 4 * params
        print(f"random Llama: {params / 1e6:.0f}M parameters, hidden {args.hidden}, {args.layers} layers, saved as "
              f"bf16 safetensors ({sum(f.stat().st_size for f in (tmp / 'llama').glob('*.safetensors')) / GiB:.2f} "
              f"GiB); whole model in fp32 {fp32 / GiB:.2f} GiB", flush=True)
        rows = []
        for name in args.cases:
            ranks, overrides = CASES[name]
            results = {}
            for kind, llm in (("model", f"{{path: {tmp / 'llama'}}}"), ("baseline", TOY_LLM)):
                recipe = tmp / f"{name}-{kind}.yaml"
                recipe.write_text(RECIPE.format(run=tmp / f"run-{name}-{kind}", llm=llm, data=tmp / "data"))
                # the baseline's toy LLM is a config: nothing to partition as it is read
                extra = [o for o in overrides if kind == "model" or not o.startswith("backend.zero_init")]
                results[kind] = run_case(recipe, ranks, [*extra, *args.set], args.timeout)
            rows.append((name, ranks, results))
            model, base = results["model"], results["baseline"]
            if "error" in model:
                print(f"{name:<20} {ranks} rank(s): {model['error']}", flush=True)
            else:
                print(f"{name:<20} {ranks} rank(s): load peak {model['load'] / GiB:.2f} GiB, set-up peak "
                      f"{model['peak'] / GiB:.2f} GiB, first step's peak {model['step'] / GiB:.2f} GiB "
                      f"(baseline {base.get('step', 0) / GiB:.2f}), first step {model['first']:.1f} s", flush=True)

        exports = []
        for dtype in args.export:
            results = {}
            for kind, llm in (("model", f"{{path: {tmp / 'llama'}}}"), ("baseline", TOY_LLM)):
                recipe = tmp / f"export-{kind}.yaml"
                run = tmp / f"run-export-{kind}-{dtype}"
                recipe.write_text(RECIPE.format(run=run, llm=llm, data=tmp / "data"))
                results[kind] = run_export(recipe, run, tmp / f"out-{kind}-{dtype}", dtype, args.timeout,
                                           pretrained=kind == "model", export_from=args.export_from)
            exports.append((dtype, results))
            print(f"export {dtype}: {results['model']}", flush=True)

    print("\n| case | ranks | load GiB (largest rank) | x whole fp32 model | set-up GiB | baseline GiB | "
          "first step s | step peak GiB | baseline's step peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ranks, results in rows:
        model, base = results["model"], results["baseline"]
        if "error" in model:
            print(f"| {name} | {ranks} | fails: {model['error']} | | | | | | |")
            continue
        base_peak = base.get("load", 0)
        print(f"| {name} | {ranks} | {model['load'] / GiB:.2f} | {(model['load'] - base_peak) / fp32:.2f} | "
              f"{model['peak'] / GiB:.2f} | {base_peak / GiB:.2f} | {model['first']:.1f} | "
              f"{model['step'] / GiB:.2f} | {base.get('step', 0) / GiB:.2f} |")

    if exports:
        print("\n| export (1-step ZeRO-3 run, 2 ranks) | peak GiB | x whole fp32 model | peak anonymous GiB | "
              "x whole fp32 model | baseline GiB (anonymous) | seconds |")
        print("|---|---|---|---|---|---|---|")
        for dtype, results in exports:
            model, base = results["model"], results["baseline"]
            if "error" in model or "error" in base:
                print(f"| --dtype {dtype} | fails: {model.get('error') or base.get('error')} | | | | | |")
                continue
            print(f"| --dtype {dtype} | {model['peak'] / GiB:.2f} | {(model['peak'] - base['peak']) / fp32:.2f} | "
                  f"{model['anon'] / GiB:.2f} | {(model['anon'] - base['anon']) / fp32:.2f} | "
                  f"{base['peak'] / GiB:.2f} ({base['anon'] / GiB:.2f}) | {model['seconds']:.1f} |")


if __name__ == "__main__":
    main()
