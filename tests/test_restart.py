"""Runs without a person: the launcher never restarts a bug in a loop (run.max_restarts), and a
diverging run skips non-finite steps and rolls back past the samples that caused it. Real ranks
over gloo; faults from tests/support/inject/sitecustomize.py (PARGO_TEST_FAULT, PARGO_TEST_NAN_SAMPLE).
A killed rank that restarts two nodes, and a straggler, are in test_slurm.py (the loopback
two-node test); a frozen rank that spends the restarts and requeues, on the real SLURM cluster."""

from __future__ import annotations

import json
import re
import time

import pytest
from support.training import crash_copy, losses, run_train, sample_ids, write_recipe

from pargo_dist.launch.restarts import RestartPolicy



def inject(**faults: str) -> dict[str, str]:
    """Fault knobs (tests/support/inject/sitecustomize.py, on every test process's PYTHONPATH)."""
    return dict(faults)


def test_the_same_failure_at_the_same_step_ends_the_run_after_one_retry(tmp_path, data_dir):
    """Rank 1 raises in step 3 every time (a bug, not a fault): one restart, then the same error at
    the same step ends the run with exit 1 and the rank's traceback, not a loop of restarts."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    out = run_train(recipe, ["run.max_restarts=3"], nproc=2, expect=1, extra_env=inject(PARGO_TEST_FAULT="1:3"))
    err = out.stderr
    assert err.count("restart 1 of at most 3") == 1 and "restart 2" not in err, err[-3000:]
    assert "not restarting: the same failure again at step 3 (RuntimeError: injected fault on rank 1 in step 3)" in err
    assert err.count("Traceback") >= 2 and "injected fault on rank 1 in step 3" in err


def test_the_restart_policy_counts_within_its_window_and_never_restarts_a_bad_input(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    policy = RestartPolicy(max_restarts=2, window_s=60)
    assert policy.refuse(2, None) == "a bad recipe, argument or input, or a run that diverged"
    for n in (1, 2):
        assert policy.refuse(137, None) is None and policy.note(None) == n
        clock[0] += 10
    assert "2 restart(s) within run.restart_window_s=60 s already" in policy.refuse(137, None)
    clock[0] += 60  # the first two leave the window
    assert policy.refuse(137, None) is None
    policy.note({"step": 4, "error": "RuntimeError: boom"})
    assert "same failure again at step 4" in policy.refuse(1, {"step": 4, "error": "RuntimeError: boom"})
    assert policy.refuse(1, {"step": 5, "error": "RuntimeError: boom"}) is None  # it got further: a fault


@pytest.mark.parametrize("backend", [["data.train.num_workers=1"],
                                     ["backend.name=megatron", "backend.tensor_parallel=2", "train.micro_batch=8"]],
                         ids=["zero3-loader-worker", "megatron-tp2"])
def test_a_sample_that_makes_nan_is_skipped_rolled_back_and_never_trained_on(reference, tmp_path, data_dir, backend):
    """One sample of step 3 makes its rank's loss NaN every time it is read (a fault knob). Step 3
    is skipped by every rank (DeepSpeed's overflow path; the megatron backend checks the norm
    before megatron's optimizer, which would apply it) and counted; with
    train.rollback_after_bad_steps=1 the run then goes back to the step-2 checkpoint and skips
    the samples of the ranks whose loss was NaN (ZeRO-3: rank 1's 4; TP=2: both ranks read the
    same 8) by id. Its whole curve is then exactly that of a run told to skip those samples from
    the start (data.train.skip_ids): weights, Adam, RNG and data position all came back."""
    ref = reference(3, "finetune")
    rank1_step3 = [json.loads(line) for line in (ref / "sample_ids.rank1.jsonl").read_text().splitlines()][2]
    assert rank1_step3["step"] == 3
    poisoned = rank1_step3["ids"][1]
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    out = run_train(recipe, ["train.rollback_after_bad_steps=1", *backend], nproc=2,
                    extra_env=inject(PARGO_TEST_NAN_SAMPLE=poisoned))
    culprits = sample_ids(ref)[3] if "backend.name=megatron" in backend else rank1_step3["ids"]
    assert "step 3 skipped: gradient norm" in out.stdout, out.stdout[-3000:]
    assert "rolled back to step 2 (rollback 1 after step 3: 1 step(s) in a row with a non-finite loss" in out.stdout
    said = re.search(rf"skipping {len(culprits)} sample\(s\) from now on: (.*) \(rollback 1 of at most 3", out.stdout)
    assert said and sorted(said.group(1).split(", ")) == sorted(culprits), out.stdout[-3000:]
    assert losses(tmp_path / "run", "train/skipped_steps") == {s: float(s >= 3) for s in range(1, 7)}
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["skipped_steps"] == 1 and meta["rollbacks"] == 1 and sorted(meta["excluded_samples"]) == sorted(culprits)
    assert not any(poisoned in ids for ids in sample_ids(tmp_path / "run").values())

    clean = write_recipe(tmp_path / "clean.yaml", tmp_path / "clean", data_dir)
    run_train(clean, [f"data.train.skip_ids=[{','.join(culprits)}]", *backend], nproc=2)
    got, want = losses(tmp_path / "run"), losses(tmp_path / "clean")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (step, got, want)
    assert sample_ids(tmp_path / "run") == sample_ids(tmp_path / "clean")


def test_a_skipped_step_leaves_the_run_as_if_its_batch_had_never_been_there(tmp_path, data_dir):
    """ZeRO-3, rank 1's projector output NaN in step 3 (a fault knob), no rollback
    (train.rollback_after_bad_steps=0): every rank skips the update through DeepSpeed's overflow
    path. The run without that batch: the same run's step-2 checkpoint, told it is at step 3 with
    the data one global batch further (meta.json edited). Steps 4-6 of both are equal: the skipped
    step moved neither the weights nor Adam's moments or step count, and the schedule and the data
    went on."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    out = run_train(recipe, ["train.rollback_after_bad_steps=0"], nproc=2, extra_env=inject(PARGO_TEST_NAN="1:3"))
    assert "step 3 skipped: gradient norm" in out.stdout and "rolled back" not in out.stdout, out.stdout[-3000:]
    assert losses(tmp_path / "run", "train/skipped_steps") == {s: float(s >= 3) for s in range(1, 7)}

    without = tmp_path / "without"
    without.mkdir()
    recipe = crash_copy(tmp_path / "run", without, data_dir, after=2)
    meta_path = without / "run" / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    batch = meta["samples_seen"] // 2  # one global batch: 2 steps so far
    meta.update(step=3, samples_seen=meta["samples_seen"] + batch)
    meta["loader"]["sample_in_epoch"] += batch
    meta_path.write_text(json.dumps(meta))
    run_train(recipe, [], nproc=2)
    got, want = losses(tmp_path / "run"), losses(without / "run")
    for step in (4, 5, 6):
        assert want[step] == pytest.approx(got[step], rel=1e-6, abs=1e-7), (step, got, want)
