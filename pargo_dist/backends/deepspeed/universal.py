"""A ZeRO checkpoint converted to DeepSpeed's universal format, for an elastic resume.

ZeRO's optimizer shards are per rank; another rank count or stage cannot load them as they are.
DeepSpeed's ds_to_universal puts them together per parameter (fp32 weights, Adam's moments,
step), in a form any layout loads. For a 7B-70B checkpoint that takes minutes to hours, so:

- it runs in a process of its own (`python -m pargo_dist.backends.deepspeed.universal STEP_DIR`),
  outside the rank's process and outside any collective: its extraction workers are forked from
  a fresh single-threaded process, not from a rank with communication threads, and it can be
  run by hand before a job (`pargo-dist` ranks reuse what it made);
- once per filesystem (pargo_dist.runtime.filesystems): nodes with their own disks convert in
  parallel, nodes sharing one convert once;
- with as many extraction workers as the node has cores and memory for (the other ranks of the
  node are idle meanwhile);
- while the other ranks wait on the store, not in a barrier the collective timeout would end
  (pargo_dist.runtime.store_sync).

Written under a temporary name and renamed when complete, so a conversion cut short is never
loaded. Made once per checkpoint (`ds_universal/` beside `ds/`), then reused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pargo_dist.checkpoint.state import DEEPSPEED_DIR

UNIVERSAL_DIR = "ds_universal"  # beside ds/ in a step directory, written on the first elastic resume


def extract_workers(ds_dir: Path, cores: int | None = None, memory: int | None = None) -> int:
    """Workers for the extraction: one per optimizer shard file at most, no more than the cores
    this process may run on, and as many as host memory holds at twice the largest shard each
    (a worker holds one shard and the slices it cuts from it)."""
    from pargo_dist.runtime.node_memory import node_memory_bytes

    shards = [p.stat().st_size for p in Path(ds_dir).glob("*optim_states.pt")]
    if not shards:
        return 1
    cores = cores or len(os.sched_getaffinity(0))
    memory = memory or node_memory_bytes()
    by_memory = max(1, memory // (2 * max(shards)))
    return int(max(1, min(len(shards), cores, by_memory)))


def convert(step_dir: Path, workers: int = 1) -> Path:
    """step_dir/ds -> step_dir/ds_universal (through ds_universal.partial). In this process."""
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from deepspeed.checkpoint import ds_to_universal

    from pargo_dist.backends.deepspeed.universal_patch import make_loadable_by_every_stage

    step_dir = Path(step_dir)
    out = step_dir / UNIVERSAL_DIR
    partial = step_dir / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    argv = ["ds_to_universal", "--input_folder", str(step_dir / DEEPSPEED_DIR), "--output_folder", str(partial),
            "--num_extract_workers", str(workers), "--num_merge_workers", str(workers), "--inject_missing_state"]
    saved_argv, sys.argv = sys.argv, argv
    try:
        with redirect_stdout(StringIO()), redirect_stderr(StringIO()):  # its banners and progress bars
            ds_to_universal.main(ds_to_universal.parse_arguments())
    finally:
        sys.argv = saved_argv
    make_loadable_by_every_stage(partial / "zero", step_dir / DEEPSPEED_DIR)
    (partial / "latest_universal").write_text(UNIVERSAL_DIR)
    partial.rename(out)
    return out


def convert_in_own_process(step_dir: Path, workers: int) -> None:
    """`convert` in a child process of its own (its memory goes back to the OS when it ends);
    raises with the converter's own output when it fails."""
    cmd = [sys.executable, "-m", "pargo_dist.backends.deepspeed.universal", str(step_dir), "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not convert the ZeRO checkpoint {Path(step_dir) / DEEPSPEED_DIR} to DeepSpeed's "
                           f"universal format for an elastic resume (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")


def universal_checkpoint(step_dir: Path, sync, say=print) -> Path:
    """Every rank: `step_dir/ds_universal`, converted by one rank per filesystem if it is not
    there yet, while the others wait on the store (`sync`: pargo_dist.runtime.store_sync)."""
    from pargo_dist.runtime.filesystems import filesystem_group
    from pargo_dist.runtime.store_sync import transfer_allowance

    step_dir = Path(step_dir)
    out = step_dir / UNIVERSAL_DIR
    size = sync.share("size of the ZeRO checkpoint",  # one walk (rank 0's), for every rank's allowance
                      lambda: sum(f.stat().st_size for f in (step_dir / DEEPSPEED_DIR).rglob("*") if f.is_file()))
    group = filesystem_group(sync, step_dir)
    if group.leader and not out.is_dir():
        import time

        workers = extract_workers(step_dir / DEEPSPEED_DIR)
        start = time.monotonic()
        convert_in_own_process(step_dir, workers)
        say(f"converted {step_dir / DEEPSPEED_DIR} to the universal format for this layout in "
            f"{time.monotonic() - start:.1f} s ({workers} worker(s); ranks {list(group.ranks)} share it)")
    # the converting rank's own allowance (Trainer.run beats its hang detector with it); a failed
    # conversion ends this wait at once (runtime.exits.leave_now aborts it)
    sync.barrier("universal conversion", timeout_s=transfer_allowance(size))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pargo_dist.backends.deepspeed.universal",
        description="Convert a DeepSpeed ZeRO checkpoint (STEP_DIR/ds) to the universal format (STEP_DIR/"
                    "ds_universal) that a resume on another rank count or ZeRO stage loads. Training does this "
                    "by itself; run it ahead to take it off the job's start.")
    parser.add_argument("step_dir", type=Path)
    parser.add_argument("--workers", type=int, default=0,
                        help="extraction workers (default: what the cores and memory allow)")
    args = parser.parse_args(argv)
    if (args.step_dir / UNIVERSAL_DIR).is_dir():
        print(f"{args.step_dir / UNIVERSAL_DIR} exists")
        return 0
    workers = args.workers or extract_workers(args.step_dir / DEEPSPEED_DIR)
    print(convert(args.step_dir, workers))
    return 0


if __name__ == "__main__":
    from pargo_dist.compat import configure_deepspeed_env

    configure_deepspeed_env()
    sys.exit(main())
