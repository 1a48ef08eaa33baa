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
in lock-step) and the count reaches the logs. A shard file that does not decompress at all is
not skipped: it is a `DamagedShard` error naming the file (see `ParGoDataset.prepare_shard`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import traceback
import warnings
from typing import Any, Mapping

from PIL import UnidentifiedImageError
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState

from pargo_dist.data import grouping
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.prompt import PromptBuilder
from pargo_dist.data.schema import BadSample
from pargo_dist.data.sources import DataConfig, StreamConfig  # noqa: F401  (re-exported)
from pargo_dist.errors import DamagedShard, UserError
from pargo_dist.runtime.cache import cache_dir

log = logging.getLogger(__name__)
# streaming's note that a `replication` resume counts replicated samples: ParGoLoader counts them once
warnings.filterwarnings("ignore", message=r"The `replication` arg has been set.*")


def default_cache_dir(remote: str) -> str:
    """A local cache dir unique to the remote (streaming needs one local dir per dataset), under
    PARGO_DIST_CACHE (pargo_dist/runtime/cache.py)."""
    return str(cache_dir("streaming") / hashlib.sha1(remote.encode()).hexdigest()[:16])


def stream_names(cfg: DataConfig) -> list[str]:
    """The mixture's stream labels, in order (one unnamed "data" stream without a mixture)."""
    if not cfg.streams:
        return ["data"]
    names = [s.name or (s.remote or s.local or f"stream{i}").rstrip("/").rsplit("/", 1)[-1]
             for i, s in enumerate(cfg.streams)]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def _streams(cfg: DataConfig) -> list[Stream]:
    out = []
    for i, s in enumerate(cfg.streams):
        if s.remote is None and s.local is None:
            raise UserError(f"data streams[{i}]: remote or local must name the MDS shards")
        out.append(Stream(remote=s.remote, local=s.local or default_cache_dir(s.remote), split=s.split,
                          proportion=s.proportion, repeat=s.repeat, choose=s.choose))
    return out


def _while_decompressing(err: BaseException) -> bool:
    """Whether `err` came from decompressing (or checksumming) a shard streaming has on disk, not
    from downloading it or from the local disk (an OSError with an errno: disk full, I/O error).
    Told by the frame it passed through, because the codecs' errors (zstd.Error, zlib.error,
    BadGzipFile, ...) share no base class (streaming pinned at 0.13.0: test_streaming checks it)."""
    if isinstance(err, OSError) and err.errno is not None:
        return False
    return any(frame.f_code.co_name == "_decompress_shard_part" for frame, _ in traceback.walk_tb(err.__traceback__))


class ParGoDataset(StreamingDataset):
    _damaged: DamagedShard | None = None  # a shard that did not decompress in streaming's background threads

    def __init__(self, cfg: DataConfig, *, tokenizer, image_processor: ImagePreprocessor,
                 num_image_tokens: int | Mapping[int, int], batch_size: int, **streaming_kwargs: Any):
        """`num_image_tokens`: visual tokens per image, or {crops: tokens} for every crop count
        `image_processor.crops` can give (see PromptBuilder)."""
        if cfg.streams and (cfg.remote or cfg.local):
            raise UserError("data: give remote/local or streams (a mixture), not both")
        if not cfg.streams and cfg.remote is None and cfg.local is None:
            raise UserError("data.remote or data.local must name the MDS shards")
        if not cfg.streams and cfg.remote is None and not os.path.exists(os.path.join(cfg.local, cfg.split or "",
                                                                                        "index.json")):
            raise UserError(f"{cfg.local} holds no MDS dataset (no index.json): convert the data with `pargo-dist "
                            "convert` (or `pargo-dist synth`) and point the recipe's data.*.local at the output")
        where = {"streams": _streams(cfg), "epoch_size": cfg.epoch_size} if cfg.streams else {
            "remote": cfg.remote, "local": cfg.local or default_cache_dir(cfg.remote)}
        try:
            super().__init__(
                **where, split=cfg.split, batch_size=batch_size,
                shuffle=cfg.shuffle, shuffle_seed=cfg.seed, num_canonical_nodes=cfg.num_canonical_nodes,
                download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
                predownload=cfg.predownload, **streaming_kwargs,
            )
        except ValueError as err:  # streaming's own checks of the weights (proportion on every stream, ...)
            raise UserError(f"data {'streams' if cfg.streams else 'source'}: {err}") from None
        self.cfg = cfg
        self.excluded = set(cfg.skip_ids)  # sample ids replaced like unusable ones (ParGoLoader.exclude)
        self.image_processor = image_processor
        self.prompt = PromptBuilder(tokenizer, num_image_tokens, cfg.max_len, cfg.caption_prompt)
        # estimated tokens per sample, from the shards' lengths.npz (data.group_by_length; grouping.py)
        self.sample_lengths = grouping.sample_lengths(self) if cfg.group_by_length else None

    def resample_streams(self, epoch: int, stream_id: int | None = None):
        """streaming's map from the epoch's shuffled slots to samples; with data.group_by_length,
        reordered so that the epoch's order is length-grouped (grouping.py: rank-count free)."""
        units, samples = super().resample_streams(epoch, stream_id)
        if self.sample_lengths is not None and stream_id is None:
            samples = grouping.regroup(self, units, samples, epoch)
        return units, samples

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        return {**super().state_dict(num_samples, from_beginning), **grouping.state(self.cfg)}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        grouping.check_resume(self.cfg, obj)  # a position means the saved order: other grouping settings are logged
        super().load_state_dict(obj)
        # streaming takes a saved position from an epoch before its own next one for a stale
        # state and starts a new epoch: in a process that already iterated (a rollback restores
        # an earlier position in place) the next epoch must be the saved one again
        self.next_epoch = obj["epoch"]

    def encode(self, raw: dict[str, Any]) -> dict[str, Any]:
        """One MDS sample -> model-ready example. Raises BadSample for unusable samples."""
        image = raw["image"]
        pixels = None
        if image:
            try:
                pixels = self.image_processor.load(image, normalize=False)  # uint8 (crops, 3, H, W)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
                raise BadSample("bad_image", f"{type(err).__name__}: {err}") from None
        ids, labels = self.prompt(raw["caption"], raw["messages"], 0 if pixels is None else len(pixels))
        return {"id": raw["id"], "input_ids": ids, "labels": labels, "pixel_values": pixels}

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Only this index's own failure is reported: every index is visited once per epoch, so
        # each unusable sample is counted exactly once, even when it is also tried as a substitute.
        skipped: list[tuple[str, str]] = []
        failures = []
        for k in range(self.cfg.max_substitutes + 1):
            sample = (index + k) % self.num_samples
            raw: dict[str, Any] = {}
            try:
                raw = self.read(sample)
                if raw.get("id") in self.excluded:
                    raise BadSample("excluded", "in data.skip_ids or skipped after a rollback")
                example = self.encode(raw)
            except BadSample as err:
                name = raw.get("id") or f"{self.shard_file(sample)}#{sample}"
                if k == 0:
                    log.warning("skipping sample %s (%s)", name, err)
                    skipped.append((name, err.reason))
                failures.append(f"{name}: {err}")
                continue
            example["skipped"] = skipped
            example["stream"] = int(self.stream_per_shard[self.spanner[sample][0]])  # for per-stream counts
            return example
        raise UserError(
            f"{len(failures)} consecutive unusable samples from sample index {index} ({'; '.join(failures[:3])}"
            "...): the shards look damaged; check them against the `pargo-dist convert` report or convert again")

    def shard_file(self, sample: int) -> str:
        """The shard file that holds `sample` (for messages)."""
        shard = self.shards[self.spanner[sample][0]]
        raw, _ = shard.file_pairs[-1]  # (meta,) data: the file the sample's bytes live in
        return os.path.join(shard.dirname, shard.split or "", raw.basename)

    def read(self, sample: int) -> dict[str, Any]:
        """The raw record of `sample`. Bytes that do not decode (a shard truncated or overwritten
        after it was written) make it a BadSample naming the shard: skipped and counted like a
        corrupt image, and if a whole run of samples is damaged, an error naming the shard.
        A shard that cannot be downloaded raises as it is (streaming retried it already), one that
        does not decompress is a DamagedShard (`prepare_shard`)."""
        try:
            return self.get_item(sample)
        except UserError:
            raise
        except RuntimeError:  # streaming's "Background thread failed": a damaged shard says which
            self._raise_damaged()
            raise
        except (ValueError, IndexError, KeyError, EOFError, struct.error) as err:
            raise BadSample("damaged_record", f"{self.shard_file(sample)}: {type(err).__name__}: {err}") from None

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's download + decompression of a shard; one that does not decompress is a
        DamagedShard naming the stream and the file, raised where samples are read.

        streaming also prepares shards ahead in two background threads (blocking=False there).
        An exception in them is only logged (a traceback) and ends the epoch early without a
        word, so the error is kept and raised by the reading thread (`read`, `__iter__`), and
        streaming's stop event ends those threads. The shard is marked not prepared again: left
        "preparing", a reader waiting for it would wait forever; now it tries it and raises."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            if not _while_decompressing(err):
                raise
            self._shard_states[shard_id] = _ShardState.REMOTE
            self._damaged = DamagedShard(self._damaged_message(shard_id))
            if getattr(self, "_event", None) is not None:
                self._event.set()
            if blocking:
                raise self._damaged from None

    def _damaged_message(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw, zipped = self.shards[shard_id].file_pairs[-1]
        name = (zipped or raw).basename
        local = os.path.join(stream.local, stream.split) if stream.split else stream.local
        where, fix = local, "re-convert it with `pargo-dist convert` or re-upload it"
        if stream.remote:
            where = "/".join(filter(None, [stream.remote.rstrip("/"), stream.split])) + f" (cached in {local})"
            fix += f", then delete the cached copy {os.path.join(local, name)}"
        return (f"data stream {where}: shard {name} is damaged (it does not decompress: truncated or "
                f"overwritten after it was written); {fix}")

    def _raise_damaged(self) -> None:
        if self._damaged is not None:
            raise self._damaged

    def __iter__(self):
        yield from super().__iter__()
        self._raise_damaged()  # met by a background thread: streaming ended the epoch early


class ParGoLoader(StreamingDataLoader):
    """StreamingDataLoader that counts samples (not packed rows) for its resumable state."""

    def _get_batch_size(self, batch: Any) -> int:
        return batch.num_samples

    def exclude(self, ids) -> None:
        """Never yield these sample ids again: each is replaced by the next usable sample, as an
        unusable one is (the run's rollback after a divergence, pargo_dist/train/divergence.py). Persistent
        workers hold a copy of the dataset made when they started: they are shut down, and the
        next iteration starts workers with the new set."""
        self.dataset.excluded.update(ids)
        workers = getattr(self, "_iterator", None)  # torch keeps persistent workers' iterator here
        if workers is not None:
            workers._shutdown_workers()
            self._iterator = None

    def __iter__(self):
        """A UserError raised in a loader worker (data.num_workers > 0) arrives re-made by torch
        with the worker's whole traceback as its message ("Caught DamagedShard in DataLoader
        worker process 0. Original Traceback ..."): raised again with its own one line only."""
        try:
            yield from super().__iter__()
        except UserError as err:
            raise type(err)(_own_message(err)) from None


def _own_message(err: UserError) -> str:
    """The message a UserError was raised with, out of torch's worker wrapper if it has one: the
    traceback's last line, "pargo_dist.errors.DamagedShard: <message>"."""
    text = str(err)
    if not text.startswith(f"Caught {type(err).__name__} in DataLoader worker"):
        return text
    return text.rstrip().splitlines()[-1].partition(": ")[2]


def build_loader(cfg: DataConfig, *, tokenizer, image_processor: ImagePreprocessor,
                 num_image_tokens: int | Mapping[int, int],
                 batch_size: int, padding_side: str = "right", drop_last: bool = True,
                 replication: int = 1) -> ParGoLoader:
    """Dataset + collator + resumable loader for this rank (ranks come from RANK/WORLD_SIZE env).

    `replication`: that many consecutive ranks receive the same samples (the ranks of one
    tensor/pipeline-parallel model replica)."""
    from pargo_dist.data.collate import Collator
    from pargo_dist.data.shared_memory import remove_stale_shared_memory

    remove_stale_shared_memory()  # a killed run's registrations, not a live process's
    dataset = ParGoDataset(cfg, tokenizer=tokenizer, image_processor=image_processor,
                           num_image_tokens=num_image_tokens, batch_size=batch_size,
                           replication=replication if replication > 1 else None)
    collate = Collator(pad_id=tokenizer.pad_token_id, padding_side=padding_side, pack=cfg.pack,
                       max_len=cfg.max_len if cfg.pack else None,
                       pixel_mean=tuple(image_processor.mean), pixel_std=tuple(image_processor.std))
    return ParGoLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=cfg.num_workers,
                       drop_last=drop_last, persistent_workers=cfg.num_workers > 0)
