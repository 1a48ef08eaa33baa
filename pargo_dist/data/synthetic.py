"""The built-in synthetic "detail caption" dataset: the default data of the demo and the tests.

Why it looks like this
----------------------
ParGo's point is that a projector with partial (region) queries keeps fine detail that a few
global queries lose. The data should therefore reward *detail perception*: each image holds
several small coloured shapes, one per cell of a G x G grid (sometimes one of them large, the
"salient" object), and the caption names every shape's size, colour, kind and position:

    There are 3 shapes. A small red circle at the top left. A large blue square at the centre.
    A small yellow triangle at the bottom right.

A model that only perceives the most salient object cannot produce that caption, nor answer
the yes/no questions that come with each image ("Is there a red circle at the top left?").
The "no" questions change exactly one attribute of a real shape (colour, kind or position) to
a value that is not present there, so they cannot be answered from the other attributes alone.
Yes and no answers are balanced per image.

Everything is drawn with flat colours on a light, gently tinted background (PIL only, no
fonts, no network), so a shape's pixels have its exact RGB in PNG (and nearly so in JPEG);
the tests check that the rendering is faithful to the caption.

Determinism
-----------
Sample i depends on (seed, i) alone: its random stream is `random.Random(f"{seed}:{i}")`
(string seeds are hashed with SHA-512, so this is stable across processes, platforms and
PYTHONHASHSEED). Sample i is thus the same whatever num_samples is, whichever range is
generated first and however many workers generate shards in parallel; a resumed or sharded
conversion writes identical bytes, and a test can regenerate any single sample.

The wording uses a small fixed vocabulary (`synthetic_vocabulary()`), from which the built-in
word-level tokenizer is built, so synthetic text never meets an unknown token.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pargo_dist.data.schema import CAPTION_PROMPT, IMAGE_MARKER, make_sample
from pargo_dist.errors import UserError

# Flat, clearly distinct colours; each has a channel far below the light background's.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
KINDS = ("circle", "square", "triangle", "cross")
MAX_GRID = 4  # grids 2 and 3 name cells in words, larger ones as "row r column c"
SMALL_SIZE = (0.40, 0.55)  # shape side as a fraction of the cell side
LARGE_SIZE = (0.78, 0.90)  # the salient shape, drawn in about half of the images
LARGE_AT = 0.7  # sizes from here on are captioned "large"
HELD_OUT_SEED_OFFSET = 1_000_003
SAMPLE_KINDS = ("caption", "qa", "mixed")
TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # the word-level pre-tokenization (like HF `Whitespace`)


@dataclass
class SyntheticConfig:
    """How many samples, how they look. Sample i depends on (seed, i) only, not on num_samples."""

    num_samples: int = 1000
    image_size: int = 224  # square images, pixels
    grid: int = 3  # G x G cells, at most one shape per cell (2..MAX_GRID)
    min_shapes: int = 2
    max_shapes: int = 4
    seed: int = 0
    image_format: str = "png"  # "png" (exact colours) or "jpeg"
    qa_per_image: int = 2  # yes/no question-answer pairs per image, half of them "yes"

    def __post_init__(self):
        def need(ok: bool, field: str, what: str):
            if not ok:
                raise UserError(f"SyntheticConfig.{field} {what} (got {getattr(self, field)!r})")

        for name in ("num_samples", "image_size", "grid", "min_shapes", "max_shapes", "seed", "qa_per_image"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                 name, "must be an int")
        need(self.num_samples >= 0, "num_samples", "must be >= 0")
        need(2 <= self.grid <= MAX_GRID, "grid", f"must be between 2 and {MAX_GRID}")
        need(self.image_size >= max(32, 16 * self.grid), "image_size",
             f"must be >= max(32, 16 * grid) = {max(32, 16 * self.grid)} so every shape is visible")
        need(self.min_shapes >= 1, "min_shapes", "must be >= 1")
        need(self.min_shapes <= self.max_shapes <= self.grid ** 2, "max_shapes",
             f"must be between min_shapes ({self.min_shapes}) and grid * grid ({self.grid ** 2})")
        need(self.image_format in ("png", "jpeg"), "image_format", 'must be "png" or "jpeg"')
        need(1 <= self.qa_per_image <= 2 * self.min_shapes, "qa_per_image",
             f"must be between 1 and 2 * min_shapes ({2 * self.min_shapes}): yes-questions need distinct shapes")


def held_out(cfg: SyntheticConfig, n: int) -> SyntheticConfig:
    """The held-out split of `cfg`: the same settings, n samples, seed + HELD_OUT_SEED_OFFSET.

    Its samples come from a different random stream than the training split's (sample i has
    key "seed+1000003:i", not "seed:i"), so no held-out image is a training image. (Captions
    may coincide: they are compositions of a small vocabulary, which is the point.) Do not
    train with seed + HELD_OUT_SEED_OFFSET yourself.
    """
    return replace(cfg, num_samples=n, seed=cfg.seed + HELD_OUT_SEED_OFFSET)


# ----------------------------------------------------------------------------- wording


def position_name(row: int, col: int, grid: int) -> str:
    """A cell's name: "the top left", "the top", "the centre", ... (grid 2, 3), else "row 2 column 3"."""
    if grid > 3:
        return f"row {row + 1} column {col + 1}"
    last = grid - 1
    vertical = "top" if row == 0 else "bottom" if row == last else ""
    horizontal = "left" if col == 0 else "right" if col == last else ""
    return "the " + (" ".join(w for w in (vertical, horizontal) if w) or "centre")


def _count_sentence(n: int) -> str:
    return "There is 1 shape." if n == 1 else f"There are {n} shapes."


def _shape_sentence(shape: dict, grid: int) -> str:
    size = "large" if shape["size"] >= LARGE_AT else "small"
    return f"A {size} {shape['colour']} {shape['kind']} at {position_name(shape['row'], shape['col'], grid)}."


def _question(colour: str, kind: str, row: int, col: int, grid: int) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"Is there {article} {colour} {kind} at {position_name(row, col, grid)}?"


def synthetic_vocabulary() -> list[str]:
    """Every token that synthetic text can contain, in a fixed order (for the word-level tokenizer).

    Built by running every template over every value it can take (all counts, sizes, colours,
    kinds, cells of every grid), plus the answers and the default caption prompt's words, so
    it cannot drift from the templates. Tokens are split like `\\w+|[^\\w\\s]+`.
    """
    texts = [_count_sentence(n) for n in range(1, MAX_GRID ** 2 + 1)]
    for grid in range(2, MAX_GRID + 1):
        for row in range(grid):
            for col in range(grid):
                for colour in COLOURS:
                    for kind in KINDS:
                        texts.append(_question(colour, kind, row, col, grid))
                        for size in (SMALL_SIZE[0], LARGE_SIZE[0]):
                            shape = {"colour": colour, "kind": kind, "row": row, "col": col, "size": size}
                            texts.append(_shape_sentence(shape, grid))
    texts += ["yes", "no", CAPTION_PROMPT]
    return list(dict.fromkeys(tok for text in texts for tok in TOKEN_RE.findall(text)))


# ----------------------------------------------------------------------------- scenes


def synthetic_scene(index: int, cfg: SyntheticConfig) -> dict[str, Any]:
    """Scene `index` of `cfg`: shapes, background, caption and QA pairs, from (cfg.seed, index) alone.

    shapes: [{"colour", "kind", "row", "col", "size", "x", "y"}] in raster order of their cells;
    size is the shape's side as a fraction of the cell side, (x, y) its centre as a fraction of
    the image side (jittered inside its cell, so the shape never leaves its cell).
    qa: [(question, "yes" | "no")], balanced: half of them "yes" (odd counts: a fair coin).
    """
    if index < 0:
        raise ValueError(f"index must be >= 0 (got {index})")
    rng = random.Random(f"{cfg.seed}:{index}")
    g = cfg.grid
    n = rng.randint(cfg.min_shapes, cfg.max_shapes)
    cells = sorted(rng.sample(range(g * g), n))
    large = rng.randrange(n) if rng.random() < 0.5 else -1
    shapes = []
    for i, cell in enumerate(cells):
        row, col = divmod(cell, g)
        size = rng.uniform(*(LARGE_SIZE if i == large else SMALL_SIZE))
        slack = (1 - size) / 2 * 0.8  # how far the centre may move and stay inside the cell
        x = (col + 0.5 + rng.uniform(-slack, slack)) / g
        y = (row + 0.5 + rng.uniform(-slack, slack)) / g
        shapes.append({"colour": rng.choice(list(COLOURS)), "kind": rng.choice(KINDS), "row": row, "col": col,
                       "size": round(size, 3), "x": round(x, 4), "y": round(y, 4)})
    background = tuple(rng.randint(228, 250) for _ in range(3))
    gradient = rng.randint(-8, 8)  # top-to-bottom brightness change, for a little variety
    caption = " ".join([_count_sentence(n)] + [_shape_sentence(s, g) for s in shapes])
    return {"index": index, "grid": g, "shapes": shapes, "background": background, "gradient": gradient,
            "caption": caption, "qa": _qa_pairs(shapes, cfg.qa_per_image, g, rng)}


def _qa_pairs(shapes: list[dict], count: int, grid: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` distinct yes/no questions: "yes" about real shapes, "no" = one attribute changed."""
    present = {(s["colour"], s["kind"], s["row"], s["col"]) for s in shapes}
    n_yes = count // 2 + int(count % 2 == 1 and rng.random() < 0.5)
    answers = ["yes"] * n_yes + ["no"] * (count - n_yes)
    rng.shuffle(answers)
    yes_shapes = rng.sample(shapes, n_yes)  # distinct shapes -> distinct questions
    pairs, asked = [], set()
    for answer in answers:
        if answer == "yes":
            s = yes_shapes.pop()
            fact = (s["colour"], s["kind"], s["row"], s["col"])
        else:
            fact = None
            while fact is None or fact in present or fact in asked:
                fact = _changed(rng.choice(shapes), grid, present, rng)
        asked.add(fact)
        pairs.append((_question(*fact, grid), answer))
    return pairs


def _changed(s: dict, grid: int, present: set, rng: random.Random) -> tuple:
    """The shape `s` with its colour, kind or cell changed to one that is not present there."""
    what = rng.choice(("colour", "kind", "position"))
    if what == "colour":
        return rng.choice([c for c in COLOURS if c != s["colour"]]), s["kind"], s["row"], s["col"]
    if what == "kind":
        return s["colour"], rng.choice([k for k in KINDS if k != s["kind"]]), s["row"], s["col"]
    free = [divmod(c, grid) for c in range(grid * grid) if (s["colour"], s["kind"], *divmod(c, grid)) not in present]
    if not free:  # every cell holds this very colour and kind: change the colour instead
        return rng.choice([c for c in COLOURS if c != s["colour"]]), s["kind"], s["row"], s["col"]
    return (s["colour"], s["kind"], *rng.choice(free))


# ----------------------------------------------------------------------------- images


def render_scene(scene: dict[str, Any], cfg: SyntheticConfig) -> Image.Image:
    """Draw a scene as a (cfg.image_size, cfg.image_size) RGB image: flat shapes, tinted background."""
    size = cfg.image_size
    ramp = np.round(scene["gradient"] * (np.arange(size) / (size - 1) - 0.5))  # per image row
    pixels = np.asarray(scene["background"], dtype=np.float64)[None, None, :] + ramp[:, None, None]
    img = Image.fromarray(np.clip(np.broadcast_to(pixels, (size, size, 3)), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    cell = size / scene["grid"]
    for s in scene["shapes"]:
        cx, cy = round(s["x"] * size), round(s["y"] * size)
        half = max(2, round(s["size"] * cell / 2))
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        fill = COLOURS[s["colour"]]
        if s["kind"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s["kind"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif s["kind"] == "triangle":  # apex up; the centre lies inside it
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif s["kind"] == "cross":
            arm = max(1, round(half * 0.35))
            draw.rectangle([x0, cy - arm, x1, cy + arm], fill=fill)
            draw.rectangle([cx - arm, y0, cx + arm, y1], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {s['kind']!r}")
    return img


def encode_image(img: Image.Image, image_format: str) -> bytes:
    """PNG (lossless) or JPEG (quality 90) bytes; deterministic for a given Pillow."""
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        raise UserError(f'image_format must be "png" or "jpeg" (got {image_format!r})')
    return buf.getvalue()


# ----------------------------------------------------------------------------- MDS samples


def synthetic_sample(index: int, cfg: SyntheticConfig, kind: str = "caption") -> dict[str, Any]:
    """MDS sample `index` (see schema.py): a caption, or all the image's QA pairs as one chat."""
    if kind not in SAMPLE_KINDS:
        raise UserError(f"kind must be one of {SAMPLE_KINDS} (got {kind!r})")
    if kind == "mixed":
        kind = "caption" if index % 2 == 0 else "qa"
    scene = synthetic_scene(index, cfg)
    image = encode_image(render_scene(scene, cfg), cfg.image_format)
    if kind == "caption":
        return make_sample(f"synthetic:{index}", image, caption=scene["caption"])
    messages = []
    for i, (question, answer) in enumerate(scene["qa"]):
        prefix = f"{IMAGE_MARKER}\n" if i == 0 else ""
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return make_sample(f"synthetic:{index}", image, messages=messages)


def synthetic_samples(cfg: SyntheticConfig, start: int = 0, stop: int | None = None,
                      kind: str = "caption") -> Iterator[dict[str, Any]]:
    """MDS sample dicts for indices start..stop-1 (stop defaults to cfg.num_samples).

    kind: "caption" (stage 1 pretraining: id, image, caption), "qa" (stage 2: the image's
    yes/no pairs as one multi-turn conversation, `<image>` in the first user turn only), or
    "mixed": caption samples at even indices, QA samples at odd ones (so any contiguous
    range is about half of each, and sample i's kind is a function of i alone).
    """
    if kind not in SAMPLE_KINDS:
        raise UserError(f"kind must be one of {SAMPLE_KINDS} (got {kind!r})")
    stop = cfg.num_samples if stop is None else stop
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop (got start={start}, stop={stop})")
    return (synthetic_sample(index, cfg, kind) for index in range(start, stop))  # checked eagerly, made lazily


def write_splits(out: str, cfg: SyntheticConfig, held_out_samples: int = 0, kind: str = "caption",
                 size_limit: str | int = "16mb", progress: bool = True) -> dict[str, Any]:
    """Write `<out>/train` (cfg.num_samples) and, if asked, `<out>/val` (the held-out split)
    as MDS datasets, locally or to a remote such as s3://bucket/prefix. Returns the summaries."""
    from pargo_dist.data.convert import write_dataset

    splits = {"train": cfg}
    if held_out_samples:
        splits["val"] = held_out(cfg, held_out_samples)
    summaries = {}
    for name, split_cfg in splits.items():
        target = out.rstrip("/") + "/" + name
        rows = ((sample, None) for sample in synthetic_samples(split_cfg, kind=kind))
        summaries[name] = write_dataset(rows, target, size_limit=size_limit, progress=progress,
                                        desc=f"synth {name}")
    return summaries


def prepare_for_recipe(recipe) -> list[str]:
    """Write the synthetic splits a recipe asks for (`data.synthetic.num_samples` > 0) into
    data.train.local and data.eval.local, where absent. Returns the dirs it wrote.

    Run by the command line before any rank starts (a launcher, each node's on a cluster), so
    ranks never wait on one another for it. Safe when several processes race (ranks started by
    torchrun, nodes sharing a filesystem): each writes into a temp dir of its own and renames it
    into place; the first rename wins and the others discard theirs. The data is a function of
    the seed alone, so every copy is the same."""
    import os
    import shutil
    from pathlib import Path

    syn = recipe.data.synthetic
    if not syn.num_samples or not recipe.data.train.local:
        return []
    base = SyntheticConfig(num_samples=syn.num_samples, image_size=syn.image_size, seed=syn.seed)
    targets = [(Path(recipe.data.train.local), base)]
    if syn.held_out and recipe.data.eval is not None and recipe.data.eval.local:
        targets.append((Path(recipe.data.eval.local), held_out(base, syn.held_out)))
    written = []
    for out, split in targets:
        if (out / "index.json").exists():
            continue
        from pargo_dist.data.convert import write_dataset

        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = ((sample, None) for sample in synthetic_samples(split, kind=syn.kind))
        write_dataset(rows, str(tmp), progress=False, desc="synth")
        try:
            os.rename(tmp, out)  # atomic; fails if another process got there first
            written.append(str(out))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "index.json").exists():
                raise
    return written
