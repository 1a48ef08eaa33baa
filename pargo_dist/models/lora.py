"""LoRA on the LLM for stage 2 (ParGo's own recipe: rank 256, alpha 512, on the attention's QKV).

peft wraps `model.language_model` (get_peft_model): the chosen linear layers gain A/B adapters,
every original LLM weight is frozen, and the projector keeps training beside them (the stage's
`freeze` already set that). Only what trains is saved in checkpoints (the DeepSpeed backend
excludes frozen parameters), so a checkpoint of a 7B run with rank-256 adapters is the adapters,
the projector and their Adam state; resume and export rebuild the frozen rest from the recipe.

`merge` folds the adapters into the LLM's weights (W + B A * alpha / r) and removes them: the
exported model is a plain ParGo model whose logits equal the adapted one's. `save_adapters`
writes them in peft's own format instead, for users who keep one base and many adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pargo_dist.errors import UserError


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM in stage `finetune` (peft): the LLM's own weights stay frozen, the
    adapters and the projector train. r=0: off (the whole LLM trains)."""

    r: int = 0  # rank; ParGo's stage 2 used 256
    alpha: float = 16.0  # the update is scaled by alpha / r; ParGo's stage 2 used 512
    dropout: float = 0.0
    # module names (suffixes, e.g. q_proj) or one regex over full names (peft's target_modules);
    # empty: the LLM family's attention projections (DEFAULT_TARGETS below)
    target_modules: list[str] = field(default_factory=list)
    target_regex: str | None = None


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS = {  # LLM model_type -> linear layers that get adapters when the recipe names none
    "llama": ATTENTION, "mistral": ATTENTION, "qwen2": ATTENTION, "qwen3": ATTENTION, "gemma": ATTENTION,
    "internlm2": ["wqkv", "wo"],  # the fused QKV of InternLM2 (remote code)
    "gpt2": ["c_attn", "c_proj"],
}


def targets(lora: LoraConfig, model_type: str) -> list[str] | str:
    if lora.target_regex:
        return lora.target_regex
    if lora.target_modules:
        return list(lora.target_modules)
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"model.lora: no default target modules for LLM type {model_type!r}; name them in "
                         f"model.lora.target_modules (known defaults: {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def adapter_params(llm, lora: LoraConfig, model_type: str) -> int:
    """Parameters the adapters add to `llm` (without building them: the planner's meta models),
    matching targets as peft does: a name suffix, or a full-name regex."""
    import re

    from torch import nn

    wanted = targets(lora, model_type)
    total = 0
    for name, module in llm.named_modules():
        hit = re.fullmatch(wanted, name) if isinstance(wanted, str) else name.split(".")[-1] in wanted
        if hit and isinstance(module, nn.Linear):
            total += lora.r * (module.in_features + module.out_features)
    return total


def apply_lora(model, lora: LoraConfig) -> None:
    """Wrap the LLM with adapters (in place). The vision tower and projector are untouched."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                            target_modules=targets(lora, model.config.text_config.model_type))
    try:
        model.language_model = get_peft_model(model.language_model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"model.lora: {err}") from None


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def merge(model) -> None:
    """Fold the adapters into the LLM weights and drop them (in place): a plain ParGo model."""
    if is_lora(model):
        model.language_model = model.language_model.merge_and_unload()


def save_adapters(model, out: str | Path) -> Path:
    """peft's adapter files for the LLM (adapter_config.json, adapter_model.safetensors) in
    OUT/llm_adapter, and the projector's weights in OUT/projector.safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    model.language_model.save_pretrained(out / "llm_adapter")
    state = {f"projector.{k}": v.detach().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(state, out / "projector.safetensors")
    return out
