"""Sample encoding: image preprocessing vs the HF processors, prompts and labels, padding, packing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

from pargo_dist.data.collate import Collator
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.prompt import PromptBuilder
from pargo_dist.data.schema import IMAGE_MARKER, BadSample, make_sample
from pargo_dist.data.tokenizer import ASSISTANT, build_word_tokenizer, image_token_id
from pargo_dist.constants import IGNORE_INDEX

WORDS = ["a", "red", "blue", "square", "circle", "is", "there", "yes", "no", "?", ".", "Describe", "the",
         "image", "in", "detail", "and", "left", "right"]


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS)


@pytest.mark.parametrize("w,h", [(50, 37), (37, 80), (64, 64), (20, 20)])
def test_preprocessing_matches_clip_image_processor(w, h):
    hf = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = ImagePreprocessor.from_hf(hf)
    img = noise_image(w, h)
    ref = torch.from_numpy(hf(img, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(ours(img), ref, atol=1e-5, rtol=1e-5)


def test_preprocessing_matches_siglip_image_processor():
    hf = SiglipImageProcessor(size={"height": 32, "width": 32})
    ours = ImagePreprocessor.from_hf(hf)
    img = noise_image(45, 70, seed=2)
    ref = torch.from_numpy(hf(img, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(ours(img), ref, atol=1e-5, rtol=1e-5)


def test_jpeg_draft_mode_decodes_smaller_but_never_below_the_needed_size():
    big = encoded(noise_image(1024, 768), "JPEG")
    pre = ImagePreprocessor(size=64, resize_to=64)
    img = pre.decode(big)
    assert img.size[1] >= 64 and img.size[0] < 1024  # decoded at 1/8 scale: 128 x 96
    assert pre.load(big).shape == (1, 3, 64, 64)  # (crops, 3, H, W): one view unless data.image asks for tiles
    small = ImagePreprocessor(size=512, resize_to=512).decode(big)
    assert small.size == (1024, 768)  # no draft when the image is not at least 2x the need


def test_word_tokenizer_round_trips_text(tok):
    text = "Describe the image in detail. a red square and a blue circle."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok(IMAGE_MARKER, add_special_tokens=False)["input_ids"]) == 1
    assert tok.unk_token_id not in tok(text)["input_ids"]


def test_caption_prompt_labels_only_the_caption(tok):
    build = PromptBuilder(tok, num_image_tokens=5, max_len=64)
    ids, labels = build("a red square .", [], crops=1)
    img = image_token_id(tok)
    assert ids.count(img) == 5 and labels.count(IGNORE_INDEX) >= 5
    answer = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer) == "a red square ." + tok.eos_token  # caption then EOS, nothing else
    first_label = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert ids[first_label - 1] == tok.convert_tokens_to_ids(ASSISTANT)


def test_conversation_labels_every_answer_and_inserts_a_missing_marker(tok):
    build = PromptBuilder(tok, num_image_tokens=3, max_len=64)
    messages = [{"role": "user", "content": "is there a red square ?"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "is there a blue circle ?"}, {"role": "assistant", "content": "no"}]
    ids, labels = build("", messages, crops=1)
    answer = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert answer == "yes</s> no</s>"
    assert tok.unk_token_id not in ids
    assert ids.count(image_token_id(tok)) == 3
    assert ids.index(image_token_id(tok)) < ids.index(tok.convert_tokens_to_ids("▁red"))  # before the question


def test_prompt_rejections_name_the_reason(tok):
    build = PromptBuilder(tok, num_image_tokens=10, max_len=24)
    with pytest.raises(BadSample, match="marker_without_image"):
        build("", [{"role": "user", "content": f"{IMAGE_MARKER} a"}, {"role": "assistant", "content": "yes"}], False)
    with pytest.raises(BadSample, match="too_long"):  # the image alone does not fit
        PromptBuilder(tok, num_image_tokens=30, max_len=24)("a red square .", [], True)
    long_caption = " ".join(["red"] * 40)
    ids, labels = build(long_caption, [], True)  # the tail is cut, the image is kept whole
    assert len(ids) == 24 and ids.count(image_token_id(tok)) == 10
    with pytest.raises(BadSample, match="empty_text"):
        make_sample("x", b"", caption="  ")


def _examples(tok, n=3, T=10):
    build = PromptBuilder(tok, num_image_tokens=T, max_len=64)
    caps = ["a red square .", "a blue circle and a red square .", "yes ."][:n]
    out = []
    for i, cap in enumerate(caps):
        ids, labels = build(cap, [], True)
        out.append({"id": f"e{i}", "input_ids": ids, "labels": labels,
                    "pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))})
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_collator(tok, side):
    ex = _examples(tok)
    batch = Collator(pad_id=tok.pad_token_id, padding_side=side, pad_to_multiple_of=8)(ex)
    lengths = [len(e["input_ids"]) for e in ex]
    assert batch.input_ids.shape == (3, -(-max(lengths) // 8) * 8)
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.num_samples == 3 and batch.num_tokens == sum(lengths)
    # the loss's answer tokens, counted on the CPU at collate time: each sample's labels past its first
    assert batch.num_targets == sum(sum(lab != IGNORE_INDEX for lab in e["labels"][1:]) for e in ex) > 0
    for row, e in zip(range(3), ex):
        kept = batch.input_ids[row][batch.attention_mask[row].bool()]
        assert kept.tolist() == e["input_ids"]
    assert batch.pixel_values.shape == (3, 3, 32, 32)


def test_packed_batch_gives_each_sample_the_logits_and_loss_it_has_alone(tok):
    from conftest import IMAGE_TOKEN

    model = tiny_model("llama")
    ex = _examples(tok)
    for e in ex:  # the tiny model's placeholder id
        e["input_ids"] = [IMAGE_TOKEN if t == image_token_id(tok) else t for t in e["input_ids"]]
    total = sum(len(e["input_ids"]) for e in ex)
    packed = Collator(pad_id=0, pack=True, max_len=total + 16, pad_to_multiple_of=16)(ex)
    width = -(-total // 16) * 16
    assert width > total  # trailing padding is exercised
    assert packed.input_ids.shape == (1, width) and packed.attention_mask is None
    out = model(**packed.model_inputs())
    start = 0
    token_losses = []
    placed = sorted(ex, key=lambda e: packed.sample_ids.index(e["id"]))  # row order (longest first)
    assert [e["id"] for e in placed] == ["e1", "e0", "e2"]
    for e in placed:
        k = len(e["input_ids"])
        alone = Collator(pad_id=0)([e])
        ref = model(**alone.model_inputs())
        torch.testing.assert_close(out.logits[0, start:start + k], ref.logits[0], atol=1e-5, rtol=1e-4)
        token_losses.append(ref.loss * (torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum())
        start += k
    n_targets = sum((torch.tensor(e["labels"][1:]) != IGNORE_INDEX).sum() for e in ex)
    torch.testing.assert_close(out.loss, sum(token_losses) / n_targets, atol=1e-5, rtol=1e-5)
    assert packed.num_targets == int(n_targets)  # no target lost or added across sample boundaries


def test_packing_keeps_the_sample_count_and_splits_rows(tok):
    ex = _examples(tok)
    lengths = [len(e["input_ids"]) for e in ex]
    batch = Collator(pad_id=0, pack=True, max_len=lengths[0] + lengths[1])(ex)
    assert batch.input_ids.shape[0] == 2 and batch.num_samples == 3
    assert batch.sample_ids == ["e1", "e0", "e2"]  # first fit, longest first: e1 and e0 fill row 0 exactly
    assert batch.position_ids[0, lengths[1]].item() == 0  # positions restart per sample
    assert batch.labels[0, lengths[1]].item() == IGNORE_INDEX  # no cross-sample target
    with pytest.raises(ValueError, match="e1 has .* tokens > max_len 5"):
        Collator(pad_id=0, pack=True, max_len=5)(ex[1:])
