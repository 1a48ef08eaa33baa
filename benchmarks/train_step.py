"""Training-step throughput and peak memory: pargo_dist (DeepSpeed and megatron backends) vs a
bare DeepSpeed loop vs HF Trainer, each next to what the planner (`pargo-dist plan`) predicts.

What is measured: tokens/s, MFU and peak memory of one *optimizer step* (forward, backward,
ZeRO gradient reduction, clipping, AdamW update) on one fixed synthetic batch, so no data
loading is inside the timed region; rates come from the median step time (robust to other
processes on a shared machine). The contenders train the same model (same recipe, same seed,
same frozen parts), on the same batch; the DeepSpeed ones under the same DeepSpeed config
(`pargo_dist.backends.deepspeed.backend.ds_config`):

  pargo_dist      our loop: `Trainer.train_step` itself (global target-token count, its
                  all-reduces, the loss normalisation), over the backend `make_backend(cfg)`
                  gives, set up as `build_trainer` does it (init_distributed, the model built
                  frozen for the stage, `backend.setup`, which builds
                  the optimizer and LR schedule): here backend.name=deepspeed.
  megatron        the same, with backend.name=megatron at TP=1, PP=1 (one process): the LLM is
                  converted to a megatron-core GPTModel, megatron DDP + its optimizer (on GPU:
                  bf16 params, fp32 grads, the distributed optimizer; on CPU: the FP32
                  optimizer). ZeRO does not apply to it. Shown as "pargo_dist megatron (TP=1)".
  bare deepspeed  `deepspeed.initialize(model, AdamW(fused=True), config)`, then
                  `loss = engine(**batch).loss; engine.backward(loss); engine.step()`.
                  ours / bare is the *framework overhead* of pargo_dist (ideally 1.00).
  hf trainer      `transformers.Trainer` with `TrainingArguments(deepspeed=<the same dict>)`
                  and its default optimizer since torch 2.8 (adamw_torch_fused): what a
                  LLaVA-style training script gets. All three use fused AdamW, so the rows
                  compare loops, not optimizers. A step is timed from the end of
                  the previous step to its own end (TrainerCallback.on_step_end), so
                  the Trainer's own per-step work (batch fetch and device move, loss-kwarg
                  counting, callbacks) is included, as it is in a real run.
  compiled        the pargo_dist row with the recipe override train.compile=true, its blocks
                  compiled as a run compiles them (pargo_dist.train.run.set_up_backend, which
                  build_trainer calls too; a note under the table
                  says how many). Compiling falls in the warm-up steps, so give it --warmup 2
                  or more. --compile-backend sets train.compile_backend (aot_eager: the same
                  graphs without code generation, a quick check on CPU). Not a default row.

ZeRO stages: --zero takes one or more stages (--zero 2 3). The pargo_dist row runs at each of
them ("pargo_dist ZeRO-2", "pargo_dist ZeRO-3"): how much a stage costs is our question. Every
other DeepSpeed row (bare deepspeed, hf trainer, compiled, finetune, lora) runs once, at the
first stage given, and is labelled with it: they answer other questions (framework overhead,
compile), and one reference row per table keeps "vs bare ds" unambiguous. The "ran as" column
is the stage DeepSpeed's engine itself reports. On one rank DeepSpeedBackend runs ZeRO-3 as
ZeRO-2 (`zero_stage_for`: stage 3 has nothing to partition there), so without --force-zero3 a
"ZeRO-3" row at one rank shows "ran as ZeRO-2!" and measures ZeRO-2. --force-zero3 sets the
recipe key backend.zero3_on_one_rank=true, so stage 3 runs as asked: per-module gathers, hooks and persistence thresholds as on N GPUs,
without the communication; that is the per-GPU cost of ZeRO-3 a multi-GPU run pays on top of
its collectives.

Model sizes: "tiny" is recipes/tiny-cpu.yaml as is; "small" (~56M parameters), "1b" (a
Llama-1B-shaped LLM: hidden 2048, 16 layers, 16 heads, 8 KV heads, FFN 5632, with a
CLIP-L/336-shaped tower and the paper's ParGo projector, ~1.2B parameters in all) and "3b" (a
Llama-3B-class LLM: hidden 3072, 28 layers, 24 heads, 8 KV heads, FFN 8192, the same tower and
projector as 1b, ~3.3B parameters in all) are the same recipe with overrides (SIZES below); 1b
and 3b run on CUDA only. Vocabulary: the synthetic tokenizer's ~100 ids for tiny, 32,000
(Llama-2's, passed as llm vocab_size) for the others, so the LM head costs what it really
does. Sequence: the visual tokens + 64 text tokens (tiny, small), 304 visual + 720 text =
1,024 (1b, 3b; see TEXT_TOKENS_OF). Micro batch: --batch takes one or more sizes (--batch 4
16; one table per size x batch), default 8 (tiny, small) and 4 (1b, 3b). The recipe's stage
(full: tower, projector and LLM all train) holds for all sizes and contenders.

The planner's prediction, next to each measurement: `pargo_dist.plan` (`estimate`, as
`pargo-dist plan` calls it) for the row's own config and layout (the ZeRO stage DeepSpeed will
run, or megatron TP=1 PP=1), on Hardware(gpus=1, this GPU's memory, peak = pargo_dist.models.flops
peak_flops_per_device, else 989 TFLOP/s, mfu = the planner's default 0.40), for the benchmark's
micro batch and sequence. Columns:

  plan GiB, x plan   the predicted GPU memory, and measured peak / predicted. The prediction
                     includes a fixed 2.5 GiB for the CUDA context, NCCL and fragmentation,
                     which max_memory_allocated does not count: a ratio a little under 1 is
                     the planner being right. This is the planner's independent check.
  plan s, x plan     the predicted step time and measured / predicted. The planner's step
                     time is FLOPs / (peak x its *assumed* MFU of 40%), from the same FLOP
                     count as the MFU column, so this ratio is exactly 0.40 / measured MFU:
                     not a prediction of speed but how far the step is from the MFU the
                     planner assumes (1.00: as assumed; 4.0: the planner's times are 4x
                     optimistic). Pass the measured MFU to `pargo-dist plan --mfu`.
On CPU the prediction is for an H200-sized GPU (141 GiB, 989 TFLOP/s) and is shown for
reference only: CPU peak RSS and CPU step time are not comparable, so both ratios show "-".
A prediction that cannot be made shows "n/a"; it is made in the row's own process before the
model is built, so a row that runs out of memory still shows what the planner expected.

Every contender runs in its own subprocess (one rank: RANK=0, WORLD_SIZE=1; gloo on CPU, NCCL
on CUDA), so peak memory (`pargo_dist.observe.metrics.peak_memory_gib`: CUDA
max_memory_allocated, or the process peak RSS on CPU, imports included) and process-group state
cannot leak between them. MFU (`pargo_dist.models.flops.model_flops_per_sample`, vision tower
included) is shown where the GPU's peak FLOP/s is known. "start s" is the row's imports, model build, set-up and warm-up steps
(where a GPU row's time goes when it is not stepping). A contender that cannot run shows
"n/a: <reason>" in its row. --budget-s caps the whole run: rows are started only while time
is left (each with at most the time left), the rest show "n/a: skipped", and the tables are
always printed (benchmarks/gpu_run.sh uses it to fit a device session).

    python benchmarks/train_step.py                                # CPU: tiny, fp32, four rows
    python benchmarks/train_step.py --sizes small --steps 20       # one size, more steps
    python benchmarks/train_step.py --contenders pargo_dist megatron   # some rows only
    python benchmarks/train_step.py --sizes tiny --zero 2 3 --force-zero3 --contenders pargo_dist
    python benchmarks/train_step.py --sizes 1b --batch 4 16        # CUDA: bf16, 3 + 10 steps a row
    python benchmarks/train_step.py --sizes 1b 3b --batch 16 --contenders pargo_dist megatron compiled
    python benchmarks/train_step.py --sizes small --zero 3 --contenders finetune lora   # LoRA vs full LLM

The finetune / lora rows train the same model in stage finetune (projector + LLM, tower
frozen): the whole LLM, or LoRA adapters (--lora-r, on the attention projections) with the
LLM's weights frozen. Their difference is the optimizer state and gradients of the LLM.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # a row's "start s" counts from here (imports included)

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pargo_dist  # noqa: F401  (environment shims)

RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
CONTENDERS = ("pargo_dist", "megatron", "bare deepspeed", "hf trainer", "compiled", "finetune", "lora")
DEFAULT_CONTENDERS = CONTENDERS[:4]
PER_STAGE = ("pargo_dist",)  # rows run at every --zero stage; other DeepSpeed rows at the first only
LABELS = {"megatron": "pargo_dist megatron (TP=1)",  # the table's name of a contender, where not its key
          "compiled": "pargo_dist compiled", "finetune": "finetune: full LLM", "lora": "finetune: LoRA"}
EXTRA_OF = {"finetune": ["train.stage=finetune"], "lora": ["train.stage=finetune"],  # extra overrides
            "compiled": ["train.compile=true"]}
TEXT_TOKENS = 64  # per sample, besides the visual tokens: half prompt, half answer (the targets)
VOCAB = 32000
H200_GIB = 141.0  # the GPU the planner is asked about on CPU

_LLM = "model.llm.config."
_VIS = "model.vision.config."
_CLIP_L_336 = [f"{_VIS}hidden_size=1024", f"{_VIS}intermediate_size=4096", f"{_VIS}num_hidden_layers=24",
               f"{_VIS}num_attention_heads=16", f"{_VIS}image_size=336", f"{_VIS}patch_size=14",
               "model.vision.feature_layer=-2", "model.vision.post_layernorm=false"]
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
           f"{_LLM}vocab_size={VOCAB}", *_CLIP_L_336],
    "3b": [f"{_LLM}hidden_size=3072", f"{_LLM}intermediate_size=8192", f"{_LLM}num_hidden_layers=28",
           f"{_LLM}num_attention_heads=24", f"{_LLM}num_key_value_heads=8", f"{_LLM}max_position_embeddings=2048",
           f"{_LLM}vocab_size={VOCAB}", *_CLIP_L_336],
}
# "moe": tiny-cpu's LLM as a Qwen3-MoE (8 experts of width 128, 2 active, q/k norms): ZeRO (HF's
# MoE block, each decoder layer a ZeRO-3 leaf) against megatron's MoELayer, both in one process
# (EP=1: expert parallelism needs ranks; the 2-rank EP=2 run is tests/test_moe.py's)
SIZES["moe"] = [f"{_LLM}model_type=qwen3_moe", f"{_LLM}num_experts=8", f"{_LLM}num_experts_per_tok=2",
                f"{_LLM}moe_intermediate_size=128", f"{_LLM}norm_topk_prob=true", f"{_LLM}head_dim=32"]
CUDA_ONLY = {"1b", "3b"}
DEFAULT_PROJECTOR = {"1b", "3b"}  # sizes that use ProjectorConfig's defaults (the paper's 288 + 16 queries)
# Sizes with longer text: 304 visual + 720 = 1,024 tokens a sample (a multiple of 64, as bf16
# matmuls want; the former 1,022 dodged an apex softmax kernel that megatron's SDPA core
# attention no longer reaches).
TEXT_TOKENS_OF = {"1b": 720, "3b": 720}
BATCH_OF = {"1b": 4, "3b": 4}  # default micro batch where not 8


# ----------------------------------------------------------------------------- one contender


def _first(value):
    """One value of an option that the table's process takes as a list (--batch, --zero)."""
    return value[0] if isinstance(value, (list, tuple)) else value


def batch_size(size: str, args) -> int:
    return _first(args.batch) or BATCH_OF.get(size, 8)


def batches(size: str, args) -> list[int]:
    return list(args.batch) if args.batch else [BATCH_OF.get(size, 8)]


def load_size(size: str, args, backend: str = "deepspeed", extra: list[str] = ()):
    """The recipe with the size's overrides and the benchmark's batch / precision / ZeRO stage /
    backend (megatron: TP=1, PP=1, one process)."""
    from pargo_dist.config import load_config

    overrides = SIZES[size] + [f"train.micro_batch={batch_size(size, args)}", "train.grad_accum=1",
                               f"train.precision={args.precision}", f"backend.zero_stage={_first(args.zero)}",
                               f"train.steps={args.warmup + args.steps}", "logging.tensorboard=false",
                               f"backend.name={backend}", *extra]
    if getattr(args, "force_zero3", False):  # ZeRO-3 as asked on one rank (else it runs as ZeRO-2)
        overrides.append("backend.zero3_on_one_rank=true")
    if backend == "megatron":
        overrides += ["backend.tensor_parallel=1", "backend.pipeline_parallel=1"]
    cfg = load_config(args.recipe, overrides)
    if size in DEFAULT_PROJECTOR:
        cfg.model.projector = {}
        cfg.validate()
    return cfg


def predict(cfg, batch: int, seq: int) -> dict:
    """The planner's memory and step time for this row's config on one GPU (see the docstring):
    `estimate(cfg, hw, layout, shapes_of(cfg, batch, seq))`, the layout at the ZeRO stage
    DeepSpeed will really run (ds_config's), or megatron's TP x PP."""
    from pargo_dist.models.flops import peak_flops_per_device
    from pargo_dist.plan.estimate import (
        H100_BF16_TFLOPS,
        Hardware,
        estimate,
        fits,
        layout_of,
    )
    from pargo_dist.plan.trace import shapes_of

    cuda = torch.cuda.is_available()
    mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if cuda else H200_GIB
    peak = peak_flops_per_device(cfg.train.precision) if cuda else None
    hw = Hardware(gpus=1, gpu_mem_gib=mem, peak_tflops=peak / 1e12 if peak else H100_BF16_TFLOPS)
    layout = layout_of(cfg)
    if cfg.backend.name == "deepspeed":
        from pargo_dist.backends.deepspeed.backend import ds_config

        layout.zero_stage = ds_config(cfg, 1)["zero_optimization"]["stage"]
    est = estimate(cfg, hw, layout, shapes_of(cfg, micro_batch=batch, seq_len=seq))
    return {"plan_step_s": est.step_time_s, "plan_gib": est.total_gib, "plan_layout": est.layout.name(),
            "plan_fits": fits(est, hw), "plan_hw": {"gpu_mem_gib": hw.gpu_mem_gib, "peak_tflops": hw.peak_tflops,
                                                    "mfu": hw.mfu}}


def fixed_batch(model, tokenizer, batch: int, seed: int = 0, text_tokens: int = TEXT_TOKENS):
    """One collated batch: <s> <|user|> <image>*V prompt <|assistant|> answer </s>; loss on the answer."""
    from pargo_dist.constants import IGNORE_INDEX
    from pargo_dist.data.collate import Collator
    from pargo_dist.data.tokenizer import ASSISTANT, USER, image_token_id

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


def ran_as(engine) -> str:
    """What a DeepSpeed engine really runs (its own record of the stage), for the table."""
    return f"ZeRO-{engine.zero_optimization_stage()}"


COMPILED: dict = {}  # train.compile: blocks compiled and torch.compile's backend (run_one reports them)


def run_pargo(cfg, model, batch, args, backend) -> tuple[list[float], str]:
    """Trainer.train_step over `backend` (already through init_distributed, model built in its
    frozen, as build_trainer does); then as build_trainer: activation checkpointing and
    train.compile where the recipe asks, and setup, which builds the optimizer and LR
    schedule. The step count advances as in Trainer.run."""
    from pargo_dist.checkpoint.manager import CheckpointManager
    from pargo_dist.observe.metrics import MetricsLogger
    from pargo_dist.runtime.signals import StopSignal
    from pargo_dist.train.trainer import Trainer

    from pargo_dist.train.run import set_up_backend

    COMPILED["blocks"] = set_up_backend(cfg, backend, model)  # as build_trainer: checkpointing, compile, setup
    COMPILED["backend"] = cfg.train.compile_backend
    backend.train(True)
    run_dir = tempfile.mkdtemp(prefix="bench-run-")
    trainer = Trainer(cfg, backend, None, CheckpointManager(run_dir), MetricsLogger(run_dir, enabled_tensorboard=False),
                      StopSignal(), model=model)
    batch = batch.causal_only().to(backend.device)  # as the loop does on the host, once

    def step():
        trainer.train_step([batch])
        trainer.state.step += 1

    engine = getattr(backend, "engine", None)
    return timed_loop(step, args.warmup, args.steps), ran_as(engine) if engine is not None else "mcore"


def run_bare(cfg, model, batch, args, _backend=None) -> tuple[list[float], str]:
    import deepspeed

    from pargo_dist.backends.deepspeed.backend import ds_config

    params = [p for p in model.parameters() if p.requires_grad]
    # fused, as pargo_dist's and the HF Trainer's (its default since torch 2.8): the rows compare loops
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, 1))
    engine.train()
    inputs = batch.to(engine.device).model_inputs()

    def step():
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()

    return timed_loop(step, args.warmup, args.steps), ran_as(engine)


def run_hf(cfg, model, batch, args, _backend=None) -> tuple[list[float], str]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pargo_dist.backends.deepspeed.backend import ds_config

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
        adam_epsilon=o.eps, max_grad_norm=o.clip_grad, lr_scheduler_type="cosine", optim="adamw_torch_fused",
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
    return [marks[k] - marks[k - 1] for k in range(max(args.warmup, 1) + 1, args.warmup + args.steps + 1)], \
        ran_as(trainer.model_wrapped)


def run_one(size: str, contender: str, args) -> dict:
    """Build, time, measure one contender (in this process: the parent starts one per case).
    The planner's prediction is printed first (PLAN_MARK), so a row that fails later keeps it."""
    from pargo_dist.runtime.rank_env import single_process_env

    single_process_env()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers

    from pargo_dist.build import build_model, init_freeze_and_adapt, meta_model
    from pargo_dist.data.tokenizer import synthetic_tokenizer
    from pargo_dist.models.flops import mfu, model_flops_per_sample, peak_flops_per_device
    from pargo_dist.observe.metrics import peak_memory_gib
    from pargo_dist.train.run import make_backend

    transformers.logging.set_verbosity_error()
    extra = EXTRA_OF.get(contender, []) + ([f"model.lora.r={args.lora_r}", f"model.lora.alpha={2 * args.lora_r}"]
                                           if contender == "lora" else [])
    if contender == "compiled" and args.compile_backend:
        extra.append(f"train.compile_backend={args.compile_backend}")
    cfg = load_size(size, args, backend="megatron" if contender == "megatron" else "deepspeed", extra=extra)
    backend = None
    if contender in ("pargo_dist", "megatron", "compiled", "finetune", "lora"):  # as build_trainer: the backend joins
        backend = make_backend(cfg)
        backend.init_distributed()
    else:
        from pargo_dist.backends.deepspeed.backend import init_distributed

        init_distributed()
    n = batch_size(size, args)
    text_tokens = TEXT_TOKENS_OF.get(size, TEXT_TOKENS)
    try:  # before the build: seq = the visual tokens + the text (fixed_batch's layout)
        plan = predict(cfg, n, meta_model(cfg).num_image_tokens() + text_tokens)
    except Exception as err:  # noqa: BLE001  the row runs without a prediction
        plan = {"plan_error": f"{type(err).__name__}: {err}"}
    print(PLAN_MARK + json.dumps(plan), flush=True)
    tokenizer = synthetic_tokenizer()
    model = build_model(cfg, tokenizer)
    init_freeze_and_adapt(model, cfg)  # frozen parts, LoRA adapters: as build_trainer
    batch = fixed_batch(model, tokenizer, n, seed=cfg.run.seed, text_tokens=text_tokens)
    seq = batch.input_ids.shape[1]
    flops = model_flops_per_sample(model, seq)
    info = {"size": size, "contender": contender, "seq": seq, "visual": model.num_image_tokens(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "tokens": batch.num_tokens, "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), **plan}
    run = {"bare deepspeed": run_bare, "hf trainer": run_hf}.get(contender, run_pargo)
    times, ran = run(cfg, model, batch, args, backend)
    median = statistics.median(times)
    samples_per_s = n / median
    peak = peak_flops_per_device(cfg.train.precision)
    info.update(samples_per_s=samples_per_s, tokens_per_s=batch.num_tokens / median, step_s=times,
                median_s=median, ran=ran, start_s=time.perf_counter() - T_START - sum(times),
                mem_gib=peak_memory_gib(), mfu=mfu(flops * samples_per_s, peak) if peak else None,
                **({"compiled": COMPILED} if COMPILED else {}))
    return info


# ----------------------------------------------------------------------------- the table

MARK = "TRAIN_STEP_RESULT "
PLAN_MARK = "TRAIN_STEP_PLAN "


def rows_of(args) -> list[tuple[str, int | None]]:
    """(contender, ZeRO stage) per row, in --contenders order: PER_STAGE contenders at every
    --zero stage, other DeepSpeed ones at the first, megatron without one."""
    rows: list[tuple[str, int | None]] = []
    for contender in args.contenders:
        if contender == "megatron":
            rows.append((contender, None))
        elif contender in PER_STAGE:
            rows += [(contender, z) for z in args.zero]
        else:
            rows.append((contender, args.zero[0]))
    return rows


def label(contender: str, stage: int | None) -> str:
    name = LABELS.get(contender, contender)
    return f"{name} ZeRO-{stage}" if stage is not None else name


def _marked(text: str, mark: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith(mark):
            return json.loads(line[len(mark):])
    return None


def spawn(size: str, contender: str, stage: int | None, batch: int, args, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", size, contender, "--recipe", str(args.recipe),
           "--batch", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", args.precision, "--zero", str(stage or args.zero[0]), "--lora-r", str(args.lora_r)] \
        + (["--force-zero3"] if args.force_zero3 else []) \
        + (["--compile-backend", args.compile_backend] if args.compile_backend else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    base = {"size": size, "contender": contender, "stage": stage, "batch": batch}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        out, err, error = proc.stdout, proc.stderr, None
    except subprocess.TimeoutExpired as exc:  # its output so far still holds the prediction
        out, err, error = exc.stdout or "", exc.stderr or "", f"timed out after {timeout:.0f}s"
        out, err = (s.decode(errors="replace") if isinstance(s, bytes) else s for s in (out, err))
    wall = time.perf_counter() - t0
    result = _marked(out, MARK)
    if result is not None and error is None:
        return {**(_marked(out, PLAN_MARK) or {}), **result, **base, "wall_s": wall}
    if error is None:
        tail = [ln for ln in (err or out).strip().splitlines() if ln.strip()]
        error = f"exit {proc.returncode}: {tail[-1] if tail else '?'}"
    return {**(_marked(out, PLAN_MARK) or {}), **base, "wall_s": wall, "error": error}


def short(err: str, width: int = 110) -> str:
    err = " ".join(err.split())
    return err if len(err) <= width else err[: width - 3] + "..."


def _num(value, fmt: str, width: int) -> str:
    return f"{value:>{width}{fmt}}" if value is not None else f"{'n/a':>{width}}"


def print_table(size: str, batch: int, rows: list[dict], args) -> None:
    cuda = torch.cuda.is_available()
    ok = [r for r in rows if "error" not in r]
    ref = ok[0] if ok else {}
    # the GPU's name as a row saw it: the parent never initialises CUDA (no context beside the rows')
    device = (ref.get("device") or "CUDA") if cuda else f"CPU, {os.cpu_count()} cores, " \
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    model = (f"{ref['params'] / 1e6:,.1f}M params ({ref['trainable'] / 1e6:,.1f}M trained) | seq {ref['seq']:,} = "
             f"{ref['visual']} visual + {ref['seq'] - ref['visual']} text") if ref else "model ?"
    hw = next((r["plan_hw"] for r in rows if "plan_hw" in r), None)
    plan = (f"plan: 1 GPU, {hw['gpu_mem_gib']:.1f} GiB, {hw['peak_tflops']:g} TFLOP/s, assumed MFU {hw['mfu']:.0%}"
            + ("" if cuda else " (an H200; CPU ratios '-')")) if hw else "plan: n/a"
    print(f"\n[{size} | batch {batch}] {device} | {args.precision} | {model} | median of {args.steps} steps after "
          f"{args.warmup} warm-up | {plan}")
    bare = next((r for r in ok if r["contender"] == "bare deepspeed"), None)
    names = [label(r["contender"], r.get("stage")) for r in rows]
    w = max(17, *(len(n) for n in names))
    print(f"{'contender':<{w}} {'ran as':>7} {'trained M':>10} {'tokens/s':>10} {'MFU':>6} {'step s':>8}"
          f" {'plan s':>8} {'x plan':>7} {'peak GiB':>9} {'plan GiB':>9} {'x plan':>7} {'vs bare':>8}"
          f" {'start s':>8} {'wall s':>7}")
    for name, r in zip(names, rows):
        plan_s, plan_gib = r.get("plan_step_s"), r.get("plan_gib")
        if "error" in r:
            fit = "" if r.get("plan_fits", True) else ", over the GPU's memory"
            planned = f" | plan: {plan_s:.3g} s, {plan_gib:.1f} GiB ({r['plan_layout']}{fit})" \
                if plan_gib is not None else ""
            print(f"{name:<{w}} {'-':>7} n/a: {short(r['error'], 90)}{planned}")
            continue
        ran = r.get("ran", "?")
        if r.get("stage") is not None and ran != f"ZeRO-{r['stage']}":
            ran += "!"
        x_step = f"{r['median_s'] / plan_s:.2f}" if cuda and plan_s else "-"
        x_mem = f"{r['mem_gib'] / plan_gib:.2f}" if cuda and plan_gib else "-"
        vs_bare = f"{r['samples_per_s'] / bare['samples_per_s']:.2f}" if bare else "-"
        m = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        print(f"{name:<{w}} {ran:>7} {r['trainable'] / 1e6:>10.2f} {r['tokens_per_s']:>10,.0f} {m:>6}"
              f" {r['median_s']:>8.3f} {_num(plan_s, '.3g', 8)} {x_step:>7} {r['mem_gib']:>9.2f}"
              f" {_num(plan_gib, '.2f', 9)} {x_mem:>7} {vs_bare:>8} {r['start_s']:>8.0f} {r['wall_s']:>7.0f}")
    for name, r in zip(names, rows):
        if r.get("compiled", {}).get("blocks"):
            c = r["compiled"]
            print(f"  {name}: {c['blocks']} transformer blocks compiled ({c['backend']}); compiling is in the warm-up")
        elif r["contender"] == "compiled" and "error" not in r:
            print(f"  {name}: nothing was compiled (train.compile had no effect)")
    errs = {r["plan_error"] for r in rows if "plan_error" in r}
    for err in errs:
        print(f"  plan n/a: {short(err)}")
    sys.stdout.flush()


def footer(args, cuda: bool) -> None:
    print("\nvs bare: samples/s relative to the table's bare DeepSpeed row (run at the first --zero stage) on "
          "the same model and batch (pargo_dist / bare = framework overhead; megatron / bare = backend vs ZeRO)."
          "\nran as: the ZeRO stage DeepSpeed's engine reports ('!': not the row's label: on one rank "
          "DeepSpeedBackend runs ZeRO-3 as ZeRO-2, see --force-zero3" +
          ("; forced here" if args.force_zero3 else "") + "); mcore: megatron-core."
          "\nmegatron row: TP=1 PP=1 in one process; " + ("bf16 params, distributed optimizer" if cuda else
                                                          "FP32 optimizer") + "; the ZeRO stage does not apply."
          "\nplan s / plan GiB: pargo_dist.plan.estimate for the row's layout on 1 GPU; plan s assumes the "
          "planner's default MFU (40%), so step x plan = 0.40 / MFU; plan GiB includes 2.5 GiB for the CUDA "
          "context, NCCL and fragmentation." + ("" if cuda else " On CPU both are for an H200 and not "
                                                 "comparable: ratios '-'.") +
          "\nstart s: imports, model build, set-up and warm-up steps; wall s: the contender's whole subprocess."
          "\npeak mem: " + ("torch.cuda.max_memory_allocated." if cuda else
                            "peak RSS of the contender's own process (imports of torch/deepspeed/transformers "
                            "included)."))


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                    help="default: tiny (CPU), 1b (CUDA: ~1 min a row); 1b and 3b run on CUDA only")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(DEFAULT_CONTENDERS),
                    help="rows to run (megatron: the 'pargo_dist megatron (TP=1)' row; compiled: pargo_dist with "
                    "train.compile=true; finetune / lora: stage finetune with the whole LLM / LoRA adapters "
                    "trained); default: the first four")
    ap.add_argument("--lora-r", type=int, default=64, help="LoRA rank of the lora row (alpha = 2 r)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 3 on CUDA)")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="micro batch(es), one table each (default: 8; 4 for sizes 1b, 3b)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    ap.add_argument("--zero", type=int, nargs="+", choices=[1, 2, 3], default=[2],
                    help="ZeRO stage(s): the pargo_dist row runs at each, other DeepSpeed rows at the first "
                    "(default: 2)")
    ap.add_argument("--force-zero3", action="store_true",
                    help="run ZeRO-3 rows as stage 3 on one rank (DeepSpeedBackend runs them as ZeRO-2 there); "
                    "this benchmark only")
    ap.add_argument("--compile-backend", default=None,
                    help="train.compile_backend of the compiled row (default: the recipe's, inductor; aot_eager "
                    "traces the same graphs without generating code: a quick check on CPU)")
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds per contender before giving up (default: 900 on CPU, 240 on CUDA)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run: a row starts only with --min-row-s left, and gets at most "
                    "what is left; later rows show 'n/a: skipped' (default: no limit)")
    ap.add_argument("--min-row-s", type=float, default=30.0, help="see --budget-s (default: 30)")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or 10
    args.warmup = (3 if cuda else 2) if args.warmup is None else args.warmup
    args.sizes = args.sizes or (["1b"] if cuda else ["tiny"])
    args.case_timeout = args.case_timeout or (240 if cuda else 900)
    args.zero = list(dict.fromkeys(args.zero))  # in the order given, once each
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    if args.one:
        size, contender = args.one
        args.batch, args.zero = _first(args.batch), args.zero[0]
        try:
            out = run_one(size, contender, args)
        except Exception as err:  # noqa: BLE001  reported in the table row
            traceback.print_exc()
            out = {"size": size, "contender": contender, "error": f"{type(err).__name__}: {err}"}
        print(MARK + json.dumps(out), flush=True)
        return

    if not cuda and CUDA_ONLY & set(args.sizes):
        print(f"note: sizes {', '.join(sorted(CUDA_ONLY & set(args.sizes)))} run on CUDA only; skipped here",
              file=sys.stderr)
        args.sizes = [s for s in args.sizes if s not in CUDA_ONLY]
    deadline = time.perf_counter() + args.budget_s if args.budget_s is not None else None
    for size in args.sizes:
        for batch in batches(size, args):
            rows = []
            for contender, stage in rows_of(args):
                timeout = args.case_timeout
                left = deadline - time.perf_counter() if deadline is not None else None
                if left is not None and left < args.min_row_s:
                    rows.append({"size": size, "contender": contender, "stage": stage, "batch": batch,
                                 "error": f"skipped: {args.budget_s:.0f} s budget (--budget-s) spent"})
                    continue
                row = spawn(size, contender, stage, batch, args, timeout if left is None else min(timeout, left))
                print(f"  [{size} | batch {batch}] {label(contender, stage)}: {row['wall_s']:.0f} s"
                      + (f", {short(row['error'], 80)}" if "error" in row else ""), file=sys.stderr, flush=True)
                rows.append(row)
            print_table(size, batch, rows, args)
    footer(args, cuda)


if __name__ == "__main__":
    main()
