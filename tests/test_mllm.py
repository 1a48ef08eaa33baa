"""ParGo MLLM: splicing, padding, generation, HF round trip, vision tower, from_components."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN, TINY_TEXT, TINY_VISION, tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from pargo_dist.constants import IGNORE_INDEX
from pargo_dist.models import ParGoForConditionalGeneration, VisionTower, insert_image_tokens
from pargo_dist.models.vision import vision_config_from

PAD = 0


def prompt(model, text_before, text_after, images=1):
    ids = list(text_before) + [IMAGE_TOKEN] * images + list(text_after)
    return insert_image_tokens(ids, IMAGE_TOKEN, model.num_image_tokens())


def pad(seqs, side):
    width = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        fill = [PAD] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append([0] * len(fill) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def test_visual_tokens_reach_the_llm_causally(text_type):
    model = tiny_model(text_type)
    ids = torch.tensor([prompt(model, [5, 6, 7], [8, 9, 10])])
    first_image = 3
    px = torch.randn(1, 3, 32, 32)
    a = model(input_ids=ids, pixel_values=px).logits
    b = model(input_ids=ids, pixel_values=px + 1.0).logits
    delta = (a - b).abs().amax(-1)[0]
    assert torch.all(delta[:first_image] == 0)  # before the image: untouched
    assert torch.all(delta[first_image:] > 1e-4)  # image and everything after it sees the image
    # The spliced embeddings are exactly the projector's output, at the placeholder slots.
    emb = model.embed(ids, px)
    visual = model.encode_images(px)[0]
    torch.testing.assert_close(emb[0, first_image:first_image + visual.shape[0]], visual)


def test_labels_on_visual_tokens_are_ignored():
    model = tiny_model()
    ids = torch.tensor([prompt(model, [5, 6], [8, 9, 10, 11])])
    px = torch.randn(1, 3, 32, 32)
    labels = ids.clone()  # deliberately unmasked: the model must drop the image positions
    out = model(input_ids=ids, pixel_values=px, labels=labels)
    keep = (ids != IMAGE_TOKEN)[0, 1:]
    logits, targets = out.logits[0, :-1], ids[0, 1:]
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("text_type", ["llama", "qwen2", "gpt2"])
def test_padded_batch_matches_each_sample_alone(text_type, side):
    model = tiny_model(text_type)
    seqs = [prompt(model, [5, 6, 7], [8, 9]), prompt(model, [11], [12, 13, 14, 15, 16, 17])]
    px = torch.randn(2, 3, 32, 32)
    ids, mask = pad(seqs, side)
    batched = model(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        alone = model(input_ids=torch.tensor([s]), pixel_values=px[i:i + 1]).logits[0]
        rows = mask[i].bool()
        torch.testing.assert_close(batched[i][rows], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("text_type", ["llama", "qwen2", "gpt2"])
def test_batched_greedy_generation_matches_single(text_type):
    model = tiny_model(text_type)
    seqs = [prompt(model, [5, 6, 7], [8]), prompt(model, [11], [12, 13, 14])]
    px = torch.randn(2, 3, 32, 32)
    ids, mask = pad(seqs, "left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    batched = model.generate(ids, px, attention_mask=mask, **kw)
    assert batched.shape == (2, 6)  # new tokens only
    for i, s in enumerate(seqs):
        alone = model.generate(torch.tensor([s]), px[i:i + 1], **kw)
        assert batched[i].tolist() == alone[0].tolist()
        # Greedy means: every generated token is the argmax of a full forward pass.
        full = torch.tensor([s + alone[0].tolist()])
        logits = model(input_ids=full, pixel_values=px[i:i + 1]).logits[0]
        assert logits[len(s) - 1:-1].argmax(-1).tolist() == alone[0].tolist()


def test_beam_search_returns_the_best_scored_sequence():
    model = tiny_model()
    s = prompt(model, [5, 6], [7])
    px = torch.randn(1, 3, 32, 32)
    kw = dict(max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
    beam = model.generate(torch.tensor([s]), px, num_beams=4, do_sample=False, **kw)[0].tolist()
    greedy = model.generate(torch.tensor([s]), px, do_sample=False, **kw)[0].tolist()

    def logprob(cont):
        logits = model(input_ids=torch.tensor([s + cont]), pixel_values=px).logits[0]
        lp = logits[len(s) - 1:-1].log_softmax(-1)
        return lp.gather(1, torch.tensor(cont)[:, None]).sum().item()

    assert logprob(beam) >= logprob(greedy) - 1e-5


def test_save_and_load_roundtrip_gives_identical_logits(tmp_path, text_type):
    model = tiny_model(text_type)
    ids = torch.tensor([prompt(model, [5, 6], [8, 9])])
    px = torch.randn(1, 3, 32, 32)
    ref = model(input_ids=ids, pixel_values=px).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loader in (ParGoForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert type(loaded) is ParGoForConditionalGeneration
        assert torch.equal(loaded(input_ids=ids, pixel_values=px).logits, ref)
    assert AutoConfig.from_pretrained(tmp_path).projector == model.config.projector


@pytest.mark.parametrize(
    "projector,tokens",
    [
        ({"type": "mlp"}, 16),
        ({"type": "qformer", "num_global": 6, "depth": 2, "width": 32, "heads": 4, "ffn": 64}, 6),
        ({"num_partial": 4, "num_global": 2, "depth": 1, "width": 32, "heads": 4, "ffn": 64,
          "region": "window", "window": [2, 2], "cascade": [1]}, 6),
    ],
)
def test_projector_choice_by_config(tmp_path, projector, tokens):
    model = tiny_model(projector=projector)
    assert model.num_image_tokens() == tokens
    ids = torch.tensor([prompt(model, [5], [6])])
    px = torch.randn(1, 3, 32, 32)
    ref = model(input_ids=ids, pixel_values=px).logits
    model.save_pretrained(tmp_path)
    loaded = ParGoForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(input_ids=ids, pixel_values=px).logits, ref)


def test_placeholder_count_mismatch_is_a_clear_error():
    model = tiny_model()
    ids = torch.tensor([[5, IMAGE_TOKEN, 6]])  # one placeholder, not expanded to 10
    with pytest.raises(ValueError, match=r"1 image placeholder tokens .* the images give 10 visual tokens \(\(1, 10\)\)"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


def test_image_token_outside_vocab_is_rejected():
    with pytest.raises(ValueError, match="image_token_id=500 is outside the LLM vocabulary"):
        ParGoForConditionalGeneration(tiny_config(image_token_id=500))


def test_clip_tower_selects_penultimate_layer_and_drops_cls():
    config = vision_config_from(TINY_VISION["clip"])
    torch.manual_seed(0)
    tower = VisionTower.build(config, feature_layer=-2).eval()
    px = torch.randn(2, 3, 32, 32)
    feats = tower(px)
    hidden = tower.model(pixel_values=px, output_hidden_states=True).hidden_states
    assert feats.shape == (2, 16, 32)
    torch.testing.assert_close(feats, hidden[-2][:, 1:])
    normed = VisionTower(tower.model, feature_layer=-1, post_layernorm=True)(px)
    torch.testing.assert_close(normed, tower.model.vision_model.post_layernorm(hidden[-1][:, 1:]))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-2, 1, -1])
def test_the_tower_runs_only_the_blocks_its_features_need(kind, feature_layer):
    """Features from block k: the blocks past k do not run (no hook fires), the features and the
    gradients of a trained tower equal the whole encoder's, and the encoder keeps all its blocks."""
    torch.manual_seed(0)
    tower = VisionTower.build(vision_config_from(TINY_VISION[kind]), feature_layer=feature_layer, drop_cls=False,
                              trainable=True).eval()
    layers = tower.model.vision_model.encoder.layers
    ran = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    px = torch.randn(2, 3, 32, 32)
    feats = tower(px)
    used = feature_layer % (len(layers) + 1)
    assert ran == list(range(used)) and len(tower.model.vision_model.encoder.layers) == len(layers) == 2
    feats.square().sum().backward()
    got = {n: p.grad.clone() for n, p in tower.model.named_parameters() if p.grad is not None}
    tower.zero_grad(set_to_none=True)
    whole = tower.model(pixel_values=px, output_hidden_states=True).hidden_states[feature_layer]
    torch.testing.assert_close(feats, whole)
    whole.square().sum().backward()
    want = {n: p.grad for n, p in tower.model.named_parameters() if p.grad is not None and p.grad.any()}
    assert want and set(want) <= set(got)
    for name, grad in want.items():  # the same blocks, the same ops: a replay (bit-equal), so a tight tolerance
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6)


def test_siglip_tower_has_no_cls_to_drop():
    torch.manual_seed(0)
    tower = VisionTower.build(vision_config_from(TINY_VISION["siglip"]), feature_layer=-1).eval()
    px = torch.randn(1, 3, 32, 32)
    hidden = tower.model(pixel_values=px, output_hidden_states=True).hidden_states
    torch.testing.assert_close(tower(px), hidden[-1])
    model = tiny_model(vision="siglip")
    ids = torch.tensor([prompt(model, [5], [6])])
    assert model(input_ids=ids, pixel_values=px).logits.shape == (1, 12, 128)


def test_crops_are_concatenated_crop_major():
    model = tiny_model()
    crops = torch.randn(1, 3, 3, 32, 32)  # one image, three crops
    feats = model.vision_tower(crops)
    assert feats.shape == (1, 48, 32)
    for c in range(3):
        torch.testing.assert_close(feats[:, 16 * c:16 * (c + 1)], model.vision_tower(crops[:, c]))
    assert model.encode_images(crops).shape == (1, 10, 48)  # 48 patches -> 8 regions of 6


def test_from_components_loads_pretrained_parts(tmp_path):
    torch.manual_seed(3)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT["qwen2"]))
    llm.save_pretrained(tmp_path / "llm")
    tower = VisionTower.build(vision_config_from(TINY_VISION["clip"]))
    tower.model.save_pretrained(tmp_path / "vision")

    model = ParGoForConditionalGeneration.from_components(
        tmp_path / "vision", tmp_path / "llm", projector={"num_partial": 8, "num_global": 2, "depth": 1,
        "width": 32, "heads": 4, "ffn": 64}, image_token_id=IMAGE_TOKEN).eval()
    text = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(input_ids=text).logits, llm.eval()(input_ids=text).logits)
    px = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.vision_tower.model(pixel_values=px).last_hidden_state,
                               tower.model.eval()(pixel_values=px).last_hidden_state)


def _trainable(model):
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "stage,trains",
    [("align", {"projector"}), ("finetune", {"projector", "language_model"}),
     ("full", {"projector", "language_model", "vision_tower"})],
)
def test_stage_freezing_and_backward_reach(stage, trains):
    model = tiny_model().train()
    model.freeze(stage)
    assert _trainable(model) == trains
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in trains), name
    ids = torch.tensor([prompt(model, [5, 6], [7, 8, 9])])
    model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids).loss.backward()
    reached = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert reached == trains
    for part in trains:  # each trainable part gets a real, non-zero gradient
        grads = [p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(part) and p.grad is not None]
        assert sum(grads) > 0


def test_unknown_stage_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown stage 'stage1'; valid stages: \['align', 'finetune', 'full'\]"):
        tiny_model().freeze("stage1")


def test_text_only_training_batch_still_runs_vision_and_projector():
    """ZeRO-3 safety: every rank must run the same modules, even on a batch with no image."""
    model = tiny_model().train()
    model.freeze("full")
    ids = torch.tensor([[5, 6, 7, 8]])
    calls = []
    model.projector.register_forward_hook(lambda *a: calls.append("projector"))
    model.vision_tower.register_forward_hook(lambda *a: calls.append("vision"))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert calls == ["vision", "projector"]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.projector.parameters())
    model.eval()  # inference skips the unnecessary work
    calls.clear()
    plain = model(input_ids=ids, labels=ids)
    assert calls == [] and torch.allclose(plain.loss, out.loss)


def test_new_model_has_frozen_vision_tower_in_eval_mode():
    model = tiny_model().train()
    assert _trainable(model) == {"projector", "language_model"}
    assert model.projector.training and not model.vision_tower.model.training
    model.freeze("full")
    assert model.vision_tower.model.training
    model.freeze("align")
    assert not model.vision_tower.model.training


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.freeze("finetune")
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            assert model.projector.gradient_checkpointing and model.language_model.model.gradient_checkpointing
        calls = []
        model.projector.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
        ids = torch.tensor([prompt(model, [5, 6], [7, 8, 9])])
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
              labels=ids).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("projector") for n in grads[0])
    for name in grads[0]:  # the recomputation replays the same ops (bit-equal): a tight tolerance
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("text_type", ["llama", "qwen2", "gpt2"])
def test_a_right_padded_batch_trains_with_plain_causal_attention(text_type, monkeypatch):
    """Batch.causal_only: a right-padded batch's mask becomes all ones, so transformers runs SDPA
    with is_causal and no (b, 1, s, s) mask (the flash kernel on a GPU); loss and gradients are
    the masked batch's. A left-padded batch keeps its mask.

    Two SDPA kernels for the same function: compared in float64 (HF still takes its loss in
    float32 from logits equal to ~1e-15), to 1e-10 on any CPU; a padding key that leaked into a
    real query would move them by ~1e-2."""
    from pargo_dist.batch import Batch, count_targets

    model = tiny_model(text_type).double()
    model.freeze("full")
    model.eval()  # no dropout (gpt2 has some): both passes must see the same function
    seqs = [prompt(model, [5, 6, 7], [8, 9]), prompt(model, [11], [12, 13, 14, 15, 16, 17])]
    ids, mask = pad(seqs, "right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = Batch(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32),
                  num_targets=count_targets(labels))
    causal = batch.causal_only()
    assert bool(causal.attention_mask.all()) and batch.attention_mask is mask  # a copy; the batch as it was

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    results = []
    for b in (batch, causal):
        model.zero_grad(set_to_none=True)
        seen.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        loss = model(**b.model_inputs()).loss
        monkeypatch.undo()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        list(seen)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-10, atol=1e-10)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert grads0[name].dtype == torch.float64, name
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-10, atol=1e-10, msg=name)
    llm_calls = calls1[-model.config.text_config.num_hidden_layers:]  # the LLM's layers run last
    assert llm_calls and all(no_mask and is_causal for no_mask, is_causal in llm_calls), calls1
    assert not all(no_mask for no_mask, _ in calls0[-len(llm_calls):])  # with the real mask: a 4-D mask

    left_ids, left_mask = pad(seqs, "left")
    left = Batch(input_ids=left_ids, labels=left_ids, attention_mask=left_mask)
    assert left.causal_only() is left
    assert Batch(input_ids=ids, labels=labels).causal_only().attention_mask is None  # packed rows: as they are
