"""Does the planner's model-state memory match reality? Predicted vs measured vs DeepSpeed's estimators.

For each model size (benchmarks/train_step.py's "tiny" and "small" recipes, plus "medium",
~0.2B) x ZeRO stage 1/2/3 x 1 and 2 ranks, real ranks (gloo on CPU, fp32, as a CPU can run
them) build the model, set up the DeepSpeed backend exactly as training does and run one
optimizer step, so weights, gradients and Adam state all exist. Measured: each rank's
resident memory (RSS, after gc and malloc_trim so that freed build-time memory is not
counted) minus its RSS before the model was built; the largest rank is reported. Predicted:
`pargo_dist.plan.estimate.model_state_bytes` for fp32, what stays resident after a step: weights and
optimizer state, and for ZeRO-3 the gradient partitions and the parameters it keeps gathered
(`zero3_live_bytes`; ZeRO-1/2 free their gradients at the end of the step, the planner's total
counts them as part of the backward's peak).
Also shown: the planner's bf16 figure (what a GPU
run holds) next to DeepSpeed's own estimators for bf16/fp16 on GPU
(`estimate_zero2_model_states_mem_needs` for ZeRO-1/2, it has none for 1; and
`estimate_zero3_model_states_mem_needs`), with the relative difference.

    .venv/bin/python benchmarks/plan_memory.py                 # all sizes, ~5 min on 2 cores
    .venv/bin/python benchmarks/plan_memory.py --sizes small --zero 3
    .venv/bin/python benchmarks/plan_memory.py --step-peak     # ~3 min: see below

`--step-peak`: the whole step's peak, the planner's total against a run's. A random 278M Llama
(hidden 1,024, 18 layers, vocab 32,000) saved by transformers as bf16 safetensors is trained
by `pargo-dist train` for 2 steps in fp32 at micro-batch 2 on 2 CPU ranks, under ZeRO-3
(partitioned as it is read) and megatron TP=2: the same model over the same 2 ranks
(benchmarks/startup.py runs them). Measured: the largest rank's peak RSS over the two steps
(VmHWM, reset when set-up ends) less the same for a 2-layer toy LLM (imports, tower,
projector, data: what a rank holds without the model). glibc's malloc runs with a fixed mmap
threshold (MALLOC_MMAP_THRESHOLD_), so a freed block goes back to the system, as a GPU's
caching allocator lets it be reused, instead of staying in the heap and counting as resident.
Predicted: `pargo-dist plan`'s total for the recipe without its fixed CUDA/NCCL reserve.

Not counted by either side: activations (one tiny batch, freed) and the framework's own
buffers; the measured figure therefore includes DeepSpeed's buckets on top of model states,
which is the error the table shows.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_step import SIZES, VOCAB, fixed_batch  # noqa: E402

_LLM = "model.llm.config."
_VIS = "model.vision.config."
MEDIUM = [f"{_LLM}hidden_size=1024", f"{_LLM}intermediate_size=2816", f"{_LLM}num_hidden_layers=12",
          f"{_LLM}num_attention_heads=16", f"{_LLM}num_key_value_heads=8", f"{_LLM}max_position_embeddings=512",
          f"{_LLM}vocab_size={VOCAB}", *[o for o in SIZES["small"] if o.startswith(("model.vision", "model.proj"))]]
ALL_SIZES = {"tiny": SIZES["tiny"], "small": SIZES["small"], "medium": MEDIUM}
RECIPE = HERE.parent / "recipes" / "tiny-cpu.yaml"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return rss_bytes()


def overrides(size: str, zero: int) -> list[str]:
    return [*ALL_SIZES[size], f"backend.zero_stage={zero}", "train.precision=fp32", "train.micro_batch=1",
            "train.grad_accum=1", "train.stage=full", "logging.tensorboard=false"]


def worker(size: str, zero: int) -> None:
    import torch

    from pargo_dist import build
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend
    from pargo_dist.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, overrides(size, zero))
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    tokenizer = build.build_tokenizer(cfg)
    before = settle()
    model = build.build_model(cfg, tokenizer)
    model.freeze(cfg.train.stage)
    backend.setup(model)
    del model
    batch = fixed_batch(backend.module, tokenizer, 1, text_tokens=16)
    backend.train_batch([batch], float(batch.num_targets), 0)
    del batch
    after = settle()
    print(json.dumps({"measured": after - before}), flush=True)


def measure(size: str, zero: int, ranks: int) -> float:
    from pargo_dist.runtime.rank_env import free_port, rank_env

    master = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", size, str(zero)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=rank_env(r, ranks, 1, 0, master))
             for r in range(ranks)]
    values = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{size} ZeRO-{zero} x{ranks} failed:\n{err[-3000:]}")
        values.append(json.loads(out.strip().splitlines()[-1])["measured"])
    return float(max(values))


def predicted(size: str, zero: int, ranks: int) -> tuple[float, float, float, int]:
    """(planner fp32, planner bf16, DeepSpeed's estimator, parameters) in bytes per rank."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from pargo_dist.config import load_config
    from pargo_dist.plan.estimate import Layout, model_state_bytes, zero3_live_bytes
    from pargo_dist.plan.trace import shapes_of

    cfg = load_config(RECIPE, overrides(size, zero))
    shapes = shapes_of(cfg, micro_batch=1, seq_len=64)
    layout = Layout("deepspeed", zero_stage=zero)
    states = model_state_bytes(shapes, layout, ranks, "fp32")
    fp32 = states["weights"] + states["optimizer"]
    if zero == 3:  # the gradient partitions stay, and so do the parameters DeepSpeed keeps gathered
        fp32 += states["gradients"] + zero3_live_bytes(shapes, "fp32")
    bf16 = sum(model_state_bytes(shapes, layout, ranks, "bf16").values())
    total = sum(shapes.params.values())
    if zero == 3:
        _, ds, *_ = estimate_zero3_model_states_mem_needs(total, shapes.largest_module, num_gpus_per_node=ranks,
                                                          cpu_offload=False)
    else:
        _, ds = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=ranks, cpu_offload=False)
    return fp32, bf16, float(ds), total


STEP_CASES = ("megatron-tp2", "zero3-fp32-2-init")


def step_peaks(micro_batch: int, timeout: float) -> None:
    """The `--step-peak` table (module docstring)."""
    import tempfile

    import startup

    from pargo_dist.config import load_config
    from pargo_dist.plan.estimate import FRAMEWORK_RESERVE_GIB, GiB, Hardware, estimate, layout_of
    from pargo_dist.plan.trace import shapes_of

    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="pargo-step-peak-") as tmp:
        tmp = Path(tmp)
        params = startup.save_llama(tmp / "llama", 1024, 18, 2816, VOCAB)
        print(f"random Llama: {params / 1e6:.0f}M parameters saved as bf16 safetensors; fp32 training, micro-batch "
              f"{micro_batch}, 2 steps", flush=True)
        for name in STEP_CASES:
            ranks, overrides = startup.CASES[name]
            overrides = [*overrides, "train.precision=fp32", f"train.micro_batch={micro_batch}"]
            got = {}
            for kind, llm in (("model", f"{{path: {tmp / 'llama'}}}"), ("baseline", startup.TOY_LLM)):
                recipe = tmp / f"{name}-{kind}.yaml"
                recipe.write_text(startup.RECIPE.format(run=tmp / f"run-{name}-{kind}", llm=llm, data=tmp / "data"))
                extra = [o for o in overrides if kind == "model" or not o.startswith("backend.zero_init")]
                got[kind] = startup.run_case(recipe, ranks, extra, timeout, env=fixed)
                if "error" in got[kind]:
                    raise RuntimeError(f"{name} ({kind}): {got[kind]['error']}")
            cfg = load_config(tmp / f"{name}-model.yaml", overrides)
            hw = Hardware(gpus=ranks, gpus_per_node=ranks)
            est = estimate(cfg, hw, layout_of(cfg), shapes_of(cfg))
            parts = {k: v for k, v in est.memory.items()}
            parts["buffers"] -= FRAMEWORK_RESERVE_GIB
            measured = (got["model"]["step"] - got["baseline"]["step"]) / GiB
            rows.append((est.layout.name(), parts, measured))
            print(f"{est.layout.name()}: planned {sum(parts.values()):.2f} GiB, measured {measured:.2f} GiB", flush=True)
    names = list(rows[0][1])
    print(f"\n| layout | {' | '.join(names)} | planned GiB | measured GiB | error |")
    print("|---|" + "---|" * (len(names) + 3))
    for layout, parts, measured in rows:
        total = sum(parts.values())
        print(f"| {layout} | {' | '.join(f'{parts[n]:.2f}' for n in names)} | {total:.2f} | {measured:.2f} | "
              f"{(total - measured) / measured:+.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-peak", action="store_true",
                    help="the whole step's peak of a 278M model, ZeRO-3 vs megatron TP=2, planned and measured")
    ap.add_argument("--micro-batch", type=int, default=2, help="with --step-peak")
    ap.add_argument("--sizes", nargs="+", choices=list(ALL_SIZES), default=list(ALL_SIZES))
    ap.add_argument("--zero", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    if args.step_peak:
        step_peaks(args.micro_batch, timeout=900)
        return
    mib = 2**20
    print(f"{'size':<8}{'params':>8}{'ZeRO':>5}{'ranks':>6} | {'fp32 pred':>10}{'measured':>10}{'error':>8} | "
          f"{'bf16 pred':>10}{'DS estim.':>10}{'diff':>8}")
    print(f"{'':<8}{'':>8}{'':>5}{'':>6} | {'MiB/rank':>10}{'MiB/rank':>10}{'':>8} | {'MiB/GPU':>10}{'MiB/GPU':>10}")
    for size in args.sizes:
        for zero in args.zero:
            for ranks in args.ranks:
                fp32, bf16, ds, total = predicted(size, zero, ranks)
                got = measure(size, zero, ranks)
                print(f"{size:<8}{total / 1e6:>7.1f}M{zero:>5}{ranks:>6} | {fp32 / mib:>10.1f}{got / mib:>10.1f}"
                      f"{(fp32 - got) / got:>+8.1%} | {bf16 / mib:>10.1f}{ds / mib:>10.1f}{(bf16 - ds) / ds:>+8.1%}",
                      flush=True)


if __name__ == "__main__":
    main()
