"""What builds the real Trainer and runs it in a rank: `train(cfg)` is `pargo-dist train` on one
rank (the launcher starts one per GPU).

`build_trainer` joins the process group, builds the model for its stage, wraps it in the
recipe's backend (the only place that names a concrete backend, lazily: each imports its own
heavy library), opens the loaders and logs, and finds the checkpoint to resume from. `train`
runs it; a rank that raises leaves at once with its traceback (runtime.exits.leave_now), never
waiting in a collective its peers will not join.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from pargo_dist.backends.base import Backend
from pargo_dist.backends.compile import compile_blocks
from pargo_dist.checkpoint.manager import CheckpointManager
from pargo_dist.compat import return_freed_host_memory
from pargo_dist.config import Config, to_yaml
from pargo_dist.data.crops import CropPolicy
from pargo_dist.observe.metrics import MetricsLogger
from pargo_dist.runtime.exits import leave_now, record_failure
from pargo_dist.runtime.hang_detector import SETUP_ALLOWANCE_S, HangWatchdog
from pargo_dist.runtime.process_group import set_collective_timeout
from pargo_dist.runtime.signals import StopSignal
from pargo_dist.runtime.store_sync import StoreSync
from pargo_dist.train.trainer import Trainer


def make_backend(cfg: Config) -> Backend:
    """The recipe's backend (imported lazily: each pulls in its own heavy library)."""
    if cfg.backend.name == "megatron":
        from pargo_dist.backends.megatron.backend import MegatronBackend

        return MegatronBackend(cfg)
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend

    return DeepSpeedBackend(cfg)


def set_up_backend(cfg: Config, backend: Backend, model: torch.nn.Module) -> int:
    """From the built model (frozen for its stage, adapters in) to the backend ready to train:
    activation checkpointing, train.compile, the backend's set-up. Returns the number of blocks
    compiled. One function, so that the benchmarks time what a run trains."""
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    compiled = 0
    if cfg.train.compile:  # before set-up: a frozen tower may leave the module tree there (ZeRO-3)
        compiled = compile_blocks([model], cfg.train.compile_backend)
    backend.setup(model)
    return_freed_host_memory()  # DeepSpeed copied the weights into its flat buffers
    if cfg.train.compile:  # and the blocks a backend built itself (megatron's TransformerLayers)
        compiled += compile_blocks([backend.module], cfg.train.compile_backend)
    return compiled


def build_trainer(cfg: Config, stop: StopSignal | None = None) -> Trainer:
    """Join the process group, build the model for its stage, wrap it in the recipe's backend,
    open the loaders and the logs; the returned Trainer resumes (if there is a checkpoint) when run."""
    from pargo_dist import build
    from pargo_dist.data.dataset import stream_names

    start = time.monotonic()
    stop = stop or StopSignal()  # first: a signal during start-up is honoured at the first step
    # armed before the rendezvous: a node that never shows up is a hang too
    watchdog = HangWatchdog(cfg.train.hang_timeout_s, int(os.environ.get("RANK", 0)))
    watchdog.beat("joining the process group (rendezvous)", allow=SETUP_ALLOWANCE_S)
    backend = make_backend(cfg)
    rank, world = backend.init_distributed()
    watchdog.beat("setting up (model, data, resume)", allow=SETUP_ALLOWANCE_S)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sync = StoreSync.default()
    checkpoints = CheckpointManager(run_dir, keep_last=cfg.checkpoint.keep_last, rank=rank, world_size=world,
                                    sync=sync, remote=cfg.checkpoint.remote, heartbeat=watchdog.beat)
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer, llm_weights=not backend.reads_pretrained_llm,
                              llm_dtype=torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32)
    if backend.reads_pretrained_llm:
        backend.load_pretrained_llm(model)
    loaded = build.init_freeze_and_adapt(model, cfg, gather=backend.param_gather)
    return_freed_host_memory()
    # counted before set-up: a backend may take parts out of the module it wraps (ZeRO-3: a frozen tower)
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trained = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    if rank == 0:
        print(f"model built and loaded in {time.monotonic() - start:.1f} s; setting up {backend.name}", flush=True)
    compiled = set_up_backend(cfg, backend, model)
    if compiled and rank == 0:
        print(f"train.compile: {compiled} transformer blocks compiled ({cfg.train.compile_backend}); the first "
              "steps include compiling", flush=True)
    loader = build.loader(cfg, cfg.data.train, model, tokenizer, cfg.train.micro_batch,
                          replication=backend.replication)
    crops = CropPolicy.from_config(cfg.data.image)
    if crops.mode != "single" and rank == 0:
        print(f"images: {crops.describe()}", flush=True)
    data = cfg.data.train
    step_samples = cfg.train.micro_batch * cfg.train.grad_accum * world // backend.replication
    if data.group_by_length and data.group_size % step_samples and rank == 0:
        print(f"data.train.group_size {data.group_size} is not a multiple of the {step_samples} samples of a step: "
              "steps straddle length groups and pad more; make it one (e.g. "
              f"{-(-data.group_size // step_samples) * step_samples})", flush=True)
    eval_loader = None
    if cfg.data.eval is not None:
        held_out = []  # one loader, built on first use and reused (streaming allows one per local dir)

        def eval_loader():
            if not held_out:
                held_out.append(build.loader(cfg, replace(cfg.data.eval, shuffle=False), model, tokenizer,
                                             cfg.train.micro_batch, replication=backend.replication))
            return held_out[0]

    # set up on every rank (at its node's pace): from here, training's own collective timeout; then
    # the checkpoint to resume from (downloaded for nodes that lack it, waited for on the store)
    sync.barrier("set up")
    set_collective_timeout(cfg.train.collective_timeout_s)
    resume_from = checkpoints.resolve(cfg.checkpoint.resume, loads_with=(cfg.backend.name, backend.layout()))
    if rank == 0 and loaded and resume_from is None:
        print(f"initialised {', '.join(cfg.model.init_parts)} from {cfg.model.init_from} ({len(loaded)} tensors)",
              flush=True)
    metrics = MetricsLogger(run_dir / "tb", rank=rank, total_steps=cfg.train.steps, every=cfg.logging.every,
                            enabled_tensorboard=cfg.logging.tensorboard)
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        layout = ", ".join(f"{k} {v}" for k, v in backend.layout().items())
        print(f"set up in {time.monotonic() - start:.1f} s: {count / 1e6:,.1f}M parameters ({trained / 1e6:,.1f}M "
              f"trained), {backend.name} ({layout}), {world} rank(s)", flush=True)
    return Trainer(cfg, backend, loader, checkpoints, metrics, stop, model=model, tokenizer=tokenizer,
                   eval_loader=eval_loader, streams=stream_names(cfg.data.train), resume_from=resume_from,
                   watchdog=watchdog)


def train(cfg: Config) -> int:
    """Run (or resume) the recipe's training; returns 0, or REQUEUE_EXIT after a signal.

    With several ranks an exception ends this process at once (see `runtime.exits.leave_now`); with one it
    propagates (the CLI prints a UserError as one line, anything else with its traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = None
    try:
        trainer = build_trainer(cfg)
        code = trainer.run()
        trainer.watchdog.beat("leaving the process group")
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return code
    except BaseException as err:
        record_failure(trainer.state.step + 1 if trainer is not None else 0, err)
        if dist.is_initialized() and dist.get_world_size() > 1:
            leave_now(err)
        raise
    finally:
        if trainer is not None:
            trainer.watchdog.close()
