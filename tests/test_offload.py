"""ZeRO-Offload with real ranks (gloo on CPU): optimizer state, and under ZeRO-3 the
parameters, kept in host memory. The backend keeps its client torch AdamW for the offloaded
partitions (backends/deepspeed/backend.py, offload_config), so an offloaded run trains, saves,
resumes and reshards like one without offload.

What these tests prove, and what they cannot: on CPU the "device" is host memory too, so
offloading moves no bytes between memories and saves none; that (the GPU memory an offload frees,
the time its copies cost) is for a GPU run (benchmarks/gpu_run.sh). What they prove is that the
recipe's offload keys reach DeepSpeed, which then runs its offload code path (its own flags say
so: DeepSpeedBackend.offloaded, printed at set-up), and that this path (gradients copied into
host-side buffers, the norm for clipping computed over them, our AdamW stepping the host copies,
the update written back, the offloaded state saved, loaded and resharded) does the same math as
the run without offload.

Tolerances: the offload path may add the same numbers in another order. So the offloaded curve is compared with the non-offloaded reference to rel 1e-5
(the same bound test_train.py uses for a change of float order; measured: equal to the last bit,
as were ZeRO-1/2 with the optimizer offloaded, and bf16); a resume replays the same offloaded
computation from saved state and is compared to 1e-6.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support.training import losses, marker, run_train, sample_ids, write_recipe

OFFLOAD = ["backend.offload_optimizer=true", "backend.offload_params=true"]


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory, data_dir):
    """An uninterrupted 2-rank ZeRO-3 run of the test recipe (6 steps, a checkpoint every 2) with
    the optimizer and the parameters offloaded."""
    tmp = tmp_path_factory.mktemp("offloaded")
    out = run_train(write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir), OFFLOAD, nproc=2)
    (tmp / "stdout.txt").write_text(out.stdout)  # beside the run, what it printed
    return tmp / "run"


def resumed_from_step_2(source, tmp_path, data_dir):
    """A copy of `source` as if it had been stopped right after its step-2 checkpoint: later
    checkpoints and logs gone, each rank's sample-id log cut at step 2 (as test_train.py's
    elastic test does). Returns (recipe, run dir)."""
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for step in (4, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    (run_dir / "train_log.jsonl").unlink()
    for f in run_dir.glob("sample_ids.rank*.jsonl"):
        f.write_text("".join(line + "\n" for line in f.read_text().splitlines() if json.loads(line)["step"] <= 2))
    assert marker(run_dir, 2).exists()
    return write_recipe(tmp_path / "recipe.yaml", run_dir, data_dir), run_dir


def test_offloaded_zero3_follows_the_reference_curve(offloaded, reference):
    """Offload changes where the fp32 partitions, Adam's moments and the parameters live, not the
    math: the same AdamW, param groups and LR schedule as the reference run. DeepSpeed itself says
    it offloaded both (its optimizer's flags), so this is the offload path, not the plain one."""
    said = (offloaded.parent / "stdout.txt").read_text()
    assert "ZeRO-Offload: optimizer state and parameters in host memory" in said, said[-2000:]
    got, ref = losses(offloaded), losses(reference(3, "finetune"))
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)
    assert all(marker(offloaded, step).exists() for step in (2, 4, 6))
    assert sample_ids(offloaded) == sample_ids(reference(3, "finetune"))


def test_offloaded_resume_reproduces_the_uninterrupted_run(offloaded, tmp_path, data_dir):
    """Saved from host memory and loaded back into it: Adam's moments and step come back, and the
    rest of the run replays the uninterrupted one."""
    recipe, run_dir = resumed_from_step_2(offloaded, tmp_path, data_dir)
    out = run_train(recipe, OFFLOAD, nproc=2)
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    got, ref = losses(run_dir), losses(offloaded)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got, ref)
    assert sample_ids(run_dir) == sample_ids(offloaded)


# Resharding into ZeRO-3 (here: 1 rank with offloaded parameters) loses the exact curve after the
# first step, with or without offload (1 rank with backend.zero3_on_one_rank=true does the same):
# DeepSpeed's ZeRO-3 universal loader gives every sub-group's Adam state one shared `step` tensor,
# which DeepSpeedBackend._load_universal keeps (torch.as_tensor returns it as it is), so each
# group's fused step advances the others' count too. A one-line fix in _load_universal (a tensor
# of its own per state); strict, so that the fix shows here.
@pytest.mark.parametrize("offload", [
    pytest.param(["backend.offload_optimizer=true"], id="zero2-offload-optimizer"),
    pytest.param(OFFLOAD, id="zero3-offload-all"),
])
def test_offloaded_two_rank_checkpoint_reshards_onto_one_rank(offloaded, tmp_path, data_dir, offload):
    """The offloaded 2-rank ZeRO-3 checkpoint resumed on 1 rank, offloaded again: with the optimizer
    offloaded the rank runs ZeRO-2, with the parameters too it keeps ZeRO-3 (zero_stage_for). The
    shards go through DeepSpeed's universal format into the new layout's host-memory partitions.
    1 rank x 8 = 2 ranks x 4: the same global batches, only the float order of the gradient sums
    differs."""
    stage = 3 if "backend.offload_params=true" in offload else 2
    recipe, run_dir = resumed_from_step_2(offloaded, tmp_path, data_dir)
    out = run_train(recipe, [*offload, "train.micro_batch=8"], nproc=1)
    assert f"elastic resume (dp 2, zero_stage 3 -> dp 1, zero_stage {stage})" in out.stdout
    offloaded_now = "optimizer state and parameters" if stage == 3 else "optimizer state"
    assert f"ZeRO-Offload: {offloaded_now} in host memory" in out.stdout
    assert "at step 2" in out.stdout
    ids = sample_ids(run_dir)
    seen = [i for s in sorted(ids) for i in ids[s]]
    assert sorted(ids) == list(range(1, 7)) and len(seen) == len(set(seen)) == 6 * 8
    got, ref = losses(run_dir), losses(offloaded)
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)
