"""`pargo-dist eval`: detail recall and MME scoring against hand-computed values; the runner
against the trainer's own held-out loss (DeepSpeed and megatron TP=2 runs) and single-sample
generation; 2 ranks against 1; resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import forkserver
from pargo_dist.data.synthetic import SyntheticConfig, held_out, position_name, synthetic_scene
from pargo_dist.evaluation import mme
from pargo_dist.evaluation.details import aggregate, parse_question, parse_shapes, score_caption

TRUTH = ("There are 3 shapes. A small red circle at the top left. A large blue square at the centre. "
         "A small green cross at the bottom right.")


def test_detail_recall_counts_each_attribute_at_each_position():
    generated = ("There are 3 shapes . A small red circle at the top left . A small blue triangle at the centre . "
                 "A small yellow cross at the top . A small red circle at the top left .")
    s = score_caption(TRUTH, generated)
    # top left: all right; centre: colour right, kind and size wrong; bottom right: not named
    assert s["hit/all"] == 1 and s["hit/colour"] == 2 and s["hit/kind"] == 1 and s["hit/position"] == 2
    assert s["hit/size"] == 1 and s["true"] == 3
    assert s["named"] == 4 and s["correct"] == 2  # the repeated top-left shape is right twice
    assert s["count_right"] == 1
    other = score_caption("There is 1 shape. A large purple cross at row 2 column 3.",
                          "There are 2 shapes. A large purple cross at row 2 column 3.")
    pooled = aggregate([s, other, score_caption("a photo of a dog", "a dog")])
    assert pooled["recall/all"] == pytest.approx(2 / 4) and pooled["recall/position"] == pytest.approx(3 / 4)
    assert pooled["precision"] == pytest.approx(3 / 5) and pooled["count_acc"] == pytest.approx(1 / 2)
    assert pooled["images"] == 2  # the caption without shapes is not applicable, not a zero
    assert aggregate([]) == {}


def test_every_synthetic_caption_and_question_parses_back():
    cfg = SyntheticConfig(num_samples=60, grid=3)
    for i in range(60):
        scene = synthetic_scene(i, cfg)
        shapes = parse_shapes(scene["caption"])
        assert [(s.colour, s.kind, s.position) for s in shapes] == [
            (t["colour"], t["kind"], position_name(t["row"], t["col"], 3)) for t in scene["shapes"]]
        assert score_caption(scene["caption"], scene["caption"])["hit/all"] == len(shapes)
        for question, _ in scene["qa"]:
            assert parse_question(question) is not None


def test_mme_reads_both_layouts_and_scores_like_mme(tmp_path):
    cfg = held_out(SyntheticConfig(num_samples=1, image_size=48), 1)
    root = mme.write_synthetic(tmp_path / "mme", cfg, 24, first=10)
    questions = mme.load_benchmark(root)
    assert len(questions) == 48 and {q.answer for q in questions} == {"yes", "no"}
    assert {q.subtask for q in questions} == {"wrong_colour", "wrong_kind", "wrong_position"}
    for q in questions:  # each subtask is what the "no" question gets wrong at the asked cell
        index = int(q.image.stem.split("_")[1])
        assert 10 <= index < 34
        scene = synthetic_scene(index, cfg)
        colour, kind, where = parse_question(q.question)
        there = [s for s in scene["shapes"] if position_name(s["row"], s["col"], 3) == where]
        present = any((s["colour"], s["kind"]) == (colour, kind) for s in there)
        assert present == (q.answer == "yes")
        if q.answer == "no" and q.subtask == "wrong_colour":
            assert there[0]["kind"] == kind and there[0]["colour"] != colour
    # the flat layout (image and questions side by side) reads the same questions
    flat = tmp_path / "flat" / "existence"
    flat.mkdir(parents=True)
    for q in questions[:4]:
        shutil.copy(q.image, flat / q.image.name)
        shutil.copy(q.image.parent.parent / "questions_answers_YN" / f"{q.image.stem}.txt", flat)
    assert [(q.question, q.answer) for q in mme.load_benchmark(tmp_path / "flat")] == \
        [(q.question, q.answer) for q in sorted(questions[:4], key=lambda q: q.image.name)]

    # scores: image A both right, image B one right, image C both wrong ("other" answers)
    rows = [{"subtask": "existence", "image": img, "question": f"q{n}", "answer": ans, "prediction": pred}
            for img, n, ans, pred in [("a", 1, "yes", "Yes."), ("a", 2, "no", "no, there is not"),
                                      ("b", 1, "yes", "yes"), ("b", 2, "no", "Yes"),
                                      ("c", 1, "yes", "I think so"), ("c", 2, "no", "")]]
    rows += [{"subtask": "OCR", "image": "d", "question": "q", "answer": "no", "prediction": "No"}]
    s = mme.score(rows)
    assert s["mme/existence/acc"] == pytest.approx(100 * 3 / 6)
    assert s["mme/existence/acc_plus"] == pytest.approx(100 * 1 / 3)
    assert s["mme/existence/score"] == pytest.approx(50 + 100 / 3)
    assert s["mme/OCR/score"] == 200 and s["mme/perception"] == pytest.approx(250 + 100 / 3)
    assert s["mme/total"] == s["mme/perception"] and "mme/cognition" not in s
    assert s["mme/acc"] == pytest.approx(100 * 4 / 7) and s["mme/other"] == pytest.approx(2 / 7)
    assert [mme.parse_answer(a) for a in ("Yes", " NO.", "nope", "The answer is yes", "yes!")] == \
        ["yes", "no", "no", "other", "yes"]
    out = mme.write_results(rows, tmp_path / "res")
    assert (out / "existence.txt").read_text().splitlines()[3] == "b\tq2\tNo\tYes"

    bad = tmp_path / "bad" / "count"
    bad.mkdir(parents=True)
    shutil.copy(questions[0].image, bad / "x.png")
    (bad / "x.txt").write_text("Is there a red circle at the top?\tYes\nIs there a cat?  Maybe\n")
    with pytest.raises(ValueError, match=r"x.txt:2: expected 'question<TAB>Yes\|No'"):
        mme.load_benchmark(tmp_path / "bad")


# ----------------------------------------------------------------------------- the runner, for real


def run_eval(args: list[str], nproc: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    from support.training import env

    cmd = [sys.executable, "-m", "pargo_dist.cli", "eval", *args, "--nproc", str(nproc)]
    out = forkserver.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert out.returncode == expect, f"eval exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def rows(out: Path, name: str) -> dict[str, dict]:
    merged = {}
    for part in sorted((out / "parts").glob(f"{name}.rank*.jsonl")):
        for line in part.read_text().splitlines():
            if line.endswith("}"):  # not the line a kill cut short
                row = json.loads(line)
                merged[row["id"]] = row
    return merged


@pytest.fixture(scope="module")
def evaluated(reference, tmp_path_factory):
    """The 2-rank finetune reference run, evaluated on 2 ranks (held-out split + 12 MME images)."""
    run = reference(3, "finetune")
    out = tmp_path_factory.mktemp("eval") / "two"
    log = run_eval([str(run), "--out", str(out), "--tb", str(out / "tb"), "--mme-images", "12",
                    "--max-new-tokens", "24"], nproc=2)
    return run, out, log


def test_eval_loss_is_the_trainers_and_metrics_reach_tensorboard(evaluated):
    from pargo_dist.observe.report import read_scalars
    from support.training import losses

    run, out, log = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    # the trainer evaluated the whole held-out split (32 samples <= 8 batches x 4 x 2 ranks) at step 6,
    # right-padded under DeepSpeed; eval does it left-padded on the exported model
    assert metrics["step"] == 6 and metrics["samples"] == 32 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(losses(run, "eval/loss")[6], rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-9)
    assert 0 <= metrics["recall/all"] <= metrics["recall/position"] <= 1 and metrics["images"] == 32
    assert metrics["mme/acc"] == pytest.approx(mme.score(list(rows(out, "mme").values()))["mme/acc"])
    assert len(rows(out, "mme")) == 24 and len(rows(out, "captions")) == 32
    scalars = read_scalars(out / "tb")
    assert scalars["eval/heldout_loss"] == [(6, pytest.approx(metrics["loss"], rel=1e-6))]
    assert scalars["eval/recall/all"][0][0] == 6 and "eval/mme/acc_plus" in scalars
    assert "recall/all" in log.stdout and "mme/acc" in log.stdout


def test_batched_answers_are_single_sample_generation(evaluated):
    """Left-padded batches on 2 ranks give what one sample alone gives (caption and yes/no)."""
    import torch
    from PIL import Image

    from pargo_dist.evaluation.runner import Evaluator
    from pargo_dist.evaluation.generate import caption_image, held_out_image, load_exported

    _, out, _ = evaluated
    model, tokenizer, cfg = load_exported(out / "model")
    captions = rows(out, "captions")
    for index in (0, 5, 31):
        image, truth = held_out_image(cfg, index)
        assert captions[str(index)]["truth"] == truth
        assert captions[str(index)]["generated"] == caption_image(model, tokenizer, cfg, image, max_new_tokens=24)
    evaluator = Evaluator(model, tokenizer, cfg, torch.device("cpu"), 1, {"max_new_tokens": 4})
    questions = {q.key: q for q in mme.load_benchmark(out / "mme_synthetic")}
    for key, row in list(rows(out, "mme").items())[:4]:
        q = questions[key]
        alone = evaluator._generate([evaluator.question_prompt(q.question)],
                                    evaluator.pixels(Image.open(q.image).convert("RGB")).unsqueeze(0))
        assert row["prediction"] == alone[0]


def test_eval_resumes_on_another_rank_count_and_equals_the_whole_run(evaluated, tmp_path):
    _, out, _ = evaluated
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "mme_results")
    (resumed / "metrics.json").unlink()
    settings = json.loads((resumed / "settings.json").read_text())
    # a kill mid-way: rank 1's results lost, rank 0's last line cut short
    (resumed / "parts" / "captions.rank1.jsonl").unlink()
    part = resumed / "parts" / "mme.rank0.jsonl"
    kept = part.read_text().splitlines()[:5]
    part.write_text("\n".join(kept) + "\n" + '{"id": "wrong_col')  # no newline at the end
    done_before = len(rows(resumed, "captions")) + len(rows(resumed, "mme"))

    def lines_of_rank0() -> int:
        return sum(len(p.read_text().splitlines()) for p in (resumed / "parts").glob("*.rank0.jsonl"))

    before = lines_of_rank0()
    run_eval([settings["model"], "--out", str(resumed), "--tb", str(tmp_path / "tb"), "--mme-images", "12",
              "--max-new-tokens", "24"], nproc=1)
    whole, again = json.loads((out / "metrics.json").read_text()), json.loads((resumed / "metrics.json").read_text())
    assert again.keys() == whole.keys()
    for key in whole:
        assert again[key] == pytest.approx(whole[key], rel=1e-5), key
    assert lines_of_rank0() - before == 32 + 24 - done_before  # only what was missing was evaluated again


def test_eval_of_a_megatron_tp2_run_on_2_ranks_gives_the_trainers_loss(data_dir, tmp_path):
    """A megatron checkpoint saved at TP=2, evaluated on 2 ranks: rank 0 converts it once, before
    the ranks form their group (megatron's reader forms a one-process group of its own), the
    other rank waits for the export; both evaluate half the held-out split, whose loss is the
    trainer's own eval/loss at that step (the whole split, on the TP=2 model)."""
    from support.training import losses, run_train, write_recipe

    run = tmp_path / "run"
    run_train(write_recipe(tmp_path / "recipe.yaml", run, data_dir),
              ["backend.name=megatron", "backend.tensor_parallel=2", "train.micro_batch=8", "train.steps=2"], nproc=2)
    out = tmp_path / "eval"
    log = run_eval([str(run), "--out", str(out), "--tb", str(out / "tb"), "--mme", "none", "--no-generate"], nproc=2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["samples"] == 32 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(losses(run, "eval/loss")[2], rel=1e-5)
    assert log.stdout.count("exporting ") == 1 and not (out / "model.partial").exists()
    parts = [len((out / "parts" / f"captions.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert parts == [16, 16]


def test_sigterm_keeps_finished_batches_exits_for_requeue_and_the_rerun_finishes(evaluated, tmp_path):
    """A preempted evaluation: every rank writes its current batch and leaves with 75; the same
    command then does only the rest and gives the uninterrupted metrics."""
    import os
    import signal
    import time

    from support.training import env

    _, out, _ = evaluated
    args = [str(out / "model"), "--out", str(tmp_path / "ev"), "--mme-images", "12", "--max-new-tokens", "24",
            "--batch-size", "2"]
    proc = forkserver.Popen([sys.executable, "-m", "pargo_dist.cli", "eval", *args, "--nproc", "2"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    parts = tmp_path / "ev" / "parts"
    deadline = time.monotonic() + 300
    while not (parts.exists() and any(p.stat().st_size for p in parts.glob("*.jsonl"))):  # a first batch written
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher forwards it to both ranks
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, log[-3000:]
    assert "received signal 15: finished batches are kept in" in log
    assert 0 < len(rows(tmp_path / "ev", "captions")) + len(rows(tmp_path / "ev", "mme")) < 32 + 24
    assert not (tmp_path / "ev" / "metrics.json").exists()
    run_eval(args, nproc=1)
    whole = json.loads((out / "metrics.json").read_text())
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in whole.keys() - {"step"}:
        assert again[key] == pytest.approx(whole[key], rel=1e-5), key


def test_eval_skips_and_names_a_corrupt_image_and_refuses_bad_input(evaluated, tmp_path, capsys, monkeypatch):
    """In this process (one rank): a corrupt image is skipped, counted and named; a missing split,
    a missing model and another evaluation's results dir are one clear line each (exit 2)."""
    from pargo_dist.cli import main
    from pargo_dist.data.convert import write_dataset
    from pargo_dist.data.synthetic import synthetic_samples

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    _, out, _ = evaluated
    cfg = held_out(SyntheticConfig(num_samples=1, image_size=48), 6)
    samples = list(synthetic_samples(cfg))
    samples[2]["image"] = b"\x89PNG this is not an image"
    write_dataset(((s, None) for s in samples), str(tmp_path / "val"), progress=False)
    model = str(out / "model")
    assert main(["eval", model, "--out", str(tmp_path / "ev"), "--data", str(tmp_path / "val"), "--mme", "none",
                 "--max-new-tokens", "4"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["samples"] == 5 and metrics["skipped"] == 1
    assert "skipped sample synthetic:2 (index 2): bad_image" in capsys.readouterr().out
    assert main(["eval", model, "--out", str(tmp_path / "fast"), "--data", str(tmp_path / "val"), "--mme", "none",
                 "--no-generate"]) == 0  # loss and perplexity only
    fast = json.loads((tmp_path / "fast" / "metrics.json").read_text())
    assert fast["loss"] == pytest.approx(metrics["loss"], rel=1e-6) and "recall/all" not in fast
    assert "recall/all" in metrics
    assert main(["eval", model, "--out", str(tmp_path / "ev"), "--data", str(tmp_path / "val"), "--mme", "none",
                 "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "holds results of another evaluation" in err and "max_new_tokens': (4, 8)" in err
    assert main(["eval", model, "--out", str(tmp_path / "ev2"), "--data", str(tmp_path / "nothing")]) == 2
    assert "--data " + str(tmp_path / "nothing") + ": no MDS index.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
