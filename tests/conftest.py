"""Shared tiny model settings: hidden 32-64, 1-2 layers, so the suite stays fast on 2 cores."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import pargo_dist  # noqa: E402,F401  (environment shims before any transformers import)

torch.set_num_threads(1)

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1

TINY_VISION = {
    "clip": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,  # 4 x 4 patch grid
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
}

TINY_TEXT = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
    },
    # Learned absolute positions (unlike RoPE, whose outputs ignore a common shift): shows that
    # left padding gets the right position ids.
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": VOCAB,
        "n_positions": 256,
    },
}

TINY_PROJECTOR = {"num_partial": 8, "num_global": 2, "depth": 2, "width": 32, "heads": 4, "ffn": 64}


def tiny_config(text: str = "llama", vision: str = "clip", **overrides):
    from pargo_dist.models import ParGoConfig

    values = dict(
        vision_config=dict(TINY_VISION[vision]),
        text_config=dict(TINY_TEXT[text]),
        projector=dict(TINY_PROJECTOR),
        image_token_id=IMAGE_TOKEN,
    )
    values.update(overrides)
    return ParGoConfig(**values)


def tiny_model(text: str = "llama", vision: str = "clip", seed: int = 0, **overrides):
    from pargo_dist.models import ParGoForConditionalGeneration

    torch.manual_seed(seed)
    return ParGoForConditionalGeneration(tiny_config(text, vision, **overrides)).eval()


@pytest.fixture(params=["llama", "qwen2"])
def text_type(request):
    return request.param


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback for the whole session; S3 env vars point at it."""
    from support.s3 import start_moto

    server = start_moto()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
