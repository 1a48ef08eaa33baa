"""Build the model, tokenizer and data loaders a recipe describes (shared by train, export, eval)."""

from __future__ import annotations

from pathlib import Path

import torch

from pargo_dist.config import Config
from pargo_dist.data.dataset import DataConfig, build_loader
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.tokenizer import image_token_id, load_tokenizer
from pargo_dist.models import ParGoForConditionalGeneration
from pargo_dist.models.vision import vision_config_from


def build_tokenizer(cfg: Config):
    spec = cfg.model.tokenizer
    if spec != "synthetic" and not Path(spec).exists() and cfg.model.llm.path:
        spec = cfg.model.llm.path
    return load_tokenizer(spec)


def build_model(cfg: Config, tokenizer, seed: int | None = None) -> ParGoForConditionalGeneration:
    """The recipe's model: pretrained parts from paths, random parts from configs (seeded, so
    every rank and every resume builds the identical initial weights)."""
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    m = cfg.model
    llm = m.llm.path or {**m.llm.config, "vocab_size": m.llm.config.get("vocab_size", len(tokenizer))}
    vision = m.vision.path or dict(m.vision.config)
    model = ParGoForConditionalGeneration.from_components(
        vision, llm, projector=dict(m.projector), image_token_id=image_token_id(tokenizer),
        vision_feature_layer=m.vision.feature_layer, vision_drop_cls=m.vision.drop_cls,
        vision_post_layernorm=m.vision.post_layernorm, vision_class=m.vision.class_name)
    if len(tokenizer) > model.config.text_config.vocab_size:  # <image> added to a pretrained tokenizer
        model.language_model.resize_token_embeddings(len(tokenizer))
        model.config.text_config.vocab_size = len(tokenizer)
    return model


def image_processor(cfg: Config) -> ImagePreprocessor:
    vision = vision_config_from(cfg.model.vision.path or dict(cfg.model.vision.config))
    return ImagePreprocessor.for_tower(vision, cfg.model.vision.path)


def loader(cfg: Config, data: DataConfig, model, tokenizer, batch_size: int, padding_side: str = "right",
           replication: int = 1):
    return build_loader(data, tokenizer=tokenizer, image_processor=image_processor(cfg),
                        num_image_tokens=model.num_image_tokens(), batch_size=batch_size,
                        padding_side=padding_side, replication=replication)
