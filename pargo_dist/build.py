"""Build the model, tokenizer and data loaders a recipe describes (shared by train, export, eval)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from pargo_dist.config import Config
from pargo_dist.data.dataset import DataConfig, build_loader
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.tokenizer import image_token_id, load_tokenizer
from pargo_dist.models import ParGoForConditionalGeneration
from pargo_dist.models.vision import vision_config_from


def _require_local(key: str, path: str | None, what: str) -> None:
    """Recipes name local directories; nothing is fetched from a hub at run time."""
    if path and not Path(path).exists():
        raise ValueError(f"{key}={path} does not exist: point {key} at a local {what} directory "
                         "(download it first; the recipe's comment names the hub id)")


def build_tokenizer(cfg: Config):
    m = cfg.model
    if m.tokenizer != "synthetic":
        _require_local("model.tokenizer", m.tokenizer, "HF tokenizer (usually the same as model.llm.path)")
    return load_tokenizer(m.tokenizer)


def build_model(cfg: Config, tokenizer, seed: int | None = None) -> ParGoForConditionalGeneration:
    """The recipe's model: pretrained parts from paths, random parts from configs (seeded, so
    every rank and every resume builds the identical initial weights)."""
    m = cfg.model
    _require_local("model.llm.path", m.llm.path, "HF causal-LM")
    _require_local("model.vision.path", m.vision.path, "HF vision model (CLIP, SigLIP, ...)")
    torch.manual_seed(cfg.run.seed if seed is None else seed)
    llm = m.llm.path or {**m.llm.config, "vocab_size": m.llm.config.get("vocab_size", len(tokenizer))}
    vision = m.vision.path or dict(m.vision.config)
    model = ParGoForConditionalGeneration.from_components(
        vision, llm, projector=dict(m.projector), image_token_id=image_token_id(tokenizer),
        vision_feature_layer=m.vision.feature_layer, vision_drop_cls=m.vision.drop_cls,
        vision_post_layernorm=m.vision.post_layernorm, vision_class=m.vision.class_name)
    if len(tokenizer) > model.config.text_config.vocab_size:  # <image> added to a pretrained tokenizer
        # padded to a multiple of 64 so tensor parallelism still splits it (Llama-3: 128256 + 1 would not)
        model.language_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        model.config.text_config.vocab_size = model.get_input_embeddings().num_embeddings
    return model


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
        raise ValueError(f"{key}: meta_model needs {key}.config or {key}.path holding a config.json")

    m = cfg.model
    llm, vision = part_config("model.llm", m.llm), part_config("model.vision", m.vision)
    if "vocab_size" not in llm:
        if m.tokenizer != "synthetic":
            raise ValueError("model.llm.config needs vocab_size (the tokenizer is not read on the meta device)")
        llm["vocab_size"] = len(load_tokenizer("synthetic"))
    image_id = llm.get("image_token_id", llm["vocab_size"] - 1)
    with torch.device("meta"):
        return ParGoForConditionalGeneration.from_components(
            vision, llm, projector=dict(m.projector), image_token_id=image_id,
            vision_feature_layer=m.vision.feature_layer, vision_drop_cls=m.vision.drop_cls,
            vision_post_layernorm=m.vision.post_layernorm, vision_class=m.vision.class_name)


def init_parts_from(model: ParGoForConditionalGeneration, source: str, parts: list[str]) -> list[str]:
    """Load `parts` (e.g. the projector) from an earlier run into a freshly built model: how
    stage 2 starts from stage 1. `source`: a `pargo-dist export` directory (safetensors), or a
    DeepSpeed run / checkpoint dir (consolidated on the fly). Every parameter of each part must
    come from the source, with its shape; anything else is an error naming the source and keys.
    Returns the loaded keys."""
    path = Path(source)
    if not path.exists():
        raise ValueError(f"model.init_from={source} does not exist: point it at a `pargo-dist export` directory "
                         "or a run directory of the earlier stage")
    prefixes = tuple(f"{p}." for p in parts)
    wanted = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    files = sorted(path.glob("*.safetensors"))
    if files:  # read only the wanted tensors: a 70B export holds 140 GB, its projector 40 MB
        from safetensors import safe_open

        state = {}
        for f in files:
            with safe_open(f, framework="pt") as reader:
                state.update({k: reader.get_tensor(k) for k in reader.keys() if k in wanted})
    else:
        from pargo_dist.backends.deepspeed import TAG, consolidated_state_dict
        from pargo_dist.export import resolve_checkpoint

        step_dir = resolve_checkpoint(path)
        if not (step_dir / TAG).is_dir():
            raise ValueError(f"model.init_from={source}: {step_dir} is not a DeepSpeed checkpoint; export it "
                             "first (`pargo-dist export`) and point model.init_from at the export")
        state = consolidated_state_dict(step_dir)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"model.init_from={source} lacks {len(missing)} weights of {parts}: {missing[:5]}")
    for name, param in wanted.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"model.init_from={source}: {name} has shape {tuple(state[name].shape)}, this "
                             f"recipe's model {tuple(param.shape)} (a different projector or LLM config?)")
        with torch.no_grad():
            param.copy_(state[name].to(param.dtype))
    return sorted(wanted)


def prepare_for_stage(model: ParGoForConditionalGeneration, cfg: Config) -> list[str]:
    """What every rebuild of a run's model does after `build_model`, so training, resume and
    export agree: parts from model.init_from, the stage's frozen parts, LoRA adapters. Returns
    the keys loaded from init_from.

    init_from is applied on a resume and an export too: checkpoints hold only what trains
    (align, LoRA), so frozen parts that came from init_from must come from there again."""
    loaded = init_parts_from(model, cfg.model.init_from, cfg.model.init_parts) if cfg.model.init_from else []
    model.freeze(cfg.train.stage)
    if cfg.model.lora.r:
        from pargo_dist.lora import apply_lora

        apply_lora(model, cfg.model.lora)
    return loaded


def image_processor(cfg: Config) -> ImagePreprocessor:
    vision = vision_config_from(cfg.model.vision.path or dict(cfg.model.vision.config))
    return ImagePreprocessor.for_tower(vision, cfg.model.vision.path)


def loader(cfg: Config, data: DataConfig, model, tokenizer, batch_size: int, padding_side: str = "right",
           replication: int = 1):
    return build_loader(data, tokenizer=tokenizer, image_processor=image_processor(cfg),
                        num_image_tokens=model.num_image_tokens(), batch_size=batch_size,
                        padding_side=padding_side, replication=replication)
