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
