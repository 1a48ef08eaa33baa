"""The contract between the training loop and a backend: exactly what the loop calls.

A backend spreads the model over ranks and runs one optimizer step over collated
micro-batches. It owns the process groups, the optimizer and LR schedule, gradient reduction,
mixed precision and its own checkpoint files. It knows nothing of data formats (it receives
`Batch` objects and reads only their tensors and `num_targets`) and nothing of training
stages: what trains is what has `requires_grad`, set on the model before `setup`.

The loop (pargo_dist/train/trainer.py) knows nothing of DeepSpeed or megatron: it calls these methods
and nothing else. Two implementations: `deepspeed.DeepSpeedBackend` (ZeRO 1-3, data parallel)
and `megatron.MegatronBackend` (tensor x pipeline parallel LLM, data parallel over the rest).
A test double (tests/support/fake_backend.py) implements it for in-process loop tests.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from pargo_dist.batch import Batch


@runtime_checkable
class Backend(Protocol):
    name: str
    """Written into every checkpoint: a run resumes only with the backend that wrote it."""

    replication: int
    """Consecutive ranks that read the same samples: the ranks of one model replica (TP x PP
    under megatron, 1 under ZeRO). The loop counts their samples once."""

    reads_pretrained_llm: bool
    """True: the backend reads its own share of a pretrained LLM (model.llm.path) itself, in
    `load_pretrained_llm` (ZeRO-3 partitioned) or `setup` (megatron's TP x PP share), so the model
    is built with the LLM's weights left on the meta device. False: it arrives with them."""

    param_gather: Callable[[list[torch.nn.Parameter]], AbstractContextManager] | None
    """A context in which partitioned parameters are whole and writable (to fill them from an
    earlier run, model.init_from), or None when nothing is partitioned before `setup`."""

    generates: bool
    """Whether `module.generate` works during training (sample captions)."""

    synced_gpus: bool
    """Whether generation must keep every rank stepping together (ZeRO-3 gathers parameters in
    every forward, so a rank that finished early must keep joining)."""

    def init_distributed(self) -> tuple[int, int]:
        """Join the process group (and build the backend's own groups); -> (rank, world size)."""

    def load_pretrained_llm(self, model: torch.nn.Module) -> None:
        """Called when `reads_pretrained_llm`, right after the model is built (its LLM on the meta
        device) and before the stage freezes parts or LoRA wraps the LLM: give the LLM its
        pretrained weights this backend's way."""

    def setup(self, model: torch.nn.Module) -> None:
        """Take the built model, already frozen for its stage, and wrap it with the optimizer,
        the LR schedule and the parallel layout."""

    @property
    def device(self) -> torch.device:
        """Where batches go and where collectives reduce (NCCL reduces only GPU tensors)."""

    @property
    def module(self) -> torch.nn.Module:
        """The model as trained (for generation)."""

    def train(self, mode: bool = True) -> None:
        """Training or evaluation mode (dropout)."""

    def train_batch(self, micro_batches: list[Batch], targets: float, step: int) -> torch.Tensor:
        """Forward and backward over the micro-batches and one optimizer step at step index `step`.
        `targets`: answer tokens of the whole global batch (all ranks, all micro-batches); the
        gradient must be that of the summed token loss / targets. Returns this rank's summed
        token loss (a 0-d tensor on `device`; summed over ranks, each token counts once)."""

    def eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        """This rank's summed token loss on one batch, no gradient (counted as in train_batch)."""

    def set_step(self, step: int) -> None:
        """Put the LR schedule at optimizer step `step` (the schedule is a function of the step)."""

    def learning_rates(self) -> dict[str, float]:
        """Current rate per parameter group, by part name (what the next step uses)."""

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step before clipping, if the backend knows it."""

    def moe_aux_loss(self) -> float | None:
        """The last step's load-balancing loss of an MoE LLM (unweighted, the mean over its MoE
        layers, micro-batches and ranks) when train.moe_aux_loss_coef adds it; else None."""

    def layout(self) -> dict[str, int]:
        """How ranks are arranged (dp, tp, pp, zero_stage): recorded in each checkpoint."""

    def save(self, step_dir: Path, background: bool = False) -> None:
        """Collective: write model and optimizer state into `step_dir` (the checkpoint manager
        made it and marks it complete afterwards). Frozen parameters may be left out.
        `background`: take the state now, write it while training goes on (checkpoint.async_save);
        a backend that cannot may write it at once."""

    def saves_pending(self) -> bool:
        """Whether writes of a background save are still running on this rank (raises the error
        of one that failed)."""

    def wait_for_saves(self) -> None:
        """Block until this rank's background writes have finished (raises a failure's error)."""

    def load(self, step_dir: Path, saved_world: int) -> None:
        """Collective: restore what `save` wrote, written by `saved_world` ranks: weights and
        optimizer state exactly, resharded when this layout (rank count, ZeRO stage, TP/PP) is
        not the saving one. There is no weights-only fallback: a resume never restarts Adam."""
