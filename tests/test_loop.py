"""The training loop's own logic, in-process with a fake backend (tests/support/fake_backend.py):
when it evaluates, saves and stops, what it counts and hands the backend, how it resumes.

The fake is a deterministic bigram LM trained with SGD, so "resumes exactly" is checked as
equality of the loss curve; one real 1-rank gloo process group serves the loop's all-reduces.
What needs real ranks and real backends (ZeRO partitions, megatron layouts, SIGKILL) is in
test_train.py and test_megatron.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
import torch.distributed as dist
from support.fake_backend import FakeBackend, ListLoader

from pargo_dist.backends.base import Backend
from pargo_dist.checkpoint.manager import CheckpointManager
from pargo_dist.checkpoint.state import TrainState
from pargo_dist.config import load_config
from pargo_dist.data.collate import Collator
from pargo_dist.errors import Diverged, UserError
from pargo_dist.observe.metrics import MetricsLogger
from pargo_dist.runtime.signals import StopSignal
from pargo_dist.runtime.exits import REQUEUE_EXIT
from pargo_dist.train.trainer import Trainer

MICRO = 3  # samples per micro-batch


@pytest.fixture(scope="module", autouse=True)
def one_rank_group(tmp_path_factory):
    """The loop all-reduces its counts: a real 1-rank gloo group, in this process."""
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def batches(n: int, seed: int = 0) -> list:
    """n collated micro-batches of random token rows: a prompt (ignored), an answer, padding;
    samples alternate between two streams of a mixture."""
    g = torch.Generator().manual_seed(seed)
    collate = Collator(pad_id=0)
    out = []
    for b in range(n):
        examples = []
        for i in range(MICRO):
            k = int(torch.randint(6, 12, (1,), generator=g))
            ids = torch.randint(1, 32, (k,), generator=g).tolist()
            labels = [-100] * 3 + ids[3:]
            examples.append({"id": f"s{b}:{i}", "input_ids": ids, "labels": labels, "stream": (b * MICRO + i) % 2})
        out.append(collate(examples))
    return out


def recipe(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(None, [f"run.dir={tmp_path}", "train.steps=6", "train.grad_accum=2", "train.eval_every=0",
                              "train.sample_every=0", "checkpoint.every=0", "checkpoint.keep_last=10",
                              "logging.every=100", "logging.tensorboard=false", "logging.sample_ids=true",
                              *overrides])


def trainer(cfg, backend=None, loader=None, eval_batches=None, resume=False):
    backend = backend or FakeBackend()
    ckpt = CheckpointManager(cfg.run.dir, keep_last=cfg.checkpoint.keep_last)
    held_out = eval_batches if eval_batches is not None else batches(2, seed=99)
    return Trainer(cfg, backend, loader or ListLoader(batches(40)), ckpt,
                   MetricsLogger(cfg.run.dir, total_steps=cfg.train.steps, enabled_tensorboard=False),
                   StopSignal(), model=backend.module, eval_loader=lambda: held_out, streams=["a", "b"],
                   resume_from=ckpt.latest() if resume else None)


def run(t: Trainer) -> int:
    try:
        return t.run()
    finally:
        t.stop.close()


def logged(run_dir, key="train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_the_fake_follows_the_backend_contract():
    assert isinstance(FakeBackend(), Backend)


def test_each_step_hands_the_backend_the_global_answer_token_count_and_counts_what_it_read(tmp_path):
    cfg = recipe(tmp_path, "checkpoint.every=6")
    data = batches(40)
    t = trainer(cfg, loader=ListLoader(data))
    assert run(t) == 0
    trained = [v for kind, v in t.backend.calls if kind == "train"]
    want = [float(data[2 * s].num_targets + data[2 * s + 1].num_targets) for s in range(6)]
    assert trained == want  # grad_accum=2: both micro-batches' targets, counted at collate time
    state = CheckpointManager.load_state(tmp_path / "checkpoints" / "step_00000006")
    assert state.step == 6 and state.samples_seen == 6 * 2 * MICRO
    assert state.tokens_seen == sum(b.num_tokens for b in data[:12])
    assert state.stream_samples == {"a": 18, "b": 18} and state.loader == {"consumed": 12}
    assert state.backend == "fake" and state.layout == {"dp": 1} and state.world_size == 1
    loss = logged(tmp_path)
    assert sorted(loss) == list(range(1, 7)) and loss[6] < loss[1]
    # the logged loss is the global mean over answer tokens: the fake's summed loss / targets
    ids = [json.loads(line)["ids"] for line in (tmp_path / "sample_ids.rank0.jsonl").read_text().splitlines()]
    assert ids[0] == data[0].sample_ids + data[1].sample_ids


def test_evaluation_and_checkpoints_come_when_the_recipe_says_and_at_the_end(tmp_path):
    cfg = recipe(tmp_path, "train.steps=7", "train.eval_every=3", "checkpoint.every=2", "checkpoint.keep_last=2")
    held_out = batches(2, seed=99)
    t = trainer(cfg, eval_batches=held_out)
    assert run(t) == 0
    order = [(kind, v) for kind, v in t.backend.calls if kind != "train"]
    evals = [("eval", b.num_targets) for b in held_out]
    assert order == [("save", 2), *evals, ("save", 4), *evals, ("save", 6), *evals, ("save", 7)]
    assert sorted(logged(tmp_path, "eval/loss")) == [3, 6, 7]
    assert CheckpointManager(tmp_path).complete_steps() == [6, 7]  # keep_last=2


def test_a_signal_saves_after_the_step_exits_75_and_the_resume_continues_exactly(tmp_path):
    whole = tmp_path / "whole"
    assert run(trainer(recipe(whole))) == 0
    cut = tmp_path / "cut"
    cfg = recipe(cut)
    first = trainer(cfg)
    first.backend.hooks[2] = lambda: os.kill(os.getpid(), signal.SIGTERM)  # during step 3
    assert run(first) == REQUEUE_EXIT
    assert CheckpointManager(cut).complete_steps() == [3]  # finished the step, saved, stopped
    assert sorted(logged(cut)) == [1, 2, 3]
    second = trainer(cfg, resume=True)  # a fresh backend and loader, as after a requeue
    assert run(second) == 0
    assert second.loader.consumed == 12 and second.state.samples_seen == 6 * 2 * MICRO
    assert logged(cut) == logged(whole)  # steps 4-6 from the checkpoint equal the uninterrupted run


def test_a_checkpoint_without_its_marker_is_never_resumed_from(tmp_path):
    """A crash in the middle of the last save leaves a directory without COMPLETE: the resume
    takes the one before it and replays the lost steps exactly."""
    whole = tmp_path / "whole"
    cfg = recipe(whole, "checkpoint.every=2")
    assert run(trainer(cfg)) == 0
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    (cut / "checkpoints" / "step_00000006" / "COMPLETE").unlink()
    (cut / "train_log.jsonl").unlink()
    t = trainer(recipe(cut, "checkpoint.every=2"), resume=True)
    assert t.resume_from.name == "step_00000004"
    assert run(t) == 0
    assert logged(cut) == {s: v for s, v in logged(whole).items() if s > 4}


def test_resume_refuses_a_checkpoint_of_another_backend(tmp_path):
    cfg = recipe(tmp_path)
    ckpt = CheckpointManager(tmp_path)
    step_dir = ckpt.begin(2)
    ckpt.save_state(step_dir, TrainState(step=2, backend="megatron"))
    ckpt.commit(step_dir, 2)
    with pytest.raises(UserError, match="written by the megatron backend, this recipe uses fake"):
        run(trainer(cfg, resume=True))


def test_a_resume_at_another_layout_says_so_and_continues_the_schedule_and_the_data_exactly(tmp_path, capsys):
    """Every backend's load reshards (weights and optimizer; no weights-only fallback), so a resume
    at another layout is the loop's ordinary resume plus a line that says so. The fake saves as
    "dp 2" and resumes as dp 1 with the same arithmetic: steps 4-6 equal the uninterrupted run's."""
    cfg = recipe(tmp_path, "checkpoint.every=3")
    assert run(trainer(cfg, FakeBackend(dp=2))) == 0
    whole = logged(tmp_path)
    (tmp_path / "checkpoints" / "step_00000006").rename(tmp_path / "later")  # resume at 3
    (tmp_path / "train_log.jsonl").unlink()
    t = trainer(cfg, FakeBackend(), resume=True)
    assert run(t) == 0
    out = capsys.readouterr().out
    assert ("elastic resume (dp 2 -> dp 1): weights, optimizer moments, schedule and data position restored, "
            "resharded for this layout") in out
    assert "resumed from" in out
    assert t.loader.consumed == 12 and t.state.step == 6
    assert logged(tmp_path) == {s: v for s, v in whole.items() if s > 3}


def test_empty_training_data_is_an_error_that_says_so(tmp_path):
    with pytest.raises(UserError, match="gave no batch"):
        run(trainer(recipe(tmp_path), loader=ListLoader([])))


def test_a_loss_spike_rolls_back_and_the_run_continues_as_if_its_samples_were_never_there(tmp_path, capsys):
    """A sample that multiplies its batch's loss by 50 in step 4 (past a window of 2 steps, factor
    3): the run goes back to the step-2 checkpoint, skips that step's samples by id, and its curve
    is then exactly that of a run whose loader never had them. The samples are named, kept in the
    checkpoint (a resume skips them too) and in run.dir/excluded_samples.json."""
    data = batches(40)
    spiky = data[7].sample_ids[1]  # step 4 takes micro-batches 6 and 7
    step4 = data[6].sample_ids + data[7].sample_ids
    cfg = recipe(tmp_path / "spike", "checkpoint.every=2", "train.loss_spike_factor=3", "train.loss_spike_window=2")
    t = trainer(cfg, loader=ListLoader(data))
    t.backend.poison[spiky] = 50.0
    assert run(t) == 0
    out = capsys.readouterr().out
    assert "rolled back to step 2 (rollback 1 after step 4: loss" in out and "x the mean" in out, out
    assert f"skipping 6 sample(s) from now on: {', '.join(step4)} (rollback 1 of at most 3" in out
    assert t.state.rollbacks == 1 and sorted(t.state.excluded_samples) == sorted(step4)
    assert CheckpointManager.load_state(tmp_path / "spike" / "checkpoints" / "step_00000006").excluded_samples.keys() \
        == set(step4)
    assert json.loads((tmp_path / "spike" / "excluded_samples.json").read_text()).keys() == set(step4)
    clean = ListLoader(data)
    clean.exclude(step4)
    assert run(trainer(recipe(tmp_path / "clean", "checkpoint.every=2"), loader=clean)) == 0
    got, want = logged(tmp_path / "spike"), logged(tmp_path / "clean")  # the last value logged per step
    assert got == want
    assert logged(tmp_path / "spike", "train/rollbacks") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 1}


def test_a_rollback_sticks_through_a_restart(tmp_path, monkeypatch):
    """Three non-finite steps in a row (3-5; rollback_after_bad_steps=3) span the step-4 checkpoint.
    The rollback goes back to step 2, retires the step-4 checkpoint (saved after the divergence
    began) and saves step 2 again with the rollback in it. The run is then killed at once (before
    any later checkpoint): the restart resumes from step 2, skipping the bad samples, with the
    rollback counted (so train.max_rollbacks cannot be evaded by a restart), and its curve is that
    of the run that was not killed. Before, the restart resumed from step 4, without either."""
    data = batches(40)
    bad = [data[b].sample_ids[0] for b in (4, 6, 8)]  # steps 3, 4 and 5
    overrides = ("train.rollback_after_bad_steps=3", "checkpoint.every=2", "train.steps=8")

    def poisoned(cfg, **kw):
        t = trainer(cfg, loader=ListLoader(data), **kw)
        for sample in bad:
            t.backend.poison[sample] = float("nan")
        return t

    assert run(poisoned(recipe(tmp_path / "whole", *overrides))) == 0

    class Killed(Exception):
        pass

    roll_back = Trainer._roll_back

    def then_killed(self, verdict):
        roll_back(self, verdict)
        raise Killed  # as a SIGKILL right after the rollback would end the run

    monkeypatch.setattr(Trainer, "_roll_back", then_killed)
    cfg = recipe(tmp_path / "killed", *overrides)
    with pytest.raises(Killed):
        run(poisoned(cfg))
    monkeypatch.setattr(Trainer, "_roll_back", roll_back)
    ckpt = CheckpointManager(cfg.run.dir)
    assert ckpt.complete_steps() == [2]  # step 4 retired
    state = CheckpointManager.load_state(ckpt.step_dir(2))
    assert state.rollbacks == 1 and set(bad) <= set(state.excluded_samples)
    restarted = poisoned(cfg, resume=True)
    assert run(restarted) == 0
    assert restarted.state.rollbacks == 1 and set(bad) <= set(restarted.state.excluded_samples)
    got, want = logged(tmp_path / "killed"), logged(tmp_path / "whole")
    assert {s: v for s, v in got.items() if s > 2} == {s: v for s, v in want.items() if s > 2}


def test_a_spike_skips_the_samples_of_the_ranks_whose_own_loss_spiked():
    """At 1,000 ranks a spike's whole global batch is thousands of samples: only the ranks whose
    own per-token loss is above the spike's threshold are blamed; the whole batch only where no
    rank's own loss stands out, and for non-finite steps the ranks whose own loss was not finite."""
    from pargo_dist.train.divergence import Verdict, blame

    spike = Verdict("loss spike", (7,), spike_above=3.0)
    ranks = [[(["a", "b"], True, 1.1)], [(["c", "d"], True, 9.5)], [(["e"], True, 0.9)]]
    assert blame(spike, ranks) == ["c", "d"]
    spread = [[(["a"], True, 2.9)], [(["c"], True, 2.8)]]  # the sum spiked, no rank's own loss did
    assert blame(spike, spread) == ["a", "c"]
    nan = Verdict("non-finite", (3, 4))
    ranks = [[(["a"], True, 1.0), (["b"], True, 1.0)], [(["c"], False, float("nan")), (["d"], True, 1.0)]]
    assert blame(nan, ranks) == ["c"]


def test_one_non_finite_step_is_skipped_and_repeated_ones_roll_back_until_the_run_stops_naming_them(tmp_path):
    """rollback_after_bad_steps=2: a lone NaN step is only skipped (no update, counted). Two in a
    row roll back; with max_rollbacks=1 the next divergence stops the run with a Diverged error
    that names the samples, and with no checkpoint before the bad steps there is nothing to roll
    back to: the same error, saying so."""
    data = batches(40)
    cfg = recipe(tmp_path / "lone", "train.rollback_after_bad_steps=2")
    t = trainer(cfg, loader=ListLoader(data))
    t.backend.poison[data[4].sample_ids[0]] = float("nan")  # step 3
    assert run(t) == 0
    assert t.state.skipped_steps == 1 and t.state.rollbacks == 0
    loss = logged(tmp_path / "lone")
    assert loss[3] != loss[3] and all(loss[s] == loss[s] for s in (1, 2, 4, 5, 6))  # NaN at 3 only

    cfg = recipe(tmp_path / "again", "train.rollback_after_bad_steps=2", "train.max_rollbacks=1", "checkpoint.every=2",
                 "train.steps=12")
    t = trainer(cfg, loader=ListLoader(data))
    # steps 3 and 4 (micro-batches 4-7) diverge, then, after the rollback, two later steps do
    for b in (5, 6, 15, 17):
        t.backend.poison[data[b].sample_ids[0]] = float("nan")
    with pytest.raises(Diverged, match=r"2 step\(s\) in a row with a non-finite loss or gradient norm \(steps \d+-\d+; "
                                       r"train.rollback_after_bad_steps=2\), after 1 rollback\(s\) already "
                                       r"\(train.max_rollbacks=1\)") as err:
        run(t)
    assert data[15].sample_ids[0] in str(err.value) and data[17].sample_ids[0] in str(err.value)
    assert t.state.rollbacks == 1 and set(data[4].sample_ids + data[7].sample_ids) <= set(t.state.excluded_samples)

    t = trainer(recipe(tmp_path / "none", "train.rollback_after_bad_steps=1", "checkpoint.every=0"),
                loader=ListLoader(data))
    t.backend.poison[data[0].sample_ids[0]] = float("nan")
    with pytest.raises(Diverged, match="no complete checkpoint from before step 1 to roll back to"):
        run(t)
