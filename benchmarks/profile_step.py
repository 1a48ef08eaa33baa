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

    python benchmarks/profile_step.py                                   # CPU: tiny, DeepSpeed ZeRO-2
    python benchmarks/profile_step.py --size small --backend megatron
    python benchmarks/profile_step.py --size 1b --zero 3 --batch 16     # CUDA, bf16
    python benchmarks/profile_step.py --trace /tmp/step.json            # also a Chrome trace

Figures: quote them with the command that printed them; GPU figures only from a GPU run.
"""

from __future__ import annotations

import argparse
import os
import warnings
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (its sizes, recipe and fixed batch)

COLLECTIVE = re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d::|gloo", re.IGNORECASE)


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
    from pargo_dist.checkpoint import CheckpointManager
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.launch import single_process_env
    from pargo_dist.metrics import MetricsLogger
    from pargo_dist.signals import StopSignal
    from pargo_dist.train import Trainer, make_backend

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
    report(prof, wall_ms, args, cfg, batch, cuda)


def report(prof, wall_ms: float, args, cfg, batch, cuda: bool) -> None:
    steps = args.steps
    events = prof.key_averages()
    device_ms = (lambda e: getattr(e, "device_time_total", 0.0) / 1e3) if cuda else (lambda e: 0.0)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS=" \
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(f"[{args.size}] {device} | {cfg.backend.name}"
          f"{f' ZeRO-{args.zero}' if cfg.backend.name == 'deepspeed' else ' TP=1'} | {cfg.train.precision} | batch "
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
