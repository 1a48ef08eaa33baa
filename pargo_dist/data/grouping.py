"""Length-grouped batches (`data.train.group_by_length`): micro-batches of similar length.

Why
---
A batch is padded to its longest sample. On a LLaVA-like mix (short answers, paragraphs, long
conversations; images and text-only) a random batch is over half padding, and packing leaves
a tenth or more (docs/data.md). Sorting by length helps, but must not cost what the loader
already guarantees: the identical next batches after a resume, also on another number of
ranks, without reading the samples that were consumed.

How
---
streaming's resumable state is one number, the position in the epoch's global order (samples
consumed); the order itself is a function of the seed, the epoch and `num_canonical_nodes`,
and the partition over nodes, ranks and workers is laid over it. So the grouping is one more
deterministic permutation of that order, a function of (seed, epoch, per-sample lengths,
block and group size) only, never of the rank count. Resume and elastic resume then stay
exact for free: the same positions hold the same samples for any world. (The loader state
records the two sizes; a resume with other grouping settings is allowed, and warned about.)

The permutation: each canonical node consumes its contiguous range of positions in order, and
a global step takes the next positions of every canonical node. Each range is cut into blocks
of `group_block / num_canonical_nodes` consecutive positions; a block's samples are sorted by
their estimated length (stable, so ties keep the shuffled order), cut into groups of
`group_size / num_canonical_nodes`, and the full groups are put in a seeded random order (the
same order on every canonical node, so a step's positions on all of them are at the same
length quantile); a last, partial group stays at the block's end, where it keeps the groups
before it aligned to steps. A step that lies inside one group gives every rank a micro-batch
of similar length (ranks take strided positions of the step), and the model still sees short
and long groups in random order. Reordering stays within a block, far smaller than streaming's
shuffle block (2^18 samples), so which shards are read when barely changes.

The hook is `ParGoDataset.resample_streams`, the epoch's map from streaming's shuffled slots to
samples, which every batching method lays out: the grouped order is folded into that map
(`regroup`), so partitioning, the drop of consumed samples on resume, the shared-memory hand-off
to workers and mixtures all stay streaming's own code.

Lengths come from a small sidecar that `pargo-dist convert` and `pargo-dist synth` write next to
each split's index.json, `lengths.npz`: per sample, the characters of its text (caption or
message contents), its turns (0: a caption), and its image's width and height (0: none). The
loader never reads a shard for them. The estimated tokens of a sample are its visual tokens
(`ImagePreprocessor.crop_count` -> `PromptBuilder.visual_tokens`, so crops count) plus its
characters / CHARS_PER_TOKEN plus TOKENS_PER_TURN per turn, capped at max_len; samples with and
without images fall apart by their visual tokens. For shards converted before the sidecar
existed: `python -m pargo_dist.data.grouping DATASET` writes it (reads every sample once).
"""

from __future__ import annotations

import io
import logging
import os
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from pargo_dist.errors import UserError

log = logging.getLogger(__name__)

SIDECAR = "lengths.npz"
COLUMNS = ("text_chars", "turns", "width", "height")
CHARS_PER_TOKEN = 4  # English BPE averages ~4 characters a token; only the order of estimates matters
TOKENS_PER_TURN = 4  # the chat template's role markers and end-of-turn token


# --------------------------------------------------------------------------- the sidecar


def sample_sizes(sample: dict[str, Any]) -> tuple[int, int, int, int]:
    """(text characters, turns (0: a caption), image width, image height) of an MDS sample dict.
    An image whose header does not decode counts as none: the loader skips that sample anyway
    (and counts it), so its length only has to be some length."""
    chars = len(sample.get("caption") or "") + sum(len(m["content"]) for m in sample.get("messages") or [])
    width = height = 0
    if sample.get("image"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(sample["image"])) as img:  # the header only
                width, height = img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            pass
    return chars, len(sample.get("messages") or []), width, height


class SizeLog:
    """Collects `sample_sizes` of the samples a writer writes, in order, and saves the sidecar."""

    def __init__(self) -> None:
        self.columns = {name: array("q") for name in COLUMNS}

    def add(self, sample: dict[str, Any]) -> None:
        for name, value in zip(COLUMNS, sample_sizes(sample)):
            self.columns[name].append(value)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, SIDECAR)
        os.makedirs(directory, exist_ok=True)
        with open(path, "wb") as f:  # a file object: numpy would append ".npz" to a name again
            np.savez_compressed(f, **{name: np.asarray(col, np.int32) for name, col in self.columns.items()})
        return path


def read_sidecar(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        missing = [c for c in COLUMNS if c not in z.files]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)}: not a pargo_dist lengths file; delete it and "
                            f"write it again (python -m pargo_dist.data.grouping)")
        return {c: z[c].astype(np.int64) for c in COLUMNS}


def _where(stream) -> str:
    return os.path.join(stream.remote or stream.local, stream.split or "").rstrip("/")


def _not_found(err: Exception) -> bool:
    """A missing object (streaming's downloaders raise FileNotFoundError, its S3 one boto's 403/404)."""
    from streaming.base.storage.download import BOTOCORE_CLIENT_ERROR_CODES

    response = getattr(err, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return isinstance(err, FileNotFoundError) or code in BOTOCORE_CLIENT_ERROR_CODES


def fetch_sidecar(stream, is_local_leader: bool) -> str:
    """The local path of a stream's sidecar; a remote one is downloaded once per node (local
    rank 0, like streaming's index.json; the other ranks wait for it)."""
    path = os.path.join(stream.local, stream.split or "", SIDECAR)
    if os.path.exists(path):
        return path
    fix = (f"re-run `pargo-dist convert` (or `pargo-dist synth`), which writes it, or add it to these shards "
           f"with `python -m pargo_dist.data.grouping {_where(stream)}`")
    if not stream.remote:
        raise UserError(f"data.group_by_length needs {SIDECAR} next to {_where(stream)}/index.json (each "
                        f"sample's text and image sizes) and there is none: {fix}")
    if not is_local_leader:
        deadline = time.monotonic() + stream.download_timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise UserError(f"{_where(stream)}/{SIDECAR} did not reach {path} within {stream.download_timeout}s "
                                "(see local rank 0's error)")
            time.sleep(0.1)
        return path
    from streaming.base.storage import CloudDownloader

    remote = os.path.join(stream.remote, stream.split or "", SIDECAR)
    part = f"{path}.{os.getpid()}.tmp"  # this process's own: a node sharing the dir cannot interleave with it
    try:
        for attempt in range(stream.download_retry + 1):
            try:
                CloudDownloader.direct_download(remote, part, stream.download_timeout)
                break
            except Exception as err:
                if _not_found(err):
                    raise UserError(f"data.group_by_length needs {remote} (each sample's text and image sizes, "
                                    f"next to index.json) and there is none (or it is not readable): {fix}") from None
                if attempt == stream.download_retry:
                    raise
                time.sleep(2 ** attempt)
        os.replace(part, path)  # atomic: the other ranks never read half a file
    finally:
        if os.path.exists(part):
            os.remove(part)
    return path


# --------------------------------------------------------------------------- estimated lengths


def estimate_tokens(sizes: dict[str, np.ndarray], *, crop_count: Callable[[int, int], int],
                    visual_tokens: Callable[[int], int], caption_prompt: str, max_len: int) -> np.ndarray:
    """Estimated tokens of every sample (visual + text, at most max_len) from its sizes."""
    caption = sizes["turns"] == 0
    chars = sizes["text_chars"] + np.where(caption, len(caption_prompt), 0)  # captions get the prompt turn
    turns = np.where(caption, 2, sizes["turns"])
    text = -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_TURN * turns
    visual = np.zeros_like(text)
    has = (sizes["width"] > 0) & (sizes["height"] > 0)
    if has.any():  # one crop_count per distinct size, not per sample
        wh, inverse = np.unique(np.stack([sizes["width"][has], sizes["height"][has]], 1), axis=0,
                                return_inverse=True)
        per_size = np.array([visual_tokens(crop_count(int(w), int(h))) for w, h in wh], np.int64)
        visual[has] = per_size[inverse.reshape(-1)]
    return np.minimum(visual + text, max_len).astype(np.int32)


def check_config(cfg) -> None:
    """The grouping knobs of a DataConfig (a UserError that says what to set)."""
    if cfg.group_size < 1 or cfg.group_block < 1:
        raise UserError(f"data.group_size ({cfg.group_size}) and data.group_block ({cfg.group_block}) must be >= 1")
    if cfg.group_block % cfg.group_size:
        raise UserError(f"data.group_block ({cfg.group_block}) must be a multiple of data.group_size "
                        f"({cfg.group_size}), or the groups after a block's first would straddle steps")


def sample_lengths(dataset) -> np.ndarray:
    """Estimated tokens of every sample of the dataset (all streams, in streaming's sample ids)."""
    check_config(dataset.cfg)
    leader = dataset._unique_rank_world.is_local_leader
    out = []
    for i, stream in enumerate(dataset.streams):
        sizes = read_sidecar(fetch_sidecar(stream, leader))
        expected = int(dataset.samples_per_stream[i])
        if len(sizes["turns"]) != expected:
            raise UserError(f"{_where(stream)}/{SIDECAR} lists {len(sizes['turns'])} samples but its index.json "
                            f"{expected}: it belongs to other shards (a cached copy of a replaced dataset?); "
                            f"delete it (and the cache) or write it again (python -m pargo_dist.data.grouping)")
        out.append(estimate_tokens(sizes, crop_count=dataset.image_processor.crop_count,
                                   visual_tokens=dataset.prompt.visual_tokens,
                                   caption_prompt=dataset.cfg.caption_prompt, max_len=dataset.cfg.max_len))
    return np.concatenate(out)


# --------------------------------------------------------------------------- the permutation


def group_positions(lengths_at: np.ndarray, *, num_canonical_nodes: int, block: int, group: int,
                    seed: int, epoch: int) -> np.ndarray:
    """The grouped order of an epoch: `perm` such that position p takes the sample that was at
    position perm[p]. `lengths_at[p]`: the estimated length of the sample at position p;
    `block` and `group` are in samples of the global order (per canonical node: / nodes)."""
    n = len(lengths_at)
    nodes = max(1, num_canonical_nodes)
    g = max(1, group // nodes)
    k = max(g, block // nodes // g * g)
    perm = np.arange(n, dtype=np.int64)
    for c in range(nodes):  # streaming's canonical node c consumes positions [c*n//nodes, (c+1)*n//nodes) in order
        lo, hi = c * n // nodes, (c + 1) * n // nodes
        for b, start in enumerate(range(lo, hi, k)):
            stop = min(start + k, hi)
            order = start + np.argsort(lengths_at[start:stop], kind="stable")
            full = (stop - start) // g
            # seeded by block, not canonical node: every node puts the same length quantile at the same step
            rng = np.random.default_rng([seed, epoch, b, 0x9A12])
            perm[start:start + full * g] = order[:full * g].reshape(full, g)[rng.permutation(full)].reshape(-1)
            perm[start + full * g:stop] = order[full * g:]
    return perm


def regroup(dataset, shuffle_units: np.ndarray, small_per_big: np.ndarray,
            epoch: int) -> np.ndarray:
    """`resample_streams`' slot -> sample map, changed so that streaming's own layout (sample at
    position p = map[shuffle[p]]) yields the grouped order."""
    from streaming.base.shuffle import get_shuffle

    if dataset.shuffle:  # the very shuffle random batching applies next (same arguments, deterministic)
        shuffle = get_shuffle(dataset.shuffle_algo, shuffle_units, dataset.num_canonical_nodes,
                              dataset.shuffle_seed, epoch, dataset.shuffle_block_size)
    else:
        shuffle = np.arange(len(small_per_big), dtype=np.int64)
    at = small_per_big[shuffle]  # the sample at each position, ungrouped
    perm = group_positions(dataset.sample_lengths[at], num_canonical_nodes=dataset.num_canonical_nodes,
                           block=dataset.cfg.group_block, group=dataset.cfg.group_size,
                           seed=dataset.shuffle_seed, epoch=epoch)
    out = np.empty_like(small_per_big)
    out[shuffle] = at[perm]
    return out


def state(cfg) -> dict[str, Any]:
    """What the loader state records of the grouping (nothing when off: older states read as off)."""
    return {"group_by_length": [cfg.group_block, cfg.group_size]} if cfg.group_by_length else {}


def check_resume(cfg, saved: dict[str, Any]) -> None:
    """A resume with other grouping settings than the state's: the saved position means another
    order for the rest of that epoch. Allowed (that is how grouping is switched on in a run), said."""
    was, now = saved.get("group_by_length"), state(cfg).get("group_by_length")
    if was != now:
        def say(v):
            return f"group_block {v[0]}, group_size {v[1]}" if v else "off"

        log.warning("resuming with data.group_by_length %s, but the loader state was saved with %s: the rest of "
                    "epoch %s follows the new order, so some of its samples may come twice and others not at all; "
                    "later epochs are exact again", say(now), say(was), saved.get("epoch"))


# --------------------------------------------------------------------------- shards without a sidecar


def add_lengths(dataset: str, split: str | None = None) -> str:
    """Write the sidecar of an existing MDS dataset (a local dir or a remote such as
    s3://bucket/prefix, where it is uploaded next to index.json). Reads every sample once
    (images: the header only); a remote's shards pass through a temporary dir one at a time.
    Returns where it went."""
    import shutil
    import tempfile
    import urllib.parse

    from streaming import StreamingDataset

    from pargo_dist.data.shared_memory import remove_stale_shared_memory

    remote = dataset if len(urllib.parse.urlparse(dataset).scheme) > 1 else None
    local = tempfile.mkdtemp(prefix="pargo-lengths-") if remote else dataset
    try:
        remove_stale_shared_memory()
        ds = StreamingDataset(remote=remote, local=local, split=split, shuffle=False, batch_size=1)
        log, shard = SizeLog(), None
        for i in range(ds.num_samples):
            if remote and shard is not None and ds.spanner[i][0] != shard:
                ds.evict_shard(shard)  # done with it: the disk holds one shard at a time
            shard = ds.spanner[i][0]
            log.add(ds.get_item(i))
        directory = os.path.join(local, split or "")
        log.save(directory)
        if remote is None:
            return os.path.join(directory, SIDECAR)
        from streaming.base.storage import CloudUploader

        target = os.path.join(remote, split or "")
        CloudUploader.get((directory, target), exist_ok=True).upload_file(SIDECAR)
        return f"{target.rstrip('/')}/{SIDECAR}"
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pargo_dist.data.grouping",
                                 description=f"Write {SIDECAR} (what data.group_by_length needs) for MDS shards "
                                             "converted without it.")
    ap.add_argument("dataset", help="the split's directory or remote (s3://bucket/prefix), where index.json is")
    ap.add_argument("--split", help="a split below it (streaming's split)")
    args = ap.parse_args(argv)
    print(f"wrote {add_lengths(args.dataset, args.split)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
