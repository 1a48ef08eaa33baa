"""Where a split's shards are and how its samples become batches: the recipe's `data.train` /
`data.eval` sections. Plain dataclasses, no streaming or torch import (see models/projector_config.py
for why that matters to the launcher)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pargo_dist.data.schema import CAPTION_PROMPT


@dataclass
class StreamConfig:
    """One dataset of a mixture (mosaicml-streaming's Stream). Weigh it with at most one of:
    proportion (its share of every epoch; then every stream needs one), repeat (times its own
    size per epoch, may be fractional) or choose (samples per epoch); none: its size, once."""

    remote: str | None = None
    local: str | None = None
    split: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str | None = None  # its label in TensorBoard (data/stream/<name>); default: the path's last part


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches (the recipe's `data:` section)."""

    remote: str | None = None  # s3://bucket/prefix (or gs://, oci://, ...); None: local only
    local: str | None = None  # local shard dir / download cache; None: derived from remote
    # a mixture instead of remote/local: several datasets, each weighted (see StreamConfig)
    streams: list[StreamConfig] = field(default_factory=list)
    epoch_size: int | None = None  # samples per epoch of a mixture (default: what the weights give)
    split: str | None = None
    max_len: int = 512
    pack: bool = False
    caption_prompt: str = CAPTION_PROMPT
    shuffle: bool = True
    seed: int = 9176
    num_canonical_nodes: int | None = None  # fix it for elastic resume across node counts
    num_workers: int = 0
    download_retry: int = 5  # attempts after the first, backoff 1, 2, 4, 8, 16 s (+ jitter)
    download_timeout: float = 120.0
    predownload: int | None = None  # samples to download ahead per worker (streaming's default: 8 x batch)
    max_substitutes: int = 32  # consecutive unusable samples tolerated before failing loudly
    # sample ids never trained on: each is replaced by the next usable sample, as a corrupt one is
    # (counted in data/skipped). A run adds the samples of a rollback itself (train.rollback_*)
    skip_ids: list[str] = field(default_factory=list)
    # Length-grouped micro-batches (pargo_dist/data/grouping.py): within each block of group_block
    # consecutive samples of the epoch's order, samples are sorted by estimated tokens (visual +
    # text) and cut into groups of group_size, the groups in a seeded random order; resume stays
    # exact. Needs the lengths.npz that `pargo-dist convert` / `synth` write beside index.json.
    # Make group_size a multiple of the global batch (micro_batch x data-parallel ranks) and of
    # num_canonical_nodes, so that a step lies in one group, and group_block a multiple of it.
    group_by_length: bool = False
    group_block: int = 8192
    group_size: int = 256
