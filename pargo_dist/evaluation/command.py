"""`pargo-dist eval MODEL`: which model, where results go, which tasks; see runner.py for how.

    pargo-dist eval runs/tiny-cpu                          # newest checkpoint; captions + synthetic MME
    pargo-dist eval runs/tiny-cpu --nproc 2 --limit 64      # 2 ranks, first 64 samples / questions
    pargo-dist eval runs/x/export --mme /data/MME_Benchmark_release_version --no-captions
    pargo-dist eval runs/x --data s3://bucket/val           # another held-out split

MODEL is an exported directory (`pargo-dist export`), a run dir (its newest complete
checkpoint) or a checkpoint dir; the last two are exported once into OUT/model first. OUT
defaults to RUN/eval/step_N (or EXPORT/eval); scalars go to RUN/tb at the checkpoint's step,
next to the training curves, so `pargo-dist report RUN` plots them. Interrupted? Run the same
command again: finished items are kept (OUT/parts), the rest is done, on any rank count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from pargo_dist.errors import UserError

SETTINGS = ("data", "mme", "mme_images", "limit", "captions", "generate", "max_new_tokens", "num_beams", "dtype")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported dir, run dir (newest complete checkpoint), checkpoint dir, or a run's "
                   "checkpoint.remote URL (s3://...)")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (each a share of the items)")
    p.add_argument("--out", help="results dir (default: RUN/eval/step_N, or EXPORT/eval)")
    p.add_argument("--data", help="held-out MDS split, local dir or s3://... (default: the recipe's data.eval)")
    p.add_argument("--mme", default="auto",
                   help="MME-format directory; 'synthetic': yes/no questions about unseen images of the recipe's "
                   "held-out stream; 'none'; 'auto' (default): synthetic if the recipe trains on synthetic data")
    p.add_argument("--mme-images", type=int, default=96, help="images in the synthetic MME set (2 questions each)")
    p.add_argument("--limit", type=int, help="only the first N samples and N questions")
    p.add_argument("--no-captions", dest="captions", action="store_false",
                   help="skip the caption pass (loss, perplexity, detail recall)")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="caption pass without generation: loss and perplexity only (fast), no detail recall")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64, help="caption length cap (answers: 4)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tb", help="TensorBoard dir for the eval/... scalars (default: RUN/tb, or OUT/tb)")
    p.add_argument("--step", type=int, help="TensorBoard step of the scalars (default: the checkpoint's)")
    p.add_argument("--fresh", action="store_true", help="discard results of an earlier run in OUT")


def _resolve(args, rank: int) -> tuple[Path, Path, Path | None, int]:
    """-> (exported model dir, out dir, tensorboard dir, step). Called before the ranks' process
    group exists (see _export_once)."""
    from pargo_dist.checkpoint.manager import CheckpointManager, resolve_checkpoint, run_dir_of

    source = Path(args.model)
    if "://" in str(args.model):  # a run's checkpoint.remote: its newest complete checkpoint, downloaded
        source = resolve_checkpoint(args.model)
    if not source.exists():
        raise UserError(f"{source} does not exist: give an exported dir, a run dir or a checkpoint dir")
    if (source / "config.json").exists():
        out = Path(args.out or source / "eval")
        return source, out, out / "tb", args.step or 0
    step_dir = resolve_checkpoint(source)
    run_dir = run_dir_of(step_dir)
    step = CheckpointManager.load_state(step_dir).step
    out = Path(args.out or run_dir / "eval" / step_dir.name)
    model_dir = out / "model"
    _export_once(step_dir, model_dir, rank)
    return model_dir, out, run_dir / "tb", args.step if args.step is not None else step


def _export_once(step_dir: Path, model_dir: Path, rank: int) -> None:
    """Rank 0 exports the checkpoint into `model_dir` (once: a rerun reuses it); the other ranks
    wait until it is there. Both happen before the evaluation's process group is formed, because
    - a megatron checkpoint is read back (at TP=1, whatever layout saved it) by a process that
      forms a one-process group of its own for megatron and tears it down after
      (backends/megatron/weights.py): inside the evaluation's group it is refused;
    - an export of a large checkpoint lasts longer than a collective's timeout (10-30 minutes):
      ranks waiting for it in a barrier, or in the group's rendezvous, would time out. Here they
      wait on the directory, in no collective, and the group forms once the model is there.
    The ranks of `pargo-dist eval --nproc N` share this machine, so they see the same directory;
    should rank 0 fail, the launcher stops the others. The export is written beside `model_dir`
    and renamed into place, so a waiting rank (or a rerun after a kill) never reads half of one."""
    from pargo_dist.export.hf import export

    done = model_dir / "config.yaml"  # export's last write
    if rank != 0:
        while not done.exists():
            time.sleep(0.1)
        return
    if done.exists():
        return
    partial = model_dir.with_name(f"{model_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed export left
    print(f"exporting {step_dir} -> {model_dir}", flush=True)
    export(step_dir, partial)
    shutil.rmtree(model_dir, ignore_errors=True)  # an incomplete export of an older version
    os.replace(partial, model_dir)


def _check_settings(out: Path, args, rank: int, barrier) -> None:
    """Resume only the same evaluation: other settings in OUT are an error (or --fresh)."""
    settings = {k: getattr(args, k) for k in SETTINGS} | {"model": str(Path(args.model).resolve())}
    path = out / "settings.json"
    if rank == 0:
        if args.fresh and out.exists():
            for name in ("parts", "mme_synthetic"):
                shutil.rmtree(out / name, ignore_errors=True)
        elif path.exists() and json.loads(path.read_text()) != settings:
            old = json.loads(path.read_text())
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise UserError(f"{out} holds results of another evaluation (differs in {diff}): "
                             "use another --out, or --fresh to discard them")
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))
    barrier()


def _mme_root(args, cfg, out: Path, rank: int, barrier) -> Path | None:
    syn = cfg.data.synthetic
    if args.mme == "none" or (args.mme == "auto" and not syn.num_samples):
        return None
    if args.mme not in ("auto", "synthetic"):
        return Path(args.mme)
    from pargo_dist.data.synthetic import SyntheticConfig, held_out
    from pargo_dist.evaluation.mme import write_synthetic

    root = out / "mme_synthetic"
    if rank == 0 and not (root / ".complete").exists():
        # the held-out stream, past the images data.eval holds: questions about unseen images
        base = held_out(SyntheticConfig(num_samples=1, image_size=syn.image_size, seed=syn.seed), 1)
        write_synthetic(root, base, args.mme_images, first=syn.held_out)
        (root / ".complete").touch()
    barrier()
    return root


def print_table(metrics: dict[str, float]) -> None:
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        shown = f"{value:,.0f}" if key.endswith(("samples", "skipped", "images")) else f"{value:.4f}"
        print(f"  {key:<{width}}  {shown}")


def run(args: argparse.Namespace) -> int:
    import torch

    from pargo_dist.evaluation.runner import (
        Evaluator,
        Interrupted,
        Ranks,
        evaluate_captions,
        evaluate_mme,
        open_dataset,
    )
    from pargo_dist.evaluation.generate import load_exported
    from pargo_dist.runtime.signals import StopSignal
    from pargo_dist.runtime.exits import REQUEUE_EXIT

    stop = StopSignal()
    rank = int(os.environ.get("RANK", 0))
    try:
        model_dir, out, tb, step = _resolve(args, rank)  # before the group: see _export_once
        ranks = Ranks()
        _check_settings(out, args, ranks.rank, ranks.barrier)
        model, tokenizer, cfg = load_exported(model_dir)
        if cfg is None:
            raise UserError(f"{model_dir} has no config.yaml (the recipe): export it with `pargo-dist export`")
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        model.to(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        evaluator = Evaluator(model, tokenizer, cfg, device, args.batch_size,
                              {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams})
        metrics: dict[str, float] = {}
        if args.captions:
            data = args.data or (cfg.data.eval.remote or cfg.data.eval.local if cfg.data.eval else None)
            if not data:
                raise UserError("the recipe has no data.eval split: name one with --data")
            dataset = open_dataset(data, evaluator, cfg)
            metrics.update(evaluate_captions(evaluator, dataset, out, ranks, args.limit, args.generate, stop=stop))
        root = _mme_root(args, cfg, out, ranks.rank, ranks.barrier)
        if root is not None:
            evaluator.generate_kwargs["max_new_tokens"] = 4
            metrics.update(evaluate_mme(evaluator, root, out, ranks, args.limit, stop=stop))
        if ranks.rank == 0:
            _publish(metrics, out, Path(args.tb) if args.tb else tb, step)
    except Interrupted as why:  # every rank got the signal and leaves on its own: no collective now
        if rank == 0:
            print(f"{why}: finished batches are kept in {out / 'parts'}; run the same command again to finish "
                  f"(exit {REQUEUE_EXIT}: requeue me)", flush=True)
        return REQUEUE_EXIT
    finally:
        stop.close()
    ranks.close()
    return 0


def _publish(metrics: dict[str, float], out: Path, tb: Path, step: int) -> None:
    (out / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=1))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tb)) as writer:  # loss as heldout_loss: training's eval/loss is a few batches only
        for key, value in metrics.items():
            writer.add_scalar(f"eval/{'heldout_loss' if key == 'loss' else key}", value, global_step=step)
    print(f"evaluation at step {step} -> {out / 'metrics.json'} (TensorBoard: {tb})")
    print_table(metrics)
