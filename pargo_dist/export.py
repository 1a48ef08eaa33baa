"""`pargo-dist export`: a DeepSpeed checkpoint (any ZeRO stage, any rank count) or a megatron
one (any TP/PP/DP layout) -> one HF directory that `ParGoForConditionalGeneration.from_pretrained`
(or AutoModelForImageTextToText) loads on one process, with its tokenizer.

The model is rebuilt from the checkpoint's own config.yaml (same seed, same pretrained paths,
same model.init_from), then the consolidated fp32 weights are loaded over it. In the `align`
stage the checkpoint holds only the trained weights: the frozen backbones come from that
rebuild, and any key missing for another reason is an error, not a silent random weight.
A LoRA run is exported merged (a plain model), or as its adapters alone (`--adapters-only`).
"""

from __future__ import annotations

from pathlib import Path

from pargo_dist import build
from pargo_dist.checkpoint import resolve_checkpoint
from pargo_dist.config import load_config
from pargo_dist.errors import UserError
from pargo_dist.weights import load_trained_weights


def export(checkpoint: str | Path, out: str | Path, adapters_only: bool = False) -> Path:
    """Write the checkpoint's model to `out`. With LoRA (model.lora.r > 0) the adapters are merged
    into the LLM weights, or, with `adapters_only`, written alone in peft's format (lora.py)."""
    step_dir = resolve_checkpoint(checkpoint)
    cfg = load_config(step_dir / "config.yaml")
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    build.init_freeze_and_adapt(model, cfg)  # init_from, frozen parts, LoRA: the model the checkpoint is of
    load_trained_weights(model, step_dir)
    out = Path(out)
    from pargo_dist import lora

    if adapters_only:
        if not lora.is_lora(model):
            raise UserError(f"{step_dir}: --adapters-only needs a LoRA run (model.lora.r > 0); this one trained "
                            "the LLM's own weights")
        lora.save_adapters(model, out)
    else:
        lora.merge(model)
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text((step_dir / "config.yaml").read_text())  # the recipe it came from
    return out
