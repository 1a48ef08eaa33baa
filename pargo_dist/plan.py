"""`pargo-dist plan`: what a recipe needs per GPU and how fast it should run, before it runs.

    pargo-dist plan recipes/llama3-8b-stage2.yaml --gpus 64 --gpu-mem 80
    pargo-dist plan recipes/llama3-70b-stage2.yaml --gpus 256 --fit     # the smallest layout that fits

Everything comes from the recipe's model built on the meta device (no weights, no memory):

- Model states, bytes per parameter on one GPU (P: all parameters, T: trainable ones,
  d: data-parallel ranks, t x p: tensor x pipeline ranks), as DeepSpeed and megatron-core
  hold them in bf16 mixed precision:
      ZeRO-1     weights 2P     grads 2T + 4T/d (fp32 partition)   Adam 12T/d (fp32 master, m, v)
      ZeRO-2     weights 2P     grads 4T/d                         Adam 12T/d
      ZeRO-3     weights 2P/d   grads 4T/d                         Adam 12T/d
      megatron   weights 2P/tp  grads 4T/tp (fp32 main grads)      Adam 12T/(tp d) (distributed optimizer)
  (per pipeline stage: the largest stage counts). fp32 recipes hold 4 B weights, 4 B grads
  (ZeRO-1: all of them; 2, 3: a partition) and 8 B of Adam plus a 4 B fp32 partition copy.
  Offloaded optimizer state counts 0. ZeRO-1/2 free their gradients after each step; the
  planner counts them, as the peak during the backward includes them.
- Activations are *traced*, not estimated from a formula: one decoder layer, the projector,
  the vision tower and the LM head run forward on the meta device at the recipe's micro-batch
  and sequence length under `saved_tensors_hooks`, and every tensor autograd keeps for the
  backward is counted (parameters excluded). Attention is traced as FlashAttention keeps it
  (q, k, v, output, log-sum-exp; no S x S matrix). So GQA, biases, SwiGLU, frozen parts
  (a frozen Linear keeps no input) and `align` (the frozen LLM still keeps what the gradient
  to the projector needs) are counted as the code runs them. With activation checkpointing a
  layer keeps its input, plus one layer's activations while it is recomputed. Under megatron
  TP the tensors of hidden width stay whole unless sequence parallel is on, the rest split.
- Buffers: ZeRO-1/2 reduce buckets (DeepSpeed's 5e8 elements, 4.5x with overlap_comm as its
  docs state), ZeRO-3's gathered parameters (up to 1e9 stay live by DeepSpeed's defaults;
  measured on CPU: benchmarks/plan_memory.py), the fp32
  logits gradient of the loss, and a fixed 2.5 GiB for the CUDA context, NCCL and allocator
  fragmentation.
- Step time: model FLOPs per sample (pargo_dist.metrics, vision tower included) x global batch
  / (GPUs x peak x MFU). The MFU is an input (--mfu, default 0.40), not a promise: measure it
  with benchmarks/train_step.py on your GPUs and pass it here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 2**30
FRAMEWORK_RESERVE_GIB = 2.5
DS_REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce/allgather bucket (elements)
DS_PREFETCH_BUCKET = 5e7  # stage3_prefetch_bucket_size default
DS_MAX_LIVE = 1e9  # stage3_max_live_parameters / stage3_max_reuse_distance defaults
H100_BF16_TFLOPS = 989.0


@dataclass
class Hardware:
    gpus: int
    gpu_mem_gib: float = 80.0
    peak_tflops: float = H100_BF16_TFLOPS  # dense bf16 per GPU
    mfu: float = 0.40
    gpus_per_node: int = 8


@dataclass
class Layout:
    backend: str
    zero_stage: int = 3
    tp: int = 1
    pp: int = 1
    offload_optimizer: bool = False
    recompute: bool = False
    sequence_parallel: bool = False
    distributed_optimizer: bool = True

    def name(self) -> str:
        if self.backend == "megatron":
            extra = (" SP" if self.sequence_parallel else "") + (" recompute" if self.recompute else "")
            return f"megatron TP{self.tp} PP{self.pp}{extra}"
        extra = (" +offload" if self.offload_optimizer else "") + (" recompute" if self.recompute else "")
        return f"ZeRO-{self.zero_stage}{extra}"


@dataclass
class Shapes:
    """What the planner needs of the model, read once from the meta build."""

    params: dict[str, int]  # part -> parameters
    trainable: dict[str, int]  # part -> trainable parameters
    llm_layer_params: int
    llm_layers: int
    llm_embed_params: int  # input embedding (+ lm_head if untied)
    largest_module: int  # largest single module's parameters (ZeRO-3 gathers it whole)
    hidden: int
    vocab: int
    visual_tokens: int
    act_bytes: dict[str, float] = field(default_factory=dict)  # traced, per micro-batch
    act_layer_split: tuple[float, float] = (0.0, 0.0)  # one layer: (hidden-width bytes, the rest)
    tokens: int = 0  # per micro-batch
    dtype_bytes: int = 2
    flops_per_sample: float = 0.0


@dataclass
class Estimate:
    layout: Layout
    dp: int
    memory: dict[str, float]  # component -> GiB per GPU
    step_time_s: float
    tokens_per_s: float
    samples_per_s: float

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


# -- tracing on the meta device ----------------------------------------------------------------

class _FlashLikeAttention(torch.autograd.Function):
    """What FlashAttention keeps for its backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the planner only traces forward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_sdpa(query, key, value, *args, **kwargs):
    return _FlashLikeAttention.apply(query, key, value)


@contextlib.contextmanager
def _flash_like():
    """Every scaled_dot_product_attention (HF's and the projector's) traced as FlashAttention:
    on the meta device torch would pick the math path, which keeps the S x S probabilities."""
    original = nn.functional.scaled_dot_product_attention
    nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original


def _saved(fn, params: set[int]) -> list[torch.Tensor]:
    """Tensors autograd saves while fn() runs forward (parameters and their views left out)."""
    kept: dict[int, torch.Tensor] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            kept[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(kept.values())


def _nbytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def trace_activations(model: nn.Module, micro_batch: int, seq_len: int, crops: int = 1,
                      flash_like: bool | None = None) -> tuple[dict, tuple]:
    """Bytes autograd keeps per micro-batch: {vision, projector, llm_layer, llm_head} and one
    layer's (hidden-width, other) split. `model` is frozen for its stage; on the meta device
    (the planner) attention is traced as FlashAttention keeps it (`flash_like`), on a real
    device whatever attention the model runs is traced (how the tests check the meta trace)."""
    params = {id(p) for p in model.parameters()}
    first = next(model.language_model.parameters())
    dtype, device = first.dtype, first.device
    flash_like = device.type == "meta" if flash_like is None else flash_like

    def tensor(*shape, grad=False):
        t = torch.randn(*shape, device=device, dtype=dtype)
        return t.requires_grad_(grad)

    tower, lm = model.vision_tower, model.language_model
    tcfg = model.config.text_config
    vision_trains = any(p.requires_grad for p in tower.parameters())
    upstream = vision_trains or any(p.requires_grad for p in model.projector.parameters())
    images = micro_batch * crops
    out = {}
    hidden = tcfg.hidden_size
    head_dim = getattr(tcfg, "head_dim", None) or hidden // tcfg.num_attention_heads
    x = tensor(micro_batch, seq_len, hidden, grad=upstream)
    rope = tensor(micro_batch, seq_len, head_dim)
    layer = lm.model.layers[0]
    with _flash_like() if flash_like else contextlib.nullcontext():
        pixels = tensor(images, 3, tower.image_size, tower.image_size)
        out["vision"] = _nbytes(_saved(lambda: tower(pixels), params))
        feats = tensor(images, tower.num_patches, tower.width, grad=vision_trains)
        out["projector"] = _nbytes(_saved(lambda: model.projector(feats), params))
        kept = _saved(lambda: layer(x, attention_mask=None, position_embeddings=(rope, rope)), params)
    out["llm_layer"] = _nbytes(kept)
    wide = _nbytes(t for t in kept if t.shape[-1] == hidden)
    labels = torch.zeros(micro_batch * seq_len, dtype=torch.long, device=device)

    def head():
        logits = lm.lm_head(lm.model.norm(x))
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels)

    out["llm_head"] = _nbytes(_saved(head, params))
    return out, (wide, out["llm_layer"] - wide)


def shapes_of(cfg, micro_batch: int | None = None, seq_len: int | None = None) -> Shapes:
    """Parameter counts, traced activations and FLOPs of a recipe's model (meta device)."""
    from pargo_dist.build import meta_model
    from pargo_dist.metrics import model_flops_per_sample

    model = meta_model(cfg)
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.freeze(cfg.train.stage)
    model.train()
    parts = ("vision_tower", "projector", "language_model")
    params = {p: sum(w.numel() for w in getattr(model, p).parameters()) for p in parts}
    trainable = {p: sum(w.numel() for w in getattr(model, p).parameters() if w.requires_grad) for p in parts}
    if cfg.model.lora.r:  # the LLM's own weights freeze; its adapters (r x (in + out) per target) train
        from pargo_dist.lora import adapter_params

        trainable["language_model"] = adapter_params(model.language_model, cfg.model.lora,
                                                     model.config.text_config.model_type)
        params["language_model"] += trainable["language_model"]
        # traced and counted as a frozen LLM that gradients pass through: no weight gradients (the
        # adapters' own FLOPs and saved inputs, r / hidden of a layer's, are left out)
        model.language_model.requires_grad_(False)
    lm = model.language_model
    tcfg = model.config.text_config
    layers = lm.model.layers
    layer_params = sum(w.numel() for w in layers[0].parameters())
    embed = params["language_model"] - layer_params * len(layers) - sum(w.numel() for w in lm.model.norm.parameters())
    largest = max(sum(w.numel() for w in m.parameters(recurse=False)) for m in model.modules())
    seq = seq_len or cfg.data.train.max_len
    mb = micro_batch or cfg.train.micro_batch
    act, split = trace_activations(model, mb, seq)
    return Shapes(params=params, trainable=trainable, llm_layer_params=layer_params, llm_layers=len(layers),
                  llm_embed_params=embed, largest_module=largest, hidden=tcfg.hidden_size, vocab=tcfg.vocab_size,
                  visual_tokens=model.num_image_tokens(), act_bytes=act,
                  act_layer_split=split, tokens=mb * seq, dtype_bytes=2 if cfg.train.precision == "bf16" else 4,
                  flops_per_sample=model_flops_per_sample(model, seq))


# -- the estimate -------------------------------------------------------------------------------

def model_state_bytes(s: Shapes, layout: Layout, world: int, precision: str = "bf16") -> dict[str, float]:
    """Weights, gradients and optimizer state on one GPU (see the module docstring)."""
    P, T = float(sum(s.params.values())), float(sum(s.trainable.values()))
    w = 2.0 if precision == "bf16" else 4.0
    adam = 12.0  # bf16: fp32 master + m + v; fp32: m + v + the optimizer's fp32 partition copy
    if layout.backend == "megatron":
        tp, pp = layout.tp, layout.pp
        dp = max(world // (tp * pp), 1)
        llm_p, llm_t = float(s.params["language_model"]), float(s.trainable["language_model"])
        lm_train_frac = llm_t / llm_p if llm_p else 0.0
        # the largest stage: the first holds embeddings, vision and projector on top of its layers
        stage_llm = (math.ceil(s.llm_layers / pp) * s.llm_layer_params + s.llm_embed_params) / tp
        replicated = float(s.params["vision_tower"] + s.params["projector"])
        rep_t = float(s.trainable["vision_tower"] + s.trainable["projector"])
        weights = w * (stage_llm + replicated)
        t_local = stage_llm * lm_train_frac + rep_t
        grads = 4.0 * t_local
        optim = adam * t_local / (dp if layout.distributed_optimizer else 1)
    else:
        dp = world
        z = layout.zero_stage
        weights = w * P / (dp if z == 3 else 1)
        if precision == "bf16":  # bf16 grads, reduced into fp32 partitions
            grads = (w * T + 4.0 * T / dp) if z == 1 else 4.0 * T / dp
        else:  # fp32: ZeRO-1 keeps every gradient until the step, 2 and 3 only their partition
            grads = w * T if z == 1 else w * T / dp
        optim = adam * T / dp
    if layout.offload_optimizer:
        optim = 0.0
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def activation_bytes(s: Shapes, layout: Layout, in_flight: int = 1) -> dict[str, float]:
    """Activations kept for the backward on one GPU, and the loss's transient logits gradient.
    `in_flight`: micro-batches whose activations the first pipeline stage holds (1F1B: pp)."""
    a = s.act_bytes
    tp = layout.tp if layout.backend == "megatron" else 1
    sp = tp if layout.sequence_parallel else 1
    wide, rest = s.act_layer_split
    layer = wide / sp + rest / tp
    if layout.recompute:  # each layer keeps its input; one layer is live again while recomputed
        llm = s.llm_layers * s.tokens * s.hidden * s.dtype_bytes / sp + layer
    else:
        llm = s.llm_layers * layer
    # 1F1B: the first stage holds `pp` micro-batches of its layers/pp layers (the same total)
    # but also `pp` micro-batches of vision and projector activations
    front = (a["vision"] + a["projector"]) * in_flight
    return {"activations": llm + front + a["llm_head"] / tp,
            "loss (logits grad)": 4.0 * s.tokens * s.vocab / tp}


def zero3_live_bytes(s: Shapes, precision: str = "bf16") -> float:
    """Parameters ZeRO-3 keeps gathered: DeepSpeed releases a parameter only when it will not be
    reused within stage3_max_reuse_distance (1e9) and keeps up to stage3_max_live_parameters
    (1e9) whole, so up to 1e9 parameters (2 GB in bf16) stay resident, the whole model below that."""
    P = float(sum(s.params.values()))
    return (2.0 if precision == "bf16" else 4.0) * min(P, max(DS_MAX_LIVE, s.largest_module))


def buffer_bytes(s: Shapes, layout: Layout, world: int, precision: str = "bf16") -> dict[str, float]:
    if layout.backend == "megatron":
        return {"buffers": FRAMEWORK_RESERVE_GIB * GiB}
    if layout.zero_stage == 3:
        live = zero3_live_bytes(s, precision)
        bucket = 2.0 * DS_REDUCE_BUCKET
    else:  # DeepSpeed's docs: overlap_comm needs 4.5x the bucket (reduce + allgather, double-buffered)
        live, bucket = 0.0, 2.0 * DS_REDUCE_BUCKET * (4.5 if world > 1 else 1.0)
    return {"buffers": live + bucket + FRAMEWORK_RESERVE_GIB * GiB}


def estimate(cfg, hw: Hardware, layout: Layout, shapes: Shapes) -> Estimate:
    world = hw.gpus
    if layout.backend == "megatron" and world % (layout.tp * layout.pp):
        raise ValueError(f"{layout.name()} needs a multiple of {layout.tp * layout.pp} GPUs "
                         f"(tensor x pipeline parallel), not {world}")
    in_flight = min(layout.pp, cfg.train.grad_accum) if layout.backend == "megatron" else 1
    mem = {**model_state_bytes(shapes, layout, world, cfg.train.precision),
           **activation_bytes(shapes, layout, in_flight), **buffer_bytes(shapes, layout, world, cfg.train.precision)}
    replicas = world // (layout.tp * layout.pp) if layout.backend == "megatron" else world
    global_batch = cfg.train.micro_batch * cfg.train.grad_accum * replicas
    flops = shapes.flops_per_sample * global_batch
    step = flops / (world * hw.peak_tflops * 1e12 * hw.mfu)
    if layout.recompute:
        step *= 4.0 / 3.0  # the forward of every layer runs twice
    seq = cfg.data.train.max_len
    return Estimate(layout=layout, dp=replicas, memory={k: v / GiB for k, v in mem.items()}, step_time_s=step,
                    tokens_per_s=global_batch * seq / step, samples_per_s=global_batch / step)


def checkpoint_bytes(s: Shapes, stage: str, precision: str = "bf16", lora: bool = False) -> float:
    """One checkpoint: the saved weights (trained parts only in `align` and with LoRA, the whole
    model else) plus the trained parameters' optimizer state (bf16: fp32 master + Adam m, v; fp32: m, v)."""
    P, T = float(sum(s.params.values())), float(sum(s.trainable.values()))
    weights = (T if stage == "align" or lora else P) * (2.0 if precision == "bf16" else 4.0)
    return weights + T * (12.0 if precision == "bf16" else 8.0)


def layout_of(cfg) -> Layout:
    b = cfg.backend
    return Layout(backend=b.name, zero_stage=b.zero_stage, tp=b.tensor_parallel, pp=b.pipeline_parallel,
                  offload_optimizer=b.offload_optimizer, recompute=cfg.train.activation_checkpointing,
                  sequence_parallel=b.sequence_parallel, distributed_optimizer=b.distributed_optimizer)


def candidates(cfg, hw: Hardware) -> list[Layout]:
    """Layouts to try, cheapest in communication first: ZeRO-1..3 (then recompute, offload) for
    deepspeed; TP within a node x PP, with and without recompute, for megatron."""
    if cfg.backend.name == "megatron":
        out = []
        for recompute in (False, True):
            for tp in (1, 2, 4, 8):
                for pp in (1, 2, 4, 8, 16):
                    if tp <= hw.gpus_per_node and hw.gpus % (tp * pp) == 0:
                        out.append(Layout("megatron", tp=tp, pp=pp, recompute=recompute, sequence_parallel=tp > 1))
        return sorted(out, key=lambda lay: (lay.recompute, lay.tp * lay.pp, lay.pp))
    return [Layout("deepspeed", zero_stage=z, recompute=r, offload_optimizer=o)
            for o in (False, True) for r in (False, True) for z in (1, 2, 3)]


def fits(est: Estimate, hw: Hardware) -> bool:
    return est.total_gib <= hw.gpu_mem_gib


def options(cfg, hw: Hardware, shapes: Shapes) -> list[Estimate]:
    """Every candidate layout estimated, in `candidates` order (the first that fits is the pick)."""
    return [estimate(cfg, hw, lay, shapes) for lay in candidates(cfg, hw)]


def format_estimate(est: Estimate, hw: Hardware) -> str:
    lines = [f"layout {est.layout.name()} on {hw.gpus} GPU(s): data-parallel replicas {est.dp}"]
    for name, gib in est.memory.items():
        lines.append(f"  {name:<20}{gib:>9.2f} GiB")
    verdict = "fits" if fits(est, hw) else "DOES NOT FIT"
    lines.append(f"  {'total':<20}{est.total_gib:>9.2f} GiB   of {hw.gpu_mem_gib:g} GiB: {verdict}")
    lines.append(f"  step {est.step_time_s:.2f} s | {est.tokens_per_s:,.0f} tokens/s | {est.samples_per_s:,.1f} "
                 f"samples/s at MFU {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s")
    return "\n".join(lines)


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
                    help="checkpoint write bandwidth per node, GB/s (default 2: a parallel filesystem)")
    ap.add_argument("--sample-kb", type=float, default=150.0,
                    help="bytes of one sample in the shards, KB (default 150: a JPEG caption pair)")
    ap.add_argument("--fit", action="store_true", help="also list layouts and the smallest that fits")


def run(args: argparse.Namespace) -> int:
    from pargo_dist.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    hw = Hardware(gpus=args.gpus, gpu_mem_gib=args.gpu_mem, peak_tflops=args.peak_tflops, mfu=args.mfu,
                  gpus_per_node=args.gpus_per_node)
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
            raise ValueError(f"{err}: change --gpus, or add --fit for a layout that suits {hw.gpus} GPUs") from None
        print(f"the recipe's layout does not apply: {err}")
    else:
        print(format_estimate(est, hw))
        epoch = args.samples / est.samples_per_s
        print(f"  {args.samples:,.0f} samples: {epoch / 3600:.1f} h ({epoch * hw.gpus / 3600:,.0f} GPU-hours)")
        nodes = max(1, math.ceil(hw.gpus / hw.gpus_per_node))
        ckpt = checkpoint_bytes(shapes, cfg.train.stage, cfg.train.precision, bool(cfg.model.lora.r))
        print(f"  checkpoint {ckpt / 1e9:,.1f} GB, written in ~{ckpt / (nodes * args.fs_gbps * 1e9):,.0f} s by "
              f"{nodes} node(s) at {args.fs_gbps:g} GB/s each")
        print(f"  data from object storage: {est.samples_per_s / nodes * args.sample_kb / 1e3:,.1f} MB/s per node "
              f"at {args.sample_kb:g} KB per sample")
    if args.fit:
        print(f"\n{'layout':<34}{'GiB/GPU':>9}{'step s':>9}{'tokens/s':>12}  fits in {hw.gpu_mem_gib:g} GiB")
        best = None
        for e in options(cfg, hw, shapes):
            ok = fits(e, hw)
            best = best or (e if ok else None)
            print(f"{e.layout.name():<34}{e.total_gib:>9.1f}{e.step_time_s:>9.2f}{e.tokens_per_s:>12,.0f}  "
                  f"{'yes' if ok else 'no'}")
        if best:
            print(f"smallest layout that fits: {best.layout.name()} ({best.total_gib:.1f} GiB per GPU; "
                  "layouts are listed cheapest first: least parallelism, no recompute, no offload)")
        else:
            print("nothing fits: lower train.micro_batch, raise --gpus, or turn on activation checkpointing")
    return 0
