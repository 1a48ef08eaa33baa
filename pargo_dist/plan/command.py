"""`pargo-dist plan`, the planner's command line (pargo_dist.plan explains what it counts).

    pargo-dist plan recipes/llama3-8b-stage2.yaml --gpus 64 --gpu-mem 80
    pargo-dist plan recipes/llama3-70b-stage2.yaml --gpus 256 --fit     # the smallest layout that fits
"""

from __future__ import annotations

import argparse
import math

from pargo_dist.plan.estimate import H100_BF16_TFLOPS, Hardware, checkpoint_bytes, estimate, fits, format_estimate, \
    layout_of, options, save_blocking
from pargo_dist.plan.trace import shapes_of
from pargo_dist.errors import UserError


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides (train.micro_batch=2 ...)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80: H100)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                    help=f"dense bf16 TFLOP/s per GPU (default {H100_BF16_TFLOPS:g}: H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation to assume (default 0.40)")
    ap.add_argument("--samples", type=float, default=1e6, help="samples per epoch for the time estimate")
    ap.add_argument("--fs-gbps", type=float, default=2.0,
                    help="filesystem bandwidth per node, GB/s: checkpoint writes and the pretrained weights' reads "
                    "(default 2: a parallel filesystem)")
    ap.add_argument("--host-mem", type=float, default=1024.0,
                    help="host memory per node, GiB (default 1024); a layout whose start-up needs more is refused")
    ap.add_argument("--sample-kb", type=float, default=150.0,
                    help="bytes of one sample in the shards, KB (default 150: a JPEG caption pair)")
    ap.add_argument("--fit", action="store_true", help="also list layouts and the smallest that fits")


def run(args: argparse.Namespace) -> int:
    from pargo_dist.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    hw = Hardware(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, peak_tflops=args.peak_tflops, mfu=args.mfu,
                  gpus_per_node=args.gpus_per_node, host_mem_gib=args.host_mem, fs_gbps=args.fs_gbps)
    shapes = shapes_of(cfg)
    total = sum(shapes.params.values())
    p = shapes.params
    print(f"{args.recipe}: {_count(total)} parameters (vision {_count(p['vision_tower'])}, projector "
          f"{_count(p['projector'])}, LLM {_count(p['language_model'])}), {_count(sum(shapes.trainable.values()))} "
          f"trainable (stage {cfg.train.stage})")
    print(f"micro-batch {cfg.train.micro_batch} x {cfg.data.train.max_len} tokens ({shapes.visual_tokens} visual), "
          f"grad_accum {cfg.train.grad_accum}, {cfg.train.precision}; "
          f"{shapes.flops_per_sample / 1e12:.3g} TFLOP per sample (training)")
    try:
        est = estimate(cfg, hw, layout_of(cfg), shapes)
    except ValueError as err:
        if not args.fit:
            raise UserError(f"{err}: change --gpus, or add --fit for a layout that suits {hw.gpus} GPUs") from None
        print(f"the recipe's layout does not apply: {err}")
    else:
        print(format_estimate(est, hw))
        epoch = args.samples / est.samples_per_s
        print(f"  {args.samples:,.0f} samples: {epoch / 3600:.1f} h ({epoch * hw.gpus / 3600:,.0f} GPU-hours)")
        nodes = max(1, math.ceil(hw.gpus / hw.gpus_per_node))
        ckpt = checkpoint_bytes(shapes, cfg.train.stage, cfg.train.precision, bool(cfg.model.lora.r))
        save = save_blocking(ckpt, hw, est.step_time_s)
        print(f"  checkpoint {ckpt / 1e9:,.1f} GB, written in ~{save['sync_s']:,.0f} s by {nodes} node(s) at "
              f"{args.fs_gbps:g} GB/s each: a synchronous save stops training that long; in the background "
              f"(checkpoint.async_save) ~{save['background_s']:,.1f} s (a {save['copy_s']:,.1f} s copy to host memory "
              f"beside the next forward and backward, {save['host_gib_per_node']:,.0f} GiB of it per node)")
        print(f"  data from object storage: {est.samples_per_s / nodes * args.sample_kb / 1e3:,.1f} MB/s per node "
              f"at {args.sample_kb:g} KB per sample")
    if args.fit:
        print(f"\n{'layout':<34}{'GiB/GPU':>9}{'host GiB/node':>15}{'step s':>9}{'tokens/s':>12}  fits in "
              f"{hw.gpu_mem_gib:g} GiB / {hw.host_mem_gib:g} GiB")
        best = None
        for e in options(cfg, hw, shapes):
            ok = fits(e, hw)
            best = best or (e if ok else None)
            print(f"{e.layout.name():<34}{e.total_gib:>9.1f}{e.startup['node_gib']:>15,.0f}{e.step_time_s:>9.2f}"
                  f"{e.tokens_per_s:>12,.0f}  {'yes' if ok else 'no'}")
        if best:
            print(f"smallest layout that fits: {best.layout.name()} ({best.total_gib:.1f} GiB per GPU, "
                  f"{best.startup['node_gib']:,.0f} GiB host memory per node at start-up; "
                  "layouts are listed cheapest first: least parallelism, no recompute, no offload)")
        else:
            print("nothing fits: lower train.micro_batch, raise --gpus, or turn on activation checkpointing")
    return 0
