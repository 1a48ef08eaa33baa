"""LoRA on the LLM (model.lora): what trains, merged == unmerged, ZeRO-3 on 2 ranks with exact
resume, checkpoints of adapters + projector only, and both export forms against the trained model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support.pretrained import save_hub_style
from support.training import run_train, write_recipe

from pargo_dist import build
from pargo_dist.config import ConfigError, load_config


def lora_model(recipe, overrides=()):
    cfg = load_config(recipe, ["model.lora.r=4", "model.lora.alpha=8", *overrides])
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    build.init_freeze_and_adapt(model, cfg)
    return cfg, tokenizer, model


def logits_of(model, tokenizer, cfg, seed: int = 0) -> torch.Tensor:
    from pargo_dist.models.mllm import insert_image_tokens

    gen = torch.Generator().manual_seed(seed)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = insert_image_tokens([2, image_id, *torch.randint(10, 60, (12,), generator=gen).tolist()], image_id,
                              model.num_image_tokens())
    side = model.vision_tower.image_size
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=torch.randn(1, 3, side, side, generator=gen)).logits


def test_lora_trains_the_adapters_and_the_projector_only(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    cfg, _, model = lora_model(recipe)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n: k for n, k in trained.items() if not n.startswith("projector.")}
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters)
    # 2 layers x (q 64->64, k 64->32, v 64->32, o 64->64) at rank 4: r * (in + out) each
    assert sum(adapters.values()) == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in adapters} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sum(k for n, k in trained.items() if n.startswith("projector.")) == \
        sum(p.numel() for p in model.projector.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    _, _, only_q = lora_model(recipe, ["model.lora.target_modules=[q_proj]"])
    assert {n for n, p in only_q.named_parameters() if p.requires_grad and "lora_A" in n} == {
        f"language_model.base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight" for i in (0, 1)}


def test_merged_logits_equal_the_adapted_model(tmp_path, data_dir):
    from pargo_dist.models.lora import merge

    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    cfg, tokenizer, model = lora_model(recipe)
    base = logits_of(model, tokenizer, cfg)  # lora_B starts at zero: the adapters change nothing yet
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.5)
    adapted = logits_of(model, tokenizer, cfg)
    assert (adapted - base).abs().max() > 1e-2
    merge(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits_of(model, tokenizer, cfg), adapted, rtol=1e-5, atol=1e-5)


def test_lora_config_errors_say_what_to_change(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    with pytest.raises(ConfigError, match="model.lora.r=8 is for train.stage=finetune"):
        load_config(recipe, ["model.lora.r=8", "train.stage=align"])
    with pytest.raises(ConfigError, match="model.lora needs backend.name=deepspeed"):
        load_config(recipe, ["model.lora.r=8", "backend.name=megatron"])
    with pytest.raises(ConfigError, match="unknown key 'model.lora.rank'.*valid keys in section 'model.lora': r, "):
        load_config(recipe, ["model.lora.rank=8"])
    with pytest.raises(ValueError, match="model.lora: Target modules .*wqkv.* not found"):
        lora_model(recipe, ["model.lora.target_modules=[wqkv]"])


def test_lora_zero3_resumes_exactly_and_exports_merged_or_adapters(tmp_path, data_dir):
    """2 ranks, ZeRO-3, a pretrained LLM (bf16 safetensors) partitioned as it is read: the
    checkpoint holds adapters + projector (and their Adam state) only; a resume (from what a kill
    after step 2 leaves) continues the loss curve exactly; the merged export and the adapters
    export both give the trained model's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from pargo_dist.export.hf import export
    from pargo_dist.models import ParGoForConditionalGeneration
    from pargo_dist.backends.trained_weights import checkpoint_weights

    run = tmp_path / "run"
    llm = [f"model.llm.path={save_hub_style(tmp_path / 'llm', 'llama')}", "model.llm.config={}"]
    recipe = write_recipe(tmp_path / "recipe.yaml", run, data_dir)
    args = ["model.lora.r=4", "model.lora.alpha=8", "train.steps=3", "checkpoint.every=1", "optim.lr=1e-2",
            "backend.zero_init=true", *llm]
    out = run_train(recipe, args, nproc=2)
    assert "ZeRO-3: the pretrained LLM is partitioned as it is read" in out.stdout
    step3 = run / "checkpoints" / "step_00000003"
    state = checkpoint_weights(step3)
    assert state and all(".lora_" in k or k.startswith("projector.") for k in state)
    shutil.rmtree(step3)
    run_train(recipe, args, nproc=2)  # resumes at step 2
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    third = [r["train/loss"] for r in rows if r.get("step") == 3 and "train/loss" in r]
    assert len(third) == 2 and third[1] == pytest.approx(third[0], rel=1e-6)

    cfg, tokenizer, trained = lora_model(recipe, ["model.lora.r=4", *llm])
    missing, unexpected = trained.load_state_dict(checkpoint_weights(step3), strict=False)
    assert not unexpected and all(".lora_" not in k and not k.startswith("projector.") for k in missing)
    want = logits_of(trained, tokenizer, cfg)
    merged = ParGoForConditionalGeneration.from_pretrained(export(run, tmp_path / "merged"))
    torch.testing.assert_close(logits_of(merged, tokenizer, cfg), want, rtol=1e-5, atol=1e-5)

    adapters = export(run, tmp_path / "adapters", adapters_only=True)
    base = build.build_model(cfg, tokenizer)  # the recipe's own LLM and tower, no adapters
    base.language_model = PeftModel.from_pretrained(base.language_model, adapters / "llm_adapter")
    base.load_state_dict(load_file(adapters / "projector.safetensors"), strict=False)
    torch.testing.assert_close(logits_of(base, tokenizer, cfg), want, rtol=1e-5, atol=1e-5)
    assert (logits_of(build.build_model(cfg, tokenizer), tokenizer, cfg) - want).abs().max() > 1e-3
