"""Test-only: start Python commands by forking a process that has already imported the stack.

Every rank, export or eval process imports torch, transformers, DeepSpeed, megatron-core and
mosaicml-streaming before it does anything: 6-8 s on a 2-core machine, and the test suite starts
well over a hundred such processes. A fork server imports them once and forks a child per
command, which then runs with the command's argv, environment, working directory, standard
streams, signal mask and session, as a fresh `python -m ...` would, only without the imports.

    python tests/support/forkserver.py /tmp/fs.sock &                # imports, then serves
    PARGO_TEST_FORKSERVER_SOCKET=/tmp/fs.sock pytest                 # tests/conftest.py does both

`Popen` below is `subprocess.Popen` with one difference: when PARGO_TEST_FORKSERVER_SOCKET names
a live server and the command can be forked safely, the server forks it. Otherwise (no server,
a command that is not `python -m MOD` / `python SCRIPT` / `python -c CODE` with this
interpreter, a `preexec_fn`, or an environment that differs from the server's in a variable
that the libraries read while they are imported, such as OMP_NUM_THREADS or HF_HOME) it is
exactly subprocess.Popen.

The product knows nothing of this: its launcher starts ranks, and a rank the universal
conversion, with plain `subprocess`. In a test process, tests/support/inject/sitecustomize.py
calls `route_product_children()`, which makes `subprocess.Popen` this class for the commands
the product starts (`python -m pargo_dist...`), so a test's `pargo-dist train --nproc 2` forks
the launcher and both of its ranks.

Why forking is safe here: the server only imports (no CUDA context, no process group, no
thread of its own: OpenBLAS's pool is one thread under OMP_NUM_THREADS=1), and a child resets
what a fresh interpreter would start with: environment, sys.path and PYTHONPATH's
sitecustomize, argv, the random generators (seeded from the OS), the signal mask. What the imports wrote into the
environment (DS_ACCELERATOR=cpu from pargo_dist.compat) is written again, as a fresh process's
imports would.

The child is the server's child, not the caller's: the caller learns its exit status over the
connection it asked on, and `die_with_parent` (the launcher's PR_SET_PDEATHSIG) becomes "the
server kills the child when that connection closes before the child exits". A caller that
signals the child's pid directly (send_signal, terminate, kill) reaches it as usual.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

ENV = "PARGO_TEST_FORKSERVER_SOCKET"

# Environment variables that a library may read while it is imported (thread pools, accelerators,
# hub paths, Python's own start-up flags): a command whose value differs from the server's
# start-up environment is not forked, since the server's imports already used the other value.
# Empty counts as unset, as Python and these libraries treat it.
_IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "KMP_", "DS_", "TORCH", "PYTORCH_", "CUDA_",
                         "NCCL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "LD_", "MALLOC_",
                         "PYTHON", "MEGATRON", "NVTE_")
# ...except those read only when used, which the child applies itself
_PER_COMMAND = {"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", ENV,
                "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM"}

PRELOAD = ("pargo_dist", "torch", "numpy",  # pargo_dist first: its torchvision shim (compat.py)
            "PIL.Image", "transformers", "deepspeed", "megatron.core", "streaming", "safetensors",
           "tensorboard", "pargo_dist.train.run", "pargo_dist.backends.deepspeed.backend",
           "pargo_dist.backends.megatron.backend", "pargo_dist.data.dataset", "pargo_dist.export.hf",
           "pargo_dist.evaluation.command", "pargo_dist.evaluation.generate", "pargo_dist.launch.node")


def set_pdeathsig() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (a preexec_fn)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if v and k.startswith(_IMPORT_TIME_PREFIXES) and k not in _PER_COMMAND}


def forkable_argv(argv: list[str]) -> bool:
    """`python -m MOD ...`, `python -c CODE ...` or `python SCRIPT ...` with this interpreter."""
    if len(argv) < 2 or os.path.abspath(argv[0]) != os.path.abspath(sys.executable):
        return False
    if argv[1] in ("-m", "-c"):
        return len(argv) >= 3
    return not argv[1].startswith("-")


# ---------------------------------------------------------------------------------------- client
class Popen(subprocess.Popen):
    """subprocess.Popen, forked by the server named in PARGO_TEST_FORKSERVER_SOCKET when it can be
    (see the module docstring); `forked` says which happened. `die_with_parent=True` kills the
    child when this process dies (PR_SET_PDEATHSIG when not forked by the server)."""

    def __init__(self, args, *, die_with_parent: bool = False, **kwargs):
        if _is_product_pdeathsig(kwargs.get("preexec_fn")):  # the launcher's ranks: the same request
            kwargs["preexec_fn"], die_with_parent = None, True
        self._conn: socket.socket | None = None
        self._status: int | None = None
        self._die_with_parent = die_with_parent
        self._new_session = bool(kwargs.get("start_new_session"))
        plain = (kwargs.get("preexec_fn") is None and not kwargs.get("shell") and kwargs.get("executable") is None
                 and not kwargs.get("pass_fds") and all(kwargs.get(k) is None for k in
                                                        ("user", "group", "extra_groups", "process_group"))
                 and kwargs.get("umask", -1) == -1)
        self._try_server = bool(os.environ.get(ENV)) and plain and isinstance(args, (list, tuple)) \
            and forkable_argv([os.fspath(a) for a in args])
        if die_with_parent and kwargs.get("preexec_fn") is None:
            kwargs["preexec_fn"] = set_pdeathsig  # used only if the server does not fork it
        super().__init__(args, **kwargs)

    @property
    def forked(self) -> bool:
        return self._conn is not None

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        if self._try_server:
            conn = self._ask_server([os.fspath(a) for a in args], cwd, env, (p2cread, c2pwrite, errwrite))
            if conn is not None:
                self._conn = conn
                self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
                return
        super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                               creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest)

    def _ask_server(self, argv, cwd, env, child_fds) -> socket.socket | None:
        fds = [fd if fd != -1 else default for fd, default in zip(child_fds, (0, 1, 2))]
        request = {"argv": argv, "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
                   "env": dict(os.environ if env is None else env),
                   "new_session": self._new_session, "die_with_client": self._die_with_parent,
                   "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            _wait_for_server(os.environ[ENV])
            conn.connect(os.environ[ENV])
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
            reply = json.loads(conn.recv(65536) or b'{"refused": "the server closed the connection"}')
        except OSError:
            conn.close()
            return None
        if "pid" not in reply:
            conn.close()
            if os.environ.get("PARGO_TEST_FORKSERVER_VERBOSE"):
                print(f"[forkserver] not forked ({reply.get('refused')}): {argv[:4]}", file=sys.stderr, flush=True)
            return None
        self.pid = reply["pid"]
        return conn

    def _try_wait(self, wait_flags):
        if self._conn is None:
            return super()._try_wait(wait_flags)
        if self._status is None:
            if wait_flags & os.WNOHANG and not _readable(self._conn, 0):
                return (0, 0)
            message = self._conn.recv(4096)
            # no message: the server itself is gone, so is its child (it kills children as it exits)
            self._status = json.loads(message)["status"] if message else signal.SIGKILL
            self._conn.close()
        return (self.pid, self._status)

    def _internal_poll(self, _deadstate=None, **_):
        if self._conn is None:
            return super()._internal_poll(_deadstate)
        if self.returncode is None:
            try:
                pid, status = self._try_wait(os.WNOHANG)
                if pid == self.pid:
                    self._handle_exitstatus(status)
            except (OSError, ValueError):
                if _deadstate is not None:
                    self.returncode = _deadstate
        return self.returncode

    def _wait(self, timeout):
        if self._conn is None:
            return super()._wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            if self._status is not None or _readable(self._conn, left):
                self._handle_exitstatus(self._try_wait(0)[1])
        return self.returncode


def _is_product_pdeathsig(fn) -> bool:
    """The launcher's preexec_fn (pargo_dist.launch.node.die_with_parent): what `die_with_parent`
    asks for, so a rank it starts can still be forked."""
    return getattr(fn, "__module__", None) == "pargo_dist.launch.node" and getattr(fn, "__name__", None) == "die_with_parent"


class ProductPopen(Popen):
    """subprocess.Popen in a test process once `route_product_children` ran: the product's own
    `python -m pargo_dist...` commands are forked by the server, every other command (a shell
    tool, a library's helper process) is exactly subprocess.Popen."""

    def _execute_child(self, args, *rest):
        argv = [os.fspath(a) for a in args] if isinstance(args, (list, tuple)) else []
        if not (len(argv) >= 3 and argv[1] == "-m" and argv[2].startswith("pargo_dist")):
            self._try_server = False
        return super()._execute_child(args, *rest)


def route_product_children() -> None:
    """In this process, the product's `python -m pargo_dist...` children (the launcher's ranks,
    the universal conversion) are forked by the server named in PARGO_TEST_FORKSERVER_SOCKET."""
    if os.environ.get(ENV) and subprocess.Popen is not ProductPopen:
        subprocess.Popen = ProductPopen


def _readable(sock: socket.socket, timeout: float | None) -> bool:
    """poll(2), not select(2): a test process may hold more than 1024 descriptors."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


def run(args, *, input=None, capture_output: bool = False, timeout: float | None = None, check: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with this module's Popen."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(args, stdin=subprocess.PIPE if input is not None else kwargs.pop("stdin", None), **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def _wait_for_server(path: str, timeout: float = 300.0) -> None:
    """A server still importing (its pid file is there, its socket not yet) is waited for."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        try:
            with open(f"/proc/{int(open(path + '.pid').read())}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":  # died while importing, not yet reaped
                    return
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.05)


def start(path: str, env: dict[str, str] | None = None, log=None) -> subprocess.Popen:
    """Start a server for `path` in the background; callers may use it at once (they wait for
    it to finish importing). It exits when the process that started it does."""
    proc = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), path], env=env, stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None, start_new_session=True)
    with open(path + ".pid", "w") as f:
        f.write(str(proc.pid))
    return proc


# ---------------------------------------------------------------------------------------- server
def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> dict:
    """Import `preload`, then fork a child per request until the parent process dies or this
    one is signalled. Returns (in a child only) the request the child must run."""
    import importlib

    start_env = dict(os.environ)
    parent = os.getppid()
    for name in preload:
        importlib.import_module(name)
    written = {k: v for k, v in os.environ.items() if start_env.get(k) != v}  # what the imports set
    gc.collect()
    gc.freeze()  # the imported heap is never scanned again, here or in a child (no copy-on-write either)
    state = {"start_env": start_env, "written": written, "sys_path": list(sys.path)}

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # the path appears only once the server accepts
    listener.listen(64)
    conns: dict[socket.socket, int] = {}
    children: dict[int, tuple[socket.socket | None, bool]] = {}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping and os.getppid() == parent:
        for sock in select.select([listener, *conns], [], [], 0.05)[0]:
            if sock is listener:
                request = _accept(listener, conns, children, state)
                if request is not None:  # this is the child
                    return request
            elif not sock.recv(4096):  # the caller is gone
                pid = conns.pop(sock)
                sock.close()
                if children.get(pid, (None, False))[1]:
                    _kill(pid)
                children[pid] = (None, False)
        _reap(conns, children)
    for pid in children:
        _kill(pid)
    listener.close()
    if os.path.exists(path):
        os.unlink(path)
    sys.exit(0)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(conns, children) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn, _ = children.pop(pid, (None, False))
        if conn is not None:
            conns.pop(conn, None)
            try:
                conn.send(json.dumps({"status": status}).encode())
            except OSError:
                pass
            conn.close()


def _accept(listener, conns, children, state):
    conn, _ = listener.accept()
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
    except (OSError, ValueError) as err:
        conn.close()
        print(f"[forkserver] bad request: {err}", file=sys.stderr, flush=True)
        return None
    refused = _refusal(request, state) or _other_namespaces(conn)
    if refused:
        print(f"[forkserver] runs fresh ({refused}): {' '.join(request['argv'][:4])}", flush=True)
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"refused": refused}).encode())
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        listener.close()
        for other in conns:
            other.close()
        _become(request, fds, state)
        # the caller's Popen returns once the child is what it asked for (session, streams, mask)
        conn.send(json.dumps({"pid": os.getpid()}).encode())
        conn.close()
        return request
    for fd in fds:
        os.close(fd)
    conns[conn] = pid
    children[pid] = (conn, bool(request.get("die_with_client")))
    return None


def _refusal(request, state) -> str | None:
    if not forkable_argv(request["argv"]):
        return "not a python -m/-c/script command of this interpreter"
    # a value that the server's own imports wrote (DS_ACCELERATOR=cpu) is the one they then used
    want, have = import_time_env(request["env"]), import_time_env(state["start_env"])
    wrote = import_time_env(state["written"])
    differ = sorted(k for k in set(want) | set(have) if want.get(k) not in (have.get(k), wrote.get(k, have.get(k))))
    return f"import-time environment differs: {', '.join(differ)}" if differ else None


_NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "cgroup")


def _other_namespaces(conn: socket.socket) -> str | None:
    """A fork lives in the server's namespaces: a caller in others (a test's second "node" with a
    private /dev/shm, a container) gets a fresh process, which stays in the caller's."""
    pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        differ = [ns for ns in _NAMESPACES if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")]
    except OSError as err:
        return f"cannot read the caller's namespaces: {err}"
    return f"the caller is in other {', '.join(differ)} namespace(s)" if differ else None


def _become(request, fds, state) -> None:
    """Turn this freshly forked child into the requested command's process (before it runs)."""
    if request.get("new_session"):
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)  # sys.stdin/out/err (and every handler holding them) now use the caller's
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    env = request["env"]
    os.environ.clear()
    os.environ.update(env)
    sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
    for key, value in state["written"].items():
        if key != "PYTHONUNBUFFERED":
            os.environ.setdefault(key, value)

    # sys.path as a fresh interpreter would build it: the script's directory (or the working
    # directory), then PYTHONPATH, then the rest (site-packages)
    old_pp = [p for p in state["start_env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    new_pp = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    argv = request["argv"]
    first = "" if argv[1] == "-c" else os.getcwd() if argv[1] == "-m" else os.path.dirname(os.path.abspath(argv[1]))
    rest = [p for p in state["sys_path"][1:] if p not in old_pp and os.path.abspath(p) not in new_pp]
    sys.path[:] = [first, *new_pp, *rest]

    import random

    import torch

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    torch.seed()  # a fresh interpreter seeds torch's generator from the OS too
    signal.pthread_sigmask(signal.SIG_SETMASK, [signal.Signals(s) for s in request["sigmask"]])
    if any(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in new_pp if p not in old_pp):
        import importlib

        sys.modules.pop("sitecustomize", None)
        importlib.import_module("sitecustomize")


def run_request(request: dict) -> None:
    """Run the command in this (child) process, as the interpreter would run it."""
    import runpy

    argv = request["argv"]
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        sys.modules.pop(argv[2], None)  # run fresh as __main__, as `python -m` does
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    elif argv[1] == "-c":
        sys.argv = ["-c", *argv[3:]]
        exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


def exit_quickly(code) -> None:
    """End a forked command that finished (returned or called sys.exit) as the interpreter would,
    less its last part: non-daemon threads are joined, atexit callbacks run (multiprocessing's
    reaping of loader workers, weakref.finalize, logging), every open file is flushed, then the
    process ends. The tearing down of thousands of imported modules that would follow takes most
    of a second and changes nothing outside the process. An exception still ends the usual way."""
    import atexit
    import io
    import threading

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for obj in gc.get_objects():
        if issubclass(type(obj), io.IOBase):  # type(), not isinstance: a dead weak proxy raises there
            try:
                if not obj.closed:
                    obj.flush()
            except (OSError, ValueError):
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/support/forkserver.py SOCKET_PATH")
    request = serve(sys.argv[1])
    try:
        run_request(request)
    except SystemExit as done:
        exit_quickly(done.code)
    exit_quickly(0)


if __name__ == "__main__":
    main()
