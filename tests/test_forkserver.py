"""tests/support/forkserver.py: a process forked by the server is the process a fresh interpreter
would have started (the suite's processes and the launcher's ranks rely on it), and what the
server must not fork runs fresh."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import forkserver

TESTS = str(Path(__file__).parent)  # for `from support import forkserver` in the processes below
PROBE = r'''
import atexit, json, os, random, signal, sys, threading, time
import torch
# what the end of a process must still do: join a thread, run atexit, flush a file never closed
kept = open(sys.argv[-2], "w")
kept.write("written, never closed")
atexit.register(lambda: sys.stderr.write("atexit ran\n"))
threading.Thread(target=lambda: (time.sleep(0.3), open(sys.argv[-2] + ".thread", "w").write("joined"))).start()
print(json.dumps({
    "argv": sys.argv, "name": __name__, "cwd": os.getcwd(),
    "path_head": sys.path[:3], "env": {k: os.environ.get(k) for k in ("PROBE_VAR", "OMP_NUM_THREADS")},
    "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "own_session": os.getsid(0) == os.getpid(),
    "sigterm": str(signal.getsignal(signal.SIGTERM)), "sigint": str(signal.getsignal(signal.SIGINT)),
    "stdin": sys.stdin.read(), "injected": os.environ.get("PROBE_INJECTED"),
    "torch_seed": torch.initial_seed(), "torch_rand": torch.rand(3).tolist(), "threads": torch.get_num_threads(),
    "random": random.random(),
}))
sys.stderr.write("to stderr\n")
sys.exit(int(sys.argv[-1]))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The suite's server (tests/conftest.py), or one of this module's own."""
    if os.environ.get(forkserver.ENV):
        yield os.environ[forkserver.ENV]
        return
    path = str(tmp_path_factory.mktemp("fs") / "s.sock")
    proc = forkserver.start(path)
    os.environ[forkserver.ENV] = path
    yield path
    del os.environ[forkserver.ENV]
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "pkg").mkdir()
    script = tmp_path / "pkg" / "probe.py"
    script.write_text(PROBE)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text("import os\nos.environ['PROBE_INJECTED'] = 'yes'\n")
    return script, inject


def run_probe(popen, script: Path, inject: Path, cwd: Path, exit_code: int, **kwargs):
    env = {**os.environ, "PROBE_VAR": "x", "PYTHONPATH": str(inject)}
    kept = cwd / "kept.txt"
    with popen([sys.executable, str(script), "a", str(kept), str(exit_code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, **kwargs) as proc:
        out, err = proc.communicate("some input", timeout=120)
    assert kept.read_text() == "written, never closed" and (cwd / (kept.name + ".thread")).read_text() == "joined"
    kept.unlink()
    (cwd / (kept.name + ".thread")).unlink()
    return proc, json.loads(out), err


def test_a_forked_command_is_the_fresh_one(server, probe, tmp_path):
    script, inject = probe
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # as the launcher holds signals for its ranks
    try:
        fresh, want, want_err = run_probe(subprocess.Popen, script, inject, tmp_path, 3, start_new_session=True)
        forked, got, got_err = run_probe(forkserver.Popen, script, inject, tmp_path, 3, start_new_session=True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    assert forked.forked and not isinstance(fresh, forkserver.Popen)
    assert forked.returncode == fresh.returncode == 3
    assert got_err == want_err == "to stderr\natexit ran\n"
    seeds = {key: got.pop(key) for key in ("random", "torch_seed", "torch_rand")}
    for key, value in seeds.items():  # both generators are seeded per process, from the OS
        assert value != want.pop(key)
    assert got == want
    assert want["injected"] == "yes" and want["own_session"] and int(signal.SIGUSR1) in want["mask"]
    assert want["path_head"][:2] == [str(script.parent), str(inject)]

    _, again, _ = run_probe(forkserver.Popen, script, inject, tmp_path, 0)
    assert not again["own_session"] and int(signal.SIGUSR1) not in again["mask"]
    assert again["torch_seed"] != seeds["torch_seed"] and again["random"] != seeds["random"]


def test_exit_status_of_an_exception_and_of_a_signal(server):
    crash = forkserver.run([sys.executable, "-c", "raise ValueError('on purpose')"], capture_output=True, text=True)
    assert crash.returncode == 1 and "ValueError: on purpose" in crash.stderr
    said = forkserver.run([sys.executable, "-c", "import sys; sys.exit('a message')"], capture_output=True, text=True)
    assert said.returncode == 1 and said.stderr == "a message\n"
    proc = forkserver.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert proc.forked
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    module = forkserver.run([sys.executable, "-m", "pargo_dist.cli", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "usage: pargo-dist" in module.stdout


def test_what_the_server_must_not_fork_runs_fresh(server, tmp_path):
    """An import-time variable that differs from the server's (here the thread count) would be
    ignored by a fork, whose libraries were imported with the server's: such a command runs fresh."""
    code = "import os; print(os.getppid(), os.environ['OMP_NUM_THREADS'])"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with forkserver.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) as proc:
        ppid, threads = proc.communicate(timeout=120)[0].split()
    assert not proc.forked and int(ppid) == os.getpid() and threads == "2"
    with forkserver.Popen(["/bin/sh", "-c", "exit 4"]) as shell:
        assert not shell.forked and shell.wait(timeout=30) == 4


def test_a_child_dies_with_the_process_that_asked_for_it(server, tmp_path):
    """The launcher's ranks die with it (PR_SET_PDEATHSIG for a fresh process); a forked rank is
    the server's child, so the server kills it when the launcher's connection closes."""
    client = subprocess.Popen([sys.executable, "-c", (
        f"import sys, time; sys.path.insert(0, {TESTS!r}); from support import forkserver\n"
        "p = forkserver.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], die_with_parent=True)\n"
        "print(p.pid, p.forked, flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    pid, forked = client.stdout.readline().split()
    assert forked == "True"
    os.kill(int(pid), 0)  # alive
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the forked child {pid} outlived the process that started it")


def test_a_caller_in_other_namespaces_gets_a_fresh_process(server):
    """A fork would live in the server's namespaces; a caller in its own mount namespace (the
    suite's second "node" with a private /dev/shm) must get a child in that namespace."""
    probe = ["unshare", "-m", "true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("needs `unshare -m` (root)")
    code = (f"import os, sys; sys.path.insert(0, {TESTS!r}); from support import forkserver\n"
            "p = forkserver.Popen([sys.executable, '-c', 'import os; print(os.readlink(\"/proc/self/ns/mnt\"))'],"
            " stdout=-1, text=True)\n"
            "print(p.forked, p.communicate()[0].strip(), os.readlink('/proc/self/ns/mnt'))")
    out = subprocess.run(["unshare", "-m", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    forked, child_ns, caller_ns = out.stdout.split()
    assert forked == "False" and child_ns == caller_ns != os.readlink("/proc/self/ns/mnt"), out.stderr
    same = forkserver.run([sys.executable, "-c", "import os; print(os.readlink('/proc/self/ns/mnt'))"],
                          capture_output=True, text=True)
    assert same.stdout.strip() == os.readlink("/proc/self/ns/mnt")
