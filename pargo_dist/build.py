"""Build the model, tokenizer and data loaders a recipe describes (shared by train, export, eval)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoConfig

from pargo_dist.config import Config
from pargo_dist.data.crops import CropPolicy
from pargo_dist.data.dataset import DataConfig, build_loader
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.tokenizer import image_token_id, load_tokenizer
from pargo_dist.errors import UserError
from pargo_dist.models import ParGoForConditionalGeneration
from pargo_dist.models.vision import vision_config_from
from pargo_dist.backends.trained_weights import load_trained_weights


def _require_local(key: str, path: str | None, what: str) -> None:
    """Recipes name local directories; nothing is fetched from a hub at run time."""
    if path and not Path(path).exists():
        raise UserError(f"{key}={path} does not exist: point {key} at a local {what} directory "
                         "(download it first; the recipe's comment names the hub id)")


def build_tokenizer(cfg: Config):
    m = cfg.model
    if m.tokenizer != "synthetic":
        _require_local("model.tokenizer", m.tokenizer, "HF tokenizer (usually the same as model.llm.path)")
    return load_tokenizer(m.tokenizer)


def llm_vocab_size(cfg: Config, tokenizer) -> int | None:
    """The vocabulary a pretrained LLM needs for this tokenizer: its own, or, when the tokenizer
    added tokens (<image>), the tokenizer's padded to a multiple of 64 so that tensor parallelism
    still splits it (Llama-3: 128256 + 1 would not). None for a config-only LLM."""
    if not cfg.model.llm.path:
        return None
    own = AutoConfig.from_pretrained(cfg.model.llm.path).vocab_size
    return own if len(tokenizer) <= own else -(-len(tokenizer) // 64) * 64


def build_model(cfg: Config, tokenizer, seed: int | None = None, llm_weights: bool = True,
                llm_dtype: torch.dtype = torch.float32) -> ParGoForConditionalGeneration:
    """The recipe's model: pretrained parts from paths, random parts from configs (seeded, so
    every rank and every resume builds the identical initial weights).

    A pretrained LLM is filled from its checkpoint tensor by tensor as `llm_dtype`, or, with
    `llm_weights=False`, left on the meta device for a backend that reads its own share."""
    m = cfg.model
    _require_local("model.llm.path", m.llm.path, "HF causal-LM")
    _require_local("model.vision.path", m.vision.path, "HF vision model (CLIP, SigLIP, ...)")
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    llm = m.llm.path or {**m.llm.config, "vocab_size": m.llm.config.get("vocab_size", len(tokenizer))}
    vision = m.vision.path or dict(m.vision.config)
    model = ParGoForConditionalGeneration.from_components(
        vision, llm, projector=dict(m.projector), image_token_id=image_token_id(tokenizer),
        llm_weights=llm_weights, vocab_size=llm_vocab_size(cfg, tokenizer), llm_dtype=llm_dtype,
        vision_feature_layer=m.vision.feature_layer, vision_drop_cls=m.vision.drop_cls,
        vision_post_layernorm=m.vision.post_layernorm, vision_class=m.vision.class_name)
    if len(tokenizer) > model.config.text_config.vocab_size:  # a config-only LLM smaller than the tokenizer
        model.language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    moe_aux_loss(model, cfg.train.moe_aux_loss_coef)
    return model


def moe_aux_loss(model: ParGoForConditionalGeneration, coef: float) -> None:
    """An MoE LLM's load-balancing loss as the recipe sets it (train.moe_aux_loss_coef), whatever
    its config.json says: HF's MoE LMs add router_aux_loss_coef x that loss to their loss when
    output_router_logits is on (the megatron backend sets its own router from the recipe). HF's
    loss sums over the top-k choices (top_k for a balanced router), megatron's divides by k (1):
    the recipe's coefficient weighs megatron's, so HF's gets coef / top_k."""
    from pargo_dist.backends.megatron.layout import MOE_TYPES

    text = model.config.text_config
    if text.model_type not in MOE_TYPES:
        return
    weight = coef / text.num_experts_per_tok
    for config in {id(c): c for c in (text, model.language_model.config)}.values():
        config.output_router_logits, config.router_aux_loss_coef = coef > 0, weight
    model.language_model.router_aux_loss_coef = weight


def meta_model(cfg: Config) -> ParGoForConditionalGeneration:
    """The recipe's model on the meta device: shapes and parameter counts, no weights, no tokenizer.

    The planner and the recipe tests need a 70B recipe's sizes on a laptop without its weights,
    so only configs are read: `model.<part>.config`, else the config.json in `model.<part>.path`.
    The vocabulary is the LLM config's (a real tokenizer may add `<image>`: at most 64 rows more).
    """
    def part_config(key: str, section) -> dict:
        if section.config:
            return dict(section.config)
        if section.path and (Path(section.path) / "config.json").exists():
            return AutoConfig.from_pretrained(section.path).to_dict()
        raise UserError(f"{key}: meta_model needs {key}.config or {key}.path holding a config.json")

    m = cfg.model
    llm, vision = part_config("model.llm", m.llm), part_config("model.vision", m.vision)
    if "vocab_size" not in llm:
        if m.tokenizer != "synthetic":
            raise UserError("model.llm.config needs vocab_size (the tokenizer is not read on the meta device)")
        llm["vocab_size"] = len(load_tokenizer("synthetic"))
    image_id = llm.get("image_token_id", llm["vocab_size"] - 1)
    from transformers.modeling_utils import no_init_weights

    # no weight init: meta tensors hold no values, and initialising 36,000 experts' weights on
    # the meta device still takes seconds per MoE recipe
    with torch.device("meta"), no_init_weights():
        return ParGoForConditionalGeneration.from_components(
            vision, llm, projector=dict(m.projector), image_token_id=image_id,
            vision_feature_layer=m.vision.feature_layer, vision_drop_cls=m.vision.drop_cls,
            vision_post_layernorm=m.vision.post_layernorm, vision_class=m.vision.class_name)


def init_freeze_and_adapt(model: ParGoForConditionalGeneration, cfg: Config, gather=None) -> list[str]:
    """What every rebuild of a run's model does after `build_model`, so training, resume and
    export agree: load the parts model.init_from names (weights from an earlier run), freeze
    what the stage does not train, add LoRA adapters. Returns the keys loaded from init_from.

    init_from is applied on a resume and an export too: checkpoints hold only what trains
    (align, LoRA), so frozen parts that came from init_from must come from there again.
    `gather`: for parameters partitioned as they were built (ZeRO-3), see Backend.param_gather."""
    loaded = []
    if cfg.model.init_from:
        if not Path(cfg.model.init_from).exists():
            raise UserError(f"model.init_from={cfg.model.init_from} does not exist: point it at a `pargo-dist export` "
                            "directory or a run directory of the earlier stage")
        try:
            loaded = load_trained_weights(model, cfg.model.init_from, parts=cfg.model.init_parts, gather=gather)
        except UserError as err:
            raise UserError(f"model.init_from={cfg.model.init_from}: {err}") from None
    model.freeze(cfg.train.stage)
    if cfg.model.lora.r:
        from pargo_dist.models.lora import apply_lora

        apply_lora(model, cfg.model.lora)
    return loaded


def image_processor(cfg: Config) -> ImagePreprocessor:
    """The tower's preprocessing, cutting images into crops as data.image says."""
    vision = vision_config_from(cfg.model.vision.path or dict(cfg.model.vision.config))
    pre = ImagePreprocessor.for_tower(vision, cfg.model.vision.path)
    return dataclasses.replace(pre, crops=CropPolicy.from_config(cfg.data.image))


def visual_tokens(cfg: Config, model) -> dict[int, int]:
    """{crops: visual tokens} for every crop count data.image can give an image (the prompt's
    placeholder counts). Raises a UserError when the projector cannot take a crop count (its
    regions must tile every count's patches)."""
    tokens = {}
    for crops in CropPolicy.from_config(cfg.data.image).possible_counts():
        try:
            tokens[crops] = model.num_image_tokens(crops)
            if getattr(model.projector, "num_partial", 0):
                model.projector.regions(crops * model.vision_tower.num_patches)
        except UserError as err:
            raise UserError(f"data.image.crops={cfg.data.image.crops!r} gives images of {crops} crops, which the "
                            f"projector cannot take: {err}") from None
    return tokens


def loader(cfg: Config, data: DataConfig, model, tokenizer, batch_size: int, padding_side: str = "right",
           replication: int = 1):
    return build_loader(data, tokenizer=tokenizer, image_processor=image_processor(cfg),
                        num_image_tokens=visual_tokens(cfg, model), batch_size=batch_size,
                        padding_side=padding_side, replication=replication)
