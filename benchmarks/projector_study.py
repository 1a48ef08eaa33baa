"""Detail perception: ParGo vs Q-Former vs MLP projectors, trained the same way, evaluated the same way.

The paper's claim is that partial + global queries keep details that a few global queries
(Q-Former) lose. This study checks it at tiny scale on 2 CPU cores (about 15 minutes; 864 s measured):

1. base: one tiny model (the tiny-cpu recipe's CLIP-style tower and Llama) trained in stage
   `full` on the synthetic data, mixed captions and yes/no questions, with an **MLP**
   projector. Its tower and LLM stand in for the pretrained backbones that stage 1 starts
   from. They were trained next to an MLP, so if the base favours anyone, it favours the MLP,
   not ParGo.
2. arms: for each projector and seed, a new projector (initialised with that seed) trained
   in stage `align` (tower and LLM frozen, loaded from the base), same data order, same steps,
   same learning rate. ParGo and Q-Former produce the same number of visual tokens (32
   partial + 4 global vs 36 queries, same depth and width); the MLP passes all 64 patches.
3. evaluation (`pargo-dist eval`) of each arm on held-out images it never saw: detail recall
   of greedy captions, caption loss, and MME-style yes/no questions (accuracy, accuracy+).

    python benchmarks/projector_study.py                    # 3 seeds, prints the table
    python benchmarks/projector_study.py --seeds 0 --align-steps 100   # a quick look
    pargo-dist report runs/study/pargo-seed0 ... --out docs/img         # the plots (done at the end)

Finished runs and evaluations are reused, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
PROJECTORS = {  # type -> overrides; 36 visual tokens for both query-based projectors
    "pargo": [],
    "qformer": ["model.projector.num_global=36"],
    "mlp": [],
}
METRICS = [("recall/all", "detail recall"), ("recall/colour", "colour"), ("recall/kind", "kind"),
           ("recall/position", "position"), ("precision", "precision"), ("mme/acc", "yes/no acc"),
           ("mme/acc_plus", "acc+"), ("loss", "caption loss")]


def pargo_dist(args: list[str], log: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "-m", "pargo_dist.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"pargo-dist {args[0]} failed ({rc}); see {log}")


COMMON = ["data.synthetic.kind=mixed", "train.micro_batch=16", "train.sample_every=0", "checkpoint.every=0",
          "logging.every=100", "checkpoint.keep_last=1"]


def arm_data(work: Path, run: Path) -> list[str]:
    """Arms read the base's shards as a streaming remote into their own local copies: two jobs
    may not share one streaming local dir, and arms run side by side."""
    return [f"data.train.remote={work}/data/train", f"data.train.local={run}/data/train",
            f"data.eval.remote={work}/data/val", f"data.eval.local={run}/data/val", "data.synthetic.num_samples=0"]


def done(run: Path, steps: int) -> bool:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] \
        if (run / "train_log.jsonl").exists() else []
    return any(r.get("step") == steps and "eval/loss" in r for r in rows)


def train_base(work: Path, args) -> Path:
    run = work / "base"
    if not done(run, args.base_steps):
        print(f"[study] base: stage full, MLP projector, {args.base_steps} steps", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        pargo_dist(["train", str(RECIPE), f"run.dir={run}", "model.projector.type=mlp", "train.stage=full",
                    f"train.steps={args.base_steps}", "train.eval_every=0", "optim.warmup_steps=40",
                    f"data.train.local={work}/data/train", f"data.eval.local={work}/data/val", *COMMON],
                   run / "study.log", threads=2)
    if not (run / "export" / "config.yaml").exists():
        pargo_dist(["export", str(run), "--out", str(run / "export")], run / "study.log", threads=2)
    return run / "export"


def caption_split(work: Path, held_out: int) -> Path:
    """The held-out images as plain captions (the training split mixes in questions)."""
    out = work / "data" / "val-captions"
    if not (out / "index.json").exists():
        from pargo_dist.data.convert import write_dataset
        from pargo_dist.data.synthetic import SyntheticConfig, held_out as held_out_of, synthetic_samples

        cfg = held_out_of(SyntheticConfig(num_samples=1, image_size=64), held_out)
        write_dataset(((s, None) for s in synthetic_samples(cfg, kind="caption")), str(out), progress=False)
    return out


def arm(work: Path, base: Path, projector: str, seed: int, args) -> dict:
    run = work / f"{projector}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not done(run, args.align_steps):
        pargo_dist(["train", str(RECIPE), f"run.dir={run}", f"run.seed={seed}", f"model.projector.type={projector}",
                    *PROJECTORS[projector], "train.stage=align", f"train.steps={args.align_steps}",
                    f"model.init_from={base}", "model.init_parts=[vision_tower,language_model]",
                    f"optim.lr={args.lr}", "optim.warmup_steps=20", "train.eval_every=0", *arm_data(work, run),
                    *COMMON],
                   run / "study.log", threads=1)
    metrics = run / "eval" / "metrics.json"
    if not metrics.exists():
        captions = run / "data" / "val-captions"
        if not captions.exists():
            shutil.copytree(work / "data" / "val-captions", captions)
        pargo_dist(["eval", str(run), "--out", str(run / "eval"), "--data", str(captions),
                    "--mme", "synthetic", "--mme-images", str(args.mme_images)], run / "study.log", threads=1)
    print(f"[study] {run.name}: trained and evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def table(results: dict[str, list[dict]]) -> str:
    head = "| projector | visual tokens | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    tokens = {"pargo": "36 (32 + 4)", "qformer": "36", "mlp": "64"}
    for projector, runs in results.items():
        cells = []
        for key, _ in METRICS:
            values = [r[key] for r in runs if key in r]
            if not values:
                cells.append("-")
                continue
            scale = 1 if key.startswith("mme") or key == "loss" else 100  # recalls in percent, like MME's acc
            mean = statistics.mean(values) * scale
            spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
            cells.append(f"{mean:.1f} ± {spread:.1f}" if key != "loss" else f"{mean:.3f} ± {spread:.3f}")
        lines.append(f"| {projector} | {tokens.get(projector, '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "study"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--projectors", nargs="+", default=list(PROJECTORS), choices=list(PROJECTORS))
    ap.add_argument("--base-steps", type=int, default=800)
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--held-out", type=int, default=64, help="held-out caption images (the recipe's split)")
    ap.add_argument("--mme-images", type=int, default=96, help="images in the yes/no set (2 questions each)")
    ap.add_argument("--parallel", type=int, default=2, help="arms trained at once (1 thread each)")
    args = ap.parse_args()
    start = time.perf_counter()
    work = Path(args.work).resolve()
    (work / "data").mkdir(parents=True, exist_ok=True)
    base = train_base(work, args)
    caption_split(work, args.held_out)
    jobs = [(p, s) for s in args.seeds for p in args.projectors]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {job: pool.submit(arm, work, base, *job, args) for job in jobs}
        results = {p: [futures[(p, s)].result() for s in args.seeds] for p in args.projectors}
    pargo_dist(["report", *[str(work / f"{p}-seed{s}") for p, s in jobs], "--out", str(work / "report")],
               work / "report.log", threads=1)
    print(f"\nProjector study: align stage from one base model, {args.align_steps} steps, "
          f"{len(args.seeds)} seed(s) each (mean ± std over seeds); {args.held_out} held-out images for captions, "
          f"{args.mme_images} for yes/no ({2 * args.mme_images} questions). Recalls and yes/no in %.")
    print(table(results))
    (work / "study.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nwall time {time.perf_counter() - start:.0f} s; plots in {work / 'report'}; "
          f"per-run metrics in {work}/<projector>-seed<N>/eval/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
