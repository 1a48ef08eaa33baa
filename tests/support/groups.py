"""The suite split into groups of test files of about equal time, for `--group K/N` (tests/conftest.py)
and tests/support/run_groups.py, which runs the groups at once.

A file's cost is its seconds in a full run (`benchmarks/suite_durations.py` on a `--durations=0`
log, 2026-12-07; test_torchrun.py from its own run, 2026-12-08); a file not listed counts 3 s. Whole files, not tests: a module's fixtures (the
SLURM cluster, a megatron run shared by its tests) are built once, in one group. The split is a
function of the file names alone, so every group agrees on it without talking to the others.
"""

from __future__ import annotations

SECONDS = {
    "test_torchrun.py": 90, "test_slurm.py": 64, "test_nodes.py": 60, "test_megatron.py": 56, "test_remote_checkpoints.py": 54, "test_train.py": 42,
    "test_restart.py": 32, "test_moe.py": 24, "test_streaming.py": 21, "test_eval.py": 16, "test_pretrained.py": 15,
    "test_plan.py": 12, "test_package.py": 11, "test_compile.py": 10, "test_offload.py": 10, "test_recipes.py": 9,
    "test_checkpoint_elastic.py": 9, "test_trackers.py": 9, "test_convert.py": 7, "test_errors.py": 7,
    "test_crops.py": 7, "test_grouping.py": 7, "test_portable_export.py": 7, "test_lora.py": 6, "test_mixture.py": 6,
}
UNLISTED = 3.0


def assign(files: list[str], groups: int) -> dict[str, int]:
    """file name -> group index (0-based): the costliest file first, each to the lightest group."""
    load = [0.0] * groups
    out = {}
    for name in sorted(files, key=lambda f: (-SECONDS.get(f, UNLISTED), f)):
        g = min(range(groups), key=lambda i: (load[i], i))
        out[name] = g
        load[g] += SECONDS.get(name, UNLISTED)
    return out
