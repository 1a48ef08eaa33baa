"""DeepSpeed's gradient buckets and ZeRO-3's gathered-parameter limits, sized to the model.

DeepSpeed's defaults (5e8-element reduce and all-gather buckets, 5e7 prefetched and 1e9 live
and reuse-distance elements under ZeRO-3) are chosen for models of several billion parameters,
where each is a small fraction of the model. Below ~4B parameters they are not: a 5e8 bucket is
larger than the whole model, so ZeRO-3 copies *every* gradient into it and reduces them all at
the end of the backward (a second full gradient, and no overlap), and a 1e9 reuse distance
keeps every gathered parameter until the step ends (a second full model). Measured on a 278M
Llama, fp32, 2 CPU ranks (`benchmarks/startup.py --set train.micro_batch=2`): 6.2 GiB per rank
under ZeRO-3 against 2.6 GiB under megatron TP=2; docs/scaling.md, "ZeRO-3's step memory".

So each size is capped at a fraction of the parameters it applies to: a bucket at 1/8 of the
trained parameters (eight reduce-scatters per step, overlapping the backward), ZeRO-3's
prefetch at 1/8 and its live and reuse limits at 1/4 of all parameters. None goes below
LATENCY_FLOOR elements (tens of MB: below it a collective's fixed cost dominates, and the tiny
test models keep one bucket per step, as they had), and none above DeepSpeed's default: from
~4B parameters on, DeepSpeed's own sizes are what runs.

The planner (pargo_dist.plan.estimate.buffer_bytes) counts the same sizes: one function, so the
plan and the run cannot disagree.
"""

from __future__ import annotations

DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size / allgather_bucket_size defaults (elements)
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size default
DS_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters and stage3_max_reuse_distance defaults
LATENCY_FLOOR = 10_000_000  # 20-40 MB per collective in bf16 / fp32

BUCKET_SHARE = 8  # a bucket holds 1/8 of the trained parameters
LIVE_SHARE = 4  # ZeRO-3 keeps at most 1/4 of the parameters gathered


def _capped(share: float, default: int) -> int:
    return int(min(default, max(LATENCY_FLOOR, share)))


def buffer_sizes(trainable: int, total: int, stage: int) -> dict[str, int]:
    """The `zero_optimization` keys that size DeepSpeed's buffers, for a model of `total`
    parameters of which `trainable` are trained (counted whole, not per rank)."""
    bucket = _capped(trainable / BUCKET_SHARE, DS_REDUCE_BUCKET)
    if stage == 3:
        live = _capped(total / LIVE_SHARE, DS_MAX_LIVE)
        return {"reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": _capped(total / BUCKET_SHARE,
                                                                                     DS_PREFETCH_BUCKET),
                "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live}
    if stage in (1, 2):
        return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    return {}


def persistence_threshold(hidden: int) -> int:
    """ZeRO-3 keeps parameters of up to max(1e5, 10 x hidden) elements (norms, biases) whole on
    every rank rather than gathering them in every forward: DeepSpeed's fixed 1e5 stops covering
    a norm at hidden 100k, and a 70B's are 8k."""
    return max(100_000, 10 * hidden)
