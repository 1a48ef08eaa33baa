"""Captions from an exported model (one process, no DeepSpeed): `pargo-dist generate`."""

from __future__ import annotations

from pathlib import Path

import torch

from pargo_dist import build
from pargo_dist.config import Config, load_config
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
    builder = PromptBuilder(tokenizer, model.num_image_tokens(), max_len=10**6)
    ids = builder.generation_prompt(builder.caption_prompt)
    pixels = build.image_processor(cfg)(image).unsqueeze(0)
    out = model.generate(torch.tensor([ids]), pixels, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, do_sample=False, **generate_kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()
