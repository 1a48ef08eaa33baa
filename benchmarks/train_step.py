"""Training-step throughput and peak memory: pargo_dist (DeepSpeed and megatron backends) vs a
bare DeepSpeed loop vs HF Trainer.

What is measured: samples/s, tokens/s and peak memory of one *optimizer step* (forward,
backward, ZeRO gradient reduction, clipping, AdamW update) on one fixed synthetic batch, so no
data loading is inside the timed region; rates come from the median step time (robust to other
processes on a shared machine). Four contenders train the same model (same recipe, same seed,
same frozen parts), on the same batch; the DeepSpeed ones under the same DeepSpeed config
(`pargo_dist.backends.deepspeed.ds_config`):

  pargo_dist      our loop: `Trainer.train_step` itself (global target-token count, its
                  all-reduces, the loss normalisation), over the backend `make_backend(cfg)`
                  gives, set up as `build_trainer` does it (init_distributed, the model built
                  frozen for the stage, `backend.setup`, which builds
                  the optimizer and LR schedule): here backend.name=deepspeed.
  megatron        the same, with backend.name=megatron at TP=1, PP=1 (one process): the LLM is
                  converted to a megatron-core GPTModel, megatron DDP + its optimizer (on GPU:
                  bf16 params, fp32 grads, the distributed optimizer; on CPU: the FP32
                  optimizer). ZeRO does not apply to it. Shown as "pargo_dist megatron (TP=1)".
  bare deepspeed  `deepspeed.initialize(model, AdamW, config)`, then
                  `loss = engine(**batch).loss; engine.backward(loss); engine.step()`.
                  ours / bare is the *framework overhead* of pargo_dist (ideally 1.00).
  hf trainer      `transformers.Trainer` with `TrainingArguments(deepspeed=<the same dict>)`:
                  what a LLaVA-style training script gets. A step is timed from the end of
                  the previous step to its own end (TrainerCallback.on_step_end), so
                  the Trainer's own per-step work (batch fetch and device move, loss-kwarg
                  counting, callbacks) is included, as it is in a real run.

Model sizes: "tiny" is recipes/tiny-cpu.yaml as is; "small" (~56M parameters) and "1b" (a
Llama-1B-shaped LLM: hidden 2048, 16 layers, 16 heads, 8 KV heads, FFN 5632, with a
CLIP-L/336-shaped tower and the paper's ParGo projector, ~1.5B parameters in all, CUDA only)
are the same recipe with overrides (SIZES below). Vocabulary: the synthetic tokenizer's
~100 ids for tiny, 32,000 (Llama-2's, passed as llm vocab_size) for small and 1b, so the LM
head costs what it really does. Sequence: the visual tokens + 64 text tokens (tiny, small),
304 visual + 720 text = 1,024 (1b; see TEXT_TOKENS_OF). Micro batch: --batch, default 8
(tiny, small) and 4 (1b: fits an 80 GB H100 in bf16 for ZeRO-3 and for megatron). The recipe's stage (full: tower, projector and
LLM all train) holds for all sizes and contenders.

Every contender runs in its own subprocess (one rank: RANK=0, WORLD_SIZE=1; gloo on CPU, NCCL
on CUDA), so peak memory (`metrics.peak_memory_gib`: CUDA max_memory_allocated, or the process
peak RSS on CPU, imports included) and process-group state cannot leak between them. MFU
(`flops.model_flops_per_sample`, vision tower included) is shown where the GPU's peak
FLOP/s is known. A contender that cannot run shows "n/a: <reason>" in its row.

    python benchmarks/train_step.py                                # CPU: tiny, fp32, all four rows
    python benchmarks/train_step.py --sizes small --steps 20       # one size, more steps
    python benchmarks/train_step.py --contenders pargo_dist megatron   # some rows only
    python benchmarks/train_step.py --sizes 1b --zero 3            # CUDA: bf16, 3 + 10 steps a row
    python benchmarks/train_step.py --sizes 1b --zero 3 --contenders pargo_dist megatron   # 2 rows
    python benchmarks/train_step.py --sizes small --zero 3 --contenders finetune lora   # LoRA vs full LLM

The finetune / lora rows train the same model in stage finetune (projector + LLM, tower
frozen): the whole LLM, or LoRA adapters (--lora-r, on the attention projections) with the
LLM's weights frozen. Their difference is the optimizer state and gradients of the LLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pargo_dist  # noqa: E402,F401  (environment shims)

RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
CONTENDERS = ("pargo_dist", "megatron", "bare deepspeed", "hf trainer", "finetune", "lora")
DEFAULT_CONTENDERS = CONTENDERS[:4]
LABELS = {"megatron": "pargo_dist megatron (TP=1)",  # the table's name of a contender, where not its key
          "finetune": "finetune: full LLM", "lora": "finetune: LoRA"}
STAGE_OF = {"finetune": ["train.stage=finetune"], "lora": ["train.stage=finetune"]}  # extra overrides
TEXT_TOKENS = 64  # per sample, besides the visual tokens: half prompt, half answer (the targets)
VOCAB = 32000

_LLM = "model.llm.config."
_VIS = "model.vision.config."
SIZES: dict[str, list[str]] = {
    "tiny": [],
    "small": [f"{_LLM}hidden_size=512", f"{_LLM}intermediate_size=1408", f"{_LLM}num_hidden_layers=6",
              f"{_LLM}num_attention_heads=8", f"{_LLM}num_key_value_heads=4", f"{_LLM}max_position_embeddings=512",
              f"{_LLM}vocab_size={VOCAB}",
              f"{_VIS}hidden_size=256", f"{_VIS}intermediate_size=1024", f"{_VIS}num_hidden_layers=4",
              f"{_VIS}num_attention_heads=4", f"{_VIS}image_size=64", f"{_VIS}patch_size=8",
              "model.projector.width=256", "model.projector.heads=4", "model.projector.ffn=1024"],
    "1b": [f"{_LLM}hidden_size=2048", f"{_LLM}intermediate_size=5632", f"{_LLM}num_hidden_layers=16",
           f"{_LLM}num_attention_heads=16", f"{_LLM}num_key_value_heads=8", f"{_LLM}max_position_embeddings=2048",
           f"{_LLM}vocab_size={VOCAB}",
           f"{_VIS}hidden_size=1024", f"{_VIS}intermediate_size=4096", f"{_VIS}num_hidden_layers=24",
           f"{_VIS}num_attention_heads=16", f"{_VIS}image_size=336", f"{_VIS}patch_size=14",
           "model.vision.feature_layer=-2", "model.vision.post_layernorm=false"],
}
DEFAULT_PROJECTOR = {"1b"}  # sizes that use ProjectorConfig's defaults (the paper's 288 + 16 queries)
# Sizes with longer text: 304 visual + 720 = 1,024 tokens a sample (a multiple of 64, as bf16
# matmuls want; the former 1,022 dodged an apex softmax kernel that megatron's SDPA core
# attention no longer reaches).
TEXT_TOKENS_OF = {"1b": 720}
BATCH_OF = {"1b": 4}  # default micro batch where not 8


# ----------------------------------------------------------------------------- one contender


def batch_size(size: str, args) -> int:
    return args.batch or BATCH_OF.get(size, 8)


def load_size(size: str, args, backend: str = "deepspeed", extra: list[str] = ()):
    """The recipe with the size's overrides and the benchmark's batch / precision / ZeRO stage /
    backend (megatron: TP=1, PP=1, one process)."""
    from pargo_dist.config import load_config

    overrides = SIZES[size] + [f"train.micro_batch={batch_size(size, args)}", "train.grad_accum=1",
                               f"train.precision={args.precision}", f"backend.zero_stage={args.zero}",
                               f"train.steps={args.warmup + args.steps}", "logging.tensorboard=false",
                               f"backend.name={backend}", *extra]
    if backend == "megatron":
        overrides += ["backend.tensor_parallel=1", "backend.pipeline_parallel=1"]
    cfg = load_config(args.recipe, overrides)
    if size in DEFAULT_PROJECTOR:
        cfg.model.projector = {}
        cfg.validate()
    return cfg


def fixed_batch(model, tokenizer, batch: int, seed: int = 0, text_tokens: int = TEXT_TOKENS):
    """One collated batch: <s> <|user|> <image>*V prompt <|assistant|> answer </s>; loss on the answer."""
    from pargo_dist.data.collate import Collator
    from pargo_dist.data.tokenizer import ASSISTANT, USER, image_token_id
    from pargo_dist.constants import IGNORE_INDEX

    gen = torch.Generator().manual_seed(seed)
    words = [i for t, i in tokenizer.get_vocab().items() if t not in tokenizer.all_special_tokens]
    words = torch.tensor(sorted(words))
    side = model.vision_tower.image_size
    n_visual = model.num_image_tokens()
    user, assistant = tokenizer.convert_tokens_to_ids([USER, ASSISTANT])
    n_prompt, n_answer = text_tokens // 2 - 3, text_tokens // 2 - 1  # + <s> <|user|> <|assistant|>, + </s>
    examples = []
    for i in range(batch):
        pick = words[torch.randint(len(words), (n_prompt + n_answer,), generator=gen)].tolist()
        prompt = [tokenizer.bos_token_id, user] + [image_token_id(tokenizer)] * n_visual + pick[:n_prompt] \
            + [assistant]
        answer = pick[n_prompt:] + [tokenizer.eos_token_id]
        examples.append({"id": str(i), "input_ids": prompt + answer,
                         "labels": [IGNORE_INDEX] * len(prompt) + answer,
                         "pixel_values": torch.randn(3, side, side, generator=gen)})
    return Collator(pad_id=tokenizer.pad_token_id)(examples)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_loop(step, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run_pargo(cfg, model, batch, args, backend) -> list[float]:
    """Trainer.train_step over `backend` (already through init_distributed, model built in its
    frozen, as build_trainer does); setup builds the optimizer and LR
    schedule. The step count advances as in Trainer.run."""
    from pargo_dist.checkpoint import CheckpointManager
    from pargo_dist.metrics import MetricsLogger
    from pargo_dist.signals import StopSignal
    from pargo_dist.train import Trainer

    backend.setup(model)
    backend.train(True)
    run_dir = tempfile.mkdtemp(prefix="bench-run-")
    trainer = Trainer(cfg, backend, None, CheckpointManager(run_dir), MetricsLogger(run_dir, enabled_tensorboard=False),
                      StopSignal(), model=model)
    batch = batch.to(backend.device)

    def step():
        trainer.train_step([batch])
        trainer.state.step += 1

    return timed_loop(step, args.warmup, args.steps)


def run_bare(cfg, model, batch, args, _backend=None) -> list[float]:
    import deepspeed

    from pargo_dist.backends.deepspeed import ds_config

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, 1))
    engine.train()
    inputs = batch.to(engine.device).model_inputs()

    def step():
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()

    return timed_loop(step, args.warmup, args.steps)


def run_hf(cfg, model, batch, args, _backend=None) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pargo_dist.backends.deepspeed import ds_config

    inputs = batch.model_inputs()
    n = len(batch)
    marks: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            sync()
            marks[state.global_step] = time.perf_counter()

    class Rows(torch.utils.data.Dataset):  # the fixed batch's rows; the collator returns the batch itself
        def __len__(self):
            return n * (args.warmup + args.steps)

        def __getitem__(self, i):
            return {"row": i % n}

    def collate(rows):
        assert len(rows) == n, "the Trainer's batch is not the benchmark batch"
        return dict(inputs)

    o = cfg.optim
    out_dir = tempfile.TemporaryDirectory(prefix="hf-bench-")  # save_strategy="no": stays empty
    targs = TrainingArguments(
        output_dir=out_dir.name, deepspeed=ds_config(cfg, 1),
        per_device_train_batch_size=n, gradient_accumulation_steps=1, max_steps=args.warmup + args.steps,
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, max_grad_norm=o.clip_grad, lr_scheduler_type="cosine", optim="adamw_torch",
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=cfg.train.precision == "bf16", dataloader_num_workers=0,
        remove_unused_columns=False, seed=cfg.run.seed, data_seed=cfg.run.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                      callbacks=[StepClock()])
    trainer.train()
    out_dir.cleanup()
    engine = type(trainer.model_wrapped).__name__
    if not trainer.is_deepspeed_enabled or engine != "DeepSpeedEngine":
        raise RuntimeError(f"the HF Trainer did not train through DeepSpeed (model_wrapped: {engine})")
    if len(marks) != args.warmup + args.steps:
        raise RuntimeError(f"the HF Trainer ran {len(marks)} steps, expected {args.warmup + args.steps}")
    # step k's time: end of step k-1 to end of step k (without warm-up, step 1 has no start: left out)
    return [marks[k] - marks[k - 1] for k in range(max(args.warmup, 1) + 1, args.warmup + args.steps + 1)]


def run_one(size: str, contender: str, args) -> dict:
    """Build, time, measure one contender (in this process: the parent starts one per case)."""
    from pargo_dist.launch import single_process_env

    single_process_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pargo_dist.build import build_model, init_freeze_and_adapt
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.flops import model_flops_per_sample, mfu, peak_flops_per_device
    from pargo_dist.metrics import peak_memory_gib
    from pargo_dist.train import make_backend

    import transformers

    transformers.logging.set_verbosity_error()
    extra = STAGE_OF.get(contender, []) + ([f"model.lora.r={args.lora_r}", f"model.lora.alpha={2 * args.lora_r}"]
                                           if contender == "lora" else [])
    cfg = load_size(size, args, backend="megatron" if contender == "megatron" else "deepspeed", extra=extra)
    backend = None
    if contender in ("pargo_dist", "megatron", "finetune", "lora"):  # as build_trainer: the backend joins
        backend = make_backend(cfg)
        backend.init_distributed()
    else:
        from pargo_dist.backends.deepspeed import init_distributed

        init_distributed()
    tokenizer = synthetic_tokenizer()
    model = build_model(cfg, tokenizer)
    init_freeze_and_adapt(model, cfg)  # frozen parts, LoRA adapters: as build_trainer
    n = batch_size(size, args)
    batch = fixed_batch(model, tokenizer, n, seed=cfg.run.seed, text_tokens=TEXT_TOKENS_OF.get(size, TEXT_TOKENS))
    seq = batch.input_ids.shape[1]
    flops = model_flops_per_sample(model, seq)
    info = {"size": size, "contender": contender, "seq": seq, "tokens": batch.num_tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    run = {"bare deepspeed": run_bare, "hf trainer": run_hf}.get(contender, run_pargo)
    times = run(cfg, model, batch, args, backend)
    median = statistics.median(times)
    samples_per_s = n / median
    peak = peak_flops_per_device(cfg.train.precision)
    info.update(samples_per_s=samples_per_s, tokens_per_s=batch.num_tokens / median, step_s=times,
                mem_gib=peak_memory_gib(), mfu=mfu(flops * samples_per_s, peak) if peak else None)
    return info


# ----------------------------------------------------------------------------- the table

MARK = "TRAIN_STEP_RESULT "


def spawn(size: str, contender: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", size, contender, "--recipe", str(args.recipe),
           "--batch", str(batch_size(size, args)), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", args.precision, "--zero", str(args.zero), "--lora-r", str(args.lora_r)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return {**json.loads(line[len(MARK):]), "wall_s": wall}
    tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return {"size": size, "contender": contender, "wall_s": wall,
            "error": f"exit {proc.returncode}: {tail[-1] if tail else '?'}"}


def short(err: str, width: int = 110) -> str:
    err = " ".join(err.split())
    return err if len(err) <= width else err[: width - 3] + "..."


def print_table(size: str, rows: list[dict], args) -> None:
    ok = [r for r in rows if "error" not in r]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores, " \
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    ref = ok[0] if ok else {}
    params = f"{ref['params'] / 1e6:.1f}M params ({ref['trainable'] / 1e6:.1f}M trained)" if ref else "params ?"
    print(f"\n[{size}] {device} | {args.precision} | ZeRO-{args.zero} (DeepSpeed rows) | batch "
          f"{batch_size(size, args)} x seq {ref.get('seq', '?')} | {params} | median of {args.steps} steps after "
          f"{args.warmup} warm-up")
    bare = next((r for r in ok if r["contender"] == "bare deepspeed"), None)
    w = max(15, *(len(LABELS.get(r["contender"], r["contender"])) for r in rows))
    print(f"{'contender':<{w}} {'trained M':>10} {'samples/s':>10} {'tokens/s':>10} {'peak mem GiB':>13} {'MFU':>7}"
          f" {'vs bare ds':>11} {'row wall s':>11}")
    for r in rows:
        name = LABELS.get(r["contender"], r["contender"])
        if "error" in r:
            print(f"{name:<{w}} n/a: {short(r['error'])}")
            continue
        ratio = f"{r['samples_per_s'] / bare['samples_per_s']:.2f}" if bare else "-"
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{name:<{w}} {r['trainable'] / 1e6:>10.2f} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10,.0f}"
              f" {r['mem_gib']:>13.2f}"
              f" {m:>7} {ratio:>11} {r.get('wall_s', float('nan')):>11.0f}")
    sys.stdout.flush()


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                    help="default: tiny (CPU), 1b (CUDA: ~1 min a row, so under 4 min for all four)")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(DEFAULT_CONTENDERS),
                    help="rows to run (megatron: the 'pargo_dist megatron (TP=1)' row; finetune / lora: stage "
                    "finetune with the whole LLM / LoRA adapters trained); default: the first four")
    ap.add_argument("--lora-r", type=int, default=64, help="LoRA rank of the lora row (alpha = 2 r)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 3 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="micro batch (default: 8; 4 for size 1b)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    ap.add_argument("--zero", type=int, choices=[1, 2, 3], default=2)
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds per contender before giving up (default: 900 on CPU, 240 on CUDA)")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or 10
    args.warmup = (3 if cuda else 2) if args.warmup is None else args.warmup
    args.sizes = args.sizes or (["1b"] if cuda else ["tiny"])
    args.case_timeout = args.case_timeout or (240 if cuda else 900)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    if args.one:
        size, contender = args.one
        try:
            out = run_one(size, contender, args)
        except Exception as err:  # noqa: BLE001  reported in the table row
            traceback.print_exc()
            out = {"size": size, "contender": contender, "error": f"{type(err).__name__}: {err}"}
        print(MARK + json.dumps(out), flush=True)
        return

    if "1b" in args.sizes and not cuda:
        print("note: size 1b runs on CUDA only; skipped here", file=sys.stderr)
        args.sizes = [s for s in args.sizes if s != "1b"]
    for size in args.sizes:
        rows = []
        for contender in args.contenders:
            try:
                rows.append(spawn(size, contender, args))
            except subprocess.TimeoutExpired:
                rows.append({"size": size, "contender": contender,
                             "error": f"timed out after {args.case_timeout:.0f}s"})
        print_table(size, rows, args)
    print("\nvs bare ds: samples/s relative to the bare DeepSpeed loop on the same model and batch "
          "(pargo_dist / bare = framework overhead; megatron / bare = backend vs ZeRO).\nmegatron row: "
          "TP=1 PP=1 in one process; " + ("bf16 params, distributed optimizer" if cuda else "FP32 optimizer") +
          "; the ZeRO stage does not apply.\nrow wall s: the contender's whole subprocess (imports, model "
          "build, setup, all steps).\npeak mem: " +
          ("torch.cuda.max_memory_allocated." if cuda else
           "peak RSS of the contender's own process (imports of torch/deepspeed/transformers included)."))


if __name__ == "__main__":
    main()
