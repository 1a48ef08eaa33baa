"""The training loop on DeepSpeed, with real ranks (torchrun, gloo on CPU).

Tolerances: 2 ranks and 1 rank see the same global batches and the loss is normalised by the
global token count, so the math is identical; only the order of float additions differs
(ZeRO's reduce-scatter vs one rank's sum), which over a few Adam steps stays below 1e-4
relative. Exact resume compares the same computation replayed from saved state: equal to 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from support.training import (losses, marker, run_train, sample_ids, start_train, wait_for,
                              write_recipe)


@pytest.fixture
def recipe(tmp_path, data_dir):
    return write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)


def test_two_ranks_zero3_follow_the_one_rank_loss_curve(reference, tmp_path, data_dir):
    two = reference(3, "finetune")
    one_recipe = write_recipe(tmp_path / "one.yaml", tmp_path / "one", data_dir)
    run_train(one_recipe, ["train.micro_batch=8"], nproc=1)
    a, b = losses(two), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    ids2, ids1 = sample_ids(two), sample_ids(tmp_path / "one")
    for step in a:  # the same global batches, split differently over ranks
        assert sorted(ids2[step]) == sorted(ids1[step])
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a, b)
    assert a[6] < a[1] - 0.3  # and it learns


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference, recipe):
    run_dir = recipe.parent / "run"
    proc = start_train(recipe, [], nproc=2)
    wait_for(marker(run_dir, 2), proc)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank, no chance to clean up
    proc.wait()
    out = run_train(recipe, [], nproc=2)
    assert "resumed from" in out.stdout
    ref, got = losses(reference(3, "finetune")), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    assert sample_ids(run_dir) == sample_ids(reference(3, "finetune"))


def test_align_checkpoint_holds_only_the_projector(reference):
    ckpt = reference(2, "align") / "checkpoints" / "step_00000006" / "ds"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    names = set(states["module"])
    assert names and all(n.startswith("projector.") for n in names)


def test_elastic_resume_two_ranks_to_one_continues_the_uninterrupted_curve(reference, recipe):
    """A 2-rank ZeRO-3 checkpoint resumed on 1 rank (which runs ZeRO-2): the ZeRO shards are put
    together per parameter in DeepSpeed's universal format and cut again for the new layout, so
    weights, Adam's moments and step all come back (tests/test_checkpoint_elastic.py checks them
    exactly). The resumed run then follows the uninterrupted one (1 rank x 8 = 2 ranks x 4, as
    in the first test, only the float order of the gradient sums differs), and no sample is seen
    twice."""
    run_dir = recipe.parent / "run"
    shutil.copytree(reference(3, "finetune"), run_dir)
    for step in (4, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    (run_dir / "train_log.jsonl").unlink()
    for f in run_dir.glob("sample_ids.rank*.jsonl"):  # what the 2 ranks read up to the checkpoint
        f.write_text("".join(line + "\n" for line in f.read_text().splitlines() if json.loads(line)["step"] <= 2))
    out = run_train(recipe, ["train.micro_batch=8"], nproc=1)  # the same global batch
    assert ("elastic resume (dp 2, zero_stage 3 -> dp 1, zero_stage 2): weights, optimizer moments, schedule and "
            "data position restored") in out.stdout and "at step 2" in out.stdout
    ids = sample_ids(run_dir)
    seen = [i for s in sorted(ids) for i in ids[s]]
    assert sorted(ids) == list(range(1, 7)) and len(seen) == 6 * 8
    assert len(set(seen)) == len(seen)  # 512 samples, 48 consumed: no sample twice
    got, ref = losses(run_dir), losses(reference(3, "finetune"))
    assert sorted(got) == [3, 4, 5, 6]
    for step in got:  # the same math in another float order
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)


def test_export_round_trip_matches_the_logged_eval_loss(reference, tmp_path):
    from pargo_dist.config import load_config
    from pargo_dist.export.hf import export
    from pargo_dist.evaluation.generate import load_exported
    from pargo_dist import build
    from pargo_dist.constants import IGNORE_INDEX

    run_dir = reference(3, "finetune")
    out = export(run_dir, tmp_path / "export")
    model, tok, cfg = load_exported(out)
    cfg = load_config(out / "config.yaml")
    loader = build.loader(cfg, cfg.data.eval, model, tok, batch_size=4)
    total = n = 0.0
    with torch.no_grad():
        for batch in loader:  # the whole held-out split (32 samples), as the trainer evaluated it
            res = model(**batch.model_inputs())
            k = float((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            total, n = total + res.loss.item() * k, n + k
    assert n > 0
    logged = losses(run_dir, "eval/loss")[6]
    assert total / n == pytest.approx(logged, rel=1e-5)


def test_bad_recipes_fail_before_any_rank_starts(recipe):
    import sys

    from support import forkserver
    def cli(*args):
        return forkserver.run([sys.executable, "-m", "pargo_dist.cli", "train", str(recipe), *args, "--nproc", "2"],
                              capture_output=True, text=True, timeout=120)

    out = cli("optim.lrr=1e-3")
    assert out.returncode == 2
    assert "unknown key 'optim.lrr': did you mean 'optim.lr'?" in out.stderr and str(recipe) in out.stderr
    out = cli("train.steps=many")
    assert out.returncode == 2 and "train.steps: expected int, got 'many' (str)" in out.stderr
    out = cli("backend.zero_stage=4")
    assert out.returncode == 2 and "backend.zero_stage=4: must be one of [1, 2, 3]" in out.stderr
    assert not (recipe.parent / "run").exists()  # nothing started


def test_stage2_starts_from_the_stage1_projector(reference, tmp_path, data_dir):
    """model.init_from: stage 2 takes the projector stage 1 trained (from its export or its run
    dir), everything else from the recipe; a fresh run starts lower on the loss curve for it."""
    from safetensors.torch import load_file

    from pargo_dist import build
    from pargo_dist.backends.trained_weights import load_trained_weights
    from pargo_dist.config import load_config
    from pargo_dist.export.hf import export

    stage1 = reference(2, "align")
    exported = export(stage1, tmp_path / "stage1-export")
    trained = {k: v for k, v in load_file(exported / "model.safetensors").items() if k.startswith("projector.")}
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    cfg = load_config(recipe)
    tokenizer = build.build_tokenizer(cfg)
    fresh = build.build_model(cfg, tokenizer)
    for source in (exported, stage1):  # an export, or the run dir itself (consolidated)
        model = build.build_model(cfg, tokenizer)
        loaded = load_trained_weights(model, source, parts=["projector"])
        state, before = model.state_dict(), fresh.state_dict()
        assert sorted(loaded) == sorted(trained)
        assert all(torch.equal(state[k], trained[k]) for k in trained)
        assert any(not torch.equal(before[k], trained[k]) for k in trained)  # stage 1 did change it
        assert all(torch.equal(state[k], before[k]) for k in state if not k.startswith("projector."))
    out = run_train(recipe, [f"model.init_from={exported}", "train.steps=2"], nproc=2)
    assert f"initialised projector from {exported}" in out.stdout
    assert losses(tmp_path / "run")[1] < losses(reference(3, "finetune"))[1]
    with pytest.raises(ValueError, match="model.init_from=.*does not exist"):
        build.init_freeze_and_adapt(fresh, load_config(recipe, [f"model.init_from={tmp_path / 'nowhere'}"]))
    with pytest.raises(ValueError, match="model.init_parts"):
        load_config(recipe, ["model.init_parts=[projecter]"])


def test_frozen_parts_from_init_from_survive_resume_and_export(reference, tmp_path, data_dir):
    """Stage 1 from a trained tower and LLM (model.init_from, frozen), ZeRO-2: its checkpoints
    hold only the projector (the other save layout than test_resume_after_sigkill's ZeRO-3), so a
    resume and an export must take the backbones from init_from again, not from the recipe's
    random init. The resumed step equals the uninterrupted one, on the same samples; the export's
    backbones equal the source's."""
    from safetensors.torch import load_file

    from pargo_dist.export.hf import export

    source = export(reference(3, "finetune"), tmp_path / "source")
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    args = ["train.stage=align", f"model.init_from={source}", "model.init_parts=[vision_tower,language_model]",
            "train.steps=3", "checkpoint.every=1", "backend.zero_stage=2"]
    run_train(recipe, args, nproc=2)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000003")
    run_train(recipe, args, nproc=2)  # resumes at step 2, trains step 3 again
    steps = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    third = [r["train/loss"] for r in steps if r.get("step") == 3 and "train/loss" in r]
    assert len(third) == 2 and third[1] == pytest.approx(third[0], rel=1e-6)
    for f in (tmp_path / "run").glob("sample_ids.rank*.jsonl"):  # each rank read the same batch again
        again = [json.loads(line)["ids"] for line in f.read_text().splitlines() if json.loads(line)["step"] == 3]
        assert len(again) == 2 and again[0] == again[1]
    want = load_file(source / "model.safetensors")
    got = load_file(export(tmp_path / "run", tmp_path / "export") / "model.safetensors")
    backbone = [k for k in want if k.startswith(("vision_tower.", "language_model."))]
    assert backbone and all(torch.equal(got[k], want[k]) for k in backbone)
    assert any(not torch.equal(got[k], want[k]) for k in want if k.startswith("projector."))  # it trained


def test_compiled_blocks_under_two_rank_zero3_follow_the_eager_run(reference, recipe):
    """train.compile under ZeRO-3 on 2 ranks: the blocks are ZeRO-3 leaves whose gather hooks run
    around the compiled forward. aot_eager traces the same graphs inductor would compile (seconds
    instead of minutes on CPU; see tests/test_compile.py): the loss curve is the eager run's."""
    out = run_train(recipe, ["train.compile=true", "train.compile_backend=aot_eager", "checkpoint.every=100"], nproc=2)
    assert "transformer blocks compiled (aot_eager)" in out.stdout
    got, ref = losses(recipe.parent / "run"), losses(reference(3, "finetune"))
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)


def test_background_saves_are_marked_only_when_written_and_a_signal_waits_for_them(reference, recipe):
    """checkpoint.async_save, with every background write slowed by 1 s (the fault-injection knob):
    1. killed (SIGKILL) while the step-4 checkpoint is being written: that checkpoint has no
       COMPLETE marker, and the rerun resumes from step 2;
    2. the rerun, signalled (SIGTERM) as it resumes, saves after step 3 and waits for that save's
       writes, marks it complete, then exits 75 for requeue;
    3. a third run resumes from step 3 and finishes. The whole curve is the uninterrupted
       (synchronous) run's, to 1e-6: the background checkpoints hold exactly what sync ones do."""
    run_dir, slow = recipe.parent / "run", {"PARGO_TEST_WRITE_DELAY_S": "1"}
    args = ["checkpoint.async_save=true"]
    proc = start_train(recipe, args, nproc=2, extra_env=slow)
    wait_for(marker(run_dir, 2), proc)  # marked when step 4's save began (one save in flight)
    wait_for(run_dir / "checkpoints" / "step_00000004" / "meta.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not marker(run_dir, 4).exists()  # its shards were still being written

    proc = start_train(recipe, args, nproc=2, extra_env=slow)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("resumed from"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    assert "step_00000002" in lines[-1]
    assert out.index("checkpoint " + str(run_dir / "checkpoints" / "step_00000003") + " complete") \
        < out.index("exiting with 75")
    assert marker(run_dir, 3).exists()

    out = run_train(recipe, args, nproc=2)
    assert "resumed from" in out.stdout and "step_00000003" in out.stdout
    ref, got = losses(reference(3, "finetune")), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
