"""Llama-family causal LMs, HF <-> megatron-core GPTModel, at any tensor / pipeline layout.

Covers what Llama 2/3, Qwen2/2.5, Qwen3 and Mistral share: RMSNorm, RoPE (rotate-half), SwiGLU,
grouped-query attention (optionally with q/k/v biases: Qwen2; with an RMSNorm of each query and
key head before RoPE and a head_dim of its own: Qwen3, megatron's qk_layernorm), tied or untied
embeddings, Llama-3.1 RoPE scaling. Anything else (other RoPE scalings, MoE, sliding-window attention
that the sequences reach) is refused with the config key that caused it.

Layouts. Megatron keeps q, k and v in one `linear_qkv` whose rows are grouped per KV head:
for each query group, its q heads, then its k head, then its v head. Tensor parallelism splits
that tensor into contiguous chunks of whole groups, so a TP shard of the fused tensor is a
contiguous slice. `linear_fc1` holds [gate; up] *per TP shard*, so it is split piecewise.
Row-parallel weights (`linear_proj`, `linear_fc2`) split along the input dim; the vocab of
the embedding and output layer splits along rows. Pipeline stage p holds layers
[p*L/PP, (p+1)*L/PP), numbered from 0 in its own state dict.

`megatron_state_from_hf` gives the state dict of one (tp_rank, pp_rank) GPTModel;
`hf_state_from_megatron` is its exact inverse given all shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pargo_dist.backends.megatron.layout import ConversionError, check_layout, num_experts


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _qkv_bias(cfg) -> bool:
    return cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))


def _qk_norm(cfg) -> bool:
    """Qwen3 normalises each query and key head (q_norm / k_norm, weight [head_dim]) before RoPE."""
    return cfg.model_type in ("qwen3", "qwen3_moe")


def _moe_names(cfg) -> tuple[str, str, str, str, str]:
    """HF's names in an MoE layer: (block, router, gate, up, down) of `model.layers.N.<block>.`:
    Qwen3-MoE `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`; Mixtral `block_sparse_moe.gate`,
    `block_sparse_moe.experts.E.{w1,w3,w2}`."""
    if cfg.model_type == "mixtral":
        return "block_sparse_moe", "gate", "w1", "w3", "w2"
    return "mlp", "gate", "gate_proj", "up_proj", "down_proj"


def _local_experts(cfg, ep: int, ep_rank: int) -> range:
    """The global indices of the experts expert-parallel rank `ep_rank` holds (contiguous)."""
    per = num_experts(cfg) // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def _moe_config(cfg) -> dict[str, Any]:
    """TransformerConfig fields of an MoE LLM. Routing as each model does it: Qwen3-MoE and
    Mixtral softmax the router's logits over all experts, take the top k and renormalise those
    k to sum to one, which is megatron's top-k of the logits then a softmax over the k
    (moe_router_pre_softmax=False); Qwen3-MoE with norm_topk_prob=false keeps the unrenormalised
    probabilities (pre-softmax). Dropless (no capacity factor); no load-balancing loss here (the
    backend sets it from the recipe)."""
    experts = num_experts(cfg)
    if not experts:
        return {}
    ffn = cfg.moe_intermediate_size if cfg.model_type == "qwen3_moe" else cfg.intermediate_size
    pre_softmax = cfg.model_type == "qwen3_moe" and not getattr(cfg, "norm_topk_prob", True)
    return dict(num_moe_experts=experts, moe_router_topk=cfg.num_experts_per_tok, moe_ffn_hidden_size=ffn,
                moe_router_pre_softmax=pre_softmax, moe_router_load_balancing_type="none", moe_grouped_gemm=False)


_QK_NORMS = (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm"))  # HF self_attn.* <-> megatron self_attention.*


def transformer_config_kwargs(cfg) -> dict[str, Any]:
    """TransformerConfig fields that describe the HF model (parallel sizes etc. are added by the caller)."""
    return dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads or cfg.num_attention_heads,
        kv_channels=_head_dim(cfg),
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=_qkv_bias(cfg),
        qk_layernorm=_qk_norm(cfg),
        **_moe_config(cfg),
        hidden_dropout=0.0,
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
    )


def gpt_model_kwargs(cfg) -> dict[str, Any]:
    """GPTModel constructor arguments (besides config, spec and pipeline flags)."""
    scaling = getattr(cfg, "rope_scaling", None) or {}
    llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3"
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        share_embeddings_and_output_weights=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_scaling=llama3,
        rope_scaling_factor=float(scaling.get("factor", 8.0)) if llama3 else 8.0,
    )


# ----------------------------------------------------------------------------- tensors


def _interleave_qkv(q, k, v, groups: int):
    """HF q [nh*d, ...], k/v [ng*d, ...] -> megatron's per-group [q heads, k, v] rows."""
    q = q.reshape(groups, -1, *q.shape[1:])
    k = k.reshape(groups, -1, *k.shape[1:])
    v = v.reshape(groups, -1, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv(qkv, groups: int, q_rows: int, kv_rows: int):
    """Inverse of _interleave_qkv (q_rows / kv_rows: rows of q / of k per group)."""
    per = qkv.reshape(groups, q_rows + 2 * kv_rows, *qkv.shape[1:])
    q, k, v = per.split([q_rows, kv_rows, kv_rows], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))


def _chunk(t, tp: int, rank: int, dim: int = 0):
    return t.chunk(tp, dim=dim)[rank].clone()


def _layer_range(cfg, pp: int, pp_rank: int) -> range:
    per = cfg.num_hidden_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def megatron_state_from_hf(hf: dict[str, torch.Tensor], cfg, tp: int = 1, tp_rank: int = 0, pp: int = 1,
                           pp_rank: int = 0, ep: int = 1, ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """State dict of the GPTModel on (tp_rank, pp_rank, ep_rank) from an HF Llama-family or MoE
    state dict (an MoE layer: its router whole, its experts of `ep_rank`, each split over TP)."""
    check_layout(cfg, tp, pp, ep)
    groups = cfg.num_key_value_heads or cfg.num_attention_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    first, last = pp_rank == 0, pp_rank == pp - 1
    out: dict[str, torch.Tensor] = {}
    embed = hf["model.embed_tokens.weight"]
    if first:
        out["embedding.word_embeddings.weight"] = _chunk(embed, tp, tp_rank)
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if not tied:
            out["output_layer.weight"] = _chunk(hf["lm_head.weight"], tp, tp_rank)
        elif not first:  # the last stage keeps its own copy of the tied weight
            out["output_layer.weight"] = _chunk(embed, tp, tp_rank)
    for local, layer in enumerate(_layer_range(cfg, pp, pp_rank)):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{local}."
        att = src + "self_attn."
        for kind in ("weight", "bias"):
            if att + f"q_proj.{kind}" not in hf:
                continue
            qkv = _interleave_qkv(hf[att + f"q_proj.{kind}"], hf[att + f"k_proj.{kind}"], hf[att + f"v_proj.{kind}"],
                                  groups)
            out[dst + f"self_attention.linear_qkv.{kind}"] = _chunk(qkv, tp, tp_rank)
        out[dst + "self_attention.linear_proj.weight"] = _chunk(hf[att + "o_proj.weight"], tp, tp_rank, dim=1)
        if _qk_norm(cfg):  # per head: every TP rank holds it whole
            for ours, theirs in _QK_NORMS:
                out[dst + f"self_attention.{theirs}.weight"] = hf[att + f"{ours}.weight"].clone()
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"].clone()
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"].clone()
        if num_experts(cfg):
            block, router, gate_w, up_w, down_w = _moe_names(cfg)
            out[dst + "mlp.router.weight"] = hf[src + f"{block}.{router}.weight"].clone()
            for local_e, e in enumerate(_local_experts(cfg, ep, ep_rank)):
                expert, mine = src + f"{block}.experts.{e}.", dst + f"mlp.experts.local_experts.{local_e}."
                out[mine + "linear_fc1.weight"] = torch.cat([_chunk(hf[expert + f"{gate_w}.weight"], tp, tp_rank),
                                                             _chunk(hf[expert + f"{up_w}.weight"], tp, tp_rank)])
                out[mine + "linear_fc2.weight"] = _chunk(hf[expert + f"{down_w}.weight"], tp, tp_rank, dim=1)
            continue
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([_chunk(gate, tp, tp_rank), _chunk(up, tp, tp_rank)])
        out[dst + "mlp.linear_fc2.weight"] = _chunk(hf[src + "mlp.down_proj.weight"], tp, tp_rank, dim=1)
    return out


def megatron_state_from_checkpoint(path, cfg, tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                                   dtype: torch.dtype = torch.float32, ep: int = 1,
                                   ep_rank: int = 0) -> dict[str, torch.Tensor]:
    """The same state dict as `megatron_state_from_hf`, read from an HF safetensors checkpoint
    directory (see `iter_megatron_state_from_checkpoint`)."""
    return dict(iter_megatron_state_from_checkpoint(path, cfg, tp, tp_rank, pp, pp_rank, dtype, ep, ep_rank))


def iter_megatron_state_from_checkpoint(path, cfg, tp: int = 1, tp_rank: int = 0, pp: int = 1, pp_rank: int = 0,
                                        dtype: torch.dtype = torch.float32, ep: int = 1, ep_rank: int = 0):
    """(name, tensor) of the GPTModel on (tp_rank, pp_rank, ep_rank), one at a time, read from an
    HF safetensors checkpoint directory: only this rank's TP slice of each weight, only its PP
    stage's layers and only its experts leave the files (`safe_open(...).get_slice`), converted
    to `dtype`. A caller that copies each into its parameter holds one tensor beside the model,
    never a second model. `cfg` is the model's text config, whose vocabulary may exceed the
    checkpoint's (grown rows: see hf_checkpoint.read_rows)."""
    from pargo_dist.models.pretrained import HFCheckpoint, read_rows

    check_layout(cfg, tp, pp, ep)
    ckpt = HFCheckpoint(path)
    groups = cfg.num_key_value_heads or cfg.num_attention_heads
    d = _head_dim(cfg)
    q_per_group = cfg.num_attention_heads // groups * d
    local_groups = groups // tp
    hidden, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    first, last = pp_rank == 0, pp_rank == pp - 1

    def part(n: int, rank: int = tp_rank) -> slice:  # this rank's contiguous 1/tp of n
        return slice(rank * n // tp, (rank + 1) * n // tp)

    def read(name: str, shape: tuple[int, ...], rows: slice | None = None, cols: slice | None = None):
        ckpt.release_except(name)
        return ckpt.read(name, rows=rows, cols=cols, dtype=dtype, expect=shape)

    vocab_rows = part(vocab)
    if first or (last and tied):
        embed = read_rows(ckpt, "model.embed_tokens.weight", range(vocab_rows.start, vocab_rows.stop), hidden, dtype)
        if first:
            yield "embedding.word_embeddings.weight", embed
        if last and tied and not first:  # the last stage keeps its own copy of the tied weight
            yield "output_layer.weight", embed
        del embed
    if last:
        yield "decoder.final_layernorm.weight", read("model.norm.weight", (hidden,))
        if not tied:
            yield "output_layer.weight", read_rows(ckpt, "lm_head.weight", range(vocab_rows.start, vocab_rows.stop),
                                                   hidden, dtype)
    g = slice(tp_rank * local_groups, (tp_rank + 1) * local_groups)
    for local, layer in enumerate(_layer_range(cfg, pp, pp_rank)):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{local}."
        att = src + "self_attn."
        q_rows = slice(g.start * q_per_group, g.stop * q_per_group)
        kv_rows = slice(g.start * d, g.stop * d)
        for kind in ("weight", "bias"):
            if att + f"q_proj.{kind}" not in ckpt:
                continue
            width = (hidden,) if kind == "weight" else ()
            q = read(att + f"q_proj.{kind}", (cfg.num_attention_heads * d, *width), rows=q_rows)
            k = read(att + f"k_proj.{kind}", (groups * d, *width), rows=kv_rows)
            v = read(att + f"v_proj.{kind}", (groups * d, *width), rows=kv_rows)
            yield dst + f"self_attention.linear_qkv.{kind}", _interleave_qkv(q, k, v, local_groups)
        yield dst + "self_attention.linear_proj.weight", read(att + "o_proj.weight", (hidden, cfg.num_attention_heads * d),
                                                             cols=part(cfg.num_attention_heads * d))
        if _qk_norm(cfg):
            for ours, theirs in _QK_NORMS:
                yield dst + f"self_attention.{theirs}.weight", read(att + f"{ours}.weight", (d,))
        yield dst + "input_layernorm.weight", read(src + "input_layernorm.weight", (hidden,))
        yield dst + "pre_mlp_layernorm.weight", read(src + "post_attention_layernorm.weight", (hidden,))
        if num_experts(cfg):
            block, router, gate_w, up_w, down_w = _moe_names(cfg)
            ffn = _moe_config(cfg)["moe_ffn_hidden_size"]
            yield dst + "mlp.router.weight", read(src + f"{block}.{router}.weight", (num_experts(cfg), hidden))
            for local_e, e in enumerate(_local_experts(cfg, ep, ep_rank)):
                expert, mine = src + f"{block}.experts.{e}.", dst + f"mlp.experts.local_experts.{local_e}."
                gate = read(expert + f"{gate_w}.weight", (ffn, hidden), rows=part(ffn))
                up = read(expert + f"{up_w}.weight", (ffn, hidden), rows=part(ffn))
                yield mine + "linear_fc1.weight", torch.cat([gate, up])
                del gate, up
                yield mine + "linear_fc2.weight", read(expert + f"{down_w}.weight", (hidden, ffn), cols=part(ffn))
            continue
        gate = read(src + "mlp.gate_proj.weight", (inter, hidden), rows=part(inter))
        up = read(src + "mlp.up_proj.weight", (inter, hidden), rows=part(inter))
        yield dst + "mlp.linear_fc1.weight", torch.cat([gate, up])
        del gate, up
        yield dst + "mlp.linear_fc2.weight", read(src + "mlp.down_proj.weight", (hidden, inter), cols=part(inter))
    ckpt.close()


def hf_layer_from_megatron(shards: dict[tuple[int, ...], dict[str, torch.Tensor]], cfg, pp_rank: int, local: int,
                           layer: int, tp: int = 1, ep: int = 1) -> dict[str, torch.Tensor]:
    """The HF tensors of decoder layer `layer` (local index `local` in stage `pp_rank`) from the
    (tp_rank, pp_rank) GPTModel state dicts that hold it, or with expert parallelism (ep > 1)
    the (tp_rank, pp_rank, ep_rank) ones: each holds its experts, the rest is the same on every
    expert rank. Works on meta tensors too (names and shapes without reading a checkpoint)."""
    groups = cfg.num_key_value_heads or cfg.num_attention_heads
    d = _head_dim(cfg)
    q_rows = cfg.num_attention_heads // groups * d

    def cat(key: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([shards[(t, pp_rank)][key] for t in range(tp)], dim=dim)

    out: dict[str, torch.Tensor] = {}
    src, dst = f"decoder.layers.{local}.", f"model.layers.{layer}."
    for kind in ("weight", "bias"):
        key = src + f"self_attention.linear_qkv.{kind}"
        if key not in shards[(0, pp_rank)]:
            continue
        parts = [_split_qkv(shards[(t, pp_rank)][key], groups // tp, q_rows, d) for t in range(tp)]
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.{kind}"] = torch.cat([p[i] for p in parts])
    out[dst + "self_attn.o_proj.weight"] = cat(src + "self_attention.linear_proj.weight", dim=1)
    if _qk_norm(cfg):
        for ours, theirs in _QK_NORMS:
            out[dst + f"self_attn.{ours}.weight"] = shards[(0, pp_rank)][src + f"self_attention.{theirs}.weight"].clone()
    out[dst + "input_layernorm.weight"] = shards[(0, pp_rank)][src + "input_layernorm.weight"].clone()
    out[dst + "post_attention_layernorm.weight"] = shards[(0, pp_rank)][src + "pre_mlp_layernorm.weight"].clone()
    if num_experts(cfg):
        block, router, gate_w, up_w, down_w = _moe_names(cfg)
        out[dst + f"{block}.{router}.weight"] = shards[(0, pp_rank)][src + "mlp.router.weight"].clone()
        for e_rank in range(ep):
            for local_e, e in enumerate(_local_experts(cfg, ep, e_rank)):
                mine = src + f"mlp.experts.local_experts.{local_e}."
                held = [shards[(t, pp_rank, e_rank) if ep > 1 else (t, pp_rank)] for t in range(tp)]
                fc1 = [h[mine + "linear_fc1.weight"].chunk(2) for h in held]
                expert = dst + f"{block}.experts.{e}."
                out[expert + f"{gate_w}.weight"] = torch.cat([gate for gate, _ in fc1])
                out[expert + f"{up_w}.weight"] = torch.cat([up for _, up in fc1])
                out[expert + f"{down_w}.weight"] = torch.cat([h[mine + "linear_fc2.weight"] for h in held], dim=1)
        return out
    fc1 = [shards[(t, pp_rank)][src + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp)]
    out[dst + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1])
    out[dst + "mlp.up_proj.weight"] = torch.cat([u for _, u in fc1])
    out[dst + "mlp.down_proj.weight"] = cat(src + "mlp.linear_fc2.weight", dim=1)
    return out


def hf_ends_from_megatron(shards: dict[tuple[int, int], dict[str, torch.Tensor]], cfg, tp: int = 1,
                          pp: int = 1) -> dict[str, torch.Tensor]:
    """The HF tensors around the decoder layers: input embedding, final norm, output layer (untied)."""
    def cat(pp_rank: int, key: str) -> torch.Tensor:
        return torch.cat([shards[(t, pp_rank)][key] for t in range(tp)])

    out = {"model.embed_tokens.weight": cat(0, "embedding.word_embeddings.weight"),
           "model.norm.weight": shards[(0, pp - 1)]["decoder.final_layernorm.weight"].clone()}
    if not getattr(cfg, "tie_word_embeddings", False):
        out["lm_head.weight"] = cat(pp - 1, "output_layer.weight")
    return out


def hf_state_from_megatron(shards: dict[tuple[int, ...], dict[str, torch.Tensor]], cfg, tp: int = 1,
                           pp: int = 1, ep: int = 1) -> dict[str, torch.Tensor]:
    """HF state dict from every (tp_rank, pp_rank) GPTModel state dict, (tp_rank, pp_rank,
    ep_rank) with expert parallelism (the inverse of the above)."""
    check_layout(cfg, tp, pp, ep)
    if ep > 1:  # what is not an expert is the same on every expert rank: read it from expert rank 0
        expected = [(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)]
        shards = {**{(t, p): shards[(t, p, 0)] for t, p, _ in expected if (t, p, 0) in shards}, **shards}
    else:
        expected = [(t, p) for t in range(tp) for p in range(pp)]
    missing = [key for key in expected if key not in shards]
    if missing:
        raise ConversionError(f"shards missing for (tp_rank, pp_rank{', ep_rank' if ep > 1 else ''}) {missing}")
    out = hf_ends_from_megatron(shards, cfg, tp, pp)
    for pp_rank in range(pp):
        for local, layer in enumerate(_layer_range(cfg, pp, pp_rank)):
            out.update(hf_layer_from_megatron(shards, cfg, pp_rank, local, layer, tp, ep))
    return out
