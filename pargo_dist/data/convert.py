"""`pargo-dist convert`: caption / conversation files -> MDS shards, locally or straight to S3.

    pargo-dist convert train.jsonl --image-root imgs/ --out data/pretrain
    pargo-dist convert llava_665k.json --image-root coco/ --out s3://bucket/sft --workers 8
    pargo-dist convert shards/*.tar laion.parquet --out s3://bucket/pretrain --max-side 1024

Inputs (format from the extension, else the content; see `readers.py` for the record keys):
JSON Lines / JSON arrays of caption records (image path, base64 bytes, or LLaVA-style
`conversations`), parquet with raw image bytes, webdataset tars (`key.jpg` + `key.txt` or
`key.json`). Output: MDS shards in the `schema.py` layout, zstd-compressed, images stored
as their original encoded bytes unless `max_side` asks for a resize, and beside index.json
`lengths.npz`: each sample's text and image sizes, which `data.group_by_length` sorts by
without reading the shards (see grouping.py).

What the design protects against:
* one bad sample (missing or undecodable image, empty caption, malformed line) never stops a
  run and is never written: it is counted by reason and listed in a JSONL report with its id,
  input and line, so a 10-hour conversion does not die at 90 % or ship broken samples;
* no index claims shards that are not there. MDSWriter writes index.json only in finish(),
  after the last shard (a killed run leaves shards and no index: no reader takes it for a
  dataset). For remote output its stock finish() uploads index.json once the upload *queue*
  is empty, which can be while the last shard is still uploading or about to fail; the writer
  here waits for every shard upload to succeed before the index is written or uploaded;
* no silent overwrite: an output that already holds index.json (local or remote) is refused;
* a run that fails with an exception removes the local shards it wrote, so a rerun can use
  the same --out (a remote keeps its orphan shards, invisible without an index; a rerun
  overwrites them);
* output is deterministic: workers parse and decode in parallel, but results are written in
  input order by the one writer in the parent, so --workers 8 gives the same shards as 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

from pargo_dist.data.readers import (FORMATS, InputFormatError, RawRecord, detect_format,
                                     process_record, read_records)
from pargo_dist.errors import UserError

REPORT_NAME = "convert_report.jsonl"
BATCH = 16  # records per worker task: amortises pickling without starving workers on small inputs
READ_AHEAD = 4  # in-flight tasks per worker: keeps workers busy, bounds memory


class OutputExistsError(FileExistsError, UserError):
    """The output already holds a dataset (or other files): the user picks another."""


class UploadError(RuntimeError):
    """A shard upload failed; the index was not written, so the remote claims nothing."""


@dataclass
class ConvertSummary:
    """What a conversion did. `skipped` maps a reason (see the report) to its count."""

    written: int
    skipped: dict[str, int]
    bytes: int  # total size of the shard files as stored (compressed)
    shards: int
    report_path: str
    out: str
    inputs: int = 0
    seconds: float = 0.0
    compression: str | None = None

    @property
    def total(self) -> int:
        """Records read: every one was either written or skipped."""
        return self.written + sum(self.skipped.values())

    def format(self) -> str:
        """The human summary printed by the CLI."""
        comp = f", {self.compression}" if self.compression else ""
        rate = f" in {self.seconds:.1f}s" if self.seconds else ""
        lines = [
            f"converted {self.total:,} records from {self.inputs} input(s){rate} -> {self.out}",
            f"  written  {self.written:,} samples in {self.shards} shard(s), {_human_bytes(self.bytes)}{comp}",
        ]
        n_skipped = sum(self.skipped.values())
        if n_skipped:
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(self.skipped.items(), key=lambda x: (-x[1], x[0])))
            lines.append(f"  skipped  {n_skipped:,} ({reasons})")
        else:
            lines.append("  skipped  0")
        lines.append(f"  report   {self.report_path}")
        if self.skipped.get("missing_image"):
            lines.append("  hint: relative image paths are resolved against --image-root "
                         "(default: each input file's directory)")
        if not self.written:
            lines.append("  warning: no sample was written")
        return "\n".join(lines)


@dataclass
class _Plan:
    path: str
    fmt: str
    label: str
    root: str


def convert(
    inputs: list[str],
    out: str,
    *,
    image_root: str | None = None,
    input_format: str = "auto",
    max_side: int | None = None,
    compression: str | None = "zstd",
    size_limit: str | int = "64mb",
    workers: int = 1,
    report: str | None = None,
    progress: bool = True,
    local_cache: str | None = None,
) -> ConvertSummary:
    """Convert `inputs` into one MDS dataset at `out` (a directory, or s3:// gs:// ... remote).

    image_root:  directory relative image paths are resolved against (default: the
                 directory of the input file that names them).
    input_format: "auto" or one of jsonl/json/parquet/tar, applied to every input.
    max_side:    resize (aspect kept, LANCZOS) images whose longer side is larger, re-encoded
                 as JPEG q95 (JPEG sources) or PNG; smaller images keep their original bytes.
    compression: shard compression ("zstd", "zstd:9", None / "none").
    size_limit:  shard size before compression ("64mb", or bytes).
    workers:     processes that parse and decode; 1 runs inline.
    report:      the JSONL list of skipped records (default: <out>/convert_report.jsonl for
                 a local out, ./convert_report_<remote>.jsonl for a remote one).
    local_cache: for a remote out, the empty local directory shards are staged in before
                 upload (default: a temporary directory); removed when done.

    Raises for whole-input or output problems (naming the file); never for one bad sample.
    """
    start = time.monotonic()
    if not inputs:
        raise UserError("convert needs at least one input file")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise UserError(f"max_side must be a positive number of pixels, got {max_side}")

    plans = _plan_inputs(inputs, input_format, image_root)
    _is_remote(out)  # an unsupported scheme fails before any worker starts
    pool = _make_pool(workers) if workers > 1 else None  # before the writer's threads exist
    try:
        records = (rec for plan in plans for rec in read_records(plan.path, plan.fmt, plan.label, plan.root))
        summary = write_dataset(_results(records, pool, workers, max_side), out, compression=compression,
                                size_limit=size_limit, report=report, progress=progress,
                                local_cache=local_cache, desc="convert")
        if pool is not None:
            pool.shutdown(wait=True)
    finally:
        if pool is not None:  # failing: do not wait on a worker that may be stuck or dead
            pool.shutdown(wait=False, cancel_futures=True)
    summary.inputs = len(plans)
    summary.seconds = time.monotonic() - start
    return summary


def write_dataset(
    results: Iterable[tuple[dict | None, dict | None]],
    out: str,
    *,
    compression: str | None = "zstd",
    size_limit: str | int = "64mb",
    report: str | None = None,
    progress: bool = True,
    local_cache: str | None = None,
    desc: str = "write",
) -> ConvertSummary:
    """Write (sample, None) / (None, report entry) pairs as one MDS dataset at `out`.

    The one writer behind `convert` and `pargo-dist synth`: refuses an existing dataset,
    writes the index only after every shard (and upload) succeeded, lists skipped records in
    the report, and on failure leaves no local shards behind.
    """
    start = time.monotonic()
    if compression in ("", "none", "None"):
        compression = None
    remote = _is_remote(out)
    local = _prepare_local(local_cache, out, remote)
    if report is None:
        report = (os.path.join(os.getcwd(), f"convert_report_{_slug(out)}.jsonl") if remote
                  else os.path.join(out, REPORT_NAME))

    existed = {p: os.path.isdir(p) for p in ([local] if local else [])}
    writer = None
    temp_cache = None
    try:
        if remote and local is None:
            local = temp_cache = tempfile.mkdtemp(prefix="pargo-convert-")
        writer = _make_writer(out, local, remote, compression, size_limit)
        if remote:
            _refuse_remote_dataset(writer, out)
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)

        written, skipped = 0, Counter()
        from tqdm import tqdm

        with open(report, "w", encoding="utf-8") as rep, \
                tqdm(desc=desc, unit=" rec", disable=not progress, dynamic_ncols=True) as bar:
            for sample, bad in results:
                if sample is not None:
                    writer.write(sample)
                    written += 1
                else:
                    skipped[bad["reason"]] += 1
                    rep.write(json.dumps(bad, ensure_ascii=False) + "\n")
                    bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
                bar.update(1)
        writer.finish()
        shards = list(writer.shards)
        writer = None
    except BaseException:
        if writer is not None:
            writer.cancel_future_jobs()
        for path, was_there in existed.items():  # back to the empty / absent dir it was
            _clear(path, remove_dir=not was_there)
        if temp_cache:
            shutil.rmtree(temp_cache, ignore_errors=True)
        raise

    size = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards)
    return ConvertSummary(written=written, skipped=dict(skipped), bytes=size, shards=len(shards),
                          report_path=report, out=out, inputs=1,
                          seconds=time.monotonic() - start, compression=compression)


# --------------------------------------------------------------------------- inputs and outputs


def _plan_inputs(inputs: list[str], input_format: str, image_root: str | None) -> list[_Plan]:
    """Check every input before anything is written: a typo in the 10th file should fail
    the run in a second, not after converting the first nine."""
    plans = []
    for path in inputs:
        fmt = detect_format(path, input_format)
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        plans.append(_Plan(path, fmt, os.path.basename(path.rstrip("/")), root))
    if image_root is not None and not os.path.isdir(image_root):
        raise FileNotFoundError(f"image root is not a directory: {image_root}")
    labels = Counter(p.label for p in plans)
    for p in plans:  # two "train.jsonl" in different dirs: ids use the path, so they stay unique
        if labels[p.label] > 1:
            p.label = os.path.normpath(p.path)
    return plans


def _is_remote(out: str) -> bool:
    from streaming.base.storage.upload import UPLOADERS

    scheme = urllib.parse.urlparse(out).scheme
    if len(scheme) <= 1:  # "" (a path) or a Windows drive letter
        return False
    if scheme not in UPLOADERS:
        supported = ", ".join(sorted(s + "://" for s in UPLOADERS if s and "/" not in s))
        raise UserError(f"unsupported output {out}: use a local directory or one of {supported}")
    return True


def _prepare_local(local_cache: str | None, out: str, remote: bool) -> str | None:
    """The local directory shards are written to; refuse one that already has content."""
    local = local_cache if remote else out
    if local is None:
        return None
    index = os.path.join(local, "index.json")
    if os.path.exists(index):
        raise OutputExistsError(f"{index} exists: {local} already holds an MDS dataset; "
                                f"choose another output or delete it first")
    if os.path.exists(local) and not os.path.isdir(local):
        raise OutputExistsError(f"output {local} exists and is not a directory")
    if os.path.isdir(local) and os.listdir(local):
        raise OutputExistsError(f"output directory {local} is not empty (no index.json: perhaps the "
                                f"leftovers of a killed conversion); delete it or choose another")
    return local


def _refuse_remote_dataset(writer, out: str) -> None:
    """A remote that already has index.json: overwriting its shards in place would corrupt
    it for anyone reading it meanwhile, so refuse like for a local directory."""
    try:
        keys = writer.cloud_writer.list_objects("index.json") or []
    except NotImplementedError:  # some uploaders cannot list; their remotes are not checked
        return
    if any(k.rstrip("/").rsplit("/", 1)[-1] == "index.json" for k in keys):
        raise OutputExistsError(f"{out.rstrip('/')}/index.json exists: the remote already holds an MDS "
                                f"dataset; choose another output or delete it first")


def _make_writer(out: str, local: str | None, remote: bool, compression: str | None, size_limit):
    from concurrent.futures import ThreadPoolExecutor

    from streaming import MDSWriter

    from pargo_dist.data.grouping import SIDECAR, SizeLog
    from pargo_dist.data.schema import MDS_COLUMNS

    class _IndexLastMDSWriter(MDSWriter):
        """MDSWriter with two fixes: index.json only after every shard upload has succeeded,
        and no empty shard when one sample is larger than the shard size limit. It also writes
        the samples' text and image sizes (grouping.SIDECAR, for data.group_by_length) next to
        the index, before it: an index always has its sidecar."""

        def write(self, sample) -> None:
            self.sizes.add(sample)
            super().write(sample)

        def _write_index(self) -> None:
            self.executor.shutdown(wait=True)  # uploads *done*, not just dequeued
            if self.event.is_set():
                raise UploadError(f"uploading a shard to {self.remote} failed (see the log above); "
                                  f"index.json was not written")
            self.sizes.save(self.local)
            if self.remote:
                self.cloud_writer.upload_file(SIDECAR)  # raises when it fails: then no index either
            self.executor = ThreadPoolExecutor(max_workers=1)
            super()._write_index()

        def flush_shard(self) -> None:
            if self.new_samples:
                super().flush_shard()

    try:
        writer = _IndexLastMDSWriter(columns=MDS_COLUMNS, out=(local, out) if remote else out,
                                     keep_local=False, compression=compression, size_limit=size_limit)
        writer.sizes = SizeLog()
        return writer
    except (FileExistsError, ValueError, TypeError):
        raise
    except Exception as err:  # a missing bucket, no credentials...
        raise UserError(f"cannot write to {out}: {type(err).__name__}: {err}") from err


def _clear(path: str, remove_dir: bool) -> None:
    if remove_dir:
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)


def _slug(remote: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", remote.split("://", 1)[-1]).strip("_") or "remote"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- parallel processing


def _make_pool(workers: int):
    """A process pool, started now.

    ProcessPoolExecutor rather than multiprocessing.Pool: when a worker dies (OOM-killed on a
    huge image, a crash in a codec) the pending results raise BrokenProcessPool instead of
    waiting forever. Fork where available: workers need only PIL and the readers, while a
    spawned worker would re-import torch (seconds each) just to import this package. With
    fork every worker starts at the first submit, so a no-op is submitted here, before the
    parent has other threads.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    pool.submit(_process_batch, [], None).result()
    return pool


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (and stops the pool),
    # workers should not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_batch(batch: list[RawRecord], max_side: int | None) -> list[tuple]:
    return [process_record(rec, max_side) for rec in batch]


def _results(records: Iterator[RawRecord], pool, workers: int, max_side: int | None) -> Iterator[tuple]:
    """(sample, bad) per record, in input order. With a pool, at most workers * READ_AHEAD
    batches are in flight: Pool.imap / Executor.map would read the whole input ahead into
    memory (they do not wait for results), which for tar / parquet means all image bytes."""
    if pool is None:
        for rec in records:
            yield process_record(rec, max_side)
        return
    pending: deque = deque()
    while batch := list(islice(records, BATCH)):
        pending.append(pool.submit(_process_batch, batch, max_side))
        if len(pending) >= workers * READ_AHEAD:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `pargo-dist convert` options (the CLI module owns the subparser)."""
    parser.add_argument("inputs", nargs="+", help="input files: .jsonl, .json (captions or LLaVA "
                        "conversations), .parquet, .tar (webdataset)")
    parser.add_argument("--out", required=True, help="output directory, or a remote such as s3://bucket/prefix")
    parser.add_argument("--image-root", help="directory relative image paths are resolved against "
                        "(default: each input file's directory)")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                        help="input format for every input (default: from extension and content)")
    parser.add_argument("--max-side", type=int, help="resize images whose longer side exceeds this "
                        "(re-encoded); smaller images keep their bytes")
    parser.add_argument("--compression", default="zstd", help="shard compression: zstd (default), "
                        "zstd:LEVEL, none")
    parser.add_argument("--size-limit", default="64mb", help="shard size before compression (default 64mb)")
    parser.add_argument("--workers", type=int, default=1, help="decode processes (default 1)")
    parser.add_argument("--report", help="where to list skipped records as JSONL "
                        f"(default: <out>/{REPORT_NAME}, or ./convert_report_<remote>.jsonl)")
    parser.add_argument("--local-cache", help="for a remote --out: empty local dir to stage shards in "
                                              "(default: a temporary dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments and print its summary.

    Returns 0, or 1 when records were read but not one could be written (a wrong
    --image-root, say): a pipeline should stop there rather than train on nothing.
    """
    summary = convert(args.inputs, args.out, image_root=args.image_root, input_format=args.format,
                      max_side=args.max_side, compression=args.compression, size_limit=args.size_limit,
                      workers=args.workers, report=args.report, progress=not args.no_progress,
                      local_cache=getattr(args, "local_cache", None))
    print(summary.format())
    sys.stdout.flush()
    return 1 if summary.total and not summary.written else 0


__all__ = ["ConvertSummary", "OutputExistsError", "UploadError", "InputFormatError", "convert", "write_dataset",
           "add_arguments", "run"]
