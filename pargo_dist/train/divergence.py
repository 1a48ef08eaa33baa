"""When training diverges: the decisions (`DivergenceWatch`), taken alike on every rank.

A step whose loss or gradient norm is not finite was skipped by the backend: no update, the
data moved on. One such step is weather (an overflow in one batch). Several in a row mean the
weights or the data are bad, and skipping more steps only burns the allocation. A loss far above
its running mean (a spike) is worse: the update already happened, and the next steps climb on it.
Both end in a rollback (pargo_dist.train.trainer.Trainer._roll_back): the newest checkpoint from before
the first bad step is restored and the samples of the bad steps are skipped by id from then on,
so the run does not meet them again in the same order. At most `train.max_rollbacks` times:
after that the run stops with a `Diverged` error naming the samples.

Every input is global (the all-reduced loss, the gradient norm over every rank), so every rank
reaches the same verdict at the same step without a collective of its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """Roll back: why, and the steps whose samples caused it (the first is the one to go back
    before). `spike_above`: for a loss spike, the per-token loss above which a rank's own batch
    counts as the spike's cause (None: non-finite steps)."""

    reason: str
    steps: tuple[int, ...]
    spike_above: float | None = None


def blame(verdict: Verdict, ranks: list[list[tuple[list[str], bool, float]]]) -> list[str]:
    """The sample ids a rollback skips. `ranks`: per rank, per step of the verdict, (its sample
    ids, whether its own loss was finite, its own per-token loss). The ranks whose own loss was
    not finite, or for a spike was itself above the spike's threshold, are the cause: the others'
    samples were fine, and at 1,000 ranks skipping the whole global batch would drop thousands of
    them for good. Only where no rank's own loss stands out (a spike of the sum alone) does the
    whole batch go."""
    if verdict.spike_above is None:
        bad = [ids for rank in ranks for ids, finite, _ in rank if not finite]
    else:
        bad = [ids for rank in ranks for ids, finite, loss in rank if finite and loss > verdict.spike_above]
    chosen = bad or [ids for rank in ranks for ids, _, _ in rank]
    return list(dict.fromkeys(i for ids in chosen for i in ids))  # ranks of one replica read the same


class DivergenceWatch:
    """Fed each step's global loss and gradient norm; answers a Verdict when the run must roll back.

    `bad_steps`: non-finite steps in a row that roll back (0: never; each is still skipped).
    `spike_factor`: a finite loss above this many times the mean of the last `window` finite
    losses rolls back (0: off); judged only once `window` losses are known, and a spike's loss
    never enters the mean."""

    def __init__(self, bad_steps: int, spike_factor: float = 0.0, window: int = 50):
        self.bad_steps, self.spike_factor = bad_steps, spike_factor
        self.streak: list[int] = []
        self.recent: deque[tuple[int, float]] = deque(maxlen=window)

    @classmethod
    def from_config(cls, train) -> "DivergenceWatch":
        return cls(train.rollback_after_bad_steps, train.loss_spike_factor, train.loss_spike_window)

    @property
    def remembers(self) -> int:
        """How many recent steps' samples a rollback may need."""
        return max(self.bad_steps, 1)

    def observe(self, step: int, loss: float, grad_norm: float | None) -> Verdict | None:
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            self.streak.append(step)
            if self.bad_steps and len(self.streak) >= self.bad_steps:
                first, last = self.streak[0], self.streak[-1]
                steps = f"step {first}" if first == last else f"steps {first}-{last}"
                return Verdict(f"{len(self.streak)} step(s) in a row with a non-finite loss or gradient norm "
                               f"({steps}; train.rollback_after_bad_steps={self.bad_steps})", tuple(self.streak))
            return None
        self.streak = []
        if self.spike_factor and len(self.recent) == self.recent.maxlen:
            mean = sum(value for _, value in self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return Verdict(f"loss {loss:.4g} at step {step} is {loss / mean:.1f} x the mean {mean:.4g} of the "
                               f"last {len(self.recent)} steps (train.loss_spike_factor={self.spike_factor:g})",
                               (step,), spike_above=self.spike_factor * mean)
        self.recent.append((step, loss))
        return None

    def rolled_back(self, to_step: int) -> None:
        """The run is at `to_step` again: forget the streak and the losses after it."""
        self.streak = []
        kept = [(s, value) for s, value in self.recent if s <= to_step]
        self.recent = deque(kept, maxlen=self.recent.maxlen)
