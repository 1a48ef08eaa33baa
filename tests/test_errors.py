"""What a user sees when something goes wrong, through the launcher with real ranks: a failure
keeps its traceback and exits 1, fast, even when only one rank fails; what the user can fix
(a recipe typo, a missing dataset) is one line and exit 2, with no traceback.

Faults are injected by tests/support/inject/sitecustomize.py (PARGO_TEST_FAULT="RANK:STEP"),
which Python loads at start-up from PYTHONPATH: the product code has no test hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.training import env, write_recipe

from pargo_dist import forkserver

INJECT = str(Path(__file__).parent / "support" / "inject")
LAUNCHER = Path(__file__).parents[1] / "launchers" / "launch.py"


@pytest.fixture
def recipe(tmp_path, data_dir):
    return write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)


def launch(recipe: Path, *overrides: str, fault: str | None = None, nproc: int = 2):
    extra = {"PYTHONPATH": os.pathsep.join(filter(None, [INJECT, os.environ.get("PYTHONPATH")]))}
    if fault:
        extra["PARGO_TEST_FAULT"] = fault
    start = time.monotonic()
    out = forkserver.run([sys.executable, str(LAUNCHER), "--nproc", str(nproc), "--", str(recipe), *overrides],
                         capture_output=True, text=True, timeout=300, env={**env(), **extra})
    return out, time.monotonic() - start


def test_an_exception_on_one_rank_ends_the_run_at_once_with_its_traceback(recipe):
    """Rank 1 raises in step 2 (a bug, an OOM, a damaged input that only it reads) while rank 0
    waits for it in the step's all-reduce. Before, rank 1 sat in the teardown barrier with its
    error unprinted and rank 0 waited for the hang detector (30 minutes), and any ValueError was
    printed as one line, exit 2, "bad recipe". Now rank 1 prints its traceback and leaves, rank 0
    says it lost a peer, and the launcher names rank 1 and returns its exit code 1, in seconds."""
    out, took = launch(recipe, "train.hang_timeout_s=1800", fault="1:2")
    assert out.returncode == 1, out.stderr[-3000:]
    assert took < 30, took  # the whole run, start-up included
    err = out.stderr
    assert "pargo-dist train: rank 1 failed:\nTraceback (most recent call last):" in err
    assert "RuntimeError: injected fault on rank 1 in step 2" in err
    assert "pargo-dist launch: rank 1 exited with 1 (failed: its traceback is above)" in err
    assert "rank 0: a peer rank went away during a collective" in err or "rank 0 failed" not in err
    assert "step 1/6" in out.stdout and "step 2/6" not in out.stdout
    assert "bad recipe" not in err


def test_what_the_user_can_fix_is_one_line_and_exit_2(recipe, tmp_path):
    typo, _ = launch(recipe, "optim.lrr=1e-3")  # caught by the launcher before any rank starts
    assert typo.returncode == 2
    assert "unknown key 'optim.lrr': did you mean 'optim.lr'? valid keys in section 'optim': lr," in typo.stderr
    assert "Traceback" not in typo.stderr and not (tmp_path / "run").exists()
    # A bad input the ranks find (a split without an MDS dataset) is checked the same way through
    # sbatch in test_slurm.py::test_a_job_that_fails_for_a_real_error_is_not_requeued.
