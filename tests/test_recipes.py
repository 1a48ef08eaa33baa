"""Every recipe in recipes/ loads, validates and builds on the meta device (no weights, no network),
and its LLM and vision tower have the published size of the model the recipe names.

A new recipe is picked up by the glob; it fails here until its published sizes are added to
PUBLISHED, so a typo in a hidden size cannot ship as "Llama-3-8B".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pargo_dist.backends.megatron.layout import check_layout
from pargo_dist.build import build_model, build_tokenizer, meta_model
from pargo_dist.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
CLIP_L_336 = 304e6  # CLIP ViT-L/14 at 336 px, vision transformer only (303.5M)

# Published total parameter counts (model cards / safetensors metadata), LLM and vision tower.
PUBLISHED: dict[str, dict[str, float]] = {
    "paper-stage1-align.yaml": {"llm": 7.74e9, "vision": CLIP_L_336},  # InternLM2-7B
    "paper-stage2-finetune.yaml": {"llm": 7.74e9, "vision": CLIP_L_336},
    "llama3-8b-stage2.yaml": {"llm": 8.03e9, "vision": CLIP_L_336},
    "qwen2.5-7b-stage2.yaml": {"llm": 7.62e9, "vision": CLIP_L_336},
    "qwen3-8b-stage2.yaml": {"llm": 8.19e9, "vision": CLIP_L_336},
    "qwen3-30b-a3b-stage2.yaml": {"llm": 30.53e9, "vision": CLIP_L_336},  # 128 experts, 8 active
    "qwen3-235b-a22b-stage2.yaml": {"llm": 235.09e9, "vision": CLIP_L_336},
    "qwen2.5-14b-stage2.yaml": {"llm": 14.77e9, "vision": CLIP_L_336},
    "qwen2.5-32b-stage2.yaml": {"llm": 32.76e9, "vision": CLIP_L_336},
    "llama3-70b-stage2.yaml": {"llm": 70.55e9, "vision": CLIP_L_336},
}
NOT_PUBLISHED = {"tiny-cpu.yaml"}  # random tiny model: nothing to compare with
PAPER = {"paper-stage1-align.yaml", "paper-stage2-finetune.yaml"}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=RECIPES, ids=[r.name for r in RECIPES])
def built(request):
    cfg = load_config(request.param)  # validates too
    return request.param, cfg, meta_model(cfg)


def test_recipes_are_found():
    assert {r.name for r in RECIPES} >= set(PUBLISHED) | NOT_PUBLISHED


def test_recipe_builds_on_meta_with_published_sizes(built):
    path, cfg, model = built
    assert all(p.device.type == "meta" for p in model.parameters())
    if path.name in NOT_PUBLISHED:
        return
    assert path.name in PUBLISHED, f"{path.name}: add its published LLM / vision sizes to PUBLISHED"
    for part, module in (("llm", model.language_model), ("vision", model.vision_tower)):
        measured, published = _count(module), PUBLISHED[path.name][part]
        assert abs(measured - published) / published < 0.01, f"{path.name} {part}: {measured:,} vs {published:,.0f}"


def test_recipe_header_and_settings(built):
    path, cfg, model = built
    if path.name in NOT_PUBLISHED:
        return
    header = path.read_text().split("\nrun:")[0]
    for line in ("what trains", "hardware", "batch", "expected time: ~",
                 f"(pargo-dist plan recipes/{path.name} --gpus"):
        assert line in header, f"{path.name}: the header needs {line!r}"
    assert cfg.train.precision == "bf16" and cfg.train.activation_checkpointing
    assert cfg.model.llm.path and cfg.model.vision.path, "real runs point at local HF directories"
    if cfg.backend.name == "deepspeed":  # ZeRO-3 up to ~30B, megatron beyond (DESIGN.md)
        assert _count(model.language_model) < 40e9, f"{path.name}: use backend.name=megatron beyond ~30B"
    if path.name in PAPER:
        assert model.num_image_tokens() == 304  # 288 partial + 16 global, one 24 x 24 crop
        assert model.projector.cfg.num_partial == 288 and model.projector.cfg.num_global == 16


def test_megatron_layout_divides_the_llm(built):
    path, cfg, model = built
    if cfg.backend.name != "megatron":
        return
    text, tp, pp = model.config.text_config, cfg.backend.tensor_parallel, cfg.backend.pipeline_parallel
    assert text.num_attention_heads % tp == 0 and text.num_key_value_heads % tp == 0
    assert text.num_hidden_layers % pp == 0
    check_layout(text, tp, pp)  # also intermediate size, vocab, rope scaling
    assert not cfg.data.train.pack


@pytest.mark.parametrize("key", ["model.llm.path", "model.vision.path"])
def test_build_model_names_a_missing_path(tmp_path, key):
    missing = tmp_path / "no-such-model"
    cfg = load_config(None, [f"{key}={missing}"])  # tiny-cpu: no other path to trip over first
    with pytest.raises(ValueError, match=f"{key}={missing} does not exist: point {key} at a local"):
        build_model(cfg, tokenizer=None)


def test_build_tokenizer_names_a_missing_dir(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    cfg = load_config(None, [f"model.tokenizer={missing}"])
    with pytest.raises(ValueError, match=f"model.tokenizer={missing} does not exist"):
        build_tokenizer(cfg)


def test_meta_model_reads_config_json_from_a_path(tmp_path):
    """No `config:` in the recipe: the path's config.json is read, and nothing else."""
    from transformers import AutoConfig

    cfg = load_config(None)
    llm_dir = tmp_path / "llm"
    values = dict(cfg.model.llm.config, vocab_size=96, image_token_id=7)
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(llm_dir)
    cfg.model.llm.config, cfg.model.llm.path, cfg.model.tokenizer = {}, str(llm_dir), str(llm_dir)
    model = meta_model(cfg)
    assert model.config.text_config.vocab_size == 96 and model.config.image_token_id == 7
    cfg.model.vision.config, cfg.model.vision.path = {}, str(tmp_path / "missing")
    with pytest.raises(ValueError, match="model.vision"):
        meta_model(cfg)


def test_build_model_pads_a_grown_vocabulary(tmp_path):
    """A tokenizer that gained <image> (Llama-3: 128256 + 1) resizes to a multiple of 64, so TP still splits it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pargo_dist.data.tokenizer import synthetic_tokenizer

    cfg = load_config(None)
    tok = synthetic_tokenizer()
    values = dict(cfg.model.llm.config, vocab_size=len(tok) - 1)
    llm_dir = tmp_path / "llm"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values)).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    cfg.model.llm.config, cfg.model.llm.path, cfg.model.tokenizer = {}, str(llm_dir), str(llm_dir)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    vocab = model.config.text_config.vocab_size
    assert vocab >= len(tok) and vocab % 64 == 0 and model.get_input_embeddings().num_embeddings == vocab
    check_layout(model.config.text_config, 2, 1)  # 4 heads, 2 KV heads: TP 2 at most here
