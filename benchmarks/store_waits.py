"""What waiting ranks cost the process that hosts the store: polling (before) against one
`store.wait` per wait (after, pargo_dist/runtime/store_sync.py).

Rank 0's process hosts the job's TCPStore and, during a resume, does the long work the other ranks
wait for (a download, a conversion). Each waiting rank used to poll the store every 1 ms growing to
50 ms (`store.check` in a loop); now it sends one `store.wait`, which the store answers when the
key is set. Here 1,000 simulated waiting ranks (threads in a few processes, each with its own
connection to the store, as ranks have) wait on one key of a TCPStore hosted by this process,
while this process does a fixed amount of work (pure-Python arithmetic: the GIL-holding kind a
download loop or a conversion does). Printed: store requests per second, the work's time against
the same work with nobody waiting, and how long after the key was set every waiter had returned.

    .venv/bin/python benchmarks/store_waits.py                  # 1,000 waiters, ~7 min on 2 cores (connecting)
    .venv/bin/python benchmarks/store_waits.py --waiters 200 --work 2e6
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import resource
import time

POLL_MAX_S = 0.05  # what store_sync's wait_until polled at, at the slowest


def work(n: int) -> float:
    """A fixed amount of GIL-holding work; its wall time in seconds."""
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i % 7
    return time.perf_counter() - start


def waiters(port: int, threads: int, mode: str, counts, ready, index: int) -> None:
    """`threads` simulated ranks in this process, each with its own store client."""
    import threading

    import torch.distributed as dist

    clients = [dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=600))
               for _ in range(threads)]
    done = [0] * threads

    def rank(i: int) -> None:
        store = clients[i]
        requests = 0
        if mode == "poll":
            wait = 0.001
            while True:
                requests += 1
                if store.check(["go"]):
                    break
                time.sleep(wait)
                wait = min(POLL_MAX_S, wait * 2)
        else:
            requests += 1
            store.wait(["go"], datetime.timedelta(seconds=600))
        done[i] = requests

    ts = [threading.Thread(target=rank, args=(i,)) for i in range(threads)]
    ready.release()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    counts[index] = sum(done)
    clients[0].add("finished", threads)


def run(mode: str, total: int, procs: int, n: int, port_store) -> dict:
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=600),
                           wait_for_workers=False)
    ctx = mp.get_context("spawn")
    counts = ctx.Array("l", procs)
    ready = ctx.Semaphore(0)
    per = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=waiters, args=(master.port, per[i], mode, counts, ready, i)) for i in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.acquire()
    time.sleep(2.0)  # every waiter connected and waiting
    start = time.perf_counter()
    took = work(n)
    waited = time.perf_counter() - start
    master.set("go", b"1")
    released = time.perf_counter()
    master.wait(["finished"], datetime.timedelta(seconds=600))
    while master.add("finished", 0) < total:
        time.sleep(0.01)
    all_back = time.perf_counter() - released
    for p in ps:
        p.join()
    requests = sum(counts[:])
    return {"mode": mode, "requests": requests, "per_s": requests / (waited + 2.0), "work_s": took,
            "all_back_s": all_back}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiters", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="processes the waiters are spread over")
    ap.add_argument("--work", type=float, default=2e7, help="iterations of the host process's work")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.waiters + 256)), hard))
    n = int(args.work)
    alone = min(work(n) for _ in range(2))
    rows = [run(mode, args.waiters, args.procs, n, None) for mode in ("poll", "wait")]
    print(f"{args.waiters} waiting ranks ({args.procs} processes) on one TCPStore; the host process's work "
          f"alone: {alone:.2f} s")
    print()
    print("| waiting | store requests | requests/s | host's work | slowdown | all waiters back after the key |")
    print("|---|---|---|---|---|---|")
    names = {"poll": "polling, 1-50 ms (before)", "wait": "one store.wait (now)"}
    for r in rows:
        print(f"| {names[r['mode']]} | {r['requests']:,} | {r['per_s']:,.0f} | {r['work_s']:.2f} s | "
              f"{r['work_s'] / alone:.2f}x | {r['all_back_s']:.2f} s |")


if __name__ == "__main__":
    main()
