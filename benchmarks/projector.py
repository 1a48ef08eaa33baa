"""ParGo projector: region-gathered partial cross-attention vs the dense masked reference.

Forward + backward time and peak memory at the paper's shape (batch 8, 576 patches of width
1024, 288 + 16 queries, 4 layers of width 512, LLM width 4096) and at 4 crops (2304 patches),
printed as one table with the dense / region ratio side by side.

    python benchmarks/projector.py                      # CPU here, CUDA when there is a GPU
    python benchmarks/projector.py --dtype bf16 --iters 20

Peak memory: on CUDA, torch.cuda.max_memory_allocated above what the inputs and weights hold;
on CPU, every case runs in its own process and reports its peak RSS (ru_maxrss) above the RSS
measured just before the first step, so cases cannot inflate each other's peaks.
The "scores" column counts attention-score entries per layer and head: (P + G) x N dense,
P x N/P + G x N gathered; it is what the masked dense attention wastes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import psutil
import torch

import pargo_dist  # noqa: F401  (environment shims)
from pargo_dist.models.projector import ProjectorConfig, build_projector

VISION_WIDTH, LLM_WIDTH, GRID = 1024, 4096, (24, 24)


def run_case(impl: str, crops: int, args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    cfg = ProjectorConfig(cross_attn_impl=impl)
    proj = build_projector(cfg, VISION_WIDTH, LLM_WIDTH, GRID).to(device, dtype)
    feats = torch.randn(args.batch, crops * 576, VISION_WIDTH, device=device, dtype=dtype)

    def step():
        proj.zero_grad(set_to_none=True)
        proj(feats).float().square().mean().backward()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    N, P, G = crops * 576, cfg.num_partial, cfg.num_global
    scores = (P + G) * N if impl == "dense" else P * (N // P) + G * N
    return {"impl": impl, "crops": crops, "ms": 1000 * sorted(times)[len(times) // 2],
            "peak_mib": max(peak, 0) / 2**20, "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crops", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--iters", type=int, default=3, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "CROPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_case(args.one[0], int(args.one[1]), args)))
        return

    rows = []
    for crops in args.crops:
        for impl in ("region", "dense"):
            if args.device == "cpu":  # one process per case: ru_maxrss is a process-lifetime peak
                cmd = [sys.executable, __file__, "--one", impl, str(crops)] + [
                    f"--{k}={getattr(args, k)}" for k in ("batch", "iters", "warmup", "dtype", "device")]
                rows.append(json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1]))
            else:
                rows.append(run_case(impl, crops, args))
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nParGo projector fwd+bwd, batch {args.batch}, {args.dtype}, {name}, median of {args.iters}")
    print(f"{'patches':>8} {'impl':>7} {'ms/step':>9} {'peak MiB':>9} {'scores/head':>12} | {'time x':>7} {'mem x':>7}")
    for crops in args.crops:
        region = next(r for r in rows if r["crops"] == crops and r["impl"] == "region")
        dense = next(r for r in rows if r["crops"] == crops and r["impl"] == "dense")
        for r in (region, dense):
            ratio_t = r["ms"] / region["ms"]
            ratio_m = r["peak_mib"] / region["peak_mib"] if region["peak_mib"] else float("nan")
            print(f"{crops * 576:>8} {r['impl']:>7} {r['ms']:>9.1f} {r['peak_mib']:>9.1f} {r['scores']:>12,} |"
                  f" {ratio_t:>7.2f} {ratio_m:>7.2f}")
    print("ratios are relative to the region-gathered path of the same row group (dense / region)")


if __name__ == "__main__":
    main()
