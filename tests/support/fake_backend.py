"""A Backend for in-process loop tests: a tiny bigram language model trained with SGD on one rank.

It follows the contract of pargo_dist.backends.base.Backend (tests check that it does) and is
deterministic, so the loop's own logic (when it evaluates, saves, stops, resumes, what it
counts) is tested without DeepSpeed, megatron or extra processes. `hooks[step]` runs inside
train_batch at that step (index), e.g. to send the process a signal or raise on purpose.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pargo_dist.batch import Batch
from pargo_dist.constants import IGNORE_INDEX


class FakeBackend:
    name = "fake"
    replication = 1
    reads_pretrained_llm = False
    param_gather = None
    generates = False
    synced_gpus = False

    def __init__(self, vocab: int = 32, lr: float = 0.5, dp: int = 1):
        torch.manual_seed(0)
        self.model = torch.nn.Embedding(vocab, vocab)  # logits of the next token from this one
        self.lr = lr
        self.step_lr = lr
        self.dp = dp  # the layout it reports (its arithmetic is the same at any): stands for another one
        self.hooks: dict[int, Callable[[], None]] = {}
        # sample id -> factor on the loss of every step whose batch holds it (nan: a sample that
        # always overflows; 50: one that makes a loss spike)
        self.poison: dict[str, float] = {}
        self.norm: float | None = None
        self.calls: list[tuple[str, int | float]] = []  # what the loop asked, in order

    def init_distributed(self) -> tuple[int, int]:
        return 0, 1

    def load_pretrained_llm(self, model) -> None:
        raise AssertionError("never called: reads_pretrained_llm is False")

    def setup(self, model) -> None:
        pass

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.input_ids[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), batch.labels[:, 1:], ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def train_batch(self, micro_batches: list[Batch], targets: float, step: int) -> torch.Tensor:
        self.calls.append(("train", targets))
        if step in self.hooks:
            self.hooks[step]()
        self.model.zero_grad()
        total = torch.zeros(())
        for batch in micro_batches:
            loss = self._loss_sum(batch)
            for i in batch.sample_ids:
                loss = loss * self.poison.get(i, 1.0)
            (loss / targets).backward()
            total += loss.detach()
        self.norm = float(self.model.weight.grad.norm())
        if math.isfinite(self.norm):  # as the real backends: a non-finite gradient is not applied
            with torch.no_grad():
                self.model.weight -= self.step_lr * self.model.weight.grad
        self.set_step(step + 1)
        return total

    @torch.no_grad()
    def eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        self.calls.append(("eval", batch.num_targets))
        return self._loss_sum(batch)

    def set_step(self, step: int) -> None:
        self.step_lr = self.lr / (1 + 0.1 * step)

    def learning_rates(self) -> dict[str, float]:
        return {"all": self.step_lr}

    def grad_norm(self) -> float | None:
        return self.norm

    def moe_aux_loss(self) -> float | None:
        return None

    def layout(self) -> dict[str, int]:
        return {"dp": self.dp}

    def save(self, step_dir: Path, background: bool = False) -> None:
        self.calls.append(("save", int(Path(step_dir).name.split("_")[1])))
        torch.save(self.model.state_dict(), Path(step_dir) / "fake.pt")

    def saves_pending(self) -> bool:
        return False

    def wait_for_saves(self) -> None:
        pass

    def load(self, step_dir: Path, saved_world: int) -> None:
        self.model.load_state_dict(torch.load(Path(step_dir) / "fake.pt"))


class ListLoader:
    """A resumable loader over fixed batches: its state is how many batches were consumed, and a
    new iteration continues from there (as the streaming loader does), wrapping around at the end."""

    def __init__(self, batches: list[Batch]):
        self.batches = batches
        self.consumed = 0
        self.excluded: set[str] = set()

    def __iter__(self):
        start = self.consumed % len(self.batches) if self.batches else 0
        for batch in self.batches[start:]:
            self.consumed += 1
            if not self.excluded.intersection(batch.sample_ids):  # the fake passes over the whole batch
                yield batch

    def exclude(self, ids) -> None:
        self.excluded.update(ids)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]
