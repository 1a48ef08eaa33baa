"""Model FLOPs and MFU of a ParGo MLLM, counted analytically per part: the trainer reports MFU
with them and the planner (pargo_dist.plan) turns them into a step time.

MFU (model FLOPs utilisation, as in the PaLM paper) divides the FLOPs the *model* needs per
second by the hardware peak. The model FLOPs here cover all three parts of a ParGo MLLM:
the vision tower, the projector and the LLM. Counting only the LLM (the usual `6 * params *
tokens`) misses the vision encoder, which for a CLIP-L/14 at 336 px is ~380 GFLOPs of forward
per image, the cost of ~26 tokens of a 7B LLM, run for every image whether it trains or not.

Forward FLOPs are computed analytically, without running the model: 2 FLOPs per multiply-add
of every matmul. Weight shapes come from the modules themselves (`in_features`/`out_features`
attributes, which survive ZeRO-3 / FSDP sharding and the meta device); how many rows each
module is applied to comes from the configs. Reading the shapes rather than re-deriving them
from config fields keeps one formula right for gated (Llama) and plain (GPT-2) MLPs, grouped
KV heads, biases, tied heads and GPT-2's Conv1D alike. Elementwise work (norms, activations,
softmax, rotary, residuals) is not counted, by the usual convention. The backward is
counted per kind of matmul (`training_multipliers`), so that frozen parts cost what autograd
really runs for them; the tests check the total against torch's FlopCounterMode on a real
forward + backward.

Recomputation from activation checkpointing is *not* counted: MFU measures useful model work,
so turning checkpointing on lowers MFU (it is slower for the same model FLOPs), as it should.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from pargo_dist.constants import PARTS

# Kinds of forward FLOPs, told apart because their backward costs differ (see training_multipliers).
KINDS = ("weights", "input_weights", "attention", "forward_only")


def _unwrap(model: nn.Module) -> nn.Module:
    """The ParGo model inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`)."""
    for _ in range(8):
        if all(hasattr(model, p) for p in PARTS):
            return model
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    missing = [p for p in PARTS if not hasattr(model, p)]
    raise TypeError(f"{type(model).__name__} is not a ParGo model: it has no {missing}")


def _weight_macs(module: nn.Module) -> int | None:
    """Multiply-adds per input row of a matmul module (in x out), None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    # transformers.pytorch_utils.Conv1D (GPT-2): a Linear with a transposed weight.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.nx * module.nf
    return None


def _conv_macs(conv: nn.Conv2d, image_size: int) -> int:
    """Multiply-adds of a 2-D convolution on an image_size x image_size input."""
    out_hw = 1
    for i in range(2):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if isinstance(conv.padding, str):  # "same" keeps the size (stride 1), "valid" pads nothing
            p = d * (k - 1) // 2 if conv.padding == "same" else 0
        else:
            p = conv.padding[i]
        out_hw *= (image_size + 2 * p - d * (k - 1) - 1) // s + 1
    per_position = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return out_hw * per_position * conv.out_channels


def _zero() -> dict[str, float]:
    return dict.fromkeys(KINDS, 0.0)


def _scaled(flops: dict[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in flops.items()}


def _encoder_layers(inner: nn.Module, num_layers: int) -> list[nn.Module]:
    """The tower's transformer blocks in order (CLIP / SigLIP: encoder.layers), [] if unknown."""
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return list(layers)
    return []


def _vision_forward(model: nn.Module, crops_per_sample: float) -> dict[str, float]:
    """Forward FLOPs of the vision tower for `crops_per_sample` crops (images x crops).

    Per crop, with L tokens (patches, plus CLS where the tower has one), D the width:
        2 * L * sum(in * out of every Linear of the encoder)       qkv, out, MLP
      + 2 * (patch-conv multiply-adds)                             patch embedding
      + layers * 2 * 2 * L * L * D                                 scores QK^T and P @ V
      + pooling head, if the tower has one (SigLIP): 1 probe query attending over L tokens.
    The blocks past `feature_layer` do not run (VisionTower runs only the blocks the features
    need) and count nothing; the pooling head and any projection of the pooled token (Linears
    outside the inner transformer, e.g. CLIPVisionModelWithProjection's) run but never reach the
    loss: they are "forward_only". The patch conv reads the pixels, whose gradient nobody needs:
    "input_weights".
    """
    tower = model.vision_tower
    vcfg = tower.model.config
    inner = getattr(tower.model, "vision_model", tower.model)
    embeddings = getattr(inner, "embeddings", None)
    tokens = getattr(embeddings, "num_positions", None)
    if tokens is None:
        tokens = tower.num_patches + int(hasattr(embeddings, "class_embedding"))
    n_layers, width = vcfg.num_hidden_layers, vcfg.hidden_size
    layers = _encoder_layers(inner, n_layers)
    used = tower.feature_layer % (n_layers + 1) if layers else n_layers  # hidden_states[0]: embeddings
    head = getattr(inner, "head", None) if getattr(inner, "use_head", True) else None
    dead = {id(m) for layer in layers[used:] for m in layer.modules()}
    head_ids = {id(m) for m in head.modules()} if head is not None else set()
    inner_ids = {id(m) for m in inner.modules()}

    out = _zero()
    for m in tower.model.modules():
        if id(m) in head_ids:
            continue
        macs = _weight_macs(m)
        if macs is not None:
            if id(m) not in inner_ids:
                out["forward_only"] += 2 * macs  # applied to the pooled token
            else:
                if id(m) not in dead:
                    out["weights"] += 2 * macs * tokens
        elif isinstance(m, nn.Conv2d):
            out["input_weights"] += 2 * _conv_macs(m, tower.image_size)
    attention = 4 * tokens * tokens * width
    out["attention"] += used * attention  # the blocks past `used` do not run
    if head is not None:
        out["forward_only"] += _pooling_head_forward(head, tokens)
    return _scaled(out, crops_per_sample)


def _pooling_head_forward(head: nn.Module, tokens: int) -> float:
    """SigLIP's attention-pooling head: `probes` learned queries over `tokens` tokens."""
    attn = getattr(head, "attention", None)
    probe = getattr(head, "probe", None)
    if not isinstance(attn, nn.MultiheadAttention) or probe is None:
        # Unknown head: assume every Linear sees every token (an upper bound).
        return float(sum(2 * (_weight_macs(m) or 0) * tokens for m in head.modules()))
    q, e = probe.shape[1], attn.embed_dim
    flops = 2 * q * e * e + 2 * tokens * e * (attn.kdim + attn.vdim)  # in-projections
    flops += 4 * q * tokens * e  # scores and weighted sum
    flops += 2 * q * e * e  # out_proj (an nn.Linear that MultiheadAttention applies itself)
    for m in head.modules():
        if m is not attn.out_proj and (macs := _weight_macs(m)) is not None:
            flops += 2 * macs * q  # the MLP on the pooled queries
    return float(flops)


def _projector_forward(model: nn.Module, images_per_sample: float, crops: float) -> dict[str, float]:
    """Forward FLOPs of the projector for `images_per_sample` images of `crops` crops.

    ParGo / Q-Former (Q = P + G queries of width W, N = crops * patches features):
        2 * Q * sum(in * out of its Linears but the cross-attention K/V)   queries, FFN, out proj
      + 2 * N * sum(in * out of the cross-attention K/V Linears)          patches -> K, V
      + depth * 2 * 2 * Q * Q * W           self-attention (masked, but all Q x Q scores computed)
      + depth * 2 * 2 * (N + G * N) * W     cross-attention, region path: each partial query
                                            sees its N/P patches, each global query all N
        (dense reference path: depth * 2 * 2 * Q * N * W)
    MLP projector (LLaVA): 2 * N * sum(in * out), one token per patch.
    The matmuls that read the patch features (K/V; the MLP's first Linear) are "input_weights".
    """
    proj = model.projector
    n = crops * model.vision_tower.num_patches
    out = _zero()
    if not hasattr(proj, "layers"):  # MLPProjector: every Linear on every patch
        linears = [m for m in proj.modules() if _weight_macs(m) is not None]
        for i, m in enumerate(linears):
            out["input_weights" if i == 0 else "weights"] += 2 * _weight_macs(m) * n
        return _scaled(out, images_per_sample)
    cfg = proj.cfg
    P, G = proj.num_partial, proj.num_global
    Q, W = P + G, cfg.width
    for name, m in proj.named_modules():
        macs = _weight_macs(m)
        if macs is not None:
            if name.endswith("cross_attn.kv"):
                out["input_weights"] += 2 * macs * n
            else:
                out["weights"] += 2 * macs * Q
    cross = Q * n if (P == 0 or cfg.cross_attn_impl == "dense") else n + G * n
    out["attention"] = len(proj.layers) * 4 * (Q * Q + cross) * W
    return _scaled(out, images_per_sample)


def _llm_forward(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of the LLM on one sequence of `seq_len` tokens (visual tokens included).

        2 * S * sum(in * out of every Linear)         q, k, v, o, MLP, lm_head (the embedding
                                                      lookup is no matmul and not counted)
      + layers * 2 * 2 * S * S * heads * head_dim     scores and values, all S x S entries

    The causal mask is not discounted (PaLM / Megatron convention; SDPA's math and
    memory-efficient paths do compute the full square). Mixture-of-experts Linears (under an
    `experts` container) count with the fraction num_experts_per_tok / num_experts of tokens
    routed to each.
    """
    lm = model.language_model
    tcfg = model.config.text_config
    experts = getattr(tcfg, "num_local_experts", None) or getattr(tcfg, "num_experts", None)
    top_k = getattr(tcfg, "num_experts_per_tok", None)
    routed = top_k / experts if experts and top_k else 1.0
    per_token = 0.0
    for name, m in lm.named_modules():
        macs = _weight_macs(m)
        if macs is not None:
            per_token += macs * (routed if ".experts." in f".{name}." else 1.0)
    heads = tcfg.num_attention_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // heads
    out = _zero()
    out["weights"] = 2 * seq_len * per_token
    out["attention"] = float(tcfg.num_hidden_layers * 4 * seq_len * seq_len * heads * head_dim)
    return out


def flops_breakdown(model: nn.Module, seq_len: int, images_per_sample: float = 1.0,
                    crops: float = 1) -> dict[str, dict[str, float]]:
    """Forward FLOPs of one sample, per part and kind: {part: {kind: flops}}.

    Kinds (KINDS), which differ in what their backward costs:
      weights        matmuls with a weight, on activations inside the part;
      input_weights  matmuls with a weight that read the part's input (patch conv; the
                     projector's K/V of the patch features): no input gradient unless an
                     earlier part trains;
      attention      score and value matmuls (no weights);
      forward_only   computed but never reaching the loss (vision blocks past the feature
                     layer, SigLIP's pooling head): no backward ever.
    Arguments as in `model_flops_per_sample`.
    """
    if seq_len < 0 or images_per_sample < 0 or crops < 1:
        raise ValueError(f"need seq_len >= 0, images_per_sample >= 0, crops >= 1 "
                         f"(got {seq_len}, {images_per_sample}, {crops})")
    model = _unwrap(model)
    return {
        "vision_tower": _vision_forward(model, images_per_sample * crops),
        "projector": _projector_forward(model, images_per_sample, crops),
        "language_model": _llm_forward(model, seq_len),
    }


def forward_flops(model: nn.Module, seq_len: int, images_per_sample: float = 1.0,
                  crops: float = 1) -> dict[str, float]:
    """Forward FLOPs of one sample per part: {"vision_tower", "projector", "language_model"}."""
    parts = flops_breakdown(model, seq_len, images_per_sample, crops)
    return {part: float(sum(kinds.values())) for part, kinds in parts.items()}


def trainable_parts(model: nn.Module) -> dict[str, bool]:
    """Which parts train: any parameter with requires_grad (as `freeze(stage)` sets them)."""
    model = _unwrap(model)
    return {p: any(w.requires_grad for w in getattr(model, p).parameters()) for p in PARTS}


def training_multipliers(trainable: Mapping[str, bool]) -> dict[str, dict[str, float]]:
    """Cost of one training step in units of each part's forward FLOPs: {part: {kind: x}}.

    The backward of a matmul y = x @ w is two matmuls of the forward's size: one for the
    gradient of x (needed when anything before it trains), one for the gradient of w (needed
    when w trains). Hence, for a part:
      - it trains: 3x (forward, activation gradients, weight gradients);
      - it is frozen but the gradient must cross it to reach a trainable part before it (the
        LLM in `align`, between the loss and the projector): 2x for weight matmuls;
      - it is frozen with nothing trainable before it (the frozen vision tower, which runs
        without autograd): 1x.
    Attention score/value matmuls have no weights but two inputs that both need gradients,
    so their backward is 2x the forward whenever any gradient flows through them: 3x.
    "input_weights" matmuls skip the input gradient unless an earlier part trains (a trainable
    projector behind a frozen tower: 2x for its K/V). "forward_only" work is always 1x.
    """
    out, upstream_trains = {}, False
    for part in PARTS:
        trains = bool(trainable.get(part, False))
        grad_flows = trains or upstream_trains
        out[part] = {
            "weights": 1.0 + grad_flows + trains,
            "input_weights": 1.0 + upstream_trains + trains,
            "attention": 3.0 if grad_flows else 1.0,
            "forward_only": 1.0,
        }
        upstream_trains = upstream_trains or trains
    return out


def model_flops_per_sample(model: nn.Module, seq_len: int, images_per_sample: float = 1.0, crops: float = 1,
                           trainable: dict[str, bool] | None = None) -> float:
    """Training FLOPs (forward + backward) of one sample of `seq_len` tokens.

        sum over parts and kinds of  training_multipliers(trainable) * flops_breakdown(...)

    `seq_len`: the LLM sequence length *including* the visual tokens of the sample's images.
    `images_per_sample`: images in the sample; a batch mean is fine (0.5 when half the
    samples are text-only). `crops`: crops per image (each crop runs the vision tower; the
    projector reads every crop's patches); a batch mean is fine too (data.image.crops dynamic).
    `trainable`: part name -> trains; parts it leaves out (or all, for None) are read from the
    model's requires_grad. With nothing trainable this is the inference (forward) cost.
    A text-only batch's dummy image (ParGoConfig.always_run_vision) is per batch and not counted.
    """
    parts = flops_breakdown(model, seq_len, images_per_sample, crops)
    state = trainable_parts(model)
    state.update(trainable or {})
    mult = training_multipliers(state)
    return float(sum(mult[p][k] * parts[p][k] for p in PARTS for k in KINDS))


def mfu(flops_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation as a fraction (0.412 = 41.2 %) of one device's peak."""
    if not peak_flops or peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return float(flops_per_second) / float(peak_flops)


# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's data sheets. First substring match
# of torch.cuda.get_device_name() wins, so the specific names come before "H100".
_H100_SXM = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12}
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("H100", _H100_SXM),  # "NVIDIA H100 80GB HBM3": SXM
    ("H200", _H100_SXM),  # same chip, more memory (also GH200)
    ("H800", _H100_SXM),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)
_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "tf32"}


def peak_flops_per_device(dtype: str | torch.dtype = "bf16", device: int | None = None) -> float | None:
    """Peak dense FLOP/s of the current CUDA device for `dtype`; None on CPU or an unknown GPU.

    "fp32" means the precision matmuls really run at: TF32 tensor cores when PyTorch allows
    them (torch.backends.cuda.matmul.allow_tf32 or float32_matmul_precision high/medium),
    plain FP32 otherwise. None means "do not report MFU" rather than a made-up number.
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = _DTYPE_NAMES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPE_NAMES)}")
    if not torch.cuda.is_available():
        return None
    if key == "fp32" and (torch.backends.cuda.matmul.allow_tf32
                          or torch.get_float32_matmul_precision() != "highest"):
        key = "tf32"
    name = torch.cuda.get_device_name(device)
    for pattern, peaks in _PEAK_FLOPS:
        if pattern in name:
            return peaks[key]
    return None


__all__ = [
    "KINDS",
    "flops_breakdown",
    "forward_flops",
    "trainable_parts",
    "training_multipliers",
    "model_flops_per_sample",
    "mfu",
    "peak_flops_per_device",
]
