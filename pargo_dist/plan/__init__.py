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
  (ZeRO-1: all of them; 2, 3: a partition) and 8 B of Adam, plus under DeepSpeed a 4 B fp32
  partition copy (megatron's distributed optimizer steps fp32 parameters in place).
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
- Buffers: DeepSpeed's gradient bucket (ZeRO-1/2: 4.5x with overlap_comm, as its docs state)
  and ZeRO-3's gathered parameters (its reuse distance plus one prefetch, plus the largest leaf:
  a whole decoder layer), at the sizes the run gives DeepSpeed (backends/deepspeed/buffers.py: a
  fraction of the model below ~4B parameters, DeepSpeed's defaults above), the fp32 logits
  gradient of the loss, and a fixed 2.5 GiB for the CUDA context, NCCL and allocator
  fragmentation. The whole step's peak of a 278M model on 2 CPU ranks is planned within 3 %
  (ZeRO-3 -0.4 %, megatron TP=2 -2.5 %; `benchmarks/plan_memory.py --step-peak`).
- Mixture of experts: memory holds every expert (megatron: split over `expert_parallel` ranks;
  ZeRO-3: over all ranks, a decoder layer gathered whole with its experts); FLOPs count the
  top-k experts a token runs; activations are traced with a balanced router; `--fit` tries
  expert parallelism before TP and PP.
- Step time: model FLOPs per sample (pargo_dist.models.flops, vision tower included) x global batch
  / (GPUs x peak x MFU). The MFU is an input (--mfu, default 0.40), not a promise: measure it
  with benchmarks/train_step.py on your GPUs and pass it here.
- Start-up host memory per node, and the time to read a bf16 checkpoint at --fs-gbps, as the
  backends load it (estimate.startup_host): a megatron rank holds its TP x PP share in fp32; a
  ZeRO rank that fills the whole LLM holds it in the training precision; ZeRO-3 partitioned as
  it is read (backend.zero_init, auto for large models) holds its share of one tensor, and the
  ranks read the checkpoint once between them. A layout whose start-up
  exceeds --host-mem (default 1 TiB) does not fit. Measure it with benchmarks/startup.py.
"""

from __future__ import annotations

# plan.trace reads the model on the meta device, plan.estimate turns what it read into memory and
# time per layout, plan.command is the CLI. Note: `plan.estimate` is the function (re-exported
# below), not the submodule; import the submodule's names with `from pargo_dist.plan.estimate import`.
from pargo_dist.plan.trace import (
    Shapes,
    shapes_of,
    trace_activations,
)
from pargo_dist.plan.estimate import (
    GiB,
    FRAMEWORK_RESERVE_GIB,
    H100_BF16_TFLOPS,
    Hardware,
    Layout,
    Estimate,
    model_state_bytes,
    activation_bytes,
    zero3_live_bytes,
    buffer_bytes,
    estimate,
    checkpoint_bytes,
    layout_of,
    candidates,
    fits,
    options,
    format_estimate,
)
from pargo_dist.plan.command import add_arguments, run

__all__ = [
    "Shapes",
    "shapes_of",
    "trace_activations",
    "GiB",
    "FRAMEWORK_RESERVE_GIB",
    "H100_BF16_TFLOPS",
    "Hardware",
    "Layout",
    "Estimate",
    "model_state_bytes",
    "activation_bytes",
    "zero3_live_bytes",
    "buffer_bytes",
    "estimate",
    "checkpoint_bytes",
    "layout_of",
    "candidates",
    "fits",
    "options",
    "format_estimate",
    "add_arguments",
    "run",
]
