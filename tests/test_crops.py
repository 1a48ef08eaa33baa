"""data.image.crops: images cut into tiles (+ a thumbnail), batches that mix crop counts.

References: the tiles are compared with the image cut by hand (PIL) and preprocessed as one
crop; the grid's visual tokens with the projector fed the tower's features of the hand-cut
crops concatenated; a batch that mixes crop counts with each sample run alone (its own
unpadded batch of one). Masked keys get exactly zero weight, so only float summation order
differs: 1e-5.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model
from PIL import Image

from pargo_dist.build import visual_tokens
from pargo_dist.config import ConfigError, load_config
from pargo_dist.data.collate import Collator
from pargo_dist.data.crops import CropPolicy, ImageConfig, best_grid
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.errors import UserError
from pargo_dist.models import insert_image_tokens


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def policy(crops, **kw) -> CropPolicy:
    return CropPolicy.from_config(ImageConfig(crops=crops, **kw))


# ----------------------------------------------------------------------------- the policy


def test_dynamic_grids_follow_the_aspect_ratio_and_the_pixels_available():
    assert best_grid(1000, 500, 336, 1, 6) == (2, 1)  # 2:1, and 2x1 is the only 2:1 grid within 6 tiles
    assert best_grid(500, 1000, 336, 1, 6) == (1, 2)
    assert best_grid(1200, 400, 336, 1, 6) == (3, 1)
    assert best_grid(900, 900, 336, 1, 6) == (2, 2)  # square: 2x2 has the pixels (>= half a tile each)
    assert best_grid(300, 300, 336, 1, 6) == (1, 1)  # too small to be blown up into 4 tiles
    assert best_grid(2000, 2000, 336, 1, 9) == (3, 3)
    assert best_grid(900, 900, 336, 2, 6) == (2, 2)  # min_tiles: never a single view
    assert best_grid(300, 300, 336, 2, 6) == (2, 2)  # (even when small: the closest allowed)
    p = policy("dynamic", max_tiles=6)
    assert p.possible_counts() == [1, 3, 4, 5, 6, 7]  # >1 tile adds the thumbnail
    assert policy("2x2").possible_counts() == [5] and policy("2x2", thumbnail=False).possible_counts() == [4]
    assert policy(1).possible_counts() == policy("1x1").possible_counts() == [1]


@pytest.mark.parametrize("bad", ["3", "2*2", "0x2", "auto"])
def test_a_bad_crops_setting_names_the_key_and_the_choices(bad):
    with pytest.raises(ConfigError, match=r"data.image.crops=.*must be 1, a grid COLSxROWS .* or 'dynamic'"):
        load_config(None, [f"data.image.crops={bad}"])


def test_window_regions_cannot_take_a_crop_count_that_does_not_tile_them():
    model = tiny_model(projector={"num_partial": 8, "num_global": 2, "depth": 1, "width": 32, "heads": 4,
                                  "ffn": 64, "region": "window", "window": [2, 1]})  # 8 windows per crop
    cfg = load_config(None, ["data.image.crops=dynamic", "data.image.max_tiles=4"])
    with pytest.raises(UserError, match="data.image.crops='dynamic' gives images of 3 crops, which the projector"):
        visual_tokens(cfg, model)


# ----------------------------------------------------------------------------- pixels


def test_grid_tiles_are_the_resized_image_cut_by_hand_then_the_thumbnail():
    img = photo(90, 50)
    pre = ImagePreprocessor(size=32, resize_to=32, crops=policy("2x2"))
    out = pre.views(img)
    assert out.shape == (5, 3, 32, 32)
    big = img.resize((64, 64), Image.BICUBIC)
    single = ImagePreprocessor(size=32, resize_to=None)  # normalises an already 32 px tile unchanged in size
    for i, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # raster order
        tile = big.crop((32 * col, 32 * row, 32 * col + 32, 32 * row + 32))
        torch.testing.assert_close(out[i], single(tile), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[4], pre(img))  # the thumbnail: exactly the one-crop view


def test_load_picks_the_grid_from_the_stored_size_before_jpeg_draft_decoding():
    buf = io.BytesIO()
    photo(1200, 400).save(buf, format="JPEG", quality=90)
    pre = ImagePreprocessor(size=32, resize_to=32, crops=policy("dynamic", max_tiles=6))
    assert pre.tiles_for(1200, 400) == (3, 1)
    assert pre.load(buf.getvalue()).shape == (4, 3, 32, 32)  # 3 tiles + thumbnail
    assert pre.crop_count(1200, 400) == 4


def test_the_loader_hands_on_uint8_pixels_that_normalize_to_the_float_preprocessing():
    buf = io.BytesIO()
    photo(90, 50).save(buf, format="JPEG", quality=90)
    pre = ImagePreprocessor(size=32, resize_to=32, crops=policy("2x2"))
    raw = pre.load(buf.getvalue(), normalize=False)
    assert raw.dtype == torch.uint8 and raw.shape == (5, 3, 32, 32)
    example = {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "pixel_values": raw}
    batch = Collator(pad_id=0, pixel_mean=pre.mean, pixel_std=pre.std)([example])
    assert batch.pixel_values.dtype == torch.uint8  # a quarter of float32's bytes to the workers' shm and the GPU
    torch.testing.assert_close(batch.pixels(), pre.load(buf.getvalue()), rtol=0, atol=0)
    torch.testing.assert_close(batch.model_inputs()["pixel_values"], batch.pixels(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8 pixel_values need pixel_mean and pixel_std"):
        Collator(pad_id=0)([example]).pixels()


# ----------------------------------------------------------------------------- the model


def test_a_2x2_grid_equals_the_projector_fed_the_four_crops_by_hand():
    # the same function, batched differently: in float64 (docs/architecture.md, tolerances), where
    # the kernels' rounding differs by ~1e-15 on any CPU and a crop out of place moves tokens by ~1
    model = tiny_model().double()
    crops = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    got = model.encode_images(crops, image_crops=[4])
    by_hand = model.projector(torch.cat([model.vision_tower(c[None]) for c in crops], dim=1))
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=1e-10)
    assert model.num_image_tokens(4) == got.shape[1] == 10  # ParGo: P + G tokens, whatever the crops


def _sample(model, crops: int, text: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = insert_image_tokens([3, 4, IMAGE_TOKEN, *text], IMAGE_TOKEN, model.num_image_tokens(crops))
    return {"input_ids": ids, "labels": ids, "pixel_values": torch.randn(crops, 3, 32, 32, generator=gen)}


@pytest.mark.parametrize("projector", ["pargo", "pargo-dense", "qformer", "mlp"])
def test_mixed_crop_counts_in_one_batch_give_each_sample_its_logits_alone(projector):
    base = {"num_partial": 8, "num_global": 2, "depth": 2, "width": 32, "heads": 4, "ffn": 64}
    settings = {"pargo": {}, "pargo-dense": {"cross_attn_impl": "dense"}, "qformer": {"type": "qformer"},
                "mlp": {"type": "mlp"}}
    model = tiny_model(projector={**base, **settings[projector]})
    crop_counts = [5, 1, 3, 5]
    samples = [_sample(model, c, list(range(5, 5 + 2 + 3 * i)), seed=i) for i, c in enumerate(crop_counts)]
    batch = Collator(pad_id=0)(samples)
    assert batch.image_crops == crop_counts
    assert batch.pixel_values.shape[0] == sum(crop_counts)
    together = model(**batch.model_inputs()).logits
    for i, s in enumerate(samples):
        alone = model(**Collator(pad_id=0)([s]).model_inputs()).logits[0]
        n = len(s["input_ids"])
        torch.testing.assert_close(together[i, :n], alone[:n], rtol=1e-5, atol=1e-5)


def test_mixed_crops_train_through_the_padding_without_a_gradient_from_it():
    """The padded patch rows of a short sample receive no gradient: its tokens do not depend on them."""
    model = tiny_model().train()
    samples = [_sample(model, c, [5, 6, 7], seed=c) for c in (1, 5)]
    batch = Collator(pad_id=0)(samples)
    pixels = batch.pixel_values.clone().requires_grad_(True)
    model.vision_tower.requires_grad_(True)
    out = model(**{**batch.model_inputs(), "pixel_values": pixels})
    out.logits[0].sum().backward()  # sample 0 (one crop) only
    grads = pixels.grad.flatten(1).abs().sum(1)
    assert grads[0] > 0 and torch.all(grads[1:] == 0)  # its own crop, never the other sample's


def test_the_planner_sizes_activations_and_flops_for_the_most_crops_an_image_can_get():
    from pargo_dist.models.flops import model_flops_per_sample
    from pargo_dist.plan.trace import shapes_of

    one = shapes_of(load_config(None, []))
    grid = shapes_of(load_config(None, ["data.image.crops=2x2"]))  # 4 tiles + thumbnail
    dynamic = shapes_of(load_config(None, ["data.image.crops=dynamic", "data.image.max_tiles=6"]))  # up to 7
    assert grid.act_bytes["vision"] == pytest.approx(5 * one.act_bytes["vision"], rel=1e-3)  # (+ what is per call)
    assert dynamic.act_bytes["vision"] == pytest.approx(7 * one.act_bytes["vision"], rel=1e-3)
    assert one.act_bytes["projector"] < grid.act_bytes["projector"] < dynamic.act_bytes["projector"]
    assert grid.visual_tokens == one.visual_tokens  # ParGo: P + G tokens whatever the crops
    model = tiny_model()
    assert model_flops_per_sample(model, 64, crops=3.0) == pytest.approx(
        (model_flops_per_sample(model, 64, crops=1) + model_flops_per_sample(model, 64, crops=5)) / 2)
    assert one.flops_per_sample < grid.flops_per_sample < dynamic.flops_per_sample


# ----------------------------------------------------------------------------- real ranks


SIZES = [(48, 48), (96, 48), (48, 96), (24, 24)]  # tower side 32, dynamic <= 4 tiles: 2x2 + thumb, 2x1 +
CROPS = [5, 3, 3, 1]  # thumb, 1x2 + thumb, one view (too small for more)


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """The synthetic captions with images of four shapes (so four crop counts), as MDS shards."""
    from streaming import MDSWriter

    from pargo_dist.data.schema import MDS_COLUMNS, make_sample
    from pargo_dist.data.synthetic import SyntheticConfig, encode_image, render_scene, synthetic_scene

    root = tmp_path_factory.mktemp("mixed_sizes")
    cfg = SyntheticConfig(num_samples=64, image_size=48)
    for split, indices in (("train", range(64)), ("val", range(8))):
        with MDSWriter(out=str(root / split), columns=MDS_COLUMNS) as out:
            for i in indices:
                scene = synthetic_scene(i, cfg)
                img = render_scene(scene, cfg).resize(SIZES[i % 4])
                out.write(make_sample(f"synthetic:{i}", encode_image(img, "png"), caption=scene["caption"]))
    return root


def test_two_rank_zero3_with_different_crop_counts_per_rank_follows_megatron_on_the_same_batches(mixed_sizes, tmp_path):
    """Every rank's tower and projector run once per micro-batch whatever its crop mix, so ZeRO-3's
    collective gathers line up; the loss (normalised by the global token count) is the one the
    megatron backend at TP=2 gets from one replica of the same 8 samples (both ranks read them all).

    The tower trains (train.stage=full, at 10x the rate so that its share of the curve shows), so
    ZeRO-3 partitions it too and reduces its gradients from ranks that ran different crop counts;
    its features come from block -2 of 2, so the last block runs (and is gathered) on no rank.
    Megatron keeps the tower whole on each rank and computes every sample in one replica: the
    gradient norm of step 1 (before any update) and the losses of steps 2-3 (after the tower
    moved) are those of the same fp32 model on the same batches, summed in another order (TP
    splits the matmuls, ZeRO averages two halves): measured equal losses and norms 3e-8 apart.
    rel=1e-5 is 100x fp32's summation noise and 5-20x below what the test must see: a tower frozen
    under ZeRO-3 alone moves the loss of steps 2-3 by 1.9e-4 and 1.0e-4, features of block -1
    instead of -2 by 6e-5 and 9e-5 (and a rank that runs other tower blocks than its peer breaks
    ZeRO-3's gathers: gloo stops on mismatched sizes)."""
    from support.training import losses, run_train, write_recipe

    common = ["data.image.crops=dynamic", "data.image.max_tiles=4", "data.synthetic.num_samples=0",
              "train.steps=3", "checkpoint.every=100", "train.sample_every=0", "train.eval_every=0",
              "train.stage=full", "optim.lr_vision=3.0e-2", "model.vision.config.num_hidden_layers=2",
              "model.vision.feature_layer=-2"]
    two = write_recipe(tmp_path / "two.yaml", tmp_path / "two", mixed_sizes)
    out = run_train(two, common, nproc=2)
    megatron = write_recipe(tmp_path / "tp2.yaml", tmp_path / "tp2", mixed_sizes)  # the same code path at TP=2
    run_train(megatron, [*common, "backend.name=megatron", "backend.tensor_parallel=2", "train.micro_batch=8"], nproc=2)
    assert "images: dynamic crops: 1-4 tiles by aspect ratio + a thumbnail (1-5 crops per image)" in out.stdout
    per_rank = [[json.loads(line)["ids"] for line in (tmp_path / "two" / f"sample_ids.rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    crops = [[sorted(CROPS[int(i.split(":")[1]) % 4] for i in step) for step in rank] for rank in per_rank]
    assert any(len(set(c)) > 1 for rank in crops for c in rank)  # micro-batches mix crop counts
    assert any(a != b for a, b in zip(*crops))  # and the two ranks' mixes differ
    a, b = losses(tmp_path / "two"), losses(tmp_path / "tp2")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a, b)
    norms = losses(tmp_path / "two", "train/grad_norm"), losses(tmp_path / "tp2", "train/grad_norm")
    assert norms[0][1] == pytest.approx(norms[1][1], rel=1e-5), norms
    for run in ("two", "tp2"):  # the tower is one of the parts that train (a group of its own or shared)
        first = json.loads((tmp_path / run / "train_log.jsonl").read_text().splitlines()[0])
        assert any(k.startswith("train/lr/") and "vision_tower" in k for k in first), (run, first)
    logged = losses(tmp_path / "two", "data/crops_per_image")  # the TensorBoard scalar, per step
    for step, (r0, r1) in enumerate(zip(*crops), start=1):
        assert logged[step] == pytest.approx(sum(r0 + r1) / len(r0 + r1))
