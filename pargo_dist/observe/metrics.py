"""Training metrics: step timing, peak memory, and the logger (TensorBoard scalars and text, a
console progress line, and W&B / MLflow when the recipe names them: trackers.py), all on rank 0 only.

Model FLOPs and MFU are in pargo_dist.models.flops; reading TensorBoard logs back is in pargo_dist.observe.report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import torch

# ----------------------------------------------------------------------------- timing, memory


def peak_memory_gib() -> float:
    """Peak memory in GiB: CUDA max_memory_allocated on GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


class StepTimer:
    """Wall time of one training step and the throughput it implies.

    CUDA kernels run asynchronously, so by default both ends synchronize the device: otherwise
    a step would be timed by when its kernels were *queued*, not when they finished.
    """

    def __init__(self, synchronize: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.synchronize = synchronize
        self.clock = clock
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.synchronize and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._t0 = self.clock()

    def stop(self, samples: int, tokens: int) -> dict[str, float]:
        """{"perf/step_time": s, "perf/samples_per_s", "perf/tokens_per_s"} since `start`."""
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() without start()")
        self._sync()
        dt = max(self.clock() - self._t0, 1e-9)
        self._t0 = None
        return {"perf/step_time": dt, "perf/samples_per_s": samples / dt, "perf/tokens_per_s": tokens / dt}


# ----------------------------------------------------------------------------- logging


def _format_duration(seconds: float) -> str:
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _lr_field(scalars: Mapping[str, float]) -> str | None:
    """One lr, or name=lr per parameter group when the groups differ."""
    lrs = {k.removeprefix("train/lr").lstrip("/") or "all": v for k, v in scalars.items()
           if k == "train/lr" or k.startswith("train/lr/")}
    if not lrs:
        return None
    if len(set(lrs.values())) == 1:
        return f"lr {next(iter(lrs.values())):.1e}"
    return "lr " + " ".join(f"{name}={v:.1e}" for name, v in lrs.items())


class MetricsLogger:
    """Scalars to TensorBoard every call, a one-line progress report every `every` steps.

    Only rank 0 writes (TensorBoard event file and console); on other ranks every method is a
    no-op, so the trainer can call it unconditionally. The progress line shows the fields that
    were given among:

        step 120/300 | loss 2.314 | lr 1.0e-03 | gnorm 0.84 | 1,234 tok/s | 12.3 samples/s |
        mfu 41.2% | mem 3.1 GiB | skipped 0 | eta 3m12s

    from train/loss, train/lr[/group], train/grad_norm, perf/tokens_per_s, perf/samples_per_s,
    perf/mfu (a fraction), perf/peak_mem_gib (or perf/mem_gib), data/skipped, and
    checkpoint/remote_missing_step (a checkpoint an outage kept from the store). It is printed at
    most once per step: when step % every == 0 and at step == total_steps. A call carrying
    eval/loss always prints (evaluations are rare and worth seeing). The ETA is the mean wall
    time per step since the first logged step (so the first step, which pays for warm-up and
    compilation, is left out) times the steps left.

    `stream` None means sys.stdout at the time of printing (so output redirection applies).
    """

    def __init__(self, log_dir: str | Path, rank: int = 0, total_steps: int | None = None, every: int = 10,
                 enabled_tensorboard: bool = True, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.active = rank == 0
        self.total_steps = total_steps
        self.every = max(int(every), 1)
        self.stream = stream
        self.clock = clock
        self.writer = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first log call
        self.trackers: list = []  # W&B, MLflow (pargo_dist.observe.trackers): the same scalars and texts
        self._last_printed: int | None = None
        if self.active and enabled_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only where used

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def add_trackers(self, trackers: list) -> None:
        """Send every later scalar and text to these trackers too (rank 0)."""
        if self.active:
            self.trackers.extend(trackers)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _eta(self, step: int, now: float) -> float | None:
        if self.total_steps is None or self._first is None:
            return None
        first_step, first_time = self._first
        if step <= first_step:
            return None
        return (now - first_time) / (step - first_step) * max(self.total_steps - step, 0)

    def format_line(self, step: int, scalars: Mapping[str, float], eta: float | None = None) -> str:
        """The progress line for these scalars (no trailing newline)."""
        get = scalars.get
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        fields = [f"step {step}{total}"]
        if get("train/loss") is not None:
            fields.append(f"loss {get('train/loss'):.3f}")
        if get("eval/loss") is not None:
            fields.append(f"eval loss {get('eval/loss'):.3f}")
        if (lr := _lr_field(scalars)) is not None:
            fields.append(lr)
        if get("train/grad_norm") is not None:
            fields.append(f"gnorm {get('train/grad_norm'):.2f}")
        if get("train/moe_aux_loss") is not None:  # MoE: 1 when the routers spread tokens evenly
            fields.append(f"moe aux {get('train/moe_aux_loss'):.3f}")
        if get("perf/tokens_per_s") is not None:
            fields.append(f"{get('perf/tokens_per_s'):,.0f} tok/s")
        if get("perf/samples_per_s") is not None:
            fields.append(f"{get('perf/samples_per_s'):.1f} samples/s")
        if get("perf/mfu") is not None:
            fields.append(f"mfu {100 * get('perf/mfu'):.1f}%")
        mem = get("perf/peak_mem_gib", get("perf/mem_gib"))
        if mem is not None:
            fields.append(f"mem {mem:.1f} GiB")
        if get("data/skipped") is not None:
            fields.append(f"skipped {int(get('data/skipped'))}")
        if get("checkpoint/remote_missing_step"):
            fields.append(f"remote: step {int(get('checkpoint/remote_missing_step'))} not uploaded, retried at the "
                          "next save")
        if eta is not None:
            fields.append(f"eta {_format_duration(eta)}")
        return " | ".join(fields)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write every scalar (floats, ints or 0-d tensors) at `step`; print progress when due."""
        if not self.active:
            return
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        values = {k: float(v) for k, v in scalars.items()}
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=step)
        for tracker in self.trackers:
            tracker.log(step, values)
        due = (step % self.every == 0 or step == self.total_steps) and step != self._last_printed
        if due or "eval/loss" in values:
            if due:
                self._last_printed = step
            stream = self.stream or sys.stdout
            stream.write(self.format_line(step, values, self._eta(step, now)) + "\n")
            stream.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Text (e.g. sample captions) to TensorBoard's text tab; rank 0 only."""
        if self.active and self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)
        for tracker in self.trackers:
            tracker.log_text(step, tag, text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


__all__ = [
    "peak_memory_gib",
    "StepTimer",
    "MetricsLogger",
]
