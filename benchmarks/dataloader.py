"""Data path throughput and resume cost, printed as tables.

1. Images per second per worker for decode + preprocess (336 px, CLIP-style) + template +
   tokenize + collate, reading MDS shards from a local directory and from an S3 server on
   loopback (moto_server, started here), 0 workers (in the main process) and 1 worker; one
   crop per image, and data.image.crops 2x2 (4 tiles + a thumbnail: 5 crops) from local shards.
2. Time to resume a loader at sample K (load_state_dict, then the first batch) versus the
   time to reach the same batch by replaying K samples through the loader.
3. Padding waste (pad tokens / all tokens of the batch tensors) of the collator, padded to each
   batch's longest sample vs packed (data.train.pack), each in the loader's random order and
   length-grouped (data.train.group_by_length), on a caption-length mix like LLaVA-1.5's
   instruction data: ParGo's 304 visual tokens plus text of 50 % short answers (8-40 tokens),
   35 % paragraphs (100-400) and 15 % long conversations (400-1,200); batch --batch, rows of
   max_len 2,048 when packed, 2,000 batches.

    python benchmarks/dataloader.py                      # K = 100,000
    python benchmarks/dataloader.py --resume-at 20000 --images 256
    python benchmarks/dataloader.py --only padding       # table 3 alone (under a minute)

Needs the test extras (moto[server]) for the S3 column.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pargo_dist  # noqa: E402,F401
from pargo_dist.data.crops import CropPolicy, ImageConfig  # noqa: E402
from pargo_dist.data.dataset import DataConfig, build_loader  # noqa: E402
from pargo_dist.data.image import ImagePreprocessor  # noqa: E402
from pargo_dist.data.schema import MDS_COLUMNS, make_sample  # noqa: E402
from pargo_dist.data.tokenizer import build_word_tokenizer  # noqa: E402

WORDS = ["a", "photo", "of", "red", "green", "blue", "cat", "dog", "car", "on", "the", "left", "right", ".",
         "Describe", "image", "in", "detail"]


def photo_jpeg(i: int, w: int = 640, h: int = 480) -> bytes:
    """A photo-like JPEG (smooth gradients + noise), LAION's typical size."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (1 + i % 3) + y) % 256, (y * 2 + i) % 256, (x + y * (1 + i % 5)) % 256], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def write(out, rows, size_limit="32mb"):
    from streaming import MDSWriter

    with MDSWriter(out=out, columns=MDS_COLUMNS, compression="zstd", size_limit=size_limit) as w:
        for row in rows:
            w.write(row)


def caption(i: int) -> str:
    return f"a photo of a {WORDS[3 + i % 3]} {WORDS[6 + i % 3]} on the {WORDS[12 + i % 2]} ."


def throughput(cfg: DataConfig, tok, pre, batch: int, tokens: dict[int, int]) -> float:
    """Images per second (per worker when workers > 0) over one epoch."""
    loader = build_loader(cfg, tokenizer=tok, image_processor=pre, num_image_tokens=tokens, batch_size=batch)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 0:  # exclude start-up (worker spawn, index download)
            t0 = time.perf_counter()
            continue
        n += b.num_samples
    return n / (time.perf_counter() - t0) / max(1, cfg.num_workers)


def llava_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Tokens per sample: 304 visual + text from a short / paragraph / conversation mix."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.5, 0.35, 0.15])
    text = np.where(kind == 0, rng.integers(8, 41, n), np.where(kind == 1, rng.integers(100, 401, n),
                                                                 rng.integers(400, 1201, n)))
    return (304 + text).tolist()


def padding_waste(batch: int, batches: int = 2000, max_len: int = 2048, ranks: int = 8) -> None:
    """Table 3: the real Collator on token-only examples of llava_like_lengths, in the loader's
    order (a random one) and in data.group_by_length's order (grouping.group_positions, the code
    the loader runs, with the default group_block and group_size). The loader sorts by an
    estimate, not by the true lengths: the sidecar's characters / 4. How far that is off depends
    on the text; the grouped rows sort by the true lengths, then by estimates for text whose
    characters per token vary per sample from 3.5 to 4.5 and from 3 to 5. Grouped micro-batches
    are laid out as streaming does over `ranks` ranks (rank r takes positions r, r + ranks, ...
    of each step of ranks x batch positions)."""
    from pargo_dist.data.collate import Collator
    from pargo_dist.data.grouping import CHARS_PER_TOKEN, group_positions
    from pargo_dist.data.sources import DataConfig

    lengths = np.asarray(llava_like_lengths(batch * batches))
    cfg = DataConfig()

    def grouped(low: float, high: float) -> list[np.ndarray]:
        """Micro-batches in the grouped order, sorted by estimates from low-high characters per token."""
        chars = np.round((lengths - 304) * np.random.default_rng(1).uniform(low, high, len(lengths)))
        estimate = 304 + np.ceil(chars / CHARS_PER_TOKEN)  # what the loader computes from the sidecar
        order = group_positions(estimate, num_canonical_nodes=1, block=cfg.group_block, group=cfg.group_size,
                                seed=0, epoch=0)
        step = ranks * batch
        return [lengths[order][s:s + step][r::ranks] for s in range(0, len(lengths) - step + 1, step)
                for r in range(ranks)]

    plain = [lengths[b * batch:(b + 1) * batch] for b in range(batches)]
    padded, packed = Collator(pad_id=0), Collator(pad_id=0, pack=True, max_len=max_len)
    print(f"\nPadding waste, batch {batch}, {batches:,} batches of a LLaVA-like length mix "
          f"(mean {np.mean(lengths):.0f}, max {max(lengths)} tokens; packed rows of up to {max_len}; grouped: "
          f"group_block {cfg.group_block}, group_size {cfg.group_size}, {ranks} ranks x batch {batch})")
    print(f"{'collation':>36} {'rows/batch':>11} {'width':>7} {'pad tokens / all':>17}")
    for name, collate, micro_batches in (
            ("padded to the longest", padded, plain), ("packed", packed, plain),
            ("grouped, sorted by true lengths", padded, grouped(CHARS_PER_TOKEN, CHARS_PER_TOKEN)),
            ("grouped, estimate 3.5-4.5 chars/tok", padded, grouped(3.5, 4.5)),
            ("grouped, estimate 3-5 chars/tok", padded, grouped(3.0, 5.0)),
            ("grouped (3.5-4.5) + packed", packed, grouped(3.5, 4.5))):
        pad = total = rows = width = 0
        for lens in micro_batches:
            examples = [{"id": str(i), "input_ids": [1] * int(k), "labels": [1] * int(k)} for i, k in enumerate(lens)]
            out = collate(examples)
            cells = out.input_ids.numel()
            pad, total = pad + cells - out.num_tokens, total + cells
            rows, width = rows + out.input_ids.shape[0], width + out.input_ids.shape[1]
        n = len(micro_batches)
        print(f"{name:>36} {rows / n:>11.1f} {width / n:>7.0f} {100 * pad / total:>16.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=512, help="photo-like JPEGs for the throughput table")
    ap.add_argument("--resume-at", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--only", choices=["padding"], help="print one table only")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.only == "padding":
        padding_waste(args.batch)
        return
    from streaming.base.util import clean_stale_shared_memory

    tmp = Path(tempfile.mkdtemp(prefix="pargo_bench_"))
    tok = build_word_tokenizer(WORDS)
    pre = ImagePreprocessor(size=336, resize_to=336)
    photos = [make_sample(f"p{i}", photo_jpeg(i), caption=caption(i)) for i in range(args.images)]
    write(str(tmp / "local"), photos)

    rows = []
    server = None
    try:
        from support.s3 import start_moto

        server = start_moto()
        os.environ.update(server.env())
        remote = server.make_bucket("bench") + "/photos"
        write((str(tmp / "stage"), remote), photos)
    except Exception as err:  # noqa: BLE001  (no moto, no boto3: the local rows still run)
        print(f"(S3 column skipped: {err})")
        if server is not None:
            server.process.terminate()
        server = None
    try:
        grid = replace(pre, crops=CropPolicy.from_config(ImageConfig(crops="2x2")))  # 4 tiles + thumbnail
        for workers in (0, 1):
            for source, crops in [("local", "1"), ("local", "2x2")] + ([("s3", "1")] if server else []):
                clean_stale_shared_memory()
                where = ({"local": str(tmp / "local")} if source == "local"
                         else {"remote": remote, "local": str(tmp / f"cache{workers}")})
                cfg = DataConfig(**where, shuffle=False, num_workers=workers, max_len=512)
                tokens = {1: 304} if crops == "1" else {5: 304}
                ips = throughput(cfg, tok, pre if crops == "1" else grid, args.batch, tokens)
                rows.append((source, workers, crops, ips))

        print(f"\nDecode + preprocess (336 px crops) + tokenize + collate, {args.images} JPEGs of 640x480, "
              f"batch {args.batch}")
        print(f"{'source':>8} {'workers':>8} {'crops':>6} {'images/s per worker':>20} {'crops/s':>8}")
        for source, workers, crops, ips in rows:
            per_image = 1 if crops == "1" else 5
            print(f"{source:>8} {workers:>8} {crops:>6} {ips:>20.1f} {ips * per_image:>8.0f}")

        # Resume vs replay, on many tiny samples (the cost is the bookkeeping, not the pixels).
        K, B = args.resume_at, args.batch
        total = K + 4 * B
        write(str(tmp / "many"), (make_sample(f"m{i}", tiny_png(i), caption=caption(i)) for i in range(total)),
              size_limit="8mb")
        small = ImagePreprocessor(size=8, resize_to=8)
        cfg = DataConfig(local=str(tmp / "many"), shuffle=True, seed=1, max_len=64)
        clean_stale_shared_memory()
        loader = build_loader(cfg, tokenizer=tok, image_processor=small, num_image_tokens=4, batch_size=B)
        t0 = time.perf_counter()
        it = iter(loader)
        for _ in range(K // B):
            next(it)
        state = loader.state_dict()  # what a checkpoint at sample K holds
        target = next(it).sample_ids
        replay = time.perf_counter() - t0
        del it, loader
        clean_stale_shared_memory()
        t0 = time.perf_counter()
        resumed = build_loader(cfg, tokenizer=tok, image_processor=small, num_image_tokens=4, batch_size=B)
        resumed.load_state_dict(state)
        got = next(iter(resumed)).sample_ids
        restore = time.perf_counter() - t0
        assert got == target, "resumed loader did not continue at the same batch"
        print(f"\nReach sample {K:,} (batch {B}): restore vs replay, same next batch checked")
        print(f"{'method':>10} {'seconds':>10} {'x':>8}")
        print(f"{'restore':>10} {restore:>10.2f} {1.0:>8.1f}")
        print(f"{'replay':>10} {replay:>10.2f} {replay / restore:>8.1f}")
        padding_waste(args.batch)
    finally:
        if server:
            server.process.terminate()


if __name__ == "__main__":
    main()
