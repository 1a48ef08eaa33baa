"""`make test`: the suite as N pytest sessions at once (2 by default; PARGO_TEST_GROUPS), each
running a group of the test files (tests/support/groups.py, pytest's `--group K/N`).

Why: a third of the suite's time the 2 cores wait (ranks meeting, timeouts a test waits out on
purpose, a SLURM job being scheduled), and another session's work fills it.

Each session runs in a mount namespace with a /dev/shm of its own, as a separate machine would
have: mosaicml-streaming keeps its per-node state there, and its `clean_stale_shared_memory`
(which some tests call) removes every streaming segment it finds, live ones included, so two
sessions on one /dev/shm could break each other's loaders. (pargo_dist's loaders remove only
stale ones: pargo_dist/data/shared_memory.py.) That needs root (`unshare -m`); without it the suite runs as one
session. Each session also gets its own temp dir (TMPDIR: streaming skips a shared-memory prefix
whose file lock exists in the temp dir, so two sessions' ranks sharing /tmp could each see a
different first free prefix), pytest base temp dir and cache (PARGO_DIST_CACHE).

Lines are prefixed with their group ("[1/2] "); arguments go to every pytest session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading

ISOLATE = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]


def can_isolate() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        [*ISOLATE, "true"], capture_output=True).returncode == 0


def main() -> int:
    args = sys.argv[1:]
    pytest = [sys.executable, "-m", "pytest"]
    groups = int(os.environ.get("PARGO_TEST_GROUPS", "2"))
    if groups < 2 or not can_isolate():
        if groups >= 2:
            print("run_groups: no `unshare -m` here (root is needed): the suite runs as one session", flush=True)
        return subprocess.call([*pytest, *args])
    base = tempfile.mkdtemp(prefix="pargo-test-groups-")
    procs = []
    for k in range(1, groups + 1):
        tmp = os.path.join(base, f"t{k}")
        os.makedirs(tmp)
        env = {**os.environ, "PARGO_DIST_CACHE": os.path.join(base, f"cache{k}"), "TMPDIR": tmp}
        cmd = [*ISOLATE, *pytest, *args, f"--group={k}/{groups}", f"--basetemp={os.path.join(base, f'tmp{k}')}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      bufsize=1))
    lock = threading.Lock()
    tails: list[list[str]] = [[] for _ in procs]

    def pump(k: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with lock:
                sys.stdout.write(f"[{k + 1}/{groups}] {line}")
                sys.stdout.flush()
            tails[k] = (tails[k] + [line.rstrip()])[-1:]

    threads = [threading.Thread(target=pump, args=(k, p)) for k, p in enumerate(procs)]
    for t in threads:
        t.start()
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        codes = [p.wait() for p in procs]
    for t in threads:
        t.join()
    if any(c == 0 for c in codes):  # a group with nothing selected (make test PYTEST_ARGS=tests/x.py) ran no test: 5
        codes = [0 if c == 5 else c for c in codes]
    for k, (code, tail) in enumerate(zip(codes, tails)):
        print(f"run_groups: group {k + 1}/{groups} exited {code}: {tail[-1] if tail else ''}", flush=True)
    if all(c == 0 for c in codes):
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"run_groups: the failed groups' temp dirs are kept under {base}", flush=True)
    return max(codes, key=lambda c: c != 0)


if __name__ == "__main__":
    sys.exit(main())
