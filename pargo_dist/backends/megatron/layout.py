"""Which Llama-family and MoE models megatron's GPTModel can hold, at which TP x PP x EP layouts.

Torch-free, so the launcher checks a recipe before any rank starts (`pargo_dist.launch.node`); the
backend checks the built model again (`MegatronBackend.setup`).
"""

from __future__ import annotations

from pargo_dist.errors import UserError

LLAMA_FAMILY = ("llama", "qwen2", "mistral", "qwen3")  # qwen3: q/k RMSNorm per head, its own head_dim


class ConversionError(UserError):
    """The HF model (or the requested layout) cannot be expressed as our megatron GPTModel."""


MOE_TYPES = ("qwen3_moe", "mixtral")  # megatron's MoELayer; experts split over backend.expert_parallel ranks


def num_experts(cfg) -> int:
    """Routed experts per MoE layer (0 for a dense model): Qwen3-MoE's num_experts, Mixtral's
    num_local_experts."""
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0) \
        if cfg.model_type in MOE_TYPES else 0


def check_layout(cfg, tp: int, pp: int, ep: int = 1) -> None:
    """Why this model cannot be split TP x PP (x EP experts), as an error naming the numbers.
    `cfg`: an HF text config, or any object with its fields (a field that is absent is not
    checked: the launcher checks a recipe's config before any rank starts, when the vocabulary
    is not known yet)."""
    if cfg.model_type not in LLAMA_FAMILY + MOE_TYPES:
        raise ConversionError(f"model_type {cfg.model_type!r} is not supported by the megatron backend "
                              f"(supported: {', '.join(LLAMA_FAMILY + MOE_TYPES)})")
    experts = num_experts(cfg)
    if experts and experts % ep:
        raise ConversionError(f"num_experts={experts} is not divisible by expert parallel size {ep}")
    if cfg.model_type == "qwen3_moe" and (getattr(cfg, "mlp_only_layers", None) or
                                          getattr(cfg, "decoder_sparse_step", 1) != 1):
        raise ConversionError("qwen3_moe with dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step "
                              "!= 1) is not supported: every layer must be MoE")
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv),
                    ("intermediate_size", getattr(cfg, "intermediate_size", None)),
                    ("vocab_size", getattr(cfg, "vocab_size", None))):
        if n is not None and n % tp:
            hint = " (pad it: a vocab that is a multiple of 64 * TP is usual)" if what == "vocab_size" else ""
            raise ConversionError(f"{what}={n} is not divisible by tensor parallel size {tp}{hint}")
    layers = getattr(cfg, "num_hidden_layers", None)
    if layers is not None and layers % pp:
        raise ConversionError(f"num_hidden_layers={layers} is not divisible by pipeline "
                              f"parallel size {pp}")
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind not in (None, "default", "llama3"):
        raise ConversionError(f"rope_scaling type {kind!r} is not supported (default and llama3 are)")
    if kind == "llama3" and (scaling.get("low_freq_factor", 1.0) != 1.0 or scaling.get("high_freq_factor", 4.0) != 4.0
                             or scaling.get("original_max_position_embeddings", 8192) != 8192):
        raise ConversionError(f"rope_scaling {scaling}: megatron-core implements Llama-3.1 scaling with "
                              "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 only")
