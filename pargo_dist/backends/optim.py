"""What every backend's optimizer shares: one learning rate per model part, and the schedule.

The parts are the MLLM's top-level modules (vision_tower, projector, language_model); a
part's rate is `optim.lr_<part>` or, unset, `optim.lr`. The schedule is a function of the
optimizer step alone, so a resumed run (on any layout) continues it exactly.
"""

from __future__ import annotations

import math

from pargo_dist.config import Config

PART_LR_KEYS = {"projector": "lr_projector", "language_model": "lr_llm", "vision_tower": "lr_vision"}


def part_lr(cfg: Config, part: str) -> float:
    own = getattr(cfg.optim, PART_LR_KEYS[part])
    return own if own is not None else cfg.optim.lr


def param_groups(model, cfg: Config) -> list[dict]:
    """One AdamW group per trained part (those with parameters that require grad)."""
    groups = []
    for part in PART_LR_KEYS:
        module = getattr(model, part, None)
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            groups.append({"params": params, "lr": part_lr(cfg, part), "name": part})
    return groups


def adamw(groups: list[dict], cfg: Config, fused: bool = True):
    """torch AdamW with the recipe's betas, eps and weight decay. Fused: one kernel per step over a
    group's tensors (CUDA; CPU too since torch 2.4) instead of a chain of foreach kernels, for
    the same update (tests/test_optim.py compares the two). It is also the optimizer that steps
    ZeRO-Offload's fp32 partitions in host memory (backends/deepspeed.py, offload_config): on CPU
    tensors the fused kernel is one multithreaded pass, as fast as DeepSpeedCPUAdam, where
    foreach falls back to a kernel per operation (measured 5x slower on a 20M-element partition)."""
    import torch

    o = cfg.optim
    return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=fused, foreach=None if fused else True)


def fuse_adamw(optimizer) -> int:
    """Switch every torch AdamW inside a wrapper (megatron's ChainedOptimizer, mixed-precision and
    distributed optimizers; `.chained_optimizers`, `.optimizer`) to the fused implementation.
    Returns how many it switched. megatron-core without apex / Transformer Engine falls back to
    torch AdamW with foreach kernels and has no option for fused; the flag is read per group at
    every step, and a state made later holds its step count on the parameters' device, as fused
    needs (torch's load_state_dict moves a loaded one there too)."""
    import torch

    if isinstance(optimizer, torch.optim.AdamW):
        if optimizer.defaults.get("differentiable"):
            return 0
        for group in [optimizer.defaults, *optimizer.param_groups]:
            group["fused"], group["foreach"] = True, None
        optimizer._step_supports_amp_scaling = True
        return 1
    inner = getattr(optimizer, "chained_optimizers", None) or [getattr(optimizer, "optimizer", None)]
    return sum(fuse_adamw(o) for o in inner if o is not None and o is not optimizer)


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to min_lr_ratio at the last step."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
