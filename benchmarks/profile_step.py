"""Where a training step's time goes: torch.profiler over a few steps of pargo_dist's own loop.

The same model, batch and set-up as benchmarks/train_step.py's pargo_dist row (its SIZES and
fixed batch), one process, DeepSpeed (--zero) or megatron TP=1. Each part of the model is
labelled while it runs (record_function from module hooks): the vision tower, the projector and
the LLM, forward and backward, and the optimizer step. One table per run:

  part            ms per step on the host (the range's wall time) and, on a GPU, the kernel time
                  launched inside it; "step" is the whole Trainer.train_step
  communication   collectives (all-reduce, all-gather, reduce-scatter, broadcast) by name
  GPU busy        kernel time / step wall time: what is left is host overhead and waiting
  top ops         the 12 ops (GPU: kernels) with the most self time
  host syncs      (CUDA) how often a step makes the host wait for the GPU (`.item()`, a
                  device-to-host copy, `nonzero`, ...): each such sync drains the GPU's queue,
                  so the next kernels start only after the host has caught up: the "waiting"
                  in GPU busy. Counted with torch.cuda.set_sync_debug_mode("warn"), which
                  raises a warning per synchronizing call, over --steps further steps after
                  the profiled ones (the same step; not under the profiler, whose figures the
                  per-warning stack walk would skew), and printed per step with the 5 most
                  frequent call sites: the innermost frame in pargo_dist/, transformers/,
                  deepspeed/ or megatron/ (syncs inside autograd's backward are reported where
                  the backward was called). On CPU: n/a.

    python benchmarks/profile_step.py                                   # CPU: tiny, DeepSpeed ZeRO-2
    python benchmarks/profile_step.py --size small --backend megatron
    python benchmarks/profile_step.py --size 1b --zero 3 --batch 16     # CUDA, bf16
    python benchmarks/profile_step.py --size 1b --zero 3 --force-zero3  # stage 3 on one GPU (see below)
    python benchmarks/profile_step.py --trace /tmp/step.json            # also a Chrome trace

The header says the ZeRO stage DeepSpeed's engine really runs: on one rank DeepSpeedBackend runs
ZeRO-3 as ZeRO-2 (nothing to partition), unless --force-zero3 (as in benchmarks/train_step.py).

Figures: quote them with the command that printed them; GPU figures only from a GPU run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # (its sizes, recipe and fixed batch)

COLLECTIVE = re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d::|gloo", re.IGNORECASE)
SYNC_WARNING = re.compile(r"synchroniz", re.IGNORECASE)  # "called a synchronizing CUDA operation"
SITE_PACKAGES = ("pargo_dist", "transformers", "deepspeed", "megatron")  # where a sync's call site is looked for


def call_site() -> str:
    """The innermost frame of the current stack in one of SITE_PACKAGES, as package/path:line
    (function); "elsewhere" if none. Called while a warning is shown, so the stack is the
    synchronizing call's (a frame walk, no source lines read: cheap enough per warning)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        for package in SITE_PACKAGES:
            marker = f"/{package}/"
            if marker in path:
                return f"{package}/{path.rsplit(marker, 1)[1]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "elsewhere (no pargo_dist / transformers / deepspeed / megatron frame)"


def count_syncs(step, steps: int, debug_mode=None) -> tuple[int, Counter]:
    """Synchronizing calls in `steps` calls of step(), and their call sites. `debug_mode`: sets
    the sync debug mode (default torch.cuda.set_sync_debug_mode; "warn" on, 0 off)."""
    set_mode = debug_mode or torch.cuda.set_sync_debug_mode
    sites: Counter = Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING.search(str(message)):
            sites[call_site()] += 1
        else:  # anything else is shown as usual
            warnings._showwarning_orig(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=r"(?i).*synchroniz")  # every one, not once per site
        warnings.showwarning = show
        set_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            set_mode(0)
    return sum(sites.values()), sites


def backward_units(name: str, module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose backward can be hooked for a part. Backward hooks need tensor outputs and
    positional tensor inputs, which neither an HF causal LM (a ModelOutput) nor megatron's
    GPTModel (its input as a keyword) has, so for the LLM: each decoder layer, and the HF output
    layer (the embedding's and the final norm's backward are left out)."""
    if name != "language_model":
        return [module]
    if not hasattr(module, "get_output_embeddings"):  # megatron's layers: their hooks do not bracket
        return []  # their backward (measured ~0); the step's remainder row covers it
    layers = [m for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers")]
    # (megatron's output layer is left out too: its vocab-parallel cross entropy works in place on
    # the logits, which a backward hook's view forbids)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return ([head] if head is not None else []) + [layer for group in layers for layer in group]


def label_parts(parts: dict[str, torch.nn.Module]) -> list:
    """record_function ranges around each part's forward and backward, opened and closed by hooks."""
    handles = []
    for name, module in parts.items():
        hooks = [("forward", module.register_forward_pre_hook, module.register_forward_hook)]
        hooks += [("backward", unit.register_full_backward_pre_hook, unit.register_full_backward_hook)
                  for unit in backward_units(name, module)]
        for phase, enter, leave in hooks:
            label = f"{phase}: {name}"
            ranges: list = []

            def open_range(*_, label=label, ranges=ranges):
                ranges.append(torch.profiler.record_function(label).__enter__())

            def close_range(*_, ranges=ranges):
                if ranges:
                    ranges.pop().__exit__(None, None, None)

            handles += [enter(open_range), leave(close_range)]
    return handles


def labelled(obj, method: str, label: str) -> None:
    """Wrap obj.method in a record_function range (the optimizer step)."""
    inner = getattr(obj, method)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return inner(*args, **kwargs)

    setattr(obj, method, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(train_step.SIZES), default="tiny")
    ap.add_argument("--backend", choices=["deepspeed", "megatron"], default="deepspeed")
    ap.add_argument("--zero", type=int, choices=[1, 2, 3], default=2)
    ap.add_argument("--force-zero3", action="store_true",
                    help="run --zero 3 as stage 3 on one rank (DeepSpeedBackend runs it as ZeRO-2 there)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--recipe", type=Path, default=train_step.RECIPE)
    ap.add_argument("--trace", type=Path, help="also write a Chrome trace here")
    args = ap.parse_args()
    # backward hooks on layers whose inputs need no gradient fire on their outputs' gradients: what is wanted
    warnings.filterwarnings("ignore", message=r".*(Full backward hook is firing|For backward hooks to be called).*")

    from pargo_dist.build import build_model, init_freeze_and_adapt
    from pargo_dist.checkpoint.manager import CheckpointManager
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.runtime.rank_env import single_process_env
    from pargo_dist.observe.metrics import MetricsLogger
    from pargo_dist.runtime.signals import StopSignal
    from pargo_dist.train.trainer import Trainer
    from pargo_dist.train.run import make_backend

    single_process_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = train_step.load_size(args.size, args, backend=args.backend)
    backend = make_backend(cfg)
    backend.init_distributed()
    tokenizer = synthetic_tokenizer()
    model = build_model(cfg, tokenizer)
    init_freeze_and_adapt(model, cfg)
    n = train_step.batch_size(args.size, args)
    batch = train_step.fixed_batch(model, tokenizer, n, seed=cfg.run.seed,
                                   text_tokens=train_step.TEXT_TOKENS_OF.get(args.size, train_step.TEXT_TOKENS))
    backend.setup(model)
    backend.train(True)
    module = backend.module
    parts = module.parts() if hasattr(module, "parts") else \
        {p: getattr(module, p) for p in ("vision_tower", "projector", "language_model")}
    label_parts(parts)
    holder, method = (backend.engine, "step") if getattr(backend, "engine", None) is not None else \
        (backend.optimizer, "step")
    labelled(holder, method, "optimizer step")
    run_dir = tempfile.mkdtemp(prefix="profile-run-")
    trainer = Trainer(cfg, backend, None, CheckpointManager(run_dir), MetricsLogger(run_dir, enabled_tensorboard=False),
                      StopSignal(), model=model)
    batch = batch.to(backend.device)

    def step():
        with torch.profiler.record_function("step"):
            trainer.train_step([batch])
        trainer.state.step += 1

    for _ in range(args.warmup):
        step()
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    train_step.sync()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        train_step.sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    syncs = count_syncs(step, args.steps) if cuda else None
    train_step.sync()
    engine = getattr(backend, "engine", None)
    layout = train_step.ran_as(engine) if engine is not None else "TP=1"
    report(prof, wall_ms, args, cfg, batch, cuda, layout)
    report_syncs(syncs, args.steps)


def report_syncs(syncs: tuple[int, Counter] | None, steps: int) -> None:
    if syncs is None:
        print("host syncs: n/a (CUDA only)")
        return
    total, sites = syncs
    print(f"host syncs: {total / steps:.1f} per step ({total} in {steps} steps after the profiled ones; "
          f"torch.cuda.set_sync_debug_mode)")
    for site, n in sites.most_common(5):
        print(f"  {n / steps:>9.1f}  {site}")


def report(prof, wall_ms: float, args, cfg, batch, cuda: bool, layout: str) -> None:
    steps = args.steps
    events = prof.key_averages()
    device_ms = (lambda e: getattr(e, "device_time_total", 0.0) / 1e3) if cuda else (lambda e: 0.0)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS=" \
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    asked = f" (asked ZeRO-{args.zero})" if cfg.backend.name == "deepspeed" and layout != f"ZeRO-{args.zero}" else ""
    print(f"[{args.size}] {device} | {cfg.backend.name} {layout}{asked} | {cfg.train.precision} | batch "
          f"{len(batch)} x seq {batch.input_ids.shape[1]} | {steps} profiled steps | step wall {wall_ms:.1f} ms")
    order = ["step"] + [f"{phase}: {p}" for phase in ("forward", "backward")
                        for p in ("vision_tower", "projector", "language_model")] + ["optimizer step"]
    by_name = {e.key: e for e in events}
    print(f"{'part':<28}{'host ms/step':>14}{'share':>8}{'GPU ms/step':>13}")
    labelled_ms = 0.0
    for name in order:
        e = by_name.get(name)
        if e is None:
            print(f"{name:<28}{'n/a':>14}")
            continue
        host, gpu = e.cpu_time_total / 1e3 / steps, device_ms(e) / steps
        labelled_ms += host if name != "step" else 0.0
        print(f"{name:<28}{host:>14.1f}{host / wall_ms:>8.0%}{gpu:>13.1f}" if cuda else
              f"{name:<28}{host:>14.1f}{host / wall_ms:>8.0%}{'-':>13}")
    if "step" in by_name:
        rest = by_name["step"].cpu_time_total / 1e3 / steps - labelled_ms
        print(f"{'rest of the step (unlabelled)':<28}{rest:>14.1f}{rest / wall_ms:>8.0%}")
    comm = [e for e in events if COLLECTIVE.search(e.key)]
    comm_host = sum(e.self_cpu_time_total for e in comm) / 1e3 / steps
    comm_gpu = sum(getattr(e, "self_device_time_total", 0.0) for e in comm) / 1e3 / steps if cuda else 0.0
    print(f"{'communication (collectives)':<28}{comm_host:>14.1f}{comm_host / wall_ms:>8.0%}"
          f"{(f'{comm_gpu:>13.1f}' if cuda else f'{chr(45):>13}')}")
    if cuda:
        kernels = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3 / steps
        print(f"GPU busy: {kernels:.1f} ms of kernels per {wall_ms:.1f} ms step = {kernels / wall_ms:.0%}")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"top ops by {'GPU' if cuda else 'host'} self time (ms per step):")
    for e in sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]:
        print(f"  {getattr(e, key, 0.0) / 1e3 / steps:>9.2f}  {e.count // steps:>5}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
