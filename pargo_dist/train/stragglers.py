"""Stragglers named: the rank whose own work in a step takes longest, with its host.

In a synchronous step every rank waits for the slowest, so step times are all the same and
say nothing about who is slow. What differs is each rank's own time before it first waits on
the others: from asking for its batch to the step's first collective (the count of target
tokens, before the forward). A rank with a slow disk or network, a starved CPU or a busy host
spends longer there while the others wait for it. Every `logging.every` steps the ranks gather
their mean of it (one small collective), and rank 0 names every rank above
`logging.straggler_factor` x the median of the other ranks, on the progress output and in
TensorBoard.

Not seen here: a rank slow in its forward or backward (a GPU throttled by heat): it shows as the
others' wait inside the backend's collectives, which this does not time.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch.distributed as dist

NOISE_S = 0.05  # a rank is named only if also this much slower than the median (timer and scheduler noise)


def medians_of_the_others(times: list[float]) -> list[float]:
    """For each rank, the median of every other rank's time, from one sort: O(N log N) for N
    ranks (the median of N-1 values for each rank in turn was O(N^2 log N): at 8,000 ranks,
    seconds of rank 0's time every logging interval). Leaving out one value shifts the middle of
    the sorted list by at most one place, to the left or to the right of the one left out."""
    n = len(times)
    if n < 2:
        return [0.0] * n
    order = sorted(range(n), key=times.__getitem__)
    ranked = [times[r] for r in order]
    where = {r: i for i, r in enumerate(order)}

    def at(k: int, left_out: int) -> float:  # the k-th smallest of the others
        return ranked[k if k < left_out else k + 1]

    m = n - 1
    out = []
    for r in range(n):
        p = where[r]
        out.append(at(m // 2, p) if m % 2 else (at(m // 2 - 1, p) + at(m // 2, p)) / 2)
    return out


class StragglerWatch:
    """Times each rank's own part of a step (`start` .. `ready`) and compares the ranks."""

    def __init__(self, factor: float, every: int, rank: int):
        self.factor, self.every, self.rank = factor, max(1, every), rank
        self.host = socket.gethostname()
        self._since: float | None = None
        self._times: list[float] = []
        self._warming = True  # the first step after a start (or a rollback) is not timed

    def warm_up(self) -> None:
        """The next step starts a fresh pass over the data (a start, a rollback): its batch also
        waits for the loader's workers and first shards, on every rank alike, which says
        nothing about the host; it is not timed."""
        self._warming = True

    def start(self) -> None:
        """The rank asks for its next batch."""
        self._since = time.perf_counter()

    def ready(self) -> None:
        """The rank reaches the step's first collective."""
        if self._since is not None and not self._warming:
            self._times.append(time.perf_counter() - self._since)
        self._since, self._warming = None, False

    def compare(self, step: int) -> dict[str, float]:
        """Collective every `every` steps (every rank calls it at every step): TensorBoard scalars
        (perf/host_s_median, perf/host_s_max, perf/straggler_rank: -1 for none), and on rank 0 a
        line naming each straggler."""
        if not self.factor or step % self.every or not dist.is_initialized() or dist.get_world_size() < 2:
            return {}
        mine = statistics.fmean(self._times) if self._times else 0.0
        self._times.clear()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.host, mine))
        times = [t for _, t in everyone]
        median = statistics.median(times)
        others = medians_of_the_others(times)  # (with 2 ranks: the other one)
        slow = [r for r, t in enumerate(times) if t > self.factor * others[r] and t - others[r] > NOISE_S]
        if self.rank == 0:
            for r in slow:
                host, t = everyone[r]
                print(f"straggler: rank {r} on {host}: {t:.2f} s of its own work per step before the first "
                      f"collective, {t / max(others[r], 1e-9):.1f}x the other ranks' median ({others[r]:.2f} s) "
                      f"over the last {self.every} step(s)", flush=True)
        worst = max(range(len(times)), key=times.__getitem__)
        return {"perf/host_s_median": median, "perf/host_s_max": times[worst],
                "perf/straggler_rank": float(worst if worst in slow else -1)}
