"""Data path throughput and resume cost, printed as tables.

1. Images per second per worker for decode + preprocess (336 px, CLIP-style) + template +
   tokenize, reading MDS shards from a local directory and from an S3 server on loopback
   (moto_server, started here), 0 workers (in the main process) and 1 worker.
2. Time to resume a loader at sample K (load_state_dict, then the first batch) versus the
   time to reach the same batch by replaying K samples through the loader.
3. Padding waste (pad tokens / all tokens of the batch tensors) of the collator, padded to each
   batch's longest sample vs packed (data.train.pack), on a caption-length mix like LLaVA-1.5's
   instruction data: ParGo's 304 visual tokens plus text of 50 % short answers (8-40 tokens),
   35 % paragraphs (100-400) and 15 % long conversations (400-1,200); batch --batch, rows of
   max_len 2,048 when packed, 2,000 batches.

    python benchmarks/dataloader.py                      # K = 100,000
    python benchmarks/dataloader.py --resume-at 20000 --images 256
    python benchmarks/dataloader.py --only padding       # table 3 alone (seconds)

Needs the test extras (moto[server]) for the S3 column.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import pargo_dist  # noqa: E402,F401
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


def throughput(cfg: DataConfig, tok, pre, batch: int) -> float:
    """Images per second (per worker when workers > 0) over one epoch."""
    loader = build_loader(cfg, tokenizer=tok, image_processor=pre, num_image_tokens=304, batch_size=batch)
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


def padding_waste(batch: int, batches: int = 2000, max_len: int = 2048) -> None:
    """Table 3: the real Collator on token-only examples of llava_like_lengths."""
    from pargo_dist.data.collate import Collator

    lengths = llava_like_lengths(batch * batches)
    print(f"\nPadding waste, batch {batch}, {batches:,} batches of a LLaVA-like length mix "
          f"(mean {np.mean(lengths):.0f}, max {max(lengths)} tokens; packed rows of up to {max_len})")
    print(f"{'collation':>22} {'rows/batch':>11} {'width':>7} {'pad tokens / all':>17}")
    for name, collate in (("padded to the longest", Collator(pad_id=0)),
                          ("packed", Collator(pad_id=0, pack=True, max_len=max_len))):
        pad = total = rows = width = 0
        for b in range(batches):
            examples = [{"id": str(i), "input_ids": [1] * k, "labels": [1] * k}
                        for i, k in enumerate(lengths[b * batch:(b + 1) * batch])]
            out = collate(examples)
            cells = out.input_ids.numel()
            pad, total = pad + cells - out.num_tokens, total + cells
            rows, width = rows + out.input_ids.shape[0], width + out.input_ids.shape[1]
        print(f"{name:>22} {rows / batches:>11.1f} {width / batches:>7.0f} {100 * pad / total:>16.1f}%")
    print(f"{'grouped by length':>22} {'n/a: data.train.group_by_length is not built yet':>37}")


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
        for workers in (0, 1):
            for source in ("local", "s3") if server else ("local",):
                clean_stale_shared_memory()
                where = ({"local": str(tmp / "local")} if source == "local"
                         else {"remote": remote, "local": str(tmp / f"cache{workers}")})
                cfg = DataConfig(**where, shuffle=False, num_workers=workers, max_len=512)
                rows.append((source, workers, throughput(cfg, tok, pre, args.batch)))

        print(f"\nDecode + preprocess (336 px) + tokenize, {args.images} JPEGs of 640x480, batch {args.batch}")
        print(f"{'source':>8} {'workers':>8} {'images/s per worker':>20}")
        for source, workers, ips in rows:
            print(f"{source:>8} {workers:>8} {ips:>20.1f}")

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
        target = next(it)["sample_ids"]
        replay = time.perf_counter() - t0
        del it, loader
        clean_stale_shared_memory()
        t0 = time.perf_counter()
        resumed = build_loader(cfg, tokenizer=tok, image_processor=small, num_image_tokens=4, batch_size=B)
        resumed.load_state_dict(state)
        got = next(iter(resumed))["sample_ids"]
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
