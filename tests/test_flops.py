"""Model FLOPs: analytic counts vs. counts on real forward/backward passes, MFU and peak FLOP/s."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN, TINY_PROJECTOR, tiny_model
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pargo_dist.constants import PARTS
from pargo_dist.models.flops import (
    flops_breakdown,
    forward_flops,
    mfu,
    model_flops_per_sample,
    peak_flops_per_device,
    training_multipliers,
)
from pargo_dist.models import insert_image_tokens

TEXT = [5, 6, IMAGE_TOKEN, 7, 8, 9, 10, 11]


def batch(model, crops=1, n=1, extra_text=0):
    ids = insert_image_tokens(TEXT + list(range(12, 12 + extra_text)), IMAGE_TOKEN, model.num_image_tokens(crops))
    shape = (n, crops, 3, 32, 32) if crops > 1 else (n, 3, 32, 32)
    return torch.tensor([ids] * n), torch.randn(shape)


# ----------------------------------------------------------------------------- FLOPs: forward


def hook_count_forward(model, monkeypatch, **inputs) -> dict[str, float]:
    """Forward FLOPs per part, measured on a real forward: every nn.Linear / nn.Conv2d call
    records 2 x multiply-adds of the rows it really saw; every scaled_dot_product_attention
    call records 2 x 2 x L_q x L_k x d per (batch, head) from its tensors' shapes."""
    counts: dict[str, float] = defaultdict(float)
    current: list[str] = []
    handles = []

    def linear(m, args, out):
        counts[current[-1]] += 2 * m.in_features * m.out_features * (args[0].numel() // m.in_features)

    def conv(m, args, out):
        kh, kw = m.kernel_size
        counts[current[-1]] += 2 * out.numel() * (m.in_channels // m.groups) * kh * kw

    def enter(part):
        def hook(module, args):
            current.append(part)
        return hook

    def leave(module, args, out):
        current.pop()  # (a hook that returns something would replace the output)

    for part in PARTS:
        handles.append(getattr(model, part).register_forward_pre_hook(enter(part)))
        handles.append(getattr(model, part).register_forward_hook(leave))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        counts[current[-1]] += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        monkeypatch.undo()
        for h in handles:
            h.remove()
    return dict(counts)


@pytest.mark.parametrize("crops", [1, 2])
def test_forward_flops_match_hook_count_on_real_forward(monkeypatch, crops):
    model = tiny_model()
    ids, px = batch(model, crops, n=2)
    measured = hook_count_forward(model, monkeypatch, input_ids=ids, pixel_values=px)
    predicted = forward_flops(model, ids.shape[1], images_per_sample=1, crops=crops)
    assert set(measured) == set(PARTS)
    for part in PARTS:  # same things counted: exact, per sample
        assert measured[part] / 2 == predicted[part], part


def part_counts(fcm: FlopCounterMode) -> dict[str, float]:
    """Per-part FlopCounterMode totals, leaving out the rotary-embedding bmm (not a model matmul)."""
    counts = fcm.get_flop_counts()
    prefix = "ParGoForConditionalGeneration."
    out = {p: float(sum(counts.get(prefix + p, {}).values())) for p in PARTS}
    rotary = [k for k in counts if k.startswith(prefix + "language_model") and k.endswith("rotary_emb")]
    out["language_model"] -= sum(sum(counts[k].values()) for k in rotary)
    out["rotary"] = float(sum(sum(counts[k].values()) for k in rotary))
    return out


VARIANTS = {
    "clip-llama-pargo": {},
    "siglip-qwen2-pargo": dict(vision="siglip", text="qwen2"),  # SigLIP: no CLS, a pooling head
    "clip-gpt2-pargo": dict(text="gpt2"),  # Conv1D instead of nn.Linear, no GQA
    "clip-llama-mlp": dict(projector={"type": "mlp"}),
    "clip-llama-qformer": dict(projector={**TINY_PROJECTOR, "type": "qformer", "num_partial": 0}),
    "clip-llama-dense": dict(projector={**TINY_PROJECTOR, "cross_attn_impl": "dense"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_flops_match_flop_counter_for_every_architecture(variant):
    """torch's own FLOP counter (aten level: mm, addmm, bmm, convolution; SDPA forced onto its
    math path so that attention decomposes into counted bmm) agrees exactly, per part."""
    model = tiny_model(**VARIANTS[variant])
    for crops in (1, 2):
        ids, px = batch(model, crops)
        fcm = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fcm:
            model(input_ids=ids, pixel_values=px)
        measured = part_counts(fcm)
        predicted = forward_flops(model, ids.shape[1], crops=crops)
        for part in PARTS:
            assert measured[part] == predicted[part], (variant, crops, part)


# ----------------------------------------------------------------------------- FLOPs: training


def test_stage_multipliers_exact_ratios():
    model = tiny_model()
    ids, _ = batch(model)
    S = ids.shape[1]
    kinds = flops_breakdown(model, S)
    v, p, l = (kinds[part] for part in PARTS)
    fwd = {part: sum(k.values()) for part, k in kinds.items()}
    # tiny CLIP takes features from the penultimate layer: its last block does not run at all.
    assert v["forward_only"] == 0 and v["input_weights"] > 0 and l["input_weights"] == 0
    expected = {
        # vision frozen, no grad: 1x. projector trains behind a frozen tower: 3x, but its K/V
        # skip the input gradient (2x). LLM frozen but crossed by the gradient: 2x weights, 3x attention.
        "align": fwd["vision_tower"] + 3 * (p["weights"] + p["attention"]) + 2 * p["input_weights"]
        + 2 * l["weights"] + 3 * l["attention"],
        "finetune": fwd["vision_tower"] + 3 * (p["weights"] + p["attention"]) + 2 * p["input_weights"]
        + 3 * fwd["language_model"],
        "full": 3 * (v["weights"] + v["attention"]) + 2 * v["input_weights"] + v["forward_only"]
        + 3 * fwd["projector"] + 3 * fwd["language_model"],
    }
    got = {}
    for stage in expected:
        model.freeze(stage)  # requires_grad decides by default
        got[stage] = model_flops_per_sample(model, S)
        assert got[stage] == pytest.approx(expected[stage], rel=1e-12), stage
    assert got["align"] < got["finetune"] < got["full"]
    # An explicit `trainable` overrides requires_grad; with nothing trainable: the forward cost.
    none = dict.fromkeys(PARTS, False)
    assert model_flops_per_sample(model, S, trainable=none) == pytest.approx(sum(fwd.values()), rel=1e-12)
    model.freeze("finetune")
    assert model_flops_per_sample(model, S, trainable={"language_model": False}) == pytest.approx(got["align"])


def test_training_multipliers_table():
    m = training_multipliers({"projector": True})  # align
    assert m["vision_tower"] == dict(weights=1, input_weights=1, attention=1, forward_only=1)
    assert m["projector"] == dict(weights=3, input_weights=2, attention=3, forward_only=1)
    assert m["language_model"] == dict(weights=2, input_weights=2, attention=3, forward_only=1)
    m = training_multipliers(dict.fromkeys(PARTS, True))
    assert m["language_model"]["weights"] == 3 and m["vision_tower"]["input_weights"] == 2


@pytest.mark.parametrize("variant", ["clip-llama-pargo", "siglip-qwen2-pargo", "clip-gpt2-pargo", "clip-llama-mlp"])
def test_training_flops_match_autograd_forward_backward(variant):
    """The multipliers are what autograd really runs: FlopCounterMode over forward + backward
    of every stage equals model_flops_per_sample (minus the forward-only rotary bmm)."""
    model = tiny_model(**VARIANTS[variant]).train()
    ids, px = batch(model, extra_text=20)
    for stage in ("align", "finetune", "full"):
        model.freeze(stage)
        model.zero_grad(set_to_none=True)
        fcm = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), fcm:
            model(input_ids=ids, pixel_values=px, labels=ids).loss.backward()
        measured = fcm.get_total_flops() - part_counts(fcm)["rotary"]
        assert measured == model_flops_per_sample(model, ids.shape[1]), (variant, stage)


def test_paper_scale_closed_forms_on_meta_device():
    from pargo_dist.models import ParGoConfig, ParGoForConditionalGeneration
    from pargo_dist.models.presets import preset

    with torch.device("meta"):
        model = ParGoForConditionalGeneration(ParGoConfig(**preset("paper")))
    S = 1024
    fwd = forward_flops(model, S)

    # LLM: 2 x non-embedding parameters per token (lm_head included: it is a matmul per token;
    # norms are a rounding error) + attention 2 * 2 * S * (heads * head_dim) per layer.
    lm = model.language_model
    non_embedding = sum(p.numel() for p in lm.parameters()) - lm.get_input_embeddings().weight.numel()
    H, I, L, heads, kv, V = 4096, 14336, 32, 32, 8, 92544
    attention_per_token = L * 4 * S * H
    assert fwd["language_model"] / S == pytest.approx(2 * non_embedding + attention_per_token, rel=0.01)
    hd = H // heads  # Llama shapes written out: q, k, v, o, gate/up/down, lm_head
    per_token = L * (H * H + 2 * H * kv * hd + H * H + 3 * H * I) + H * V
    assert fwd["language_model"] == 2 * S * per_token + L * 4 * S * S * H

    # Vision: CLIP-L/14 at 336 px, 577 tokens (576 patches + CLS), all 24 blocks used.
    D, Iv, Lv, T, N = 1024, 4096, 24, 577, 576
    vision = Lv * (2 * T * (4 * D * D + 2 * D * Iv) + 4 * T * T * D) + 2 * N * (3 * 14 * 14) * D
    assert fwd["vision_tower"] == vision
    assert 370e9 < vision < 390e9  # the figure quoted in the module docstring

    # ParGo projector, paper defaults: 288 partial + 16 global queries, 4 layers of width 512.
    P, G, W, Fw, depth = 288, 16, 512, 2048, 4
    Q = P + G
    layer = (2 * Q * (3 * W * W + W * W)  # self-attention qkv + out
             + 4 * Q * Q * W  # self-attention scores and values
             + 2 * Q * W * W + 2 * N * D * 2 * W + 2 * Q * W * W  # cross q, kv (on patches), out
             + 4 * (P * (N // P) + G * N) * W  # each partial query sees N/P patches, globals all
             + 2 * Q * 2 * W * Fw)  # FFN
    assert fwd["projector"] == depth * layer + 2 * Q * W * H
    # align at this scale: the frozen LLM still costs ~2x its forward, the vision tower 1x.
    model.freeze("align")
    total = model_flops_per_sample(model, S)
    assert 2 * fwd["language_model"] < total < 2.1 * fwd["language_model"]


def test_flops_input_validation_and_wrappers():
    model = tiny_model()
    with pytest.raises(ValueError):
        forward_flops(model, -1)
    with pytest.raises(ValueError):
        forward_flops(model, 10, crops=0)
    with pytest.raises(TypeError, match="not a ParGo model"):
        forward_flops(nn.Linear(2, 2), 10)

    class Wrapper(nn.Module):  # DDP / DeepSpeed engines expose the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert forward_flops(Wrapper(model), 30) == forward_flops(model, 30)
    # Half the samples text-only: vision and projector scale, the LLM does not.
    half, full = forward_flops(model, 30, images_per_sample=0.5), forward_flops(model, 30)
    assert half["vision_tower"] == full["vision_tower"] / 2 and half["language_model"] == full["language_model"]


# ----------------------------------------------------------------------------- MFU


def test_mfu_and_peak_flops(monkeypatch):
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)
    with pytest.raises(ValueError):
        peak_flops_per_device("int3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops_per_device("bf16") is None  # CPU: MFU not reported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, dtype, peak in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5e12),  # TF32 off (PyTorch's default)
        ("Tesla T4", "bf16", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops_per_device(dtype) == peak, (name, dtype)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on
    assert peak_flops_per_device("fp32") == 156e12
