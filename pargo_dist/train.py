"""The training loop: one loop over a backend, for every stage, rank count and ZeRO stage.

Per optimizer step it takes `grad_accum` micro-batches from the streaming loader, counts the
answer tokens of the whole global batch (all ranks, all micro-batches) and normalises every
micro-batch's summed token loss by that count. The gradient is then exactly that of the
global batch's mean token loss, however the batch is split over ranks and micro-batches:
2 ranks x 4 samples and 1 rank x 8 samples follow the same loss curve (tests compare them).

Resume is exact: a checkpoint holds model and optimizer shards (backend), the LR schedule,
the step, the loader state (global samples consumed: rank-count independent) and every
rank's RNG state; `train` picks the newest *complete* checkpoint in run.dir by itself.
SIGTERM / SIGUSR1 (SLURM's warnings before a time limit or preemption) finish the current
step on all ranks, save, and exit with REQUEUE_EXIT so a launcher knows to requeue.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from pargo_dist import build
from pargo_dist.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from pargo_dist.config import Config, to_yaml
from pargo_dist.data.dataset import stream_names
from pargo_dist.launch import HELD, release_signals
from pargo_dist.metrics import MetricsLogger, StepTimer, model_flops_per_sample, mfu, peak_flops_per_device, \
    peak_memory_gib
from pargo_dist.models.mllm import IGNORE_INDEX
from pargo_dist.slurm import REQUEUE_EXIT
from pargo_dist.watchdog import SETUP_ALLOWANCE_S, HangWatchdog


def quiet_libraries() -> None:
    """Keep the console to our progress lines: DeepSpeed calls torch.distributed APIs that warn
    on every step, and logs INFO lines per rank."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..*is deprecated", category=FutureWarning)
    # megatron-core: optional fused kernels we do not use on CPU; streaming: its `replication`
    # resume note (our loader counts replicated samples once, see ParGoLoader)
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex|transformer_engine).*")
    warnings.filterwarnings("ignore", message=r"The `replication` arg has been set.*")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop agrees across ranks before acting on it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in HELD:
            signal.signal(sig, self._handle)
        # the launcher started this rank with both held (pargo_dist/launch.py): one that came
        # during start-up is delivered now, to the handler above
        release_signals()

    def _handle(self, signum, _frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1 if self.signal else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def make_backend(cfg: Config):
    """The recipe's backend (imported lazily: each pulls in its own heavy library)."""
    if cfg.backend.name == "megatron":
        from pargo_dist.backends.megatron import MegatronBackend

        return MegatronBackend(cfg)
    from pargo_dist.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(cfg)


def prepare_synthetic(cfg: Config, rank: int) -> None:
    """Generate the synthetic dataset into the recipe's local dirs once (rank 0), if absent."""
    syn = cfg.data.synthetic
    if not syn.num_samples:
        return
    train_dir = Path(cfg.data.train.local or "")
    if rank == 0 and not (train_dir / "index.json").exists():
        from pargo_dist.data.convert import write_dataset
        from pargo_dist.data.synthetic import SyntheticConfig, held_out, synthetic_samples

        base = SyntheticConfig(num_samples=syn.num_samples, image_size=syn.image_size, seed=syn.seed)
        targets = [(train_dir, base)]
        if syn.held_out and cfg.data.eval is not None and cfg.data.eval.local:
            targets.append((Path(cfg.data.eval.local), held_out(base, syn.held_out)))
        for out, scfg in targets:
            if not (out / "index.json").exists():
                rows = ((s, None) for s in synthetic_samples(scfg, kind=syn.kind))
                write_dataset(rows, str(out), progress=False, desc="synth")
    dist.barrier()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop = StopFlag()  # first: a signal during start-up is honoured at the first step
        # armed before the rendezvous: a node that never shows up is a hang too
        self.watchdog = HangWatchdog(cfg.train.hang_timeout_s, int(os.environ.get("RANK", 0)))
        self.watchdog.beat("joining the process group (rendezvous)", allow=SETUP_ALLOWANCE_S)
        self.backend = make_backend(cfg)
        self.rank, self.world = self.backend.init_distributed()
        self.watchdog.beat("setting up (model, data, resume)", allow=SETUP_ALLOWANCE_S)
        self.run_dir = Path(cfg.run.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        prepare_synthetic(cfg, self.rank)
        self.tokenizer = build.build_tokenizer(cfg)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=cfg.checkpoint.keep_last, rank=self.rank,
                                      world_size=self.world, barrier=dist.barrier)
        self.resume_dir = self.ckpt.resolve(cfg.checkpoint.resume)
        self.resume_meta = self.ckpt.load_meta(self.resume_dir) if self.resume_dir else None
        self._check_resume_backend()
        # A backend whose checkpoints are per rank resumes on another rank count from consolidated
        # weights; one whose checkpoints reshard (megatron) loads them as they are.
        self.elastic = (bool(self.resume_meta) and self.resume_meta["world_size"] != self.world
                        and not self.backend.reshards_checkpoints)
        with self.backend.model_init_context():
            model = build.build_model(cfg, self.tokenizer)
        loaded = build.prepare_for_stage(model, cfg)  # init_from, frozen parts, LoRA
        if self.rank == 0 and loaded and self.resume_dir is None:
            print(f"initialised {', '.join(cfg.model.init_parts)} from {cfg.model.init_from} "
                  f"({len(loaded)} tensors)", flush=True)
        if self.elastic:
            self._load_elastic_weights(model)
        if cfg.train.activation_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        self.backend.setup(model)
        if self.elastic:  # the schedule is a function of the step: put it there
            self.backend.position_schedule(self.resume_meta["step"])
        self.flops_model = model  # the HF model (for megatron, its LLM now lives on the meta device)
        self.train_loader = build.loader(cfg, cfg.data.train, model, self.tokenizer, cfg.train.micro_batch,
                                         replication=self.backend.replication)
        self.metrics = MetricsLogger(self.run_dir / "tb", rank=self.rank, total_steps=cfg.train.steps,
                                     every=cfg.logging.every, enabled_tensorboard=cfg.logging.tensorboard)
        self.step, self.samples_seen, self.tokens_seen, self.skipped = 0, 0, 0, 0
        self.streams = stream_names(cfg.data.train)  # samples seen per dataset of the mixture
        self.stream_samples = dict.fromkeys(self.streams, 0)
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))

    # -- resume -------------------------------------------------------------------------

    def _load_elastic_weights(self, model) -> None:
        """Resume on another rank count: ZeRO's optimizer shards are per rank, so the weights come
        from the consolidated checkpoint and Adam's moments start again; step, LR schedule and
        the data position (global samples consumed) continue exactly."""
        from pargo_dist.backends.deepspeed import consolidated_state_dict

        state = consolidated_state_dict(self.resume_dir)
        missing, unexpected = model.load_state_dict(state, strict=False)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in missing if k in trained]  # frozen parts come from the recipe
        if unexpected or missing:
            raise RuntimeError(f"checkpoint {self.resume_dir} does not fit the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if self.rank == 0:
            print(f"elastic resume: checkpoint of {self.resume_meta['world_size']} rank(s) on {self.world}; "
                  "weights, schedule and data position restored, optimizer moments re-initialised", flush=True)

    def _check_resume_backend(self) -> None:
        meta = self.resume_meta
        if meta and meta.get("backend", "deepspeed") != self.backend.name:
            raise ValueError(f"checkpoint {self.resume_dir} was written by the {meta.get('backend', 'deepspeed')} "
                             f"backend, this recipe uses {self.backend.name}: export it (`pargo-dist export`) "
                             "and start from the export, or set checkpoint.resume=none")

    def resume(self) -> None:
        step_dir, meta = self.resume_dir, self.resume_meta
        if step_dir is None:
            return
        if not self.elastic:
            self.backend.load(step_dir)
        self.step = meta["step"]
        self.samples_seen, self.tokens_seen = meta["samples_seen"], meta["tokens_seen"]
        self.skipped = meta.get("skipped", 0)
        saved = meta.get("stream_samples", {})
        self.stream_samples.update({k: v for k, v in saved.items() if k in self.stream_samples})
        if meta.get("loader") is not None:
            self.train_loader.load_state_dict(meta["loader"])
        if not self.elastic:
            restore_rng_state(self.ckpt.load_rank_state(step_dir)["rng"])
        if self.rank == 0:
            print(f"resumed from {step_dir} at step {self.step} ({self.samples_seen:,} samples seen)", flush=True)

    def save(self) -> Path:
        step_dir = self.ckpt.begin(self.step)
        meta = {"step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                "skipped": self.skipped, "stream_samples": self.stream_samples, "world_size": self.world,
                "stage": self.cfg.train.stage, "backend": self.backend.name, "layout": self.backend.layout(self.world),
                "loader": self.train_loader.state_dict()}
        self.backend.save(step_dir)
        self.ckpt.save_rank_state(step_dir, {"rng": capture_rng_state()})
        self.ckpt.save_meta(step_dir, meta, to_yaml(self.cfg))
        self.ckpt.commit(step_dir, self.step)
        return step_dir

    # -- the loop -----------------------------------------------------------------------

    def _batches(self):
        while True:  # epochs: a fresh iterator continues the streaming epoch count
            yielded = False
            for batch in self.train_loader:
                yielded = True
                yield batch
            if not yielded:
                raise RuntimeError(f"the training data at {self.cfg.data.train.local or self.cfg.data.train.remote} "
                                   "gave no batch: fewer samples than one global batch?")

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over the micro-batches; returns the global mean token loss etc."""
        per_stream = [float(sum(b["streams"].count(i) for b in micro_batches)) for i in range(len(self.streams))]
        counts = torch.tensor([float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)),
                               float(sum(b["num_tokens"] for b in micro_batches)),
                               float(sum(b["num_samples"] for b in micro_batches)),
                               float(sum(len(b["skipped"]) for b in micro_batches)), *per_stream],
                              device=self.backend.device)
        dist.all_reduce(counts)  # on the backend's device: NCCL reduces only GPU tensors
        # Ranks of one model replica (megatron TP x PP) read the same samples: count them once.
        targets, tokens, samples, skipped, *per_stream = (c / self.backend.replication for c in counts.tolist())
        for name, n in zip(self.streams, per_stream):
            self.stream_samples[name] += round(n)
        loss_sum = self.backend.train_batch(micro_batches, targets, self.step)
        dist.all_reduce(loss_sum)
        self.samples_seen += int(samples)
        self.tokens_seen += int(tokens)
        self.skipped += int(skipped)
        return {"loss": loss_sum.item() / max(targets, 1.0), "tokens": tokens, "samples": samples,
                "skipped": skipped}

    def run(self) -> int:
        cfg = self.cfg
        self.watchdog.beat("resuming from the checkpoint", allow=SETUP_ALLOWANCE_S)
        self.resume()
        first = True
        self.backend.train(True)
        batches = self._batches()
        timer = StepTimer()
        model = self.flops_model
        peak = peak_flops_per_device(cfg.train.precision)
        exit_code = 0
        while self.step < cfg.train.steps:
            timer.start()
            # the first batch may wait for the first shards to download, the first step for kernels
            allow = SETUP_ALLOWANCE_S if first else None
            self.watchdog.beat(f"reading the batch of step {self.step + 1}", allow=allow)
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            self.watchdog.beat(f"training step {self.step + 1}", allow=allow)
            first = False
            stats = self.train_step(micro)
            self.step += 1
            perf = timer.stop(int(stats["samples"]), int(stats["tokens"]))
            scalars = {"train/loss": stats["loss"], "data/skipped": float(self.skipped),
                       "perf/peak_mem_gib": peak_memory_gib(), **perf}
            if len(self.streams) > 1:  # a mixture: what each dataset really contributed so far
                scalars.update({f"data/stream/{k}": float(v) for k, v in self.stream_samples.items()})
            for name, lr in self.backend.learning_rates().items():
                scalars[f"train/lr/{name}"] = lr
            norm = self.backend.grad_norm()
            if norm is not None:
                scalars["train/grad_norm"] = norm
            if peak:
                seq = stats["tokens"] / max(stats["samples"], 1)
                flops = model_flops_per_sample(model, int(seq)) * stats["samples"] / self.world
                scalars["perf/mfu"] = mfu(flops / perf["perf/step_time"], peak)
            self.metrics.log(self.step, scalars)
            self._record(micro, scalars)
            last = self.step == cfg.train.steps
            if cfg.data.eval is not None and ((cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or last):
                self.evaluate()
            if cfg.data.eval is not None and ((cfg.train.sample_every and self.step % cfg.train.sample_every == 0)
                                              or last):
                self.sample_captions()
            self.watchdog.beat(f"agreeing on signals after step {self.step}")
            stopping = self.stop.agreed(self.backend.device)
            if last or stopping or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.watchdog.beat(f"saving the checkpoint of step {self.step}")
                path = self.save()
                if self.rank == 0:
                    print(f"saved checkpoint {path}", flush=True)
            if stopping and not last:
                if self.rank == 0:
                    print(f"received signal {self.stop.signal}: saved at step {self.step}, exiting with "
                          f"{REQUEUE_EXIT} for requeue", flush=True)
                exit_code = REQUEUE_EXIT
                break
        self.metrics.close()
        return exit_code

    def _append_log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _record(self, micro: list[dict], scalars: dict[str, float]) -> None:
        """Append this step to train_log.jsonl (rank 0) and, if asked, the sample ids (every rank):
        plain files a user, a resume check or a test can read without TensorBoard."""
        self._append_log({"step": self.step, **scalars})
        if self.cfg.logging.sample_ids:
            with open(self.run_dir / f"sample_ids.rank{self.rank}.jsonl", "a") as f:
                ids = [i for b in micro for i in b["sample_ids"]]
                f.write(json.dumps({"step": self.step, "world": self.world, "ids": ids}) + "\n")

    # -- evaluation -----------------------------------------------------------------------

    def _eval_loader(self):
        """One loader over the held-out split, reused (streaming allows one dataset per local dir)."""
        if getattr(self, "_eval", None) is None:
            data = replace(self.cfg.data.eval, shuffle=False)
            self._eval = build.loader(self.cfg, data, self.flops_model, self.tokenizer, self.cfg.train.micro_batch,
                                      replication=self.backend.replication)
        return self._eval

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the held-out split (every rank takes its share)."""
        self.backend.train(False)
        total = torch.zeros(2, device=self.backend.device)
        for i, batch in enumerate(self._eval_loader()):
            if i >= self.cfg.train.eval_batches:
                break
            self.watchdog.beat(f"evaluating (batch {i + 1} after step {self.step})")
            n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) / self.backend.replication
            total += torch.stack([self.backend.eval_loss_sum(batch).float().reshape(()),
                                  torch.tensor(n, device=total.device)])
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        self.metrics.log(self.step, {"eval/loss": loss})
        self._append_log({"step": self.step, "eval/loss": loss})
        self.backend.train(True)
        return loss

    @torch.no_grad()
    def sample_captions(self) -> list[tuple[str, str]]:
        """Greedy captions for the first held-out images, next to the truth, into TensorBoard.
        All ranks generate together (ZeRO-3 gathers parameters collectively)."""
        cfg = self.cfg
        if not self.backend.generates:
            if self.rank == 0 and self.step == cfg.train.steps:
                print("sample captions: generation runs on the exported HF model for the megatron backend "
                      "(`pargo-dist export`, then `pargo-dist generate`)", flush=True)
            return []
        self.watchdog.beat(f"generating sample captions after step {self.step}")
        self.backend.train(False)
        model = self.backend.module
        batch = next(iter(self._eval_loader()))
        n = min(cfg.train.sample_count, len(batch["input_ids"]))
        prompts, truths = [], []
        for ids, labels in zip(batch["input_ids"][:n], batch["labels"][:n]):
            answer = (labels != IGNORE_INDEX).nonzero()
            start = int(answer[0]) if len(answer) else len(ids)
            prompts.append(ids[:start])
            truths.append(self.tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True))
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
        mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
        device = self.backend.device
        pixels = batch["pixel_values"][:n].to(device) if batch["pixel_values"] is not None else None
        new = model.generate(input_ids.to(device), pixels, attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=cfg.train.max_new_tokens, pad_token_id=pad,
                             eos_token_id=self.tokenizer.eos_token_id,
                             synced_gpus=self.world > 1 and cfg.backend.zero_stage == 3)
        pairs = [(self.tokenizer.decode(g, skip_special_tokens=True).strip(), t.strip())
                 for g, t in zip(new, truths)]
        text = "\n\n".join(f"**generated:** {g}  \n**truth:** {t}" for g, t in pairs)
        self.metrics.log_text(self.step, "samples/captions", text)
        if self.rank == 0:
            g, t = pairs[0]
            print(f"sample caption @ step {self.step}\n  generated: {g}\n  truth:     {t}", flush=True)
        self.backend.train(True)
        return pairs


def train(cfg: Config) -> int:
    """Run (or resume) the recipe's training; returns 0, or REQUEUE_EXIT after a signal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.watchdog.beat("leaving the process group")
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        trainer.watchdog.close()
