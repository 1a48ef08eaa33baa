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
