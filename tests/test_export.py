"""`pargo-dist export` written one block at a time: the same tensors as the model rebuilt whole
with the checkpoint loaded over it, in shards with an index, and never more than one decoder
layer of the pretrained LLM in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support.pretrained import save_hub_style
from support.training import run_train, write_recipe

from pargo_dist import build
from pargo_dist.checkpoint.manager import resolve_checkpoint
from pargo_dist.config import load_config
from pargo_dist.export.hf import StreamedModel, block_of, export
from pargo_dist.backends.trained_weights import load_trained_weights


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_dir):
    """2 ranks, ZeRO-3 partitioned as read, a pretrained Qwen2 (tied embeddings, q/k/v biases,
    bf16 safetensors): two finetune steps, so the LLM and the projector differ from their start."""
    tmp = tmp_path_factory.mktemp("export")
    recipe = write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir)
    run_train(recipe, [f"model.llm.path={save_hub_style(tmp / 'llm', 'qwen2')}", "model.llm.config={}",
                       "train.steps=2", "checkpoint.every=2", "data.eval=null", "optim.lr=1e-2",
                       "backend.zero_init=true"], nproc=2)
    return tmp / "run"


def rebuilt_whole(run):
    """What export wrote before it streamed: the whole model rebuilt, the checkpoint loaded over it."""
    step_dir = resolve_checkpoint(run)
    cfg = load_config(step_dir / "config.yaml")
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    build.init_freeze_and_adapt(model, cfg)
    load_trained_weights(model, step_dir)
    return model


def test_the_shards_hold_what_the_whole_rebuild_holds(finetuned, tmp_path):
    from pargo_dist.models import ParGoForConditionalGeneration

    whole = rebuilt_whole(finetuned)
    want = whole.state_dict()
    out = export(finetuned, tmp_path / "out", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    got = {}
    for name, file in index["weight_map"].items():
        with safe_open(out / file, framework="pt") as f:
            got[name] = f.get_tensor(name)
    assert sum(t.numel() * t.element_size() for t in got.values()) == index["metadata"]["total_size"]
    tied = {"language_model.lm_head.weight"}  # Qwen2 ties it to the input embedding, as save_pretrained drops it
    assert set(got) == set(want) - tied
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name

    loaded = ParGoForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.language_model(ids).logits, whole.eval().language_model(ids).logits,
                                   rtol=0, atol=0)
    half = export(finetuned, tmp_path / "half", dtype="bf16")
    with safe_open(half / "model.safetensors", framework="pt") as f:
        name = "language_model.model.layers.1.mlp.down_proj.weight"
        assert torch.equal(f.get_tensor(name), want[name].bfloat16())


def test_at_most_one_decoder_layer_of_the_llm_is_in_memory(finetuned):
    """While tensors are handed to the writer, the LLM's materialised (non-meta) parameters
    never exceed one block: the 70B case is the same loop with bigger layers."""
    step_dir = resolve_checkpoint(finetuned)
    cfg = load_config(step_dir / "config.yaml")
    streamed = StreamedModel(cfg, step_dir, build.build_tokenizer(cfg))
    llm = streamed.model.language_model
    total = sum(p.numel() for p in llm.parameters())
    blocks: dict[str, int] = {}
    for name, p in llm.named_parameters():
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + p.numel()
    live = []
    for _name, _tensor in streamed.tensors():
        live.append(sum(p.numel() for p in llm.parameters() if not p.is_meta))
    assert max(live) <= max(blocks.values()) < total / 2
    assert all(p.is_meta for p in llm.parameters())  # and every block went back after it was written
