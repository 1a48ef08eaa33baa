"""Test-only: what the tests inject into the processes they start, so the product carries no
test hooks. Python imports this at start-up because tests/conftest.py puts tests/support/inject
on PYTHONPATH for every process of the suite; each knob below acts only when its variable is set.

PARGO_TEST_FORKSERVER_SOCKET (set by tests/conftest.py): the product's own `python -m pargo_dist`
children (a launcher's ranks, the universal conversion) are forked by the suite's fork server
(tests/support/forkserver.py) instead of importing the stack afresh.

PARGO_TEST_FAULT="RANK:STEP" makes that rank ("*": every rank) raise a RuntimeError inside
training step STEP (1-based), as a bug, a damaged input or an OOM on that rank alone would.
"""

import os

if os.environ.get("PARGO_TEST_FORKSERVER_SOCKET"):
    import importlib.util as _util
    import sys as _sys

    _server = _sys.modules.get("support.forkserver")
    if _server is None:
        _spec = _util.spec_from_file_location(
            "support.forkserver", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               "forkserver.py"))
        _server = _sys.modules["support.forkserver"] = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_server)
    _server.route_product_children()

_spec = os.environ.get("PARGO_TEST_FAULT")
_rank = os.environ.get("RANK")
if _spec and _rank is not None and _spec.split(":")[0] in ("*", _rank):
    import pargo_dist.train.trainer

    _step = int(_spec.split(":")[1])
    _original = pargo_dist.train.trainer.Trainer.train_step

    def _train_step(trainer, micro_batches):
        if trainer.state.step + 1 == _step:
            raise RuntimeError(f"injected fault on rank {_rank} in step {_step}")
        return _original(trainer, micro_batches)

    pargo_dist.train.trainer.Trainer.train_step = _train_step

# PARGO_TEST_NODE_MEMORY="RANK:BYTES" makes that rank see a node of BYTES memory (a smaller node,
# or a cgroup limit), as ranks on nodes of different sizes would.
_memory = os.environ.get("PARGO_TEST_NODE_MEMORY")
if _memory and _rank is not None and _memory.split(":")[0] == _rank:
    import pargo_dist.runtime.node_memory

    pargo_dist.runtime.node_memory.node_memory_bytes = lambda *_, _bytes=int(_memory.split(":")[1]): _bytes

# PARGO_TEST_SLOW_SINGLE_RANK_S="SECONDS" makes the work one rank does for the others take that much
# longer: the elastic conversion and the download of a checkpoint from the store, as they take
# minutes for a 7B-70B model while the other ranks wait (against a short train.collective_timeout_s).
_slow = float(os.environ.get("PARGO_TEST_SLOW_SINGLE_RANK_S", "0") or 0)
if _slow and _rank is not None:
    import time

    import pargo_dist.backends.deepspeed.universal
    import pargo_dist.checkpoint.object_store

    def _slowed(fn):
        def slowed(*args, **kwargs):
            time.sleep(_slow)
            return fn(*args, **kwargs)
        return slowed

    _universal = pargo_dist.backends.deepspeed.universal
    _universal.convert_in_own_process = _slowed(_universal.convert_in_own_process)
    _remote = pargo_dist.checkpoint.object_store.RemoteCheckpoints
    _remote.download = _slowed(_remote.download)

# PARGO_TEST_SLOW_DOWNLOAD_FILE_S="SECONDS" makes a checkpoint download fetch one file at a time,
# each SECONDS late, as a large checkpoint's files take minutes: a test can act mid-download (stop
# the store, kill a node). PARGO_TEST_KILL_IN_DOWNLOAD="RANK:MARKER" makes that rank SIGKILL itself
# once its download has fetched one file, once (the first to get there creates MARKER), as a node
# that dies mid-download.
_slow_file = float(os.environ.get("PARGO_TEST_SLOW_DOWNLOAD_FILE_S", "0") or 0)
_kill_download = os.environ.get("PARGO_TEST_KILL_IN_DOWNLOAD", "")
if (_slow_file or _kill_download.split(":")[0] == _rank) and _rank is not None:
    import signal as _signal
    import time as _time

    import pargo_dist.checkpoint.object_store as _store

    _fetcher = _store.RemoteCheckpoints._fetcher

    def _one_by_one(self, *args, **kwargs):
        fetch = _fetcher(self, *args, **kwargs)

        def slowly(items):
            for item in items:
                _time.sleep(_slow_file)
                fetch([item])
                marker = ":".join(_kill_download.split(":")[1:])
                if _kill_download.split(":")[0] == _rank and not os.path.exists(marker):
                    open(marker, "w").close()
                    os.kill(os.getpid(), _signal.SIGKILL)
        return slowly

    _store.RemoteCheckpoints._fetcher = _one_by_one

# PARGO_TEST_FAST_RETRIES=1 makes object-store retries back off 10 ms instead of 0.5 s (an outage
# that outlasts them costs a test seconds, not half a minute per checkpoint).
if os.environ.get("PARGO_TEST_FAST_RETRIES") and _rank is not None:
    import pargo_dist.checkpoint.object_store

    pargo_dist.checkpoint.object_store.retried.__defaults__ = (6, 0.01)


# PARGO_TEST_WRITE_DELAY_S="SECONDS" delays every background checkpoint write, and
# PARGO_TEST_STAGE_DELAY_S="SECONDS" every copy of a background save to host memory, as a slow
# filesystem or a large checkpoint would: a test can then kill a run in the middle of a write, or
# see the next optimizer update wait for a copy.
_write_delay = float(os.environ.get("PARGO_TEST_WRITE_DELAY_S", "0") or 0)
_stage_delay = float(os.environ.get("PARGO_TEST_STAGE_DELAY_S", "0") or 0)
if (_write_delay or _stage_delay) and _rank is not None:
    import time as _time

    import pargo_dist.checkpoint.background_save as _background

    if _stage_delay:
        _snapshot = _background.host_snapshot

        def _slow_snapshot(*args, **kwargs):
            _time.sleep(_stage_delay)
            return _snapshot(*args, **kwargs)

        _background.host_snapshot = _slow_snapshot
    if _write_delay:
        _submit = _background.BackgroundWriter.submit

        def _slow_submit(writer, what, state, write):
            def slow_write(copy):
                _time.sleep(_write_delay)
                return write(copy)
            return _submit(writer, what, state, slow_write)

        _background.BackgroundWriter.submit = _slow_submit


def _around_step(before):
    """Trainer.train_step with `before(trainer, micro_batches)` run first; `before` may return a
    context manager held around the step (None: nothing)."""
    import contextlib

    import pargo_dist.train.trainer

    step = pargo_dist.train.trainer.Trainer.train_step

    def train_step(trainer, micro_batches):
        with before(trainer, micro_batches) or contextlib.nullcontext():
            return step(trainer, micro_batches)

    pargo_dist.train.trainer.Trainer.train_step = train_step


def _mine(spec):
    """The knob's fields after RANK when it names this rank, else None."""
    if spec and _rank is not None and spec.split(":")[0] == _rank:
        return spec.split(":")[1:]
    return None


# PARGO_TEST_KILL="RANK:STEP:MARKER" makes that rank SIGKILL itself at the start of training step
# STEP, once (the first to get there creates MARKER; a restarted run finds it and goes on), as a
# node that dies, a GPU that falls off the bus or the kernel's OOM killer would end it.
_kill = _mine(os.environ.get("PARGO_TEST_KILL"))
if _kill:
    import signal as _signal

    def _kill_at(trainer, _micro, _step=int(_kill[0]), _marker=":".join(_kill[1:])):
        if trainer.state.step + 1 == _step and not os.path.exists(_marker):
            open(_marker, "w").close()
            os.kill(os.getpid(), _signal.SIGKILL)

    _around_step(_kill_at)

# PARGO_TEST_SLOW_BATCH="RANK:SECONDS" makes that rank take SECONDS longer to get each batch ready,
# as a slow disk, a starved CPU or a busy host would: a straggler.
_slow_batch = _mine(os.environ.get("PARGO_TEST_SLOW_BATCH"))
if _slow_batch:
    import time as _time

    _around_step(lambda _trainer, _micro, _s=float(_slow_batch[0]): _time.sleep(_s))


def _nan_projector(trainer):
    """A context in which the model's projector outputs NaN."""
    import contextlib

    @contextlib.contextmanager
    def nan():
        hook = trainer.backend.module.projector.register_forward_hook(lambda _m, _i, out: out * float("nan"))
        try:
            yield
        finally:
            hook.remove()

    return nan()


# PARGO_TEST_NAN="RANK:STEP" makes that rank's projector output NaN in training step STEP, so its loss
# and the step's gradients are not finite, as a bad sample or an overflow would make them.
_nan = _mine(os.environ.get("PARGO_TEST_NAN"))
if _nan:
    _around_step(lambda trainer, _micro, _step=int(_nan[0]): _nan_projector(trainer)
                 if trainer.state.step + 1 == _step else None)

# PARGO_TEST_NAN_SAMPLE="ID" makes the projector output NaN in every step whose batch on this rank
# holds sample ID, as a sample that always overflows would: on any rank, every time it is read.
_nan_sample = os.environ.get("PARGO_TEST_NAN_SAMPLE")
if _nan_sample and _rank is not None:
    _around_step(lambda trainer, micro, _id=_nan_sample: _nan_projector(trainer)
                 if any(_id in b.sample_ids for b in micro) else None)

# PARGO_TEST_FREEZE="RANK:STEP:MARKER:TIMES" makes that rank stop itself (SIGSTOP) at the start of
# training step STEP, as a rank whose GPU hangs would: it neither progresses nor exits, so its peers
# wait in a collective until the hang detector ends them, and only SIGKILL removes it. At most TIMES
# times over a test: each freeze appends the rank's pid to MARKER, a restarted or requeued run that
# finds TIMES lines there goes on.
_freeze = _mine(os.environ.get("PARGO_TEST_FREEZE"))
if _freeze:
    import signal as _signal

    def _freeze_at(trainer, _micro, _step=int(_freeze[0]), _marker=":".join(_freeze[1:-1]), _times=int(_freeze[-1])):
        if trainer.state.step + 1 != _step:
            return
        try:
            with open(_marker) as f:
                frozen = len(f.read().split())
        except FileNotFoundError:
            frozen = 0
        if frozen < _times:
            with open(_marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), _signal.SIGSTOP)

    _around_step(_freeze_at)
