"""The training dataset: MDS shards streamed from object storage (or a local dir), encoded.

`ParGoDataset` is a mosaicml-streaming `StreamingDataset`, so it inherits what we need at
scale: shards downloaded on demand with retries and exponential backoff, a deterministic
global shuffle that is the same for any number of ranks (`num_canonical_nodes` is fixed at
the first run and saved in the loader state), and resumption at a sample offset without
reading what was consumed (the partition is computed, not replayed).

On top of that each sample is decoded (JPEG draft mode), preprocessed like the vision tower
expects, templated, tokenized and masked (see prompt.py). A sample that cannot be used
(corrupt image, empty text, too long) is *replaced* by the next usable sample in the global
order and reported in the example's `skipped` list: batch sizes never change (so ranks stay
in lock-step) and the count reaches the logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from PIL import UnidentifiedImageError

import pargo_dist  # noqa: F401  (environment shims before streaming imports torchvision)
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.prompt import PromptBuilder
from pargo_dist.data.schema import CAPTION_PROMPT, BadSample
from streaming import StreamingDataLoader, StreamingDataset

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches (the recipe's `data:` section)."""

    remote: str | None = None  # s3://bucket/prefix (or gs://, oci://, ...); None: local only
    local: str | None = None  # local shard dir / download cache; None: derived from remote
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


def default_cache_dir(remote: str) -> str:
    """A local cache dir unique to the remote (streaming needs one local dir per dataset)."""
    root = os.environ.get("PARGO_CACHE", os.path.join(tempfile.gettempdir(), "pargo_dist_cache"))
    return os.path.join(root, hashlib.sha1(remote.encode()).hexdigest()[:16])


class ParGoDataset(StreamingDataset):
    def __init__(self, cfg: DataConfig, *, tokenizer, image_processor: ImagePreprocessor,
                 num_image_tokens: int, batch_size: int, **streaming_kwargs: Any):
        if cfg.remote is None and cfg.local is None:
            raise ValueError("data.remote or data.local must name the MDS shards")
        local = cfg.local or default_cache_dir(cfg.remote)
        super().__init__(
            remote=cfg.remote, local=local, split=cfg.split, batch_size=batch_size,
            shuffle=cfg.shuffle, shuffle_seed=cfg.seed, num_canonical_nodes=cfg.num_canonical_nodes,
            download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
            predownload=cfg.predownload, **streaming_kwargs,
        )
        self.cfg = cfg
        self.image_processor = image_processor
        self.prompt = PromptBuilder(tokenizer, num_image_tokens, cfg.max_len, cfg.caption_prompt)

    def encode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One MDS sample -> model-ready example. Raises BadSample for unusable samples."""
        image = raw["image"]
        pixels = None
        if image:
            try:
                pixels = self.image_processor.load(image)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise BadSample("bad_image", f"{type(err).__name__}: {err}") from None
        ids, labels = self.prompt(raw["caption"], raw["messages"], pixels is not None)
        return {"id": raw["id"], "input_ids": ids, "labels": labels, "pixel_values": pixels}

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Only this index's own failure is reported: every index is visited once per epoch, so
        # each unusable sample is counted exactly once, even when it is also tried as a substitute.
        skipped: list[tuple[str, str]] = []
        failures = []
        for k in range(self.cfg.max_substitutes + 1):
            raw = self.get_item((index + k) % self.num_samples)
            try:
                example = self.encode(raw)
            except BadSample as err:
                if k == 0:
                    log.warning("skipping sample %s (%s)", raw.get("id"), err)
                    skipped.append((raw.get("id", str(index)), err.reason))
                failures.append(f"{raw.get('id')}: {err}")
                continue
            example["skipped"] = skipped
            return example
        raise RuntimeError(
            f"{len(failures)} consecutive unusable samples from sample index {index} "
            f"({failures[:3]}...): the shards look broken; check them with the `pargo-dist convert` report"
        )


class ParGoLoader(StreamingDataLoader):
    """StreamingDataLoader that counts samples (not packed rows) for its resumable state."""

    def _get_batch_size(self, batch: Any) -> int:
        return batch["num_samples"]


def build_loader(cfg: DataConfig, *, tokenizer, image_processor: ImagePreprocessor, num_image_tokens: int,
                 batch_size: int, padding_side: str = "right", drop_last: bool = True,
                 replication: int = 1) -> ParGoLoader:
    """Dataset + collator + resumable loader for this rank (ranks come from RANK/WORLD_SIZE env).

    `replication`: that many consecutive ranks receive the same samples (the ranks of one
    tensor/pipeline-parallel model replica)."""
    from streaming.base.util import clean_stale_shared_memory

    from pargo_dist.data.collate import Collator

    clean_stale_shared_memory()
    dataset = ParGoDataset(cfg, tokenizer=tokenizer, image_processor=image_processor,
                           num_image_tokens=num_image_tokens, batch_size=batch_size,
                           replication=replication if replication > 1 else None)
    collate = Collator(pad_id=tokenizer.pad_token_id, padding_side=padding_side, pack=cfg.pack,
                       max_len=cfg.max_len if cfg.pack else None)
    return ParGoLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=cfg.num_workers,
                       drop_last=drop_last, persistent_workers=cfg.num_workers > 0)
