"""DeepSpeed backend: ZeRO stage 0-3 (optional CPU offload) around a plain torch model.

It knows nothing of data formats: it receives collated micro-batches and returns losses. It
builds torch AdamW (one group per model part, `pargo_dist.optim`) and the LR schedule;
DeepSpeed owns sharding, gradient reduction, accumulation boundaries, clipping and
checkpoint shards.

Checkpoints: `engine.save_checkpoint` into the step directory the checkpoint manager gives it.
In the `align` stage and with LoRA frozen parameters are excluded (the backbones are
referenced by the recipe, not copied 7B times per checkpoint); loading is then non-strict.
`export` consolidates any stage / rank count into one fp32 state dict (zero_to_fp32).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pargo_dist.compat import configure_deepspeed_env

configure_deepspeed_env()

import deepspeed  # noqa: E402

from pargo_dist.data.collate import model_inputs  # noqa: E402
from pargo_dist.models.mllm import IGNORE_INDEX  # noqa: E402
from pargo_dist.optim import lr_lambda, param_groups  # noqa: E402

TAG = "ds"


def init_distributed() -> tuple[int, int]:
    """Start the process group (gloo on CPU, nccl on GPU) once; returns (rank, world size)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def ds_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config from our recipe (batch sizes, ZeRO, precision, clipping)."""
    zero: dict[str, Any] = {"stage": cfg.backend.zero_stage}
    if cfg.backend.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if cfg.backend.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if cfg.backend.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.backend.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


class DeepSpeedBackend:
    name = "deepspeed"
    replication = 1  # every rank reads its own samples (pure data parallel)
    reshards_checkpoints = False  # ZeRO shards are per rank: another rank count needs consolidation
    generates = True  # the engine's module is the HF model: sample captions during training

    def __init__(self, cfg):
        self.cfg = cfg
        self.world_size = 1
        self.engine = self.optimizer = self.scheduler = None

    def init_distributed(self) -> tuple[int, int]:
        rank, self.world_size = init_distributed()
        return rank, self.world_size

    def model_init_context(self):
        """Where to build the model: under zero.Init when the recipe asks (too big for one rank)."""
        if self.cfg.backend.zero_init and self.cfg.backend.zero_stage == 3:
            return deepspeed.zero.Init(config_dict_or_path=ds_config(self.cfg, self.world_size))
        import contextlib

        return contextlib.nullcontext()

    def setup(self, model: torch.nn.Module) -> None:
        """AdamW with one group per trained part, the warmup-cosine schedule, then DeepSpeed."""
        o = self.cfg.optim
        optimizer = torch.optim.AdamW(param_groups(model, self.cfg), betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))
        self.optimizer, self.scheduler = optimizer, scheduler
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(self.cfg, self.world_size))

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def layout(self, world: int) -> dict[str, int]:
        return {"dp": world, "zero_stage": self.cfg.backend.zero_stage}

    def position_schedule(self, step: int) -> None:
        """Put the LR schedule at `step` (an elastic resume, where no scheduler state is loaded)."""
        self.scheduler.last_epoch = step
        factor = lr_lambda(self.cfg)(step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", "all"): g["lr"] for g in self.optimizer.param_groups}

    def forward(self, **inputs):
        return self.engine(**inputs)

    def train_batch(self, micro_batches: list[dict], targets: float, step: int) -> torch.Tensor:
        """Forward + backward of each micro-batch; DeepSpeed steps the optimizer and the LR
        schedule at the accumulation boundary (after clipping). Returns this rank's summed
        token loss.

        HF's loss with num_items_in_batch is sum / num_items. DeepSpeed divides by grad_accum
        (in backward) and by the world size (gradient all-reduce average), so this makes the
        gradient that of sum(global token losses) / targets."""
        device = self.device
        num_items = torch.tensor(targets / (self.world_size * len(micro_batches)), device=device)
        loss_sum = torch.zeros((), device=device)
        for batch in micro_batches:
            out = self.engine(**model_inputs(batch, device), num_items_in_batch=num_items)
            self.engine.backward(out.loss)
            self.engine.step()
            loss_sum += out.loss.detach().float() * num_items
        return loss_sum

    @torch.no_grad()
    def eval_loss_sum(self, batch: dict) -> torch.Tensor:
        out = self.engine(**model_inputs(batch, self.device))
        n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return out.loss.detach().float() * n

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def _frozen_excluded(self) -> bool:
        """Checkpoints without frozen weights: the align stage, and LoRA (the LLM's base weights)."""
        return self.cfg.train.stage == "align" or bool(self.cfg.model.lora.r)

    def save(self, step_dir, client_state: dict | None = None) -> None:
        exclude = self._frozen_excluded
        self.engine.save_checkpoint(str(step_dir), tag=TAG, client_state=client_state or {},
                                    exclude_frozen_parameters=exclude)

    def load(self, step_dir) -> dict:
        _, client = self.engine.load_checkpoint(
            str(step_dir), tag=TAG, load_module_strict=not self._frozen_excluded,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}")
        return client

    def gathered_params(self, params):
        """Context in which ZeRO-3-partitioned params are whole (for generation on all ranks)."""
        import contextlib

        if self.cfg.backend.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        return contextlib.nullcontext()


def consolidated_state_dict(step_dir) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage and rank count."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
