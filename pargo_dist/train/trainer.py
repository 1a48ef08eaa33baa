"""The training loop: one loop over a backend, for every stage, rank count and ZeRO stage.

Per optimizer step it takes `grad_accum` micro-batches from the streaming loader, counts the
answer tokens of the whole global batch (all ranks, all micro-batches; each batch counted
its own on the CPU when it was collated) and hands them to the backend, which normalises every
micro-batch's summed token loss by that count. The gradient is then exactly that of the
global batch's mean token loss, however the batch is split over ranks and micro-batches:
2 ranks x 4 samples and 1 rank x 8 samples follow the same loss curve (tests compare them).

Resume is exact: a checkpoint holds model and optimizer shards (backend), the run's
`TrainState` (step, samples seen, the loader's position: global samples consumed, so rank-count
independent) and every rank's RNG state; `train` picks the newest *complete* checkpoint in
run.dir by itself. SIGTERM / SIGUSR1 (SLURM's warnings before a time limit or preemption)
finish the current step on all ranks, save, and exit with REQUEUE_EXIT so a launcher requeues.

`Trainer` is handed everything it works with (backend, loaders, checkpoint manager, logger,
stop signal); `build_trainer(cfg)` builds the real ones. So the loop's timing of evaluation,
saving and stopping is tested in-process with a fake backend (tests/test_loop.py), and only
what needs real ranks spawns them.

A rank that raises leaves at once with its traceback (exit 1), never waiting in a collective
its peers will not join; the launcher then stops the others (`train`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from pargo_dist.backends.base import Backend
from pargo_dist.batch import Batch
from pargo_dist.checkpoint.manager import CheckpointManager
from pargo_dist.checkpoint.state import TrainState, capture_rng_state, restore_rng_state
from pargo_dist.checkpoint.files import atomic_write
from pargo_dist.config import Config, to_yaml
from pargo_dist.train.divergence import DivergenceWatch, Verdict, blame
from pargo_dist.errors import Diverged, UserError
from pargo_dist.models.flops import mfu, model_flops_per_sample, peak_flops_per_device
from pargo_dist.observe.metrics import MetricsLogger, StepTimer, peak_memory_gib
from pargo_dist.train.stragglers import StragglerWatch
from pargo_dist.runtime.signals import StopSignal
from pargo_dist.runtime.exits import REQUEUE_EXIT
from pargo_dist.runtime.hang_detector import SETUP_ALLOWANCE_S, HangWatchdog
from pargo_dist.runtime.store_sync import transfer_allowance


class Trainer:
    """The loop. `model` is the HF model the backend was set up with (FLOP counts read its
    shapes; under megatron its LLM lives on the meta device). `eval_loader`: a callable giving
    an iterable of held-out batches (None: no held-out split). `resume_from`: a checkpoint dir."""

    def __init__(self, cfg: Config, backend: Backend, loader, checkpoints: CheckpointManager,
                 metrics: MetricsLogger, stop: StopSignal, *, model: torch.nn.Module, tokenizer=None,
                 eval_loader: Callable[[], Iterable[Batch]] | None = None, streams: list[str] | None = None,
                 resume_from: Path | None = None, watchdog: HangWatchdog | None = None):
        self.cfg, self.backend, self.loader, self.ckpt = cfg, backend, loader, checkpoints
        self.metrics, self.stop, self.model, self.tokenizer = metrics, stop, model, tokenizer
        self.eval_loader, self.resume_from = eval_loader, resume_from
        self.rank, self.world = checkpoints.rank, checkpoints.world_size
        self.watchdog = watchdog or HangWatchdog(0, self.rank)  # timeout 0: off
        self.stragglers = StragglerWatch(cfg.logging.straggler_factor, cfg.logging.every, self.rank)
        self.divergence = DivergenceWatch.from_config(cfg.train)
        # step -> (this rank's ids, whether its own loss was finite, its own per-token loss: tensors)
        self._recent_samples: dict[int, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
        self.run_dir = checkpoints.run_dir
        self.streams = list(streams or ["data"])  # the datasets of a mixture, in order
        self.state = TrainState(step=0, world_size=self.world, stage=cfg.train.stage, backend=backend.name,
                                stream_samples=dict.fromkeys(self.streams, 0))
        auto = cfg.checkpoint.async_save
        self.background_saves = torch.cuda.is_available() if auto is None else bool(auto)
        self._unmarked: tuple[Path, int] | None = None  # a background save not yet marked COMPLETE

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    # -- checkpoints ----------------------------------------------------------------------

    def resume(self, step_dir: Path) -> None:
        saved = self.ckpt.load_state(step_dir)
        if saved.backend != self.backend.name:
            raise UserError(f"checkpoint {step_dir} was written by the {saved.backend} backend, this recipe uses "
                            f"{self.backend.name}: export it (`pargo-dist export`) and start from the export "
                            "(model.init_from), or set checkpoint.resume=none")
        self.backend.load(step_dir, saved.world_size)  # weights and optimizer, resharded for this layout
        self.backend.set_step(saved.step)  # the schedule is a function of the step
        counts = {k: v for k, v in saved.stream_samples.items() if k in self.streams}
        self.state = replace(saved, world_size=self.world, stage=self.cfg.train.stage,
                             stream_samples={**dict.fromkeys(self.streams, 0), **counts})
        if saved.loader is not None:
            self.loader.load_state_dict(saved.loader)
        if saved.excluded_samples:  # skipped after an earlier rollback: skipped for good
            self.loader.exclude(saved.excluded_samples)
        rank_state = self.ckpt.load_rank_state(step_dir)
        if rank_state is not None:
            restore_rng_state(rank_state["rng"])
        self.ckpt.catch_up(step_dir, saved.step)  # checkpoint.remote: a step an outage kept from the store
        def shown(layout: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in layout.items())

        before = shown(saved.layout) if saved.layout else f"{saved.world_size} rank(s)"
        layouts = f"{before} -> {shown(self.backend.layout())}"
        if saved.world_size != self.world or (saved.layout and saved.layout != self.backend.layout()):
            self._say(f"elastic resume ({layouts}): weights, optimizer moments, schedule and data position "
                      "restored, resharded for this layout")
        self._say(f"resumed from {step_dir} at step {saved.step} ({saved.samples_seen:,} samples seen)")

    def save(self) -> Path:
        """Collective: checkpoint this step. In the background (checkpoint.async_save) the
        backend copies its state and returns; the COMPLETE marker waits for every rank's writes
        (`_mark_saved`), so resume never picks a checkpoint still being written."""
        self._mark_saved(wait=True)  # one save in flight at a time
        step_dir = self.ckpt.begin(self.state.step)
        self.state = replace(self.state, layout=self.backend.layout(), loader=self.loader.state_dict())
        self.backend.save(step_dir, background=self.background_saves)
        self.ckpt.save_rank_state(step_dir, {"rng": capture_rng_state()})
        self.ckpt.save_state(step_dir, self.state, to_yaml(self.cfg))
        if self.background_saves:
            self._unmarked = (step_dir, self.state.step)
        else:
            self.ckpt.commit(step_dir, self.state.step)
        return step_dir

    def _mark_saved(self, wait: bool, all_written: bool = False) -> None:
        """Collective: mark the background save in flight COMPLETE once every rank's writes have
        finished: at once with `wait` (blocking until they have), or when `all_written` (the
        ranks agreed on it after a step; see `_agree`)."""
        if self._unmarked is None or not (wait or all_written):
            return
        if wait:
            self.watchdog.beat(f"finishing the checkpoint writes of step {self._unmarked[1]}")
            self.backend.wait_for_saves()
        step_dir, step = self._unmarked
        self._unmarked = None
        self.ckpt.commit(step_dir, step)  # a barrier, then rank 0 writes the marker
        self._say(f"checkpoint {step_dir} complete")

    def _agree(self) -> tuple[bool, bool]:
        """Collective, once per step: (whether any rank was signalled, whether every rank has
        finished writing the save in flight), in one all-reduce."""
        writing = self._unmarked is not None and self.backend.saves_pending()
        flags = torch.tensor([float(self.stop.requested), float(writing)], device=self.backend.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, writing = (bool(v) for v in flags.tolist())
        return stop, self._unmarked is not None and not writing

    # -- the loop -----------------------------------------------------------------------

    def _batches(self) -> Iterator[Batch]:
        while True:  # epochs: a fresh iterator continues the streaming epoch count
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            if not yielded:
                data = self.cfg.data.train
                raise UserError(f"the training data at {data.local or data.remote} gave no batch: fewer samples "
                                "than one global batch?")

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over the micro-batches; returns the global mean token loss etc."""
        per_stream = [sum(b.streams.count(i) for b in micro_batches) for i in range(len(self.streams))]
        local = [sum(b.num_targets for b in micro_batches), sum(b.num_tokens for b in micro_batches),
                 sum(b.num_samples for b in micro_batches), sum(len(b.skipped) for b in micro_batches),
                 sum(b.num_images for b in micro_batches), sum(b.num_crops for b in micro_batches), *per_stream]
        counts = torch.tensor(local, dtype=torch.float64, device=self.backend.device)  # NCCL: GPU tensors only
        self.stragglers.ready()  # this rank's own part of the step ends: from here it waits on the others
        dist.all_reduce(counts)
        # Ranks of one model replica (megatron TP x PP) read the same samples: count them once.
        targets, tokens, samples, skipped, images, crops, *per_stream = (
            c / self.backend.replication for c in counts.tolist())
        # right-padded batches train with plain causal attention (Batch.causal_only: same loss)
        loss_sum = self.backend.train_batch([b.causal_only() for b in micro_batches], targets, self.state.step)
        # which ranks' samples a divergence blames: kept as tensors and read only when a divergence
        # needs them (the step already waits for the device once, for the logged loss below)
        own_finite = torch.isfinite(loss_sum).all()
        own_loss = loss_sum.detach().clone() / max(local[0], 1)
        dist.all_reduce(loss_sum)
        s = self.state
        s.samples_seen += int(samples)
        s.tokens_seen += int(tokens)
        s.skipped += int(skipped)
        for name, n in zip(self.streams, per_stream):
            s.stream_samples[name] += round(n)
        return {"loss": loss_sum.item() / max(targets, 1.0), "tokens": tokens, "samples": samples,
                "images": images, "crops": crops, "own_finite": own_finite, "own_loss": own_loss}

    def _count_skipped_step(self, stats: dict[str, float]) -> None:
        """A step whose gradient norm was not finite (on any rank: the norm is global) was skipped
        by the backend on every rank: no update, the data moved on. Counted and said."""
        norm = self.backend.grad_norm()
        if norm is None or math.isfinite(norm):
            return
        self.state.skipped_steps += 1
        self._say(f"step {self.state.step} skipped: gradient norm {norm} (loss {stats['loss']:.4g}); the optimizer "
                  f"did not step, the data moved on ({self.state.skipped_steps} skipped so far)")

    # -- divergence ---------------------------------------------------------------------

    def _watch(self, micro: list[Batch], stats: dict[str, float]) -> Verdict | None:
        """Keep this step's sample ids (a rollback skips them) and ask the divergence watch."""
        step = self.state.step
        self._recent_samples[step] = ([i for b in micro for i in b.sample_ids], stats["own_finite"], stats["own_loss"])
        for old in [s for s in self._recent_samples if s <= step - self.divergence.remembers]:
            del self._recent_samples[old]
        return self.divergence.observe(step, stats["loss"], self.backend.grad_norm())

    def _culprits(self, verdict: Verdict) -> list[str]:
        """Collective: the sample ids the rollback skips, from every rank's own view of the bad
        steps (divergence.blame: the ranks whose own loss was not finite, or spiked)."""
        mine = [(ids, bool(finite), float(loss)) for ids, finite, loss in
                (self._recent_samples.get(s, ([], True, 0.0)) for s in verdict.steps)]
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return blame(verdict, everyone)

    def _roll_back(self, verdict: Verdict) -> None:
        """Collective: back to the newest checkpoint from before the bad steps, skipping their
        samples by id from now on (kept in TrainState, so later checkpoints skip them too). The
        run's history counters (skipped steps, rollbacks) carry over the restored state."""
        ids = self._culprits(verdict)
        s, limit = self.state, self.cfg.train.max_rollbacks
        shown = ", ".join(ids[:16]) + (f" and {len(ids) - 16} more" if len(ids) > 16 else "")
        advice = (f"The samples of those steps: {shown}. Lower optim.lr or raise optim.warmup_steps, look at these "
                  "samples, or skip them from the start with data.train.skip_ids")
        if s.rollbacks >= limit:
            raise Diverged(f"training diverged: {verdict.reason}, after {s.rollbacks} rollback(s) already "
                           f"(train.max_rollbacks={limit}). {advice}")
        self._mark_saved(wait=True)
        self.watchdog.beat(f"rolling back from step {s.step}", allow=SETUP_ALLOWANCE_S)
        target = self.ckpt.before(verdict.steps[0], loads_with=(self.backend.name, self.backend.layout()))
        if target is None:
            raise Diverged(f"training diverged: {verdict.reason}, and no complete checkpoint from before step "
                           f"{verdict.steps[0]} to roll back to (checkpoint.every={self.cfg.checkpoint.every}). {advice}")
        why = f"rollback {s.rollbacks + 1} after step {s.step}: {verdict.reason}"
        excluded = {**s.excluded_samples, **dict.fromkeys(ids, why)}
        skipped_steps, rollbacks = s.skipped_steps, s.rollbacks + 1
        self.resume(target)
        self.state.skipped_steps, self.state.rollbacks, self.state.excluded_samples = skipped_steps, rollbacks, excluded
        self.loader.exclude(ids)
        # the checkpoints saved since the divergence began go (here and in the store), and the one
        # rolled back to is saved again with the rollback in it: a restart or requeue from now on
        # resumes there, skipping these samples, and counts this rollback against max_rollbacks
        retired = self.ckpt.retire(verdict.steps[0])
        self.save()
        self._mark_saved(wait=True)
        self.divergence.rolled_back(self.state.step)
        self._recent_samples.clear()
        if self.rank == 0:
            atomic_write(self.run_dir / "excluded_samples.json", lambda f: f.write(json.dumps(excluded, indent=1)),
                         binary=False)
        self._say(f"rolled back to step {self.state.step} ({why}); skipping {len(ids)} sample(s) from now on: "
                  f"{shown} (rollback {rollbacks} of at most {limit}; all in {self.run_dir / 'excluded_samples.json'})"
                  + (f"; retired the checkpoints of steps {retired}" if retired else ""))

    def _scalars(self, stats: dict[str, float], perf: dict[str, float]) -> dict[str, float]:
        scalars = {"train/loss": stats["loss"], "data/skipped": float(self.state.skipped),
                   "perf/peak_mem_gib": peak_memory_gib(), **perf}
        if stats["crops"] > stats["images"]:  # data.image.crops: tiles per image, as they come
            scalars["data/crops_per_image"] = stats["crops"] / stats["images"]
        uploads = self.ckpt.uploads
        if uploads is not None and self.rank == 0:  # checkpoint.remote: the newest step the store lacks (0: none)
            scalars["checkpoint/remote_missing_step"] = float(uploads.newest or 0) if uploads.behind() else 0.0
        if len(self.streams) > 1:  # a mixture: what each dataset really contributed so far
            scalars.update({f"data/stream/{k}": float(v) for k, v in self.state.stream_samples.items()})
        for name, lr in self.backend.learning_rates().items():
            scalars[f"train/lr/{name}"] = lr
        norm = self.backend.grad_norm()
        if norm is not None:
            scalars["train/grad_norm"] = norm
        scalars["train/skipped_steps"] = float(self.state.skipped_steps)
        scalars["train/rollbacks"] = float(self.state.rollbacks)
        aux = self.backend.moe_aux_loss()
        if aux is not None:
            scalars["train/moe_aux_loss"] = aux
        peak = peak_flops_per_device(self.cfg.train.precision)
        if peak:
            samples = max(stats["samples"], 1)
            seq, images = stats["tokens"] / samples, stats["images"] / samples
            crops = stats["crops"] / stats["images"] if stats["images"] else 1.0  # (data.image.crops)
            flops = model_flops_per_sample(self.model, int(seq), images, crops) * stats["samples"] / self.world
            scalars["perf/mfu"] = mfu(flops / perf["perf/step_time"], peak)
        return scalars

    def _due(self, every: int, last: bool) -> bool:
        return last or bool(every and self.state.step % every == 0)

    def run(self) -> int:
        """Train to train.steps (resuming first if asked); 0, or REQUEUE_EXIT after a signal."""
        cfg = self.cfg
        if self.resume_from is not None:
            # an elastic resume converts the checkpoint on one rank per filesystem while the others
            # wait (no collective): allowed at 20 MB/s of checkpoint, at least the set-up allowance
            size = self.ckpt.size_of(self.resume_from)  # (one walk, rank 0's)
            self.watchdog.beat("resuming from the checkpoint", allow=transfer_allowance(size))
            self.resume(self.resume_from)
        self._start_trackers()
        self.backend.train(True)
        batches = self._batches()
        timer = StepTimer()
        first = True
        while self.state.step < cfg.train.steps:
            timer.start()
            # the first batch may wait for the first shards to download, the first step for kernels
            allow = SETUP_ALLOWANCE_S if first else None
            self.watchdog.beat(f"reading the batch of step {self.state.step + 1}", allow=allow)
            self.stragglers.start()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            self.watchdog.beat(f"training step {self.state.step + 1}", allow=allow)
            first = False
            stats = self.train_step(micro)
            self.state.step += 1
            self._count_skipped_step(stats)
            scalars = self._scalars(stats, timer.stop(int(stats["samples"]), int(stats["tokens"])))
            scalars.update(self.stragglers.compare(self.state.step))  # collective, every logging.every steps
            self.metrics.log(self.state.step, scalars)
            self._record(micro, scalars)
            verdict = self._watch(micro, stats)
            if verdict is not None:
                batches.close()
                self._roll_back(verdict)
                batches, first = self._batches(), True
                self.stragglers.warm_up()
                continue
            last = self.state.step == cfg.train.steps
            if self.eval_loader is not None and self._due(cfg.train.eval_every, last):
                self.evaluate()
            if self.eval_loader is not None and self._due(cfg.train.sample_every, last):
                self.sample_captions()
            self.watchdog.beat(f"agreeing on signals after step {self.state.step}")
            stopping, written = self._agree()
            self._mark_saved(wait=False, all_written=written)
            if stopping or self._due(cfg.checkpoint.every, last):
                self.watchdog.beat(f"saving the checkpoint of step {self.state.step}")
                self.metrics.flush()  # the curves up to this step on disk (and in checkpoint.remote) with it
                step_dir = self.save()
                self._say(f"saving checkpoint {step_dir} in the background" if self.background_saves
                          else f"saved checkpoint {step_dir}")
            if stopping and not last:
                self._mark_saved(wait=True)  # exit 75 only with the checkpoint complete
                self._say(f"received signal {self.stop.signal}: saved at step {self.state.step}, exiting with "
                          f"{REQUEUE_EXIT} for requeue")
                self._finish_uploads()
                self.metrics.close()
                return REQUEUE_EXIT
        self._mark_saved(wait=True)
        code = self._finish_uploads()
        self.metrics.close()
        return code

    def _finish_uploads(self) -> int:
        """Collective: wait for the checkpoint upload in flight (checkpoint.remote). The run's
        work is safe on the local disk either way; when the store still lacks the newest
        checkpoint (an outage), REQUEUE_EXIT, so that the requeued job uploads it."""
        self.watchdog.beat("finishing the checkpoint upload", allow=SETUP_ALLOWANCE_S)
        missing = self.ckpt.finish_uploads()
        if missing is None:
            return 0
        self._say(f"checkpoint.remote: {self.ckpt.remote.url} still lacks step {missing} (the object store was "
                  f"unreachable); it is complete under {self.ckpt.root}. Exiting with {REQUEUE_EXIT} so that the "
                  "job is requeued and uploads it")
        return REQUEUE_EXIT

    def _start_trackers(self) -> None:
        """W&B / MLflow on rank 0, after a resume: a requeued job continues the tracker run whose
        id its checkpoint kept (TrainState.trackers), and the next checkpoint keeps it again."""
        log = self.cfg.logging
        if self.rank != 0 or not (log.wandb.project or log.mlflow.tracking_uri):
            return
        from pargo_dist.observe.trackers import start_trackers

        trackers = start_trackers(log.wandb, log.mlflow, self.run_dir, asdict(self.cfg),
                                  to_yaml(self.cfg), self.state.trackers)
        self.metrics.add_trackers(trackers)
        self.state.trackers = {t.name: t.run_id for t in trackers}
        self._say("tracking in " + ", ".join(f"{t.name} (run {t.run_id})" for t in trackers))

    def _append_log(self, row: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _record(self, micro: list[Batch], scalars: dict[str, float]) -> None:
        """Append this step to train_log.jsonl (rank 0) and, if asked, the sample ids (every rank):
        plain files a user, a resume check or a test can read without TensorBoard."""
        self._append_log({"step": self.state.step, **scalars})
        if self.cfg.logging.sample_ids:
            with open(self.run_dir / f"sample_ids.rank{self.rank}.jsonl", "a") as f:
                ids = [i for b in micro for i in b.sample_ids]
                f.write(json.dumps({"step": self.state.step, "world": self.world, "ids": ids}) + "\n")

    # -- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss on the held-out split (every rank takes its share)."""
        self.backend.train(False)
        total = torch.zeros(2, dtype=torch.float64, device=self.backend.device)
        for i, batch in enumerate(self.eval_loader()):
            if i >= self.cfg.train.eval_batches:
                break
            self.watchdog.beat(f"evaluating (batch {i + 1} after step {self.state.step})")
            n = batch.num_targets / self.backend.replication
            total += torch.stack([self.backend.eval_loss_sum(batch.causal_only()).double().reshape(()),
                                  torch.tensor(n, dtype=torch.float64, device=total.device)])
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp(min=1)).item()
        self.metrics.log(self.state.step, {"eval/loss": loss})
        self._append_log({"step": self.state.step, "eval/loss": loss})
        self.backend.train(True)
        return loss

    @torch.no_grad()
    def sample_captions(self) -> list[tuple[str, str]]:
        """Greedy captions for the first held-out images, next to the truth, into TensorBoard.
        All ranks generate together (ZeRO-3 gathers parameters collectively)."""
        from pargo_dist.data.prompt import split_prompt_answer
        from pargo_dist.evaluation.generate import generate_texts

        cfg = self.cfg
        if not self.backend.generates:
            if self.state.step == cfg.train.steps:
                self._say("sample captions: generation runs on the exported HF model for the megatron backend "
                          "(`pargo-dist export`, then `pargo-dist generate`)")
            return []
        self.watchdog.beat(f"generating sample captions after step {self.state.step}")
        self.backend.train(False)
        batch = next(iter(self.eval_loader()))
        n = min(cfg.train.sample_count, len(batch))
        prompts, answers = zip(*(split_prompt_answer(ids, labels)
                                 for ids, labels in zip(batch.input_ids[:n], batch.labels[:n])))
        pixels, crops = batch.first_images(n)
        generated = generate_texts(self.backend.module, self.tokenizer, list(prompts), pixels, self.backend.device,
                                   image_crops=crops,
                                   max_new_tokens=cfg.train.max_new_tokens, synced_gpus=self.backend.synced_gpus)
        pairs = [(g, self.tokenizer.decode(a, skip_special_tokens=True).strip()) for g, a in zip(generated, answers)]
        text = "\n\n".join(f"**generated:** {g}  \n**truth:** {t}" for g, t in pairs)
        self.metrics.log_text(self.state.step, "samples/captions", text)
        g, t = pairs[0]
        self._say(f"sample caption @ step {self.state.step}\n  generated: {g}\n  truth:     {t}")
        self.backend.train(True)
        return pairs

