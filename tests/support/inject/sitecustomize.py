"""Test-only fault injection: Python imports this at start-up when tests/support/inject is on
PYTHONPATH (tests/test_errors.py puts it there), so the product code carries no test hooks.

PARGO_TEST_FAULT="RANK:STEP" makes that rank ("*": every rank) raise a RuntimeError inside
training step STEP (1-based), as a bug, a damaged input or an OOM on that rank alone would.
"""

import os

_spec = os.environ.get("PARGO_TEST_FAULT")
_rank = os.environ.get("RANK")
if _spec and _rank is not None and _spec.split(":")[0] in ("*", _rank):
    import pargo_dist.train

    _step = int(_spec.split(":")[1])
    _original = pargo_dist.train.Trainer.train_step

    def _train_step(trainer, micro_batches):
        if trainer.state.step + 1 == _step:
            raise RuntimeError(f"injected fault on rank {_rank} in step {_step}")
        return _original(trainer, micro_batches)

    pargo_dist.train.Trainer.train_step = _train_step

# PARGO_TEST_NODE_MEMORY="RANK:BYTES" makes that rank see a node of BYTES memory (a smaller node,
# or a cgroup limit), as ranks on nodes of different sizes would.
_memory = os.environ.get("PARGO_TEST_NODE_MEMORY")
if _memory and _rank is not None and _memory.split(":")[0] == _rank:
    import pargo_dist.node_memory

    pargo_dist.node_memory.node_memory_bytes = lambda *_, _bytes=int(_memory.split(":")[1]): _bytes

# PARGO_TEST_SLOW_SINGLE_RANK_S="SECONDS" makes the work one rank does for the others take that much
# longer: the elastic conversion and the download of a checkpoint from the store, as they take
# minutes for a 7B-70B model while the other ranks wait (against a short train.collective_timeout_s).
_slow = float(os.environ.get("PARGO_TEST_SLOW_SINGLE_RANK_S", "0") or 0)
if _slow and _rank is not None:
    import time

    import pargo_dist.backends.deepspeed_universal
    import pargo_dist.remote_checkpoints

    def _slowed(fn):
        def slowed(*args, **kwargs):
            time.sleep(_slow)
            return fn(*args, **kwargs)
        return slowed

    _universal = pargo_dist.backends.deepspeed_universal
    _universal.convert_in_own_process = _slowed(_universal.convert_in_own_process)
    _remote = pargo_dist.remote_checkpoints.RemoteCheckpoints
    _remote.download = _slowed(_remote.download)

# PARGO_TEST_FAST_RETRIES=1 makes object-store retries back off 10 ms instead of 0.5 s (an outage
# that outlasts them costs a test seconds, not half a minute per checkpoint).
if os.environ.get("PARGO_TEST_FAST_RETRIES") and _rank is not None:
    import pargo_dist.remote_checkpoints

    pargo_dist.remote_checkpoints.retried.__defaults__ = (6, 0.01)

# PARGO_TEST_KILL="RANK:STEP:MARKER" makes that rank SIGKILL itself at the start of training step
# STEP, once (the first to get there creates MARKER; a restarted run finds it and goes on), as a
# node that dies, a GPU that falls off the bus or the kernel's OOM killer would end it.
_kill = os.environ.get("PARGO_TEST_KILL")
if _kill and _rank is not None and _kill.split(":")[0] == _rank:
    import signal as _signal

    import pargo_dist.train

    _kill_step, _marker = int(_kill.split(":")[1]), _kill.split(":", 2)[2]
    _step_before_kill = pargo_dist.train.Trainer.train_step

    def _killed_step(trainer, micro_batches):
        if trainer.state.step + 1 == _kill_step and not os.path.exists(_marker):
            open(_marker, "w").close()
            os.kill(os.getpid(), _signal.SIGKILL)
        return _step_before_kill(trainer, micro_batches)

    pargo_dist.train.Trainer.train_step = _killed_step

# PARGO_TEST_SLOW_BATCH="RANK:SECONDS" makes that rank take SECONDS longer to get each batch ready,
# as a slow disk, a starved CPU or a busy host would: a straggler.
_slow_batch = os.environ.get("PARGO_TEST_SLOW_BATCH")
if _slow_batch and _rank is not None and _slow_batch.split(":")[0] == _rank:
    import time as _time

    import pargo_dist.train

    _slow_s = float(_slow_batch.split(":")[1])
    _step_before_slow = pargo_dist.train.Trainer.train_step

    def _slow_step(trainer, micro_batches):
        _time.sleep(_slow_s)
        return _step_before_slow(trainer, micro_batches)

    pargo_dist.train.Trainer.train_step = _slow_step

# PARGO_TEST_NAN="RANK:STEP" makes that rank's projector output NaN in training step STEP, so its loss
# and the step's gradients are not finite, as a bad sample or an overflow would make them.
_nan = os.environ.get("PARGO_TEST_NAN")
if _nan and _rank is not None and _nan.split(":")[0] == _rank:
    import pargo_dist.train

    _nan_step = int(_nan.split(":")[1])
    _step_before_nan = pargo_dist.train.Trainer.train_step

    def _nan_step_fn(trainer, micro_batches):
        if trainer.state.step + 1 != _nan_step:
            return _step_before_nan(trainer, micro_batches)
        hook = trainer.backend.module.projector.register_forward_hook(lambda _m, _i, out: out * float("nan"))
        try:
            return _step_before_nan(trainer, micro_batches)
        finally:
            hook.remove()

    pargo_dist.train.Trainer.train_step = _nan_step_fn
