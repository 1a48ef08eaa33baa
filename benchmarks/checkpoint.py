"""How long a checkpoint save stops training: synchronous vs background (`checkpoint.async_save`).

One rank, DeepSpeed ZeRO-2 (what one rank runs), the model of benchmarks/train_step.py's sizes
trained for one step so that Adam's state exists, then saved N times each way into a fresh
directory on the run's filesystem. Per save:

  blocked s   how long the training loop waits: until `DeepSpeedBackend.save` returns, plus, in
              the background, the time the next step's optimizer update waits for the copy.
              Synchronous: every file is written before save returns (torch.save, as DeepSpeed
              does). Background: save returns once DeepSpeed has built its state dicts; a thread
              copies them to host memory while the next step's forward and backward run, the
              update waits for the copy (pargo_dist.checkpoint.background_save); another thread writes.
  step +s     how much slower the next step ran, not counting that wait: the copy and the write
              compete with it for these 2 cores and the memory bus (the kernel's page-cache
              writes are CPU time too); on a GPU node the step runs on the GPU
  written s   from the call until the last file is on disk, the next step included
  ckpt MB     the files a save leaves (the rank's model states and optimizer states)

A step that would follow a background save runs while the thread writes; on these 2 cores the
two compete for CPU, on a GPU node the step runs on the GPU. The median over --repeats saves is
shown, and the background/synchronous ratio of blocked time (the issue's goal: <= 0.20).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py                     # small and medium, 3 saves each
    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --sizes small --repeats 5 --dir /mnt/fast

`--conversion`: the elastic resume's side instead. A 2-rank ZeRO-3 bf16 run of each size (`pargo-dist
train`, one step, checkpoint.every=1) leaves a checkpoint as every GPU recipe saves it; then, per size:

  convert 1w s   DeepSpeed's ds_to_universal with one extraction worker, in the rank's process:
                 how pargo_dist converted before (rank 0 alone, the others in a barrier)
  convert Nw s   pargo_dist/backends/deepspeed/universal.py now: its own process, with the
                 workers the node's cores and memory allow (N), while the other ranks wait on the store
  up / rank MB   what each rank uploads to checkpoint.remote (the files it wrote; rank 0 also the
                 shared ones), so what each node sends is the sum over its ranks
  down / node MB  what a node of one rank downloads for a resume on new nodes, once per
                 filesystem: by the same layout, its rank's shards and the shared files
                 (pargo_dist.checkpoint.object_store.NodeShare), per node; elastic (another
                 rank count or ZeRO stage), the whole checkpoint, as the conversion reads every
                 rank's shards

    OMP_NUM_THREADS=1 python benchmarks/checkpoint.py --conversion --sizes small medium 302m

`--transfer`: checkpoint.remote's transfers against boto3's own s3transfer. A checkpoint laid out
as an 8-rank ZeRO-3 bf16 save writes it (per rank: model states, optimizer states, rank state;
the shared meta.json, config.yaml, COMPLETE; --transfer-mb in all) goes to and comes back from
an S3 server on loopback (moto_server: an S3-compatible server, CPU-bound like any store on
these 2 cores), three ways each, in one run, the same server and files:

  ours            RemoteCheckpoints.upload_files for every rank's files (the ranks' threads at
                  once, as a node's ranks upload), then RemoteCheckpoints.download of the whole
                  checkpoint (what a node that resumes elastically fetches)
  s3transfer 10   boto3's TransferManager with 10 threads over the same files (upload_file /
                  download_file for each): the reference a well-kept library gives
  one at a time   the files one after the other, one request each (how streaming's uploader
                  and downloader, which pargo_dist used before, move them)

    python benchmarks/checkpoint.py --transfer --transfer-mb 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (its sizes, recipe and fixed batch)

_LLM = "model.llm.config."
# ~170M parameters: 8 layers of width 1,024 on the small size's tower and 32,000-token vocabulary
train_step.SIZES.setdefault("medium", train_step.SIZES["small"] + [
    f"{_LLM}hidden_size=1024", f"{_LLM}intermediate_size=2816", f"{_LLM}num_hidden_layers=8",
    f"{_LLM}num_attention_heads=16", f"{_LLM}num_key_value_heads=8"])


def files_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def measure(size: str, args) -> dict:
    import torch

    from pargo_dist.build import build_model, init_freeze_and_adapt
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.runtime.rank_env import single_process_env
    from pargo_dist.train.run import make_backend

    single_process_env()
    bench = argparse.Namespace(batch=[2], precision="fp32", zero=[2], warmup=0, steps=1, recipe=train_step.RECIPE)
    cfg = train_step.load_size(size, bench)
    backend = make_backend(cfg)
    backend.init_distributed()
    tokenizer = synthetic_tokenizer()
    model = build_model(cfg, tokenizer)
    init_freeze_and_adapt(model, cfg)
    backend.setup(model)
    backend.train(True)
    batch = train_step.fixed_batch(model, tokenizer, 2, seed=0)
    step_no = [0]

    def step() -> float:
        t = time.perf_counter()
        backend.train_batch([batch], float(batch.num_targets), step_no[0])
        step_no[0] += 1
        return time.perf_counter() - t

    step()  # Adam's state exists from here on
    plain = statistics.median(step() for _ in range(3))
    params = sum(p.numel() for p in model.parameters())
    rows = {"size": size, "params": params, "step": plain}
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    for background in (False, True):
        blocked, written, slower, mb = [], [], [], 0.0
        for i in range(args.repeats):
            step_dir = root / f"{'bg' if background else 'sync'}_{i}"
            step_dir.mkdir()
            waited = backend._writer.staged_wait_s if backend._writer else 0.0
            t0 = time.perf_counter()
            backend.save(step_dir, background=background)
            t1 = time.perf_counter()
            after = step()  # the next step: its optimizer update waits for the copy to host memory
            backend.wait_for_saves()
            t2 = time.perf_counter()
            waited = (backend._writer.staged_wait_s if backend._writer else 0.0) - waited
            blocked.append(t1 - t0 + waited)
            slower.append(after - waited - plain)
            written.append(t2 - t0)
            mb = files_mb(step_dir)
            shutil.rmtree(step_dir)
        key = "bg" if background else "sync"
        rows[key] = {"blocked": statistics.median(blocked), "written": statistics.median(written), "mb": mb,
                     "slower": statistics.median(slower)}
    shutil.rmtree(root)
    torch.distributed.destroy_process_group()
    return rows


# ~300M: the small size's tower, an 18-layer Llama of width 1,024 (the size the issue measured)
train_step.SIZES.setdefault("302m", train_step.SIZES["small"] + [
    f"{_LLM}hidden_size=1024", f"{_LLM}intermediate_size=2816", f"{_LLM}num_hidden_layers=18",
    f"{_LLM}num_attention_heads=16", f"{_LLM}num_key_value_heads=8"])


def conversion(size: str, root: Path) -> dict:
    """A 2-rank ZeRO-3 bf16 checkpoint of `size`, converted both ways (see the module docstring)."""
    import subprocess

    from pargo_dist.backends.deepspeed.universal import UNIVERSAL_DIR, convert, extract_workers
    from pargo_dist.checkpoint.object_store import NodeShare, RemoteCheckpoints

    run = root / size
    overrides = [*train_step.SIZES[size], f"run.dir={run}", "train.steps=1", "checkpoint.every=1",
                 "train.precision=bf16", "backend.zero_stage=3", "data.eval=null", "train.micro_batch=1",
                 "logging.tensorboard=false"]
    cmd = [sys.executable, "-m", "pargo_dist.cli", "train", str(train_step.RECIPE), *overrides, "--nproc", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training {size} failed: {(done.stdout + done.stderr)[-2000:]}")
    step_dir = run / "checkpoints" / "step_00000001"
    remote = RemoteCheckpoints("s3://unused/run", run / "checkpoints")
    up = [sum(p.stat().st_size for p in remote.own_files(step_dir, r, 2)) / 2**20 for r in (0, 1)]
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    down = [sum(p.stat().st_size for p in files if NodeShare((r,), 2, "deepspeed").wants(str(p.relative_to(step_dir))))
            / 2**20 for r in (0, 1)]
    row = {"size": size, "mb": files_mb(step_dir), "up": up, "down": down}
    workers = extract_workers(step_dir / "ds")
    for key, n in (("one", 1), ("many", workers)):
        shutil.rmtree(step_dir / UNIVERSAL_DIR, ignore_errors=True)
        start = time.perf_counter()
        convert(step_dir, n)
        row[key] = time.perf_counter() - start
    row["workers"] = workers
    shutil.rmtree(run)
    return row


def main_conversion(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="ckpt-convert-", dir=args.dir))
    print(f"2 ranks, DeepSpeed ZeRO-3, bf16, one step; checkpoints in {root}; CPU, {os.cpu_count()} cores")
    print(f"{'size':<8} {'ckpt MB':>8} {'convert 1w s':>13} {'convert Nw s':>13} {'N':>3} {'Nw / 1w':>8}"
          f" {'up / rank MB':>15} {'down / node MB':>15} {'elastic':>8}")
    for size in args.sizes:
        try:
            r = conversion(size, root)
        except RuntimeError as err:
            print(f"{size:<8} n/a: {str(err).splitlines()[-1]}")
            continue
        up = " / ".join(f"{mb:.0f}" for mb in r["up"])
        down = " / ".join(f"{mb:.0f}" for mb in r["down"])
        print(f"{size:<8} {r['mb']:>8.0f} {r['one']:>13.1f} {r['many']:>13.1f} {r['workers']:>3} "
              f"{r['many'] / r['one']:>8.2f} {up:>15} {down:>15} {r['mb']:>8.0f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)


def checkpoint_files(root: Path, total_mb: int, ranks: int = 8) -> dict[str, int]:
    """An 8-rank ZeRO-3 bf16 save's file names, `total_mb` in all (random bytes): name -> size."""
    shards = {}
    for r in range(ranks):
        shards[f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 6
        shards[f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = 1
        shards[f"rank_{r:05d}.pt"] = 0
    unit = total_mb * 2**20 // sum(shards.values())
    sizes = {name: max(4096, weight * unit) for name, weight in shards.items()}
    sizes.update({"meta.json": 512, "config.yaml": 2048, "COMPLETE": 64})
    step = root / "step_00000010"
    for name, size in sizes.items():
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_bytes(os.urandom(size))
    return sizes


def main_transfer(args) -> None:
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from boto3.s3.transfer import S3Transfer, TransferConfig

    from pargo_dist.checkpoint.object_store import RemoteCheckpoints
    from pargo_dist.runtime.rank_env import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001  the server is still starting
                time.sleep(0.1)
        root = Path(tempfile.mkdtemp(prefix="pargo-transfer-")) / "checkpoints"
        sizes = checkpoint_files(root, args.transfer_mb)
        total = sum(sizes.values()) / 2**20
        step = root / "step_00000010"
        names = sorted(sizes, key=lambda n: n == "COMPLETE")
        rows = []

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        # ours: every rank's upload (a thread per rank, as on a node), then the whole download
        remote = RemoteCheckpoints("s3://bench/ours", root)
        remote._uploader()  # its client made beforehand, as a run makes it at start (the bucket check)
        up = timed(lambda: list(ThreadPoolExecutor(8).map(lambda r: remote.upload_files(step, r, 8), range(8)))
                   ) + timed(lambda: remote.upload_marker(step, keep_last=3))
        fresh = RemoteCheckpoints("s3://bench/ours", root.parent / "down-ours")
        down = timed(lambda: fresh.download(10))
        rows.append(("ours", up, down))

        manager = S3Transfer(client, TransferConfig(max_concurrency=10))
        pool = ThreadPoolExecutor(10)
        up = timed(lambda: list(pool.map(lambda n: manager.upload_file(str(step / n), "bench", f"tm/{n}"), names)))
        out = root.parent / "down-tm"
        for n in names:
            (out / n).parent.mkdir(parents=True, exist_ok=True)
        down = timed(lambda: list(pool.map(lambda n: manager.download_file("bench", f"tm/{n}", str(out / n)), names)))
        rows.append(("s3transfer, 10 threads", up, down))

        single = TransferConfig(multipart_threshold=2**40, use_threads=False)
        up = timed(lambda: [client.upload_file(str(step / n), "bench", f"one/{n}", Config=single) for n in names])
        out = root.parent / "down-one"
        for n in names:
            (out / n).parent.mkdir(parents=True, exist_ok=True)
        down = timed(lambda: [client.download_file("bench", f"one/{n}", str(out / n), Config=single) for n in names])
        rows.append(("one at a time", up, down))

        print(f"{len(sizes)} files, {total:,.0f} MiB (an 8-rank ZeRO-3 bf16 save), moto_server on loopback, "
              f"{os.cpu_count()} cores")
        print()
        print("| way | upload s | upload MiB/s | download s | download MiB/s |")
        print("|---|---|---|---|---|")
        for name, up, down in rows:
            print(f"| {name} | {up:.2f} | {total / up:,.1f} | {down:.2f} | {total / down:,.1f} |")
        shutil.rmtree(root.parent, ignore_errors=True)
    finally:
        server.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=["tiny", "small", "medium", "302m"])
    ap.add_argument("--conversion", action="store_true",
                    help="time the elastic conversion and the upload/download volumes instead of saves")
    ap.add_argument("--repeats", type=int, default=3, help="saves per way (median shown)")
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    ap.add_argument("--transfer", action="store_true",
                    help="time checkpoint.remote's upload and download against boto3's s3transfer")
    ap.add_argument("--transfer-mb", type=int, default=512, help="--transfer: the checkpoint's size")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transfer:
        main_transfer(args)
        return
    if args.conversion:
        main_conversion(args)
        return
    if args.one:  # one size in this process (a fresh process per size: no state shared)
        import json

        print("CKPT_RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return

    import json
    import subprocess

    where = args.dir or tempfile.gettempdir()
    print(f"one rank, DeepSpeed ZeRO-2, fp32; writing to {where}; median of {args.repeats} saves; "
          f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{'size':<8} {'params':>8} {'ckpt MB':>8} {'step s':>7} {'sync blocked s':>15} {'bg blocked s':>13}"
          f" {'bg / sync':>10} {'bg step +s':>11} {'sync written s':>15} {'bg written s':>13}")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", size, "--repeats", str(args.repeats)] + \
              (["--dir", args.dir] if args.dir else [])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CKPT_RESULT ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"{size:<8} n/a: exit {proc.returncode}: {tail[0]}")
            continue
        r = json.loads(line[len("CKPT_RESULT "):])
        s, b = r["sync"], r["bg"]
        print(f"{size:<8} {r['params'] / 1e6:>7.0f}M {s['mb']:>8.0f} {r['step']:>7.2f} {s['blocked']:>15.3f}"
              f" {b['blocked']:>13.3f} {b['blocked'] / s['blocked']:>10.2f} {b['slower']:>11.2f}"
              f" {s['written']:>15.3f} {b['written']:>13.3f}")


if __name__ == "__main__":
    main()
