"""The numbers of docs/scaling.md, from the planner: 1M samples, stage 1 (align) and stage 2
(finetune), 7B (the paper's recipes) and 70B (recipes/llama3-70b-stage2.yaml) on 8, 64 and 256
H100s.

    .venv/bin/python benchmarks/scaling_table.py            # prints the markdown table (~1 min)
    .venv/bin/python benchmarks/scaling_table.py --mfu 0.35

Per row: the recipe's layout, or, where it does not apply to that GPU count, the first layout
`pargo-dist plan --fit` finds; memory per GPU, step time, time for 1M samples, checkpoint size
and write time (2 GB/s per node), object-storage bandwidth per node (150 KB per sample), and
the time per step of the gradient/parameter traffic that crosses nodes if nothing overlapped
(ZeRO-3: all-gather parameters for forward and backward, reduce-scatter gradients, 2 B each,
per GPU; megatron: the data-parallel reduce-scatter of fp32 grads and all-gather of bf16
params of one TP x PP shard), at 40 GB/s of bus bandwidth per GPU (400 Gb/s InfiniBand).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pargo_dist.config import load_config
from pargo_dist.plan.estimate import Hardware, checkpoint_bytes, estimate, fits, layout_of, options
from pargo_dist.plan.trace import shapes_of

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ROWS = [("7B (paper)", "stage 1 align", "paper-stage1-align.yaml", []),
        ("7B (paper)", "stage 2 finetune", "paper-stage2-finetune.yaml", []),
        ("70B (Llama-3)", "stage 1 align", "llama3-70b-stage2.yaml", ["train.stage=align"]),
        ("70B (Llama-3)", "stage 2 finetune", "llama3-70b-stage2.yaml", [])]
BUS_GBPS = 40.0
FS_GBPS = 2.0
SAMPLE_KB = 150.0


def comm_seconds(shapes, layout, est) -> float:
    P = float(sum(shapes.params.values()))
    T = float(sum(shapes.trainable.values()))
    if est.dp <= 1:
        return 0.0
    if layout.backend == "megatron":
        trained_shard = T / (layout.tp * layout.pp)  # only trained parameters are reduced and gathered
        return (4.0 + 2.0) * trained_shard / (BUS_GBPS * 1e9)
    gathers = 2.0 * 2.0 * P if layout.zero_stage == 3 else 0.0
    return (gathers + 2.0 * T) / (BUS_GBPS * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfu", type=float, default=0.40)
    ap.add_argument("--samples", type=float, default=1e6)
    args = ap.parse_args()
    print("| model | stage | GPUs | layout | GiB/GPU | step s | samples/s | 1M samples | checkpoint | save | "
          "data/node | comm s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, stage, recipe, overrides in ROWS:
        cfg = load_config(RECIPES / recipe, overrides)
        shapes = shapes_of(cfg)
        for gpus in (8, 64, 256):
            hw = Hardware(gpus=gpus, mfu=args.mfu)
            try:
                est = estimate(cfg, hw, layout_of(cfg), shapes)
                if not fits(est, hw):
                    raise ValueError("does not fit")
            except ValueError:
                fitting = [e for e in options(cfg, hw, shapes) if fits(e, hw)]
                if not fitting:
                    print(f"| {model} | {stage} | {gpus} | nothing fits 80 GiB | | | | | | | | |")
                    continue
                est = fitting[0]
            nodes = math.ceil(gpus / hw.gpus_per_node)
            ckpt = checkpoint_bytes(shapes, cfg.train.stage, cfg.train.precision, bool(cfg.model.lora.r))
            hours = args.samples / est.samples_per_s / 3600
            print(f"| {model} | {stage} | {gpus} | {est.layout.name()} (dp {est.dp}) | {est.total_gib:.1f} | "
                  f"{est.step_time_s:.2f} | {est.samples_per_s:,.0f} | {hours:.1f} h | {ckpt / 1e9:,.1f} GB | "
                  f"{ckpt / (nodes * FS_GBPS * 1e9):,.0f} s | "
                  f"{est.samples_per_s / nodes * SAMPLE_KB / 1e3:,.1f} MB/s | "
                  f"{comm_seconds(shapes, est.layout, est):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
