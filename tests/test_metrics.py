"""Metrics: step timing, peak memory, the logger, and reading its TensorBoard logs back."""

from __future__ import annotations

import io
import math
from collections import defaultdict

import pytest
import torch

from pargo_dist.observe import metrics
from pargo_dist.observe.metrics import MetricsLogger, StepTimer, peak_memory_gib
from pargo_dist.observe.report import read_scalars, read_texts

# ----------------------------------------------------------------------------- memory, timing


def test_peak_memory_is_positive_gib():
    mem = peak_memory_gib()
    assert 0.01 < mem < 1024  # this process's peak RSS in GiB: tens of MiB at least, not bytes/KiB


def test_step_timer_numbers_are_consistent():
    ticks = iter([10.0, 10.5])
    timer = StepTimer(clock=lambda: next(ticks))
    timer.start()
    perf = timer.stop(samples=4, tokens=1000)
    assert perf == {"perf/step_time": 0.5, "perf/samples_per_s": 8.0, "perf/tokens_per_s": 2000.0}
    real = StepTimer()
    real.start()
    sum(range(10000))
    perf = real.stop(samples=3, tokens=300)
    assert perf["perf/step_time"] > 0
    assert perf["perf/tokens_per_s"] * perf["perf/step_time"] == pytest.approx(300)
    assert perf["perf/samples_per_s"] * perf["perf/step_time"] == pytest.approx(3)
    with pytest.raises(RuntimeError):
        real.stop(1, 1)  # stop twice without a start


# ----------------------------------------------------------------------------- logging


def f32(x: float) -> float:
    """What TensorBoard stores: a float32."""
    return torch.tensor(x, dtype=torch.float32).item()


def fake_clock(step_seconds: float):
    t = [0.0]

    def clock():
        t[0] += step_seconds
        return t[0]

    return clock


def test_logger_writes_scalars_read_back_exactly(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path / "tb", total_steps=5, every=2, stream=out, clock=fake_clock(2.0))
    written = defaultdict(list)
    for step in range(1, 6):
        scalars = {"train/loss": 3.0 - 0.1 * step, "train/lr/projector": 1e-3 * step, "data/skipped": step // 3,
                   "perf/tokens_per_s": torch.tensor(1234.5)}  # ints and 0-d tensors are fine
        log.log(step, scalars)
        for tag, value in scalars.items():
            written[tag].append((step, f32(float(value))))
    log.log_text(5, "samples/captions", "a red square above a blue circle")
    log.close()
    assert read_scalars(tmp_path / "tb") == dict(written)
    assert read_texts(tmp_path / "tb") == {"samples/captions": [(5, "a red square above a blue circle")]}


def test_logger_progress_lines_every_n_steps_and_at_the_end(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, total_steps=5, every=2, stream=out, clock=fake_clock(2.0),
                        enabled_tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"train/loss": 2.5, "perf/tokens_per_s": 1234.4})
    log.log(5, {"eval/loss": 1.75})  # an evaluation is always printed
    lines = out.getvalue().splitlines()
    # ETA: 2 s per step measured from step 1 (the first step itself is left out).
    assert lines == [
        "step 2/5 | loss 2.500 | 1,234 tok/s | eta 6s",
        "step 4/5 | loss 2.500 | 1,234 tok/s | eta 2s",
        "step 5/5 | loss 2.500 | 1,234 tok/s | eta 0s",
        "step 5/5 | eval loss 1.750 | eta 0s",
    ]
    assert not any(tmp_path.iterdir())  # TensorBoard off: no event file


def test_progress_line_format():
    log = MetricsLogger("unused", rank=0, total_steps=300, enabled_tensorboard=False)
    scalars = {"train/loss": 2.3141, "train/lr/all": 1e-3, "train/grad_norm": 0.8412, "perf/tokens_per_s": 1234.4,
               "perf/samples_per_s": 12.34, "perf/mfu": 0.4123, "perf/peak_mem_gib": 3.14, "data/skipped": 0.0,
               "perf/step_time": 0.1}
    assert log.format_line(120, scalars, eta=192) == (
        "step 120/300 | loss 2.314 | lr 1.0e-03 | gnorm 0.84 | 1,234 tok/s | 12.3 samples/s | mfu 41.2% | "
        "mem 3.1 GiB | skipped 0 | eta 3m12s")
    two_groups = {"train/lr/projector": 1e-3, "train/lr/language_model": 2e-5}
    assert log.format_line(7, two_groups) == "step 7/300 | lr projector=1.0e-03 language_model=2.0e-05"
    assert metrics._format_duration(3 * 3600 + 125) == "3h02m"


def test_other_ranks_write_nothing(tmp_path, capsys):
    out = io.StringIO()
    log = MetricsLogger(tmp_path / "tb", rank=1, total_steps=2, every=1, stream=out)
    for step in (1, 2):
        log.log(step, {"train/loss": 1.0, "eval/loss": 1.0})
    log.log_text(2, "samples/captions", "text")
    log.flush()
    log.close()
    assert not (tmp_path / "tb").exists()
    assert out.getvalue() == "" and capsys.readouterr().out == ""


def test_read_scalars_of_an_empty_dir(tmp_path):
    assert read_scalars(tmp_path) == {} and read_texts(tmp_path) == {}
    assert math.isfinite(peak_memory_gib())


def test_the_straggler_check_takes_each_ranks_others_median_from_one_sort():
    """What each rank is compared with: the median of every other rank's time, computed from one
    sort (O(N log N)) and equal to taking the median of the others for each rank in turn, for odd
    and even rank counts, ties and 2 ranks (where it is the other rank's time)."""
    import random
    import statistics

    from pargo_dist.train.stragglers import medians_of_the_others

    rng = random.Random(5)
    for n in (2, 3, 4, 7, 8, 64, 1001):
        times = [round(rng.uniform(0.0, 2.0), 2) for _ in range(n)]  # rounded: ties too
        want = [statistics.median(times[:r] + times[r + 1:]) for r in range(n)]
        assert medians_of_the_others(times) == want, n
    assert medians_of_the_others([0.1, 0.9]) == [0.9, 0.1]
