"""Pretrained causal LMs as the hub ships them, for tests: random weights saved by transformers
in bf16 safetensors, in several shards with an index."""

from __future__ import annotations

from pathlib import Path

import torch

LLMS = {
    # GQA, untied: Llama
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=256),
    # GQA, q/k/v biases, tied embeddings: Qwen2
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
                  tie_word_embeddings=True),
    # q/k RMSNorm per head, a head_dim (24) other than hidden / heads (16), untied: Qwen3
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=100,
                  max_position_embeddings=256, tie_word_embeddings=False),
    # mixture of experts: 4 experts, top 2, q/k norms: Qwen3-MoE
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, vocab_size=100, max_position_embeddings=256),
}


def save_hub_style(out: Path, kind: str) -> Path:
    """A random causal LM saved by transformers in bf16, in several shards with an index."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(LLMS[kind])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero, Qwen3's q/k norms at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1, 0.3)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    return out
