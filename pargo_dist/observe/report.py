"""`pargo-dist report`: PNG plots and a markdown table from the TensorBoard logs of one or more runs.

    pargo-dist report study/pargo-seed0 study/pargo-seed1 study/qformer-seed0 --out study/report

TensorBoard shows curves one tag at a time. A study needs the arms side by side, with the spread
over seeds, in files to paste into a report. From every RUN_DIR/tb this writes, into --out:

    loss.png        train/loss per run (lines) and eval/loss (dots in the run's colour)
    throughput.png  perf/tokens_per_s and perf/samples_per_s per run, as a running mean
    eval.png        one panel per eval metric: a bar per group (mean of the runs' last values),
                    the sample std over seeds as the error bar, each seed as a dot
    eval.md         the same numbers as a markdown table, also printed

A run's group is its directory name less a trailing `-seed<N>` / `_seed<N>`, so `pargo-seed0` and
`pargo-seed1` average into `pargo`. Groups keep the order of the command line. eval.png and eval.md
are written when --metrics is given or some run has eval tags besides eval/loss (an evaluator ran).
Plots use matplotlib's Agg canvas on Figure objects: no display, and no pyplot global state.
`read_scalars` and `read_texts` read any TensorBoard log directory back (what MetricsLogger wrote).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
from pathlib import Path

import numpy as np

from pargo_dist.errors import UserError

DEFAULT_METRICS = ("eval/recall/*", "eval/precision", "eval/mme/acc", "eval/mme/acc_plus", "eval/heldout_loss",
                   "eval/loss")
SMOOTH = 10  # logged steps in the throughput running mean
_SEED = re.compile(r"[-_]seed\d+$")

Summary = dict[str, dict[str, tuple[float, float, int, list[float]]]]


def _name(run_dir: str | Path) -> str:
    """The directory's own name, also for "." or a trailing slash (symlinks keep their name)."""
    return Path(os.path.abspath(run_dir)).name


def group_of(run_dir: str | Path) -> str:
    """The run's arm: its directory name without a trailing -seed<N> / _seed<N>."""
    return _SEED.sub("", _name(run_dir))


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `log_dir`: tag -> [(step, value), ...].

    Values come back as TensorBoard stored them (float32). All events are kept (no sampling).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(int(e.step), float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(log_dir: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Every `log_text` entry in `log_dir`: tag -> [(step, text), ...] (tags as given to log_text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            out[tag.removesuffix("/text_summary")] = [
                (int(e.step), b"".join(e.tensor_proto.string_val).decode()) for e in acc.Tensors(tag)
            ]
    return out


def load(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of RUN_DIR/tb (training's and any evaluator's event files); ValueError if none."""
    tb = Path(run_dir) / "tb"
    if not any(tb.glob("events.out.tfevents.*")):
        raise UserError(f"{run_dir}: no TensorBoard logs, expected event files in {tb}/ "
                         f"(events.out.tfevents.*, as pargo-dist train writes them)")
    return read_scalars(tb)


def _last(points: list[tuple[int, float]]) -> float:
    """Value at the highest step; among equal steps the last written (the sort is stable)."""
    return sorted(points, key=lambda p: p[0])[-1][1]


def _summarize(scalars: dict[str, dict], metrics: list[str]) -> Summary:
    present = sorted({t for tb in scalars.values() for t in tb})
    # pattern order, sorted within a pattern; a tag matched by two patterns counts once, at the first
    tags = list(dict.fromkeys(t for pattern in metrics for t in present if fnmatch.fnmatchcase(t, pattern)))
    groups: dict[str, list[dict]] = {}
    for run, tb in scalars.items():
        groups.setdefault(group_of(run), []).append(tb)
    out: Summary = {}
    for group, tbs in groups.items():
        out[group] = {}
        for tag in tags:
            values = [_last(tb[tag]) for tb in tbs if tb.get(tag)]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out[group][tag] = (float(np.mean(values)), std, len(values), values)
    return out


def summarize(run_dirs: list[str | Path], metrics: list[str] | None = None) -> Summary:
    """{group: {metric: (mean, std, n, values)}} of each run's last value; std over seeds, ddof=1 (0 for one run).

    `metrics` are glob patterns over the tags (default DEFAULT_METRICS); metrics in pattern order.
    """
    return _summarize({str(r): load(r) for r in run_dirs}, list(metrics or DEFAULT_METRICS))


def markdown_table(summary: Summary) -> str:
    """One row per group, one column per metric, cells `mean ± std (n=N)` (`mean (n=1)` for one run)."""
    metrics = list(dict.fromkeys(m for row in summary.values() for m in row))
    lines = ["| group | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for group, row in summary.items():
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("-")
                continue
            mean, std, n, _ = row[m]
            digits = 3 if abs(mean) < 100 else 1  # fractions and percents; MME scores run to ~2000
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f} (n=1)")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False).ravel()


def _series(points: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    points = sorted(points, key=lambda p: p[0])
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _plot_loss(scalars: dict[str, dict], path: Path) -> None:
    fig, (ax,) = _figure(1, 1, 8, 5)
    every = []
    for i, (run, tb) in enumerate(scalars.items()):
        colour = f"C{i % 10}"
        if tb.get("train/loss"):
            x, y = _series(tb["train/loss"])
            ax.plot(x, y, color=colour, lw=1.2, label=_name(run))
            every.extend(y)
        if tb.get("eval/loss"):
            x, y = _series(tb["eval/loss"])
            ax.plot(x, y, "o", color=colour, ms=5, mec="k", mew=0.5)
            every.extend(y)
    positive = [v for v in every if v > 0]
    if positive and len(positive) == len(every) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title="train/loss (lines), eval/loss (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)


def _plot_throughput(scalars: dict[str, dict], path: Path) -> None:
    fig, axes = _figure(2, 1, 8, 3.5)
    for ax, tag, unit in zip(axes, ("perf/tokens_per_s", "perf/samples_per_s"), ("tokens/s", "samples/s")):
        for i, (run, tb) in enumerate(scalars.items()):
            if tb.get(tag):
                x, y = _series(tb[tag])
                w = min(SMOOTH, len(y))
                ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color=f"C{i % 10}",
                        label=_name(run))
        ax.set(xlabel="step", ylabel=unit, title=f"{tag} (running mean of {SMOOTH} logged steps)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.savefig(path)


def _plot_eval(summary: Summary, path: Path) -> None:
    groups = list(summary)
    metrics = list(dict.fromkeys(m for row in summary.values() for m in row))
    cols = min(4, len(metrics))
    fig, axes = _figure(math.ceil(len(metrics) / cols), cols, 3.2, 3.0)
    for ax, metric in zip(axes, metrics):
        for x, group in enumerate(groups):
            if metric not in summary[group]:
                continue
            mean, std, n, values = summary[group][metric]
            ax.bar(x, mean, color=f"C{x % 10}", alpha=0.8)
            if n > 1:
                ax.errorbar(x, mean, yerr=std, color="k", capsize=4, lw=1)
            ax.scatter(x + (np.linspace(-0.15, 0.15, n) if n > 1 else 0.0), values, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 3 else 0, fontsize="small")
        ax.set_title(metric, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("last value per run: mean over seeds ± sample std, dots = seeds")
    fig.savefig(path)


def report(run_dirs: list[str | Path], out: str | Path, metrics: list[str] | None = None) -> list[Path]:
    """Write loss.png, throughput.png and (with eval metrics) eval.png + eval.md into `out`; the paths written."""
    if not run_dirs:
        raise UserError("no run directories given")
    scalars = {str(r): load(r) for r in run_dirs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("loss.png", _plot_loss), ("throughput.png", _plot_throughput)):
        plot(scalars, out / name)
        written.append(out / name)
    has_eval = any(t.startswith("eval/") and t != "eval/loss" for tb in scalars.values() for t in tb)
    summary = _summarize(scalars, list(metrics or DEFAULT_METRICS))
    if (metrics or has_eval) and any(summary.values()):
        _plot_eval(summary, out / "eval.png")
        (out / "eval.md").write_text(markdown_table(summary))
        written += [out / "eval.png", out / "eval.md"]
    return written


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each with tb/ event files)")
    ap.add_argument("--out", help="output directory (default: FIRST_RUN_DIR/report)")
    ap.add_argument("--metrics", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                    help=f"comma-separated tag patterns for eval.png (default: {','.join(DEFAULT_METRICS)})")


def run(args: argparse.Namespace) -> int:
    written = report(args.runs, args.out or Path(args.runs[0]) / "report", args.metrics)
    for path in written:
        if path.name == "eval.md":
            print(path.read_text())
    for path in written:
        print(f"wrote {path}")
    return 0
