"""`pargo-dist report`: plots and the seed table from real TensorBoard logs of a small fake study."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from pargo_dist.observe.metrics import MetricsLogger
from pargo_dist.observe.report import add_arguments, group_of, report, run, summarize

# Final eval values per run, as an evaluator would log them at the last checkpoint.
TAGS = ("eval/recall/all", "eval/recall/colour", "eval/precision", "eval/mme/acc")
FINAL = {name: dict(zip(TAGS, values)) for name, values in {
    "pargo-seed0": (0.61, 0.72, 0.80, 71.5),
    "pargo-seed1": (0.65, 0.70, 0.83, 74.0),
    "pargo-seed2": (0.58, 0.75, 0.78, 69.0),
    "qformer_seed0": (0.52, 0.60, 0.70, 60.5),
    "qformer_seed1": (0.55, 0.66, 0.74, 63.0),
    "mlp": (0.40, 0.50, 0.60, 55.0),
}.items()}
STEPS = 30


def f32(x: float) -> float:
    return float(np.float32(x))


def write_run(run, final: dict[str, float] | None, seed: int) -> None:
    """Training logs (loss curve, throughput, eval/loss every 10 steps), then an evaluator's own event file."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  steps: 30\n")
    with MetricsLogger(run / "tb", total_steps=STEPS, every=10, stream=io.StringIO()) as log:
        for step in range(1, STEPS + 1):
            scalars = {"train/loss": 4.0 * np.exp(-step / 8) + 0.3 + 0.01 * seed, "perf/tokens_per_s": 1000 + step,
                       "perf/samples_per_s": 10 + 0.1 * step, "train/lr/projector": 1e-3}
            if step % 10 == 0:
                scalars["eval/loss"] = 1.0 + 3 / step + 0.01 * seed
            log.log(step, scalars)
    if final is not None:
        with MetricsLogger(run / "tb", total_steps=STEPS, stream=io.StringIO()) as log:
            log.log(10, {tag: 0.0 for tag in final})  # an earlier checkpoint: only the last value counts
            log.log(STEPS, {**final, "eval/perplexity": 3.0, "eval/mme/total": 1500.0 + seed})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    for i, (name, final) in enumerate(FINAL.items()):
        write_run(root / name, final, seed=i)
    return [root / name for name in FINAL]


def expected(runs, group: str, tag: str):
    values = [f32(FINAL[r.name][tag]) for r in runs if group_of(r) == group]
    return np.mean(values), (np.std(values, ddof=1) if len(values) > 1 else 0.0), len(values), values


def test_group_label_strips_the_seed_suffix(tmp_path):
    assert group_of("study/pargo-seed0") == "pargo"
    assert group_of("study/qformer_seed12/") == "qformer"
    assert group_of("mlp") == "mlp"
    assert group_of("a-seed1-long") == "a-seed1-long"  # only a trailing suffix
    assert group_of("seedling") == "seedling"
    (tmp_path / "x-seed3").mkdir()
    assert group_of(tmp_path / "x-seed3" / ".") == "x"


def test_summarize_is_the_mean_and_sample_std_of_last_values(study):
    summary = summarize(study)
    assert list(summary) == ["pargo", "qformer", "mlp"]  # command-line order
    for group, row in summary.items():
        assert list(row) == [*TAGS, "eval/loss"]  # default patterns; perplexity and mme/total left out
        for tag in TAGS:
            mean, std, n, values = row[tag]
            want_mean, want_std, want_n, want_values = expected(study, group, tag)
            assert (n, values) == (want_n, pytest.approx(want_values, rel=1e-6))
            assert mean == pytest.approx(want_mean, rel=1e-6) and std == pytest.approx(want_std, rel=1e-5, abs=1e-9)
    mean, std, n, _ = summary["pargo"]["eval/loss"]  # training's last eval/loss: 1 + 3/30 + 0.01 seed
    assert n == 3 and mean == pytest.approx(1.11, rel=1e-6) and std == pytest.approx(0.01, rel=1e-4)
    assert summary["mlp"]["eval/recall/all"][1] == 0.0  # a single run has no spread
    assert list(summarize(study[::-1], ["eval/mme/*"])) == ["mlp", "qformer", "pargo"]
    assert list(summarize(study, ["eval/mme/*"])["pargo"]) == ["eval/mme/acc", "eval/mme/total"]


def test_report_writes_real_pngs_and_the_table(study, tmp_path):
    written = report(study, tmp_path / "out")
    assert [p.name for p in written] == ["loss.png", "throughput.png", "eval.png", "eval.md"]
    for path in written[:3]:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 600 and img.height >= 300
            assert np.asarray(img.convert("L")).std() > 5  # something is drawn
    table = (tmp_path / "out" / "eval.md").read_text()
    mean, std, n, _ = expected(study, "pargo", "eval/recall/all")
    assert f"| pargo | {mean:.3f} ± {std:.3f} (n={n}) |" in table
    mean, std, n, _ = expected(study, "qformer", "eval/mme/acc")
    assert f"{mean:.3f} ± {std:.3f} (n=2)" in table
    assert f"| mlp | {f32(0.40):.3f} (n=1) |" in table
    assert table.splitlines()[0] == ("| group | eval/recall/all | eval/recall/colour | eval/precision | eval/mme/acc "
                                     "| eval/loss |")


def test_training_logs_alone_give_no_eval_plot(tmp_path):
    write_run(tmp_path / "plain-seed0", None, seed=0)
    written = report([tmp_path / "plain-seed0"], tmp_path / "out")
    assert [p.name for p in written] == ["loss.png", "throughput.png"]


def test_a_run_without_logs_is_named(study, tmp_path):
    bare = tmp_path / "broken-seed0"
    bare.mkdir()
    (bare / "config.yaml").write_text("{}\n")
    with pytest.raises(ValueError, match=r"broken-seed0.*expected event files in .*broken-seed0/tb"):
        report([study[0], bare], tmp_path / "out")


def test_cli_prints_the_table_and_defaults_out_to_the_first_run(study, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([*map(str, study), "--metrics", "eval/precision, eval/recall/all"])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| group | eval/precision | eval/recall/all |"
    mean, std, _, _ = expected(study, "qformer", "eval/precision")
    assert f"| qformer | {mean:.3f} ± {std:.3f} (n=2) |" in out
    assert f"wrote {study[0] / 'report' / 'eval.png'}" in out
    assert (study[0] / "report" / "loss.png").is_file()
