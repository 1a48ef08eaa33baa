"""Batches from encoded samples: padding, or packing several samples into one row.

Padding: rows padded to the longest sample (optionally to a multiple of N), with an
attention mask; right padding for training, left for generation.

Packing: the batch's samples, in order, are laid greedily into rows of at most `max_len`
tokens. Position ids restart at 0 for every sample and no 2-D attention mask is passed, so
transformers (>= 4.54 masking utils: Llama, Qwen2, Mistral, ...) builds a block-diagonal causal
mask from the position ids: no token attends across a sample boundary. The number of samples
per batch stays fixed (only the number of rows varies), which keeps the streaming loader's
sample accounting, and therefore exact resume, correct.

Images: every image's crops in a row, (crops in all, 3, H, W), with `image_crops` (crops per
image, placeholder order) when some image has more than one (data.image.crops). The data
loader's are uint8, normalized where the batch is used (Batch.pixels).

The result is a `pargo_dist.batch.Batch`: besides the tensors it carries `num_samples`,
`num_targets` (counted here, on the CPU), the sample ids, `skipped` (corrupt samples replaced
on the way, with reasons) and `streams` (each sample's dataset in a mixture) for the logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pargo_dist.batch import Batch, count_targets
from pargo_dist.constants import IGNORE_INDEX


@dataclass
class Collator:
    pad_id: int
    padding_side: str = "right"
    pack: bool = False
    max_len: int | None = None  # row length when packing
    pad_to_multiple_of: int | None = None
    # how the model normalizes uint8 pixels (the image processor's mean / std), carried by the batch
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={self.padding_side!r}: must be 'left' or 'right'")
        if self.pack and not self.max_len:
            raise ValueError("packing needs max_len (the row length)")

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return -(-longest // m) * m if m else longest

    def __call__(self, examples: list[dict[str, Any]]) -> Batch:
        rows = self._pack(examples) if self.pack else [[ex] for ex in examples]
        width = self._width(max(sum(len(ex["input_ids"]) for ex in row) for row in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = sum(len(ex["input_ids"]) for ex in row)
            start = width - n if self.padding_side == "left" else 0
            for ex in row:
                k = len(ex["input_ids"])
                ids[r, start:start + k] = torch.as_tensor(ex["input_ids"])
                lab = torch.as_tensor(ex["labels"]).clone()
                lab[0] = IGNORE_INDEX  # never predict a sample's first token from its neighbour
                labels[r, start:start + k] = lab
                mask[r, start:start + k] = 1
                positions[r, start:start + k] = torch.arange(k)
                start += k
            if self.pack and n < width:  # trailing padding: a separate "sequence" of its own
                positions[r, n:] = torch.arange(width - n)
        placed = [ex for row in rows for ex in row]  # row-major: the order image placeholders appear in
        images = [_crops(ex["pixel_values"]) for ex in placed if ex.get("pixel_values") is not None]
        crops = [len(im) for im in images]
        return Batch(input_ids=ids, labels=labels, attention_mask=None if self.pack else mask,
                     position_ids=positions if self.pack else None,
                     pixel_values=torch.cat(images) if images else None,
                     image_crops=crops if any(c != 1 for c in crops) else None,
                     pixel_mean=self.pixel_mean, pixel_std=self.pixel_std,
                     num_samples=len(examples), num_tokens=int(mask.sum()), num_targets=count_targets(labels),
                     sample_ids=[ex.get("id") for ex in placed],
                     skipped=[s for ex in placed for s in ex.get("skipped", [])],
                     streams=[ex.get("stream", 0) for ex in placed])

    def _pack(self, examples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """First-fit decreasing: longest samples first, each into the first row with room. Fewer,
        fuller rows than filling rows in arrival order (on a LLaVA-like length mix, 17.8 % of
        the tensor was padding that way; see benchmarks/dataloader.py --only padding). The order
        of samples in rows does not change what the model computes for each."""
        for ex in examples:
            if len(ex["input_ids"]) > self.max_len:
                raise ValueError(f"sample {ex.get('id')} has {len(ex['input_ids'])} tokens > max_len {self.max_len}")
        rows: list[list[dict[str, Any]]] = []
        room: list[int] = []
        for ex in sorted(examples, key=lambda e: -len(e["input_ids"])):  # stable: ties keep arrival order
            k = len(ex["input_ids"])
            r = next((i for i, free in enumerate(room) if free >= k), None)
            if r is None:
                rows.append([])
                room.append(self.max_len)
                r = len(rows) - 1
            rows[r].append(ex)
            room[r] -= k
        return rows


def _crops(pixels: torch.Tensor) -> torch.Tensor:
    """An example's image as (crops, 3, H, W) (a single (3, H, W) view is one crop)."""
    return pixels.unsqueeze(0) if pixels.dim() == 3 else pixels
