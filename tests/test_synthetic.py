"""The synthetic detail-caption dataset: determinism, faithful captions/QA/rendering, vocabulary, schema."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from pargo_dist.data.schema import IMAGE_MARKER, MDS_COLUMNS
from pargo_dist.data.synthetic import (
    CAPTION_PROMPT,
    COLOURS,
    KINDS,
    SyntheticConfig,
    held_out,
    render_scene,
    synthetic_samples,
    synthetic_scene,
    synthetic_vocabulary,
)

TOKEN = re.compile(r"\w+|[^\w\s]+")
# Cell names written out independently of the module, per grid size.
NAMES = {
    2: ["top left", "top right", "bottom left", "bottom right"],
    3: ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"],
}


def cell_name(row: int, col: int, grid: int) -> str:
    return f"the {NAMES[grid][row * grid + col]}" if grid in NAMES else f"row {row + 1} column {col + 1}"


def decode(image: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(image))
    img.load()
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def ideal_mask(kind: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where a shape of `kind` should be, in units of half its side around its centre."""
    inside = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= 1
    if kind == "triangle":  # apex up
        return inside & (np.abs(dx) <= (dy + 1) / 2)
    if kind == "cross":
        return inside & ((np.abs(dx) <= 0.35) | (np.abs(dy) <= 0.35))
    return inside


def parse_question(question: str, grid: int) -> tuple[str, str, int, int]:
    m = re.fullmatch(r"Is there an? (\w+) (\w+) at (.+)\?", question)
    assert m, question
    colour, kind, where = m.groups()
    cells = [(r, c) for r in range(grid) for c in range(grid) if cell_name(r, c, grid) == where]
    assert colour in COLOURS and kind in KINDS and len(cells) == 1, question
    return colour, kind, *cells[0]


# ----------------------------------------------------------------------------- determinism


def test_sample_depends_only_on_seed_and_index():
    small, big = SyntheticConfig(num_samples=6), SyntheticConfig(num_samples=500)
    a = list(synthetic_samples(small, start=3))
    b = list(synthetic_samples(big, start=0, stop=6))[3:]
    assert [s["id"] for s in a] == ["synthetic:3", "synthetic:4", "synthetic:5"]
    assert a == b  # same bytes, captions, ids whatever num_samples / start
    assert synthetic_scene(4, small) == synthetic_scene(4, big)
    assert list(synthetic_samples(small, 3, 4)) == a[:1]  # generating twice gives the same sample

    other = list(synthetic_samples(SyntheticConfig(num_samples=6, seed=1), start=3))
    assert all(x["image"] != y["image"] for x, y in zip(a, other))
    assert [x["caption"] for x in a] != [y["caption"] for y in other]


def test_held_out_split_is_disjoint_and_deterministic():
    cfg = SyntheticConfig(num_samples=30, seed=7)
    val = held_out(cfg, 20)
    assert (val.num_samples, val.image_size, val.grid) == (20, cfg.image_size, cfg.grid)
    assert val.seed != cfg.seed and held_out(cfg, 20) == val
    train_images = {s["image"] for s in synthetic_samples(cfg)}
    assert not train_images & {s["image"] for s in synthetic_samples(val)}


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("grid,max_shapes", [(3, 4), (2, 4), (4, 6)])
def test_caption_names_every_shape_in_raster_order(grid, max_shapes):
    cfg = SyntheticConfig(grid=grid, min_shapes=1, max_shapes=max_shapes, qa_per_image=2)
    counts, large = set(), 0
    for i in range(60):
        scene = synthetic_scene(i, cfg)
        shapes = scene["shapes"]
        cells = [(s["row"], s["col"]) for s in shapes]
        assert cells == sorted(set(cells))  # distinct cells, raster order
        assert 1 <= len(shapes) <= max_shapes
        counts.add(len(shapes))
        n = len(shapes)
        expected = ["There is 1 shape." if n == 1 else f"There are {n} shapes."]
        for s in shapes:
            size = "large" if s["size"] >= 0.7 else "small"
            large += size == "large"
            expected.append(f"A {size} {s['colour']} {s['kind']} at {cell_name(s['row'], s['col'], grid)}.")
        assert scene["caption"] == " ".join(expected)
    assert len(counts) >= 3 and large > 0  # counts vary; some images have a salient shape


# ----------------------------------------------------------------------------- rendering


def test_rendering_matches_the_scene_exactly_in_png():
    cfg = SyntheticConfig(num_samples=40)
    size, cell = cfg.image_size, cfg.image_size / cfg.grid
    salient_with_others = 0
    for sample in synthetic_samples(cfg):
        scene = synthetic_scene(int(sample["id"].split(":")[1]), cfg)
        pixels = decode(sample["image"])
        assert pixels.shape == (size, size, 3)
        occupied = set()
        for s in scene["shapes"]:
            occupied.add((s["row"], s["col"]))
            x, y = round(s["x"] * size), round(s["y"] * size)
            assert tuple(pixels[y, x]) == COLOURS[s["colour"]], (sample["id"], s)
            # Within its cell, the shape's pixels form its kind's silhouette (the kind is visible too).
            rows = slice(int(s["row"] * cell), int((s["row"] + 1) * cell))
            cols = slice(int(s["col"] * cell), int((s["col"] + 1) * cell))
            drawn = (pixels[rows, cols] == COLOURS[s["colour"]]).all(-1)
            ys, xs = np.mgrid[rows, cols]
            half = s["size"] * cell / 2 + 0.5  # + 0.5: PIL fills both end pixels
            wanted = ideal_mask(s["kind"], (xs - x) / half, (ys - y) / half)
            iou = (drawn & wanted).sum() / (drawn | wanted).sum()
            assert iou > 0.85, (sample["id"], s, iou)  # a circle drawn as a square would give ~0.79
        for r in range(cfg.grid):
            for c in range(cfg.grid):
                if (r, c) not in occupied:  # the whole empty cell: light, nearly grey background
                    y0, y1, x0, x1 = (int(v * cell) for v in (r, r + 1, c, c + 1))
                    region = pixels[y0 + 1:y1 - 1, x0 + 1:x1 - 1]
                    assert region.min() >= 215 and (region.max(-1) - region.min(-1)).max() <= 25
        if any(s["size"] >= 0.7 for s in scene["shapes"]) and len(scene["shapes"]) > 1:
            salient_with_others += 1
    assert salient_with_others > 0  # a salient shape never hides the small ones (all drawn, all named)


def test_jpeg_rendering_is_faithful_within_tolerance():
    cfg = SyntheticConfig(num_samples=10, image_format="jpeg")
    for i, sample in enumerate(synthetic_samples(cfg)):
        assert sample["image"][:2] == b"\xff\xd8"
        pixels = decode(sample["image"])
        for s in synthetic_scene(i, cfg)["shapes"]:
            x, y = round(s["x"] * cfg.image_size), round(s["y"] * cfg.image_size)
            assert np.abs(pixels[y, x] - COLOURS[s["colour"]]).max() <= 30, (i, s, pixels[y, x])


def test_render_scene_is_a_pure_function_of_the_scene():
    cfg = SyntheticConfig(image_size=336)
    scene = synthetic_scene(11, cfg)
    a, b = render_scene(scene, cfg), render_scene(scene, cfg)
    assert a.size == (336, 336) and a.mode == "RGB" and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- QA


@pytest.mark.parametrize("qa_per_image", [2, 3])
def test_qa_is_balanced_and_true_of_the_scene(qa_per_image):
    cfg = SyntheticConfig(qa_per_image=qa_per_image)
    answers = []
    for i in range(200):
        scene = synthetic_scene(i, cfg)
        facts = {(s["colour"], s["kind"], s["row"], s["col"]) for s in scene["shapes"]}
        questions = [q for q, _ in scene["qa"]]
        assert len(questions) == qa_per_image == len(set(questions))
        for question, answer in scene["qa"]:
            fact = parse_question(question, cfg.grid)
            assert answer in ("yes", "no")
            assert (fact in facts) == (answer == "yes"), (scene["caption"], question, answer)
            if answer == "no":  # one attribute (colour, kind or cell) of a real shape changed
                assert any(sum([f[0] != fact[0], f[1] != fact[1], f[2:] != fact[2:]]) == 1 for f in facts)
            answers.append(answer)
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_covers_all_synthetic_text():
    vocab = synthetic_vocabulary()
    assert len(vocab) == len(set(vocab)) and vocab == synthetic_vocabulary()
    words = set(vocab)
    assert set(TOKEN.findall(CAPTION_PROMPT)) <= words
    for cfg in [SyntheticConfig(), SyntheticConfig(grid=2, min_shapes=1, qa_per_image=1),
                SyntheticConfig(grid=4, max_shapes=16, qa_per_image=4)]:
        for i in range(300 if cfg.grid == 3 else 50):
            scene = synthetic_scene(i, cfg)
            text = " ".join([scene["caption"]] + [q + " " + a for q, a in scene["qa"]])
            assert set(TOKEN.findall(text)) <= words, set(TOKEN.findall(text)) - words


def test_synthetic_tokenizer_knows_every_word():
    from pargo_dist.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    cfg = SyntheticConfig(num_samples=200)
    for i in range(200):
        scene = synthetic_scene(i, cfg)
        for text in [scene["caption"], CAPTION_PROMPT] + [q + " " + a for q, a in scene["qa"]]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, text
            assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- schema


def test_samples_conform_to_the_mds_schema():
    cfg = SyntheticConfig(num_samples=8, image_size=64, qa_per_image=3)
    captions = list(synthetic_samples(cfg, kind="caption"))
    chats = list(synthetic_samples(cfg, kind="qa"))
    mixed = list(synthetic_samples(cfg, kind="mixed"))
    for i, (cap, chat) in enumerate(zip(captions, chats)):
        for sample in (cap, chat):
            assert set(sample) == set(MDS_COLUMNS) and sample["id"] == f"synthetic:{i}"
            assert Image.open(io.BytesIO(sample["image"])).size == (64, 64)
            assert decode(sample["image"]).shape == (64, 64, 3)
        assert cap["caption"] == synthetic_scene(i, cfg)["caption"] and cap["messages"] == []
        msgs = chat["messages"]
        assert chat["caption"] == "" and len(msgs) == 2 * cfg.qa_per_image
        assert [m["role"] for m in msgs] == ["user", "assistant"] * cfg.qa_per_image
        assert msgs[0]["content"].startswith(f"{IMAGE_MARKER}\n")
        assert sum(m["content"].count(IMAGE_MARKER) for m in msgs) == 1
        assert [(u["content"].removeprefix(f"{IMAGE_MARKER}\n"), a["content"]) for u, a in zip(msgs[::2], msgs[1::2])] \
            == synthetic_scene(i, cfg)["qa"]
        assert mixed[i] == (cap if i % 2 == 0 else chat)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field,value", [
    ("max_shapes", 10), ("min_shapes", 0), ("max_shapes", 1), ("grid", 1), ("grid", 9),
    ("image_size", 16), ("image_format", "gif"), ("qa_per_image", 0), ("qa_per_image", 5),
    ("num_samples", -1), ("seed", "0"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_bad_arguments_fail_eagerly():
    cfg = SyntheticConfig(num_samples=4)
    with pytest.raises(ValueError, match="kind"):
        synthetic_samples(cfg, kind="captions")
    with pytest.raises(ValueError, match="start"):
        synthetic_samples(cfg, start=5, stop=2)
    with pytest.raises(ValueError, match="index"):
        synthetic_scene(-1, cfg)
