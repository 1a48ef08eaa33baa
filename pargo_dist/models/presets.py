"""Named model shapes: `tiny` (CPU demo and tests' big brother) and `paper` (ParGo's setting).

A preset is a dict of ParGoConfig arguments, so it can be printed, saved and overridden.
`paper` mirrors the released model's shapes with architectures transformers ships: a
CLIP-L/14 at 336 px stands in for EVA02-CLIP-L/14 (same width 1024, 24 x 24 patches) and a
Llama-7B-shaped decoder for InternLM2-7B (hidden 4096, 32 layers), which needs remote code.
"""

from __future__ import annotations

import copy

from pargo_dist.errors import UserError

PRESETS: dict[str, dict] = {
    "tiny": {
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "max_position_embeddings": 512,
        },
        # 8 x 8 patch grid: 32 partial queries on 1x2 raster pairs + 4 global.
        "projector": {"num_partial": 32, "num_global": 4, "depth": 2, "width": 64, "heads": 4, "ffn": 128},
        "image_token_id": 511,
        "vision_feature_layer": -1,
        "vision_post_layernorm": True,
    },
    "paper": {
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 92544,
            "max_position_embeddings": 32768,
        },
        "projector": {},  # the defaults: 288 + 16 queries, 4 layers, width 512, 8 heads, FFN 2048
        "image_token_id": 92543,
        "vision_feature_layer": -1,  # last block, CLS dropped, then the tower's LayerNorm
        "vision_post_layernorm": True,
    },
}


def preset(name: str) -> dict:
    """A fresh copy of a preset's ParGoConfig arguments."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
