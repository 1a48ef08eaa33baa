"""`checkpoint.remote`: every complete checkpoint also in object storage, found there again when a
requeued job lands on nodes without the run's local files.

Layout: `<remote>/step_<N:08d>/<the step directory's files>`, the same names as on disk. The
COMPLETE object is uploaded last, by rank 0, after every rank uploaded its own files (the ones
it wrote: `rank_<r>.pt`, DeepSpeed's `zero_pp_rank_<r>_*`, megatron's `__<r>_<i>.distcp`; rank
0 the shared ones), so a remote checkpoint without it is one whose upload did not finish and is
never resumed from. keep_last applies remotely too (S3; other stores keep every checkpoint).

Transfers go through mosaicml-streaming's storage clients, the ones the data path already uses:
s3:// (and S3-compatible stores through S3_ENDPOINT_URL), gs://, oci://, azure://, with their
usual credentials from the environment, which nothing here prints. Each transfer is retried
with exponential backoff; a failure that outlasts the retries is a RemoteError naming the object,
and no COMPLETE object is written for that checkpoint. Training uploads in the background and
goes on through such failures (pargo_dist/checkpoint/upload.py); a permanent refusal (a missing
bucket) is raised at once.

A resume downloads once per filesystem, and only what that filesystem's ranks read (NodeShare):
their own shards and the shared files where the saving layout loads it, everything otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from pargo_dist.checkpoint.files import being_written
from pargo_dist.checkpoint.pruning import COMPLETE, SHARE  # the same marker, as an object; a node's share
from pargo_dist.errors import TryAgainLater, UserError
from pargo_dist.runtime.cache import cache_dir

# Keys are matched relative to the run's own prefix and anchored there: another run's checkpoints
# under it (s3://bkt/exp/ablation/step_.../) or beside it (s3://bkt/exp2/) are never this run's.
_STEP = re.compile(r"^step_(\d{8})/COMPLETE$")
_STEP_OBJECT = re.compile(r"^step_(\d{8})/")
# The files a rank writes itself: our rank state, DeepSpeed's ZeRO shards (bf16_/fp16_ prefixed in
# mixed precision, as every GPU recipe saves), megatron's distcp shards.
_OWNED = (re.compile(r"^rank_(\d+)\.pt$"), re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_"),
          re.compile(r"^__(\d+)_\d+\.distcp$"))
META = "meta.json"  # the run-level state (checkpoint.META): which layout saved the checkpoint
_SKIP_DIRS = ("ds_universal",)  # made from ds/ on an elastic resume: a cache, not the checkpoint
TRANSFER_THREADS = 8  # files in flight at once (S3: each in ranges of 64 MiB, 4 at a time)
T = TypeVar("T")


def download_dir(url: str) -> Path:
    """Where `pargo-dist export` / `eval` put a remote run's checkpoint: the cache's remote/
    (pargo_dist/runtime/cache.py) / <the URL, made a directory name>."""
    return cache_dir("remote") / re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/"))


class RemoteError(Exception):
    """An object-store request that failed: refused (RemoteRefused) or unreachable through every
    retry (RemoteUnavailable)."""


class RemoteRefused(RemoteError, UserError):
    """A refusal no retry changes (a missing bucket, denied access): the recipe or the credentials
    must change (exit 2)."""


class RemoteUnavailable(RemoteError, TryAgainLater):
    """The store did not answer through every retry, or changed under a transfer: a later attempt
    may find it back (exit 75, requeue)."""


def written_by(name: str) -> int | None:
    """The rank that wrote a checkpoint file (by its name), None for a file every rank reads."""
    for pattern in _OWNED:
        match = pattern.search(Path(name).name)
        if match:
            return int(match.group(1))
    return None


def owner_of(name: str, world_size: int) -> int:
    """The rank that uploads a checkpoint file: the one that wrote it, rank 0 for shared files."""
    writer = written_by(name)
    return 0 if writer is None else writer % world_size


@dataclass
class NodeShare:
    """The ranks on one filesystem, and how they will load a checkpoint: what a node needs of it.

    A DeepSpeed checkpoint loaded by the layout that saved it (the same rank count, ZeRO stage and
    backend) is read rank by rank: each rank its own ZeRO shards and rank state, and the shared
    files (meta.json, the module states, the config). Anything else reads other ranks' files: an
    elastic resume converts every shard, and megatron's distributed checkpoints are read by
    tensor piece, whoever wrote it. Then the node needs the whole checkpoint."""

    ranks: tuple[int, ...]
    world_size: int
    backend: str
    layout: dict[str, int] = field(default_factory=dict)

    def only_own_files(self, saved: dict) -> bool:
        """Whether these ranks need only their own and the shared files of a checkpoint whose
        meta.json is `saved`."""
        return (len(self.ranks) < self.world_size and self.backend == saved.get("backend") == "deepspeed"
                and saved.get("world_size") == self.world_size and saved.get("layout") == self.layout)

    def wants(self, name: str) -> bool:
        writer = written_by(name)
        return writer is None or writer in self.ranks


def share_of(step_dir: Path) -> dict | None:
    """What a local step directory holds when a node downloaded only its share of it (its SHARE
    file: ranks, world_size), None when it holds the whole checkpoint."""
    path = Path(step_dir) / SHARE
    return json.loads(path.read_text()) if path.is_file() else None


def holds(step_dir: Path, share: NodeShare | None) -> bool:
    """Whether a local step directory has every file `share` needs (every file, without one):
    true unless it holds only a node's share (SHARE) that lacks some of them."""
    held = share_of(step_dir)
    if held is None:
        return True
    if share is None or held["world_size"] != share.world_size:
        return False
    meta = Path(step_dir) / META
    return (set(share.ranks) <= set(held["ranks"]) and meta.is_file()
            and share.only_own_files(json.loads(meta.read_text())))


def permanent(err: BaseException) -> bool:
    """A refusal no retry changes: the store answered 4xx (no such bucket, access denied, bad
    credentials), except timeouts and throttling. Connection failures and 5xx are transient."""
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(response.get("Error", {}).get("Code", ""))
    if status is None and code.isdigit():
        status = int(code)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def retried(what: str, fn: Callable[[], T], attempts: int = 6, first_wait_s: float = 0.5) -> T:
    """fn(), retried with exponential backoff (0.5, 1, 2, 4, 8 s) through transient failures; the
    last one is raised as RemoteUnavailable naming `what` (never the credentials): exit 75, for
    a requeue. A permanent refusal (`permanent`: a missing bucket, denied access) is raised at
    once, as RemoteRefused (exit 2)."""
    for attempt in range(attempts):
        try:
            return fn()
        except RemoteError:  # an inner step that already went through its retries (opening the client)
            raise
        except Exception as err:  # noqa: BLE001  the store's or the network's: retried
            if permanent(err):
                raise RemoteRefused(f"{what} was refused: {type(err).__name__}: {err}. Check that the bucket in "
                                    "checkpoint.remote exists and that the credentials may write to it") from err
            if attempt == attempts - 1:
                raise RemoteUnavailable(f"{what} failed after {attempts} attempts: {type(err).__name__}: {err} "
                                        "(check the object store's endpoint, e.g. S3_ENDPOINT_URL, and the "
                                        "network)") from err
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")


def transfer_config():
    """s3transfer's settings for one checkpoint file: ranges of 64 MiB, 4 at a time."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)


def in_parallel(fn: Callable[[T], object], items: list[T]) -> None:
    """fn(item) for every item, TRANSFER_THREADS at a time; the first failure is raised (after
    its own retries), and what has not started yet is not started."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="checkpoint-transfer") as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()


class RemoteCheckpoints:
    """The checkpoints of one run under `url`, mirrored from `local_root` (run.dir/checkpoints)."""

    def __init__(self, url: str, local_root: str | Path):
        parsed = urllib.parse.urlparse(url)
        if not parsed.scheme or not parsed.netloc:
            raise UserError(f"checkpoint.remote={url!r}: expected an object-store URL such as s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.local_root = Path(local_root)
        self._client = None
        self.last_download: tuple[int, int, int] | None = None  # files fetched, files stored, bytes fetched

    def _uploader(self):
        """streaming's client for the store (made on first use: it checks the bucket)."""
        if self._client is None:
            from streaming.base.storage import CloudUploader

            self.local_root.mkdir(parents=True, exist_ok=True)
            self._client = retried(f"opening {self.url}", lambda: CloudUploader.get(
                (str(self.local_root), self.url), keep_local=True, exist_ok=True, retry=1))
        return self._client

    # -- upload ----------------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast on what no retry fixes: a bad URL (at construction) or a missing or
        forbidden bucket (one attempt here). An unreachable store is not an error at start:
        training goes on and the uploads retry (pargo_dist/checkpoint/upload.py)."""
        try:
            self._uploader()
        except RemoteUnavailable:
            self._client = None

    def own_files(self, step_dir: Path, rank: int, world_size: int, files: list[str] | None = None) -> list[Path]:
        """The files of `step_dir` that `rank` uploads: those it wrote (rank 0: and the shared
        ones), without the COMPLETE marker, files still being written, and caches. `files`: the
        directory's files as its filesystem's leader listed them (else it is walked here)."""
        step_dir = Path(step_dir)
        found = (step_dir / f for f in files) if files is not None else (p for p in step_dir.rglob("*") if p.is_file())
        return sorted(p for p in found if p.name not in (COMPLETE, SHARE)
                      and not being_written(p.name)
                      and not any(part.startswith(_SKIP_DIRS) for part in p.relative_to(step_dir).parts)
                      and owner_of(p.name, world_size) == rank)

    def upload_files(self, step_dir: Path, rank: int, world_size: int, files: list[str] | None = None) -> None:
        """This rank's files of `step_dir` (`own_files`), each retried; raises RemoteError. On S3,
        TRANSFER_THREADS files at a time through s3transfer (in ranges for large ones); other
        stores one after the other through streaming's uploader."""
        uploader = self._uploader()
        names = [str(path.relative_to(self.local_root)) for path in self.own_files(step_dir, rank, world_size, files)]
        client = getattr(uploader, "s3", None)
        if client is None:
            for name in names:
                retried(f"uploading {self.url}/{name}", lambda name=name: uploader.upload_file(name))
            return
        parsed = urllib.parse.urlparse(self.url)
        base = parsed.path.strip("/")

        def one(name: str) -> None:
            key = f"{base}/{name}" if base else name
            retried(f"uploading {self.url}/{name}", lambda: client.upload_file(
                str(self.local_root / name), parsed.netloc, key, Config=transfer_config()))
        in_parallel(one, names)

    def upload_marker(self, step_dir: Path, keep_last: int) -> None:
        """Rank 0, once every rank's files are up: the COMPLETE object, then pruning to keep_last."""
        name = str((Path(step_dir) / COMPLETE).relative_to(self.local_root))
        retried(f"uploading {self.url}/{name}", lambda: self._uploader().upload_file(name))
        self.prune(keep_last)

    def upload_logs(self, log_dir: Path, sent: dict[str, int]) -> int:
        """The run's TensorBoard event files (`log_dir`: run.dir/tb) under `<url>/tb/`, each one
        that grew since the last call (`sent`: name -> size uploaded, updated here): a run whose
        pods or nodes keep no disk keeps its curves beside its checkpoints, and TensorBoard reads
        them from there (`tensorboard --logdir s3://.../tb`; docs/kubernetes.md). S3 only, as
        pruning; returns how many files went up."""
        client = getattr(self._uploader(), "s3", None)
        if client is None or not Path(log_dir).is_dir():
            return 0
        parsed = urllib.parse.urlparse(self.url)
        base = parsed.path.strip("/")
        grown = [(path, path.stat().st_size) for path in sorted(Path(log_dir).rglob("*")) if path.is_file()]
        grown = [(path, size) for path, size in grown if sent.get(str(path.relative_to(log_dir))) != size]
        for path, size in grown:
            name = f"tb/{path.relative_to(log_dir)}"
            key = f"{base}/{name}" if base else name
            retried(f"uploading {self.url}/{name}", lambda path=path, key=key: client.upload_file(
                str(path), parsed.netloc, key, Config=transfer_config()))
            sent[str(path.relative_to(log_dir))] = size
        return len(grown)

    def _keys(self) -> list[str]:
        return retried(f"listing {self.url}", lambda: self._uploader().list_objects() or [])

    def _relative(self, key: str) -> str | None:
        """`key` below this run's prefix, or None for an object outside it."""
        prefix = urllib.parse.urlparse(self.url).path.strip("/")
        if not prefix:
            return key
        return key[len(prefix) + 1:] if key.startswith(prefix + "/") else None

    def steps(self, keys: list[str] | None = None) -> list[int]:
        """The steps of this run's complete checkpoints in the store (or among `keys`), oldest first."""
        keys = self._keys() if keys is None else keys
        return sorted({int(m.group(1)) for k in keys for m in [_STEP.match(self._relative(k) or "")] if m})

    def delete_from(self, from_step: int) -> None:
        """Delete the checkpoints of `from_step` and later, markers first (a rollback retires
        them). S3 only, as `prune`: other stores keep them, and resume never picks one whose
        marker is gone."""
        self._delete_keys(lambda step: step >= from_step, f"retiring steps >= {from_step} under {self.url}")

    def prune(self, keep_last: int) -> None:
        """Delete all but the newest `keep_last` complete checkpoints (and any upload left
        unfinished before them). S3 only: other stores keep every checkpoint."""
        client = getattr(self._uploader(), "s3", None)
        if client is None:
            return
        keys = self._keys()  # one listing for both: which steps are complete, which objects go
        complete = self.steps(keys)
        if len(complete) <= keep_last:
            return
        oldest_kept = complete[-keep_last]
        self._delete_keys(lambda step: step < oldest_kept, f"deleting old checkpoints under {self.url}", keys)

    def _delete_keys(self, doomed_step: Callable[[int], bool], what: str, keys: list[str] | None = None) -> None:
        """Delete this run's objects whose step `doomed_step` picks, markers first (never a
        complete-looking partial checkpoint). S3 only."""
        client = getattr(self._uploader(), "s3", None)
        if client is None:
            return
        keys = self._keys() if keys is None else keys
        parsed = urllib.parse.urlparse(self.url)
        doomed = [k for k in keys for m in [_STEP_OBJECT.match(self._relative(k) or "")]
                  if m and doomed_step(int(m.group(1)))]
        doomed.sort(key=lambda k: not k.endswith("/" + COMPLETE))  # markers first: never complete-but-partial
        for i in range(0, len(doomed), 1000):
            batch = [{"Key": k} for k in doomed[i:i + 1000]]
            retried(what, lambda batch=batch: client.delete_objects(Bucket=parsed.netloc, Delete={"Objects": batch}))

    # -- download ---------------------------------------------------------------------------

    def listing(self, prefix: str) -> dict[str, int | None]:
        """This run's objects whose names (below the run's prefix) start with `prefix`: full key ->
        size in bytes (S3; None where a store's client lists names only)."""
        client = getattr(self._uploader(), "s3", None)
        if client is None:
            keys = retried(f"listing {self.url}/{prefix}", lambda: self._uploader().list_objects(prefix) or [])
            return dict.fromkeys(keys)
        parsed = urllib.parse.urlparse(self.url)
        base = parsed.path.strip("/")

        def list_all() -> dict[str, int | None]:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=parsed.netloc,
                                                                     Prefix=f"{base}/{prefix}" if base else prefix)
            return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
        return retried(f"listing {self.url}/{prefix}", list_all)

    def download(self, step: int, share: NodeShare | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
        """The checkpoint of `step` into local_root/step_<N>, marker last, through a directory of
        its own renamed into place (so nodes sharing a filesystem do not collide: the first one
        there wins). Returns the local step directory.

        `share`: the ranks of this filesystem. Where they load only their own files (see
        NodeShare), only those and the shared ones are fetched, and a SHARE file says which
        ranks' files the directory holds; a later call that needs more fetches the whole.

        Files come down TRANSFER_THREADS at a time (S3: each through s3transfer, in ranges for
        large ones), each retried; `progress(bytes done, bytes in all)` is called at most once a
        second (the caller feeds its hang detector with it). An outage that outlasts the retries
        raises RemoteUnavailable (exit 75: the requeued job downloads again); what a killed
        attempt left is removed by the next one on this host (`remove_stale_staging`)."""
        target = self.local_root / f"step_{step:08d}"
        if (target / COMPLETE).is_file() and holds(target, share):
            return target
        self.remove_stale_staging()
        objects = {k: size for k, size in self.listing(f"step_{step:08d}/").items()
                   if _STEP_OBJECT.match(self._relative(k) or "")}
        names = {self._relative(k).split("/", 1)[1]: k for k in objects}
        staging = self.local_root / f".step_{step:08d}.{socket.gethostname()}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        start = time.monotonic()
        try:
            fetch = self._fetcher(staging, objects, progress)
            wanted = dict(names)
            if share is not None and META in wanted:
                fetch([(META, wanted[META])])
                if share.only_own_files(json.loads((staging / META).read_text())):
                    wanted = {name: key for name, key in wanted.items() if share.wants(name)}
            fetch([(n, k) for n, k in wanted.items() if n != COMPLETE and not (staging / n).is_file()])
            if COMPLETE in wanted:
                fetch([(COMPLETE, wanted[COMPLETE])])  # last: a directory with it holds the rest
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not (staging / COMPLETE).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise RemoteUnavailable(f"{self.url}/step_{step:08d} has no {COMPLETE} object: the store changed under "
                                    "the download (pruned or written again); a later attempt lists it again")
        size = sum((staging / n).stat().st_size for n in wanted)
        self.last_download = (len(wanted), len(names), size, time.monotonic() - start)
        if len(wanted) < len(names):
            (staging / SHARE).write_text(json.dumps({"ranks": sorted(share.ranks), "world_size": share.world_size}))
        if target.is_dir() and not ((target / COMPLETE).is_file() and holds(target, share)):
            shutil.rmtree(target)  # this node's part of the save, or a smaller share: superseded
        try:
            staging.rename(target)
        except OSError:  # another node got there first
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _fetcher(self, staging: Path, sizes: dict[str, int | None], progress):
        """A function that downloads [(name, key), ...] into `staging`, TRANSFER_THREADS at a time."""
        parsed = urllib.parse.urlparse(self.url)
        client = getattr(self._uploader(), "s3", None)
        total = sum(s or 0 for s in sizes.values())
        lock, state = threading.Lock(), {"done": 0, "said": 0.0}

        def count(n: int) -> None:
            with lock:
                state["done"] += n
                now = time.monotonic()
                if progress is None or now - state["said"] < 1.0:
                    return
                state["said"] = now
            progress(state["done"], total)

        if client is not None:
            def one(local: Path, key: str) -> None:
                client.download_file(parsed.netloc, key, str(local), Config=transfer_config(), Callback=count)
        else:
            from streaming.base.storage import CloudDownloader

            downloaders = threading.local()

            def one(local: Path, key: str) -> None:
                if not hasattr(downloaders, "it"):
                    downloaders.it = CloudDownloader.get(self.url)
                downloaders.it.download(f"{parsed.scheme}://{parsed.netloc}/{key}", str(local), 600)
                count(local.stat().st_size)

        def fetch_one(item: tuple[str, str]) -> None:
            name, key = item
            local = staging / name
            local.parent.mkdir(parents=True, exist_ok=True)
            retried(f"downloading {parsed.scheme}://{parsed.netloc}/{key}", lambda: one(local, key))

        def fetch(items: list[tuple[str, str]]) -> None:
            in_parallel(fetch_one, items)
        return fetch

    def remove_stale_staging(self) -> None:
        """Remove the staging directories that killed downloads on this host left (their process
        is gone); another host's, and a live process's, are left alone."""
        host = socket.gethostname()
        for path in self.local_root.glob(f".step_*.{host}.*"):
            pid = path.name.rsplit(".", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(path, ignore_errors=True)

    def fetch_newest(self) -> Path | None:
        """The newest complete remote checkpoint, downloaded; None when the store has none."""
        steps = self.steps()
        return self.download(steps[-1]) if steps else None
