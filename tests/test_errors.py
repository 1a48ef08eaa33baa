"""What a user sees when something goes wrong, through the launcher with real ranks: a failure
keeps its traceback and exits 1, fast, even when only one rank fails; what the user can fix
(a recipe typo, a missing dataset, a shard that does not decompress) is one line and exit 2, with
no traceback.

Faults are injected by tests/support/inject/sitecustomize.py (PARGO_TEST_FAULT="RANK:STEP"),
which Python loads at start-up from PYTHONPATH: the product code has no test hooks.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from support.training import env, write_recipe

from support import forkserver
LAUNCHER = Path(__file__).parents[1] / "launchers" / "launch.py"


@pytest.fixture
def recipe(tmp_path, data_dir):
    return write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)


def launch(recipe: Path, *overrides: str, fault: str | None = None, nproc: int = 2):
    extra = {}
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


def test_a_shard_that_does_not_decompress_is_one_line_naming_it_and_exit_2(tmp_path):
    """A shard truncated after it was written (a bad upload or copy) does not decompress. Before,
    the run ended in a 60-line traceback (zstd.Error during a FileNotFoundError for the
    decompressed name), in a misleading "gave no batch" when streaming's prefetch thread met it
    first, or hung (this run: a loader worker waiting for ever for the shard streaming left
    "preparing"). Now each rank that reads it names the stream and the file in one line, with the
    fix, and the run exits 2."""
    from pargo_dist.data.synthetic import SyntheticConfig, write_splits

    data = tmp_path / "data"
    write_splits(str(data), SyntheticConfig(num_samples=32, image_size=48), held_out_samples=8, size_limit=4096,
                 progress=False)  # 4 zstd shards of 8 samples: every rank reads shard 1 in its first epoch
    victim = data / "train" / "shard.00001.mds.zstd"
    victim.write_bytes(victim.read_bytes()[:100])
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data)
    out, took = launch(recipe, "train.steps=3", "checkpoint.every=0", "data.train.num_workers=1")
    assert out.returncode == 2, out.stderr[-3000:]
    named = [line for line in out.stderr.splitlines() if victim.name in line]
    assert named, out.stderr[-3000:]
    line = re.compile(rf"pargo-dist train: rank [01]: error: data stream {re.escape(str(victim.parent))}: "
                      rf"shard {re.escape(victim.name)} is damaged .*; "
                      r"re-convert it with `pargo-dist convert` or re-upload it")
    assert all(line.fullmatch(text) for text in named), named
    assert not any(text in out.stderr for text in ("Traceback", "zstd.Error", "DataLoader worker")), out.stderr[-3000:]
    assert took < 60, took
