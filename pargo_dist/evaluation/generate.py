"""Captions from a model: `pargo-dist generate` (an exported model, one process), and the batched
greedy generation that evaluation and the trainer's sample captions share."""

from __future__ import annotations

from pathlib import Path

import torch

from pargo_dist import build
from pargo_dist.config import Config, load_config
from pargo_dist.data.collate import Collator
from pargo_dist.data.prompt import PromptBuilder
from pargo_dist.data.tokenizer import load_tokenizer
from pargo_dist.models import ParGoForConditionalGeneration


def load_exported(path: str | Path) -> tuple[ParGoForConditionalGeneration, object, Config]:
    path = Path(path)
    model = ParGoForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = load_tokenizer(path)
    cfg = load_config(path / "config.yaml") if (path / "config.yaml").exists() else None
    return model, tokenizer, cfg


def held_out_image(cfg: Config, index: int):
    """The recipe's held-out synthetic image `index` and its true caption."""
    from pargo_dist.data.synthetic import SyntheticConfig, held_out, render_scene, synthetic_scene

    syn = cfg.data.synthetic
    scfg = held_out(SyntheticConfig(num_samples=syn.num_samples or 1, image_size=syn.image_size, seed=syn.seed),
                    max(syn.held_out, index + 1))
    scene = synthetic_scene(index, scfg)
    return render_scene(scene, scfg), scene["caption"]


@torch.no_grad()
def caption_image(model, tokenizer, cfg: Config, image, **generate_kwargs) -> str:
    builder = PromptBuilder(tokenizer, build.visual_tokens(cfg, model), max_len=10**6)
    pixels = build.image_processor(cfg).views(image)  # (crops, 3, H, W)
    ids = builder.generation_prompt(builder.caption_prompt, crops=len(pixels))
    out = model.generate(torch.tensor([ids]), pixels, image_crops=[len(pixels)], pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, do_sample=False, **generate_kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], pixels: torch.Tensor | None, device,
                   image_crops: list[int] | None = None, **generate_kwargs) -> list[str]:
    """Greedy continuations of a batch of prompts (token ids, image placeholders expanded),
    decoded. Prompts are left-padded, since generation appends on the right. `pixels` and
    `image_crops` as the model's forward takes them. `generate_kwargs` go to `generate`
    (max_new_tokens, num_beams, synced_gpus under ZeRO-3, ...)."""
    batch = Collator(pad_id=tokenizer.pad_token_id, padding_side="left")(
        [{"input_ids": p, "labels": p} for p in prompts])
    if pixels is not None:
        pixels = pixels.to(device, model.dtype)
    new = model.generate(batch.input_ids.to(device), pixels, attention_mask=batch.attention_mask.to(device),
                         image_crops=image_crops,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False,
                         **generate_kwargs)
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in new]
