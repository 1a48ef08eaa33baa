"""The planner's view of a model: its parameter counts, FLOPs and the activations autograd keeps,
traced on the meta device (no weights, no memory) with attention kept as FlashAttention keeps it.
See pargo_dist.plan for what is traced and why.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from pargo_dist.backends.megatron.layout import num_experts
from pargo_dist.constants import PARTS
from pargo_dist.data.crops import CropPolicy
from pargo_dist.models.flops import model_flops_per_sample


@dataclass
class Shapes:
    """What the planner needs of the model, read once from the meta build."""

    params: dict[str, int]  # part -> parameters
    trainable: dict[str, int]  # part -> trainable parameters
    llm_layer_params: int
    llm_layers: int
    llm_embed_params: int  # input embedding (+ lm_head if untied)
    largest_module: int  # largest single module's own parameters (one tensor read at a time: zero_init)
    largest_leaf: int  # the most ZeRO-3 gathers at once: a decoder layer (a leaf: DeepSpeedBackend), or a larger module
    hidden: int
    vocab: int
    visual_tokens: int
    act_bytes: dict[str, float] = field(default_factory=dict)  # traced, per micro-batch
    act_layer_split: tuple[float, float] = (0.0, 0.0)  # one layer: (hidden-width bytes, the rest)
    tokens: int = 0  # per micro-batch
    dtype_bytes: int = 2
    flops_per_sample: float = 0.0
    llm_expert_params: int = 0  # an MoE layer's routed experts (all of them), included in llm_layer_params
    llm_experts: int = 0  # routed experts per MoE layer (0: a dense LLM)


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


def _moe_blocks(layer: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks in a decoder layer (HF's Qwen3-MoE, Mixtral: a router `gate`, an
    `experts` list and a `top_k`)."""
    return [m for m in layer.modules() if isinstance(getattr(m, "experts", None), nn.ModuleList)
            and isinstance(getattr(m, "gate", None), nn.Linear) and hasattr(m, "top_k")]


@contextlib.contextmanager
def _balanced_routing(layer: nn.Module):
    """An MoE block traced as if its router spread the tokens evenly: every expert runs on
    tokens x top_k / experts rows. HF's block picks the experts from the router's values
    (nonzero), which the meta device cannot tell; what a step keeps for the backward is that of
    a balanced router, the state the load-balancing loss pushes towards."""
    def balanced(block):
        def forward(hidden_states):
            batch, seq, width = hidden_states.shape
            flat = hidden_states.reshape(-1, width)
            logits = block.gate(flat)
            weights, _ = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), block.top_k, dim=-1)
            rows = max(1, -(-flat.shape[0] * block.top_k // len(block.experts)))
            out = torch.zeros_like(flat)
            for expert in block.experts:
                out = out + (expert(flat[:rows]) * weights[:rows, :1].to(flat.dtype)).sum() * 0
            return out.reshape(batch, seq, width), logits
        return forward

    blocks = _moe_blocks(layer)
    for block in blocks:
        block.forward = balanced(block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


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
        feats = tensor(micro_batch, crops * tower.num_patches, tower.width, grad=vision_trains)  # crop-major
        out["projector"] = _nbytes(_saved(lambda: model.projector(feats), params))
        with _balanced_routing(layer):
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

    model = meta_model(cfg)
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.freeze(cfg.train.stage)
    model.train()
    params = {p: sum(w.numel() for w in getattr(model, p).parameters()) for p in PARTS}
    trainable = {p: sum(w.numel() for w in getattr(model, p).parameters() if w.requires_grad) for p in PARTS}
    if cfg.model.lora.r:  # the LLM's own weights freeze; its adapters (r x (in + out) per target) train
        from pargo_dist.models.lora import adapter_params

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
    experts = sum(w.numel() for block in _moe_blocks(layers[0]) for w in block.experts.parameters())
    seq = seq_len or cfg.data.train.max_len
    mb = micro_batch or cfg.train.micro_batch
    crops = CropPolicy.from_config(cfg.data.image).max_crops  # sized for the most crops an image can get
    act, split = trace_activations(model, mb, seq, crops)
    return Shapes(params=params, trainable=trainable, llm_layer_params=layer_params, llm_layers=len(layers),
                  llm_expert_params=experts, llm_experts=num_experts(tcfg),
                  llm_embed_params=embed, largest_module=largest, largest_leaf=max(largest, layer_params), hidden=tcfg.hidden_size, vocab=tcfg.vocab_size,
                  visual_tokens=model.num_image_tokens(crops), act_bytes=act,
                  act_layer_split=split, tokens=mb * seq, dtype_bytes=2 if cfg.train.precision == "bf16" else 4,
                  flops_per_sample=model_flops_per_sample(model, seq, crops=crops))
