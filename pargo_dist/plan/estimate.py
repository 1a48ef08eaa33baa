"""Memory per GPU and step time of a layout (ZeRO stage or megatron TP x PP, recompute, offload)
from a model's Shapes; the candidate layouts `--fit` tries and the printed estimate. The formulas
are explained in pargo_dist.plan's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pargo_dist.backends.deepspeed.buffers import buffer_sizes
from pargo_dist.errors import UserError
from pargo_dist.plan.trace import Shapes

GiB = 2**30
FRAMEWORK_RESERVE_GIB = 2.5
HOST_RESERVE_GIB = 4.0  # per rank, host side: interpreter, torch, CUDA / NCCL buffers, libraries
H100_BF16_TFLOPS = 989.0


@dataclass
class Hardware:
    gpus: int
    gpu_mem_gib: float = 80.0
    peak_tflops: float = H100_BF16_TFLOPS  # dense bf16 per GPU
    mfu: float = 0.40
    gpus_per_node: int = 8
    host_mem_gib: float = 1024.0  # per node
    fs_gbps: float = 2.0  # filesystem bandwidth per node (checkpoint writes, pretrained weights' reads)


@dataclass
class Layout:
    backend: str
    zero_stage: int = 3
    tp: int = 1
    pp: int = 1
    ep: int = 1  # megatron, MoE LLMs: experts split over this many data-parallel replicas
    offload_optimizer: bool = False
    recompute: bool = False
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    zero_init: bool | None = None  # ZeRO-3 partitions a pretrained LLM as it is read (None: auto)

    def name(self) -> str:
        if self.backend == "megatron":
            extra = (" SP" if self.sequence_parallel else "") + (" recompute" if self.recompute else "")
            return f"megatron TP{self.tp} PP{self.pp}{f' EP{self.ep}' if self.ep > 1 else ''}{extra}"
        extra = (" +offload" if self.offload_optimizer else "") + (" recompute" if self.recompute else "")
        return f"ZeRO-{self.zero_stage}{extra}"


@dataclass
class Estimate:
    layout: Layout
    dp: int
    memory: dict[str, float]  # component -> GiB per GPU
    step_time_s: float
    tokens_per_s: float
    samples_per_s: float
    startup: dict[str, float] = field(default_factory=dict)  # see startup_host

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


def model_state_bytes(s: Shapes, layout: Layout, world: int, precision: str = "bf16") -> dict[str, float]:
    """Weights, gradients and optimizer state on one GPU (see pargo_dist.plan's docstring)."""
    P, T = float(sum(s.params.values())), float(sum(s.trainable.values()))
    w = 2.0 if precision == "bf16" else 4.0
    # bf16: fp32 master + m + v. fp32: m + v, and under DeepSpeed its fp32 partition copy as well
    # (ZeRO keeps one whatever the precision); megatron's distributed optimizer steps fp32
    # parameters in place (measured: benchmarks/plan_memory.py --step-peak)
    adam = 8.0 if precision != "bf16" and layout.backend == "megatron" else 12.0
    if layout.backend == "megatron":
        tp, pp = layout.tp, layout.pp
        dp = max(world // (tp * pp), 1)
        llm_p, llm_t = float(s.params["language_model"]), float(s.trainable["language_model"])
        lm_train_frac = llm_t / llm_p if llm_p else 0.0
        # the largest stage: the first holds embeddings, vision and projector on top of its layers;
        # an MoE layer's experts are split over EP (and TP) ranks, the rest over TP
        layers = math.ceil(s.llm_layers / pp)
        experts = layers * s.llm_expert_params / layout.ep / tp
        dense = (layers * (s.llm_layer_params - s.llm_expert_params) + s.llm_embed_params) / tp
        stage_llm = dense + experts
        replicated = float(s.params["vision_tower"] + s.params["projector"])
        rep_t = float(s.trainable["vision_tower"] + s.trainable["projector"])
        weights = w * (stage_llm + replicated)
        t_local = stage_llm * lm_train_frac + rep_t
        grads = 4.0 * t_local
        # the distributed optimizer shards the dense part over the dp replicas, the experts over
        # the replicas that hold the same experts (dp / EP)
        shards = (dp, max(dp // layout.ep, 1)) if layout.distributed_optimizer else (1, 1)
        optim = adam * ((dense * lm_train_frac + rep_t) / shards[0] + experts * lm_train_frac / shards[1])
    else:
        dp = world
        z = layout.zero_stage
        # ZeRO-3 leaves a frozen vision tower whole on every GPU (DeepSpeedBackend._take_out_frozen_tower)
        whole_tower = float(s.params["vision_tower"]) if z == 3 and not s.trainable["vision_tower"] else 0.0
        weights = w * (P - whole_tower) / (dp if z == 3 else 1) + w * whole_tower
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


def _deepspeed_params(s: Shapes, layout: Layout) -> float:
    """The parameters DeepSpeed is given: ZeRO-3 is not given a frozen vision tower
    (DeepSpeedBackend._take_out_frozen_tower)."""
    P = float(sum(s.params.values()))
    if layout.zero_stage == 3 and not s.trainable["vision_tower"]:
        P -= s.params["vision_tower"]
    return P


def zero3_live_bytes(s: Shapes, precision: str = "bf16") -> float:
    """Parameters ZeRO-3 keeps gathered: DeepSpeed releases a parameter only when it will not be
    reused within stage3_max_reuse_distance, and prefetches up to stage3_prefetch_bucket_size
    more (both sized to the model: backends/deepspeed/buffers.py); a leaf (a whole decoder layer,
    DeepSpeedBackend._whole_layers_as_leaves) is gathered at once on top of them. So up to their
    sum stays resident, never more than the whole model (measured against a real engine:
    tests/test_deepspeed_backend.py, test_the_planner_counts_the_buffers_deepspeed_allocates)."""
    P, T = _deepspeed_params(s, Layout("deepspeed", zero_stage=3)), float(sum(s.trainable.values()))
    sizes = buffer_sizes(int(T), int(P), 3)
    live = sizes["stage3_max_reuse_distance"] + sizes["stage3_prefetch_bucket_size"] + s.largest_leaf
    return (2.0 if precision == "bf16" else 4.0) * min(P, live)


def buffer_bytes(s: Shapes, layout: Layout, world: int, precision: str = "bf16") -> dict[str, float]:
    """DeepSpeed's gradient buckets (in the communication dtype, the training precision) and
    ZeRO-3's gathered parameters, as deepspeed_buffers sizes them for this model; ZeRO-1/2's
    buckets 4.5x with overlap_comm, as DeepSpeed's docs state. Plus FRAMEWORK_RESERVE_GIB."""
    reserve = FRAMEWORK_RESERVE_GIB * GiB
    if layout.backend == "megatron":
        return {"buffers": reserve}
    T = float(sum(s.trainable.values()))
    w = 2.0 if precision == "bf16" else 4.0
    bucket = w * min(T, buffer_sizes(int(T), int(_deepspeed_params(s, layout)), layout.zero_stage)["reduce_bucket_size"])
    if layout.zero_stage == 3:
        return {"buffers": zero3_live_bytes(s, precision) + bucket + reserve}
    return {"buffers": bucket * (4.5 if world > 1 else 1.0) + reserve}


def startup_host(s: Shapes, layout: Layout, hw: Hardware, precision: str = "bf16",
                 pretrained: bool = True) -> dict[str, float]:
    """Host memory of start-up and the bytes each node reads from a bf16 checkpoint (2 bytes per
    parameter), as the backends load a model (pargo_dist/models/pretrained.py):

      megatron         each rank reads its TP slice and PP layers, held in fp32 until they move
                       to the GPU: 4 x stage parameters / TP
      ZeRO, whole      each rank fills the whole LLM in the training precision (w x P), then
                       DeepSpeed partitions it; every rank reads the whole checkpoint
      ZeRO-3, parts    (zero_init; auto when the whole-LLM fills of a node would take over a
                       quarter of its memory) each rank reads the rows of its own partition of
                       one tensor at a time (2 + 4 bytes of 1/world of the largest) and holds
                       only its partition, on GPU; the ranks read the checkpoint once between them
    plus, per rank, the vision tower and projector in fp32 and HOST_RESERVE_GIB. A random-init
    LLM (no checkpoint) is built whole in fp32 on every rank. Returns GiB per rank and per node,
    GB read per node, seconds to read them at hw.fs_gbps, and whether ZeRO-3 partitions."""
    ranks = min(hw.gpus_per_node, hw.gpus)
    llm = float(s.params["language_model"])
    rest = 4.0 * float(s.params["vision_tower"] + s.params["projector"])
    w = 2.0 if precision == "bf16" else 4.0
    partitioned = False
    if layout.backend == "megatron":  # its TP x PP share, and of the experts its EP share
        layer = s.llm_layer_params - s.llm_expert_params * (1 - 1 / layout.ep)
        stage = (math.ceil(s.llm_layers / layout.pp) * layer + s.llm_embed_params) / layout.tp
        held, reads = (4.0 * stage, 2.0 * stage * ranks) if pretrained else (4.0 * (llm + stage), 0.0)
    elif not pretrained:
        held, reads = 4.0 * llm, 0.0
    else:
        whole = w * llm
        auto = 4.0 * llm * ranks > hw.host_mem_gib * GiB / 4
        partitioned = layout.zero_stage == 3 and (auto if layout.zero_init is None else layout.zero_init)
        held, reads = (6.0 * s.largest_module / hw.gpus, 2.0 * llm * ranks / hw.gpus) if partitioned else \
            (whole, 2.0 * llm * ranks)
    per_rank = HOST_RESERVE_GIB * GiB + rest + held
    return {"rank_gib": per_rank / GiB, "node_gib": per_rank * ranks / GiB, "read_gb": reads / 1e9,
            "read_s": reads / (hw.fs_gbps * 1e9), "partitioned": float(partitioned)}


def estimate(cfg, hw: Hardware, layout: Layout, shapes: Shapes) -> Estimate:
    world = hw.gpus
    if layout.backend == "megatron" and world % (layout.tp * layout.pp * layout.ep):
        raise UserError(f"{layout.name()} needs a multiple of {layout.tp * layout.pp * layout.ep} GPUs "
                         f"(tensor x pipeline x expert parallel), not {world}")
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
                    tokens_per_s=global_batch * seq / step, samples_per_s=global_batch / step,
                    startup=startup_host(shapes, layout, hw, cfg.train.precision, bool(cfg.model.llm.path)))


def checkpoint_bytes(s: Shapes, stage: str, precision: str = "bf16", lora: bool = False) -> float:
    """One checkpoint: the saved weights (trained parts only in `align` and with LoRA, the whole
    model else) plus the trained parameters' optimizer state (bf16: fp32 master + Adam m, v; fp32: m, v)."""
    P, T = float(sum(s.params.values())), float(sum(s.trainable.values()))
    weights = (T if stage == "align" or lora else P) * (2.0 if precision == "bf16" else 4.0)
    return weights + T * (12.0 if precision == "bf16" else 8.0)


HOST_COPY_GBPS = 20.0  # GPU -> pinned host memory per GPU (PCIe Gen5 x16 moves ~25 GB/s each way)


def save_blocking(ckpt: float, hw: Hardware, step_time_s: float) -> dict[str, float]:
    """Seconds one checkpoint stops training, written synchronously or in the background
    (checkpoint.async_save), and what the background way costs. Synchronous: the nodes write
    `ckpt` bytes at hw.fs_gbps each. Background: each GPU copies its share to pinned host memory
    at HOST_COPY_GBPS while the next step's forward and backward run (~2/3 of a step), and
    that step's optimizer update waits for what is left of the copy; the write then runs behind
    training, and needs the host memory to hold the copy: each rank's staging arena
    (background_save.StagingArena), exactly its share, pinned, kept for the run."""
    nodes = max(1, math.ceil(hw.gpus / hw.gpus_per_node))
    copy_s = ckpt / hw.gpus / (HOST_COPY_GBPS * 1e9)
    return {"sync_s": ckpt / (nodes * hw.fs_gbps * 1e9), "copy_s": copy_s,
            "background_s": max(0.0, copy_s - step_time_s * 2 / 3), "host_gib_per_node": ckpt / nodes / GiB}


def layout_of(cfg) -> Layout:
    b = cfg.backend
    return Layout(backend=b.name, zero_stage=b.zero_stage, tp=b.tensor_parallel, pp=b.pipeline_parallel,
                  ep=b.expert_parallel,
                  offload_optimizer=b.offload_optimizer, recompute=cfg.train.activation_checkpointing,
                  sequence_parallel=b.sequence_parallel, distributed_optimizer=b.distributed_optimizer,
                  zero_init=b.zero_init)


def candidates(cfg, hw: Hardware, shapes: Shapes | None = None) -> list[Layout]:
    """Layouts to try, cheapest in communication first: ZeRO-1..3 (then recompute, offload) for
    deepspeed; TP within a node x PP, with and without recompute, for megatron, and for an MoE
    LLM (`shapes` says) its experts split over EP ranks that divide them and the replicas:
    experts over EP before layers over TP/PP (a token's all-to-all costs less than splitting
    every layer)."""
    if cfg.backend.name == "megatron":
        experts = shapes.llm_experts if shapes is not None else 0
        out = []
        for recompute in (False, True):
            for tp in (1, 2, 4, 8):
                for pp in (1, 2, 4, 8, 16):
                    for ep in (1, 2, 4, 8, 16, 32, 64):
                        if ep > 1 and (not experts or experts % ep):
                            continue
                        if tp <= hw.gpus_per_node and hw.gpus % (tp * pp * ep) == 0:
                            out.append(Layout("megatron", tp=tp, pp=pp, ep=ep, recompute=recompute,
                                              sequence_parallel=tp > 1))
        return sorted(out, key=lambda lay: (lay.recompute, lay.tp * lay.pp, lay.pp, -lay.ep))
    return [Layout("deepspeed", zero_stage=z, recompute=r, offload_optimizer=o, zero_init=cfg.backend.zero_init)
            for o in (False, True) for r in (False, True) for z in (1, 2, 3)]


def fits(est: Estimate, hw: Hardware) -> bool:
    """In GPU memory, and its start-up in the node's host memory."""
    return est.total_gib <= hw.gpu_mem_gib and est.startup.get("node_gib", 0.0) <= hw.host_mem_gib


def options(cfg, hw: Hardware, shapes: Shapes) -> list[Estimate]:
    """Every candidate layout estimated, in `candidates` order (the first that fits is the pick)."""
    return [estimate(cfg, hw, lay, shapes) for lay in candidates(cfg, hw, shapes)]


def format_estimate(est: Estimate, hw: Hardware) -> str:
    lines = [f"layout {est.layout.name()} on {hw.gpus} GPU(s): data-parallel replicas {est.dp}"]
    for name, gib in est.memory.items():
        lines.append(f"  {name:<20}{gib:>9.2f} GiB")
    verdict = "fits" if fits(est, hw) else "DOES NOT FIT"
    lines.append(f"  {'total':<20}{est.total_gib:>9.2f} GiB   of {hw.gpu_mem_gib:g} GiB: {verdict}")
    lines.append(f"  step {est.step_time_s:.2f} s | {est.tokens_per_s:,.0f} tokens/s | {est.samples_per_s:,.1f} "
                 f"samples/s at MFU {hw.mfu:.0%} of {hw.peak_tflops:g} TFLOP/s")
    up = est.startup
    if up:
        how = " (ZeRO-3: each rank reads its partition of the LLM)" if up["partitioned"] else ""
        host = "fits" if up["node_gib"] <= hw.host_mem_gib else "DOES NOT FIT: set backend.zero_init=true, or more TP/PP"
        lines.append(f"  start-up: {up['node_gib']:,.0f} GiB host memory per node ({up['rank_gib']:,.1f} per rank){how} "
                     f"of {hw.host_mem_gib:g} GiB: {host}; reads {up['read_gb']:,.1f} GB per node from the "
                     f"checkpoint, ~{up['read_s']:,.0f} s at {hw.fs_gbps:g} GB/s")
    return "\n".join(lines)
