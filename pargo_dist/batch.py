"""The collated batch: what the data pipeline hands the loop and the loop hands a backend.

A typed dataclass rather than a dict, so every field has one meaning and one name. It imports
only torch: models and backends may use it without knowing where batches come from.

`num_targets` (the answer tokens the loss counts) is computed on the CPU when the batch is
collated. The loop normalises the loss by the global count of targets; counting them on the
GPU would make every step wait for the device before it could even start.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from pargo_dist.constants import IGNORE_INDEX

# The fields the model's forward takes, in the order HF models name them.
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "pixel_values", "image_crops")


def count_targets(labels: torch.Tensor) -> int:
    """Tokens a causal LM loss counts: position i predicts label i+1, so the first label of
    every row is never a target, and IGNORE_INDEX labels are skipped."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def pads_before_tokens(mask_2d: torch.Tensor) -> bool:
    """Whether some row of a (b, s) 1/0 mask has a padding position before a real token (left
    padding, or gaps): the case that needs an explicit attention mask (see Batch.causal_only)."""
    return bool((mask_2d[:, 1:] > mask_2d[:, :-1]).any())


_SCALE_SHIFT: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std as one multiply-add per value, on
    the tensor's device (the per-channel factors are copied there once, not every batch)."""
    key = (tuple(mean), tuple(std), str(pixels.device))
    if key not in _SCALE_SHIFT:
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        _SCALE_SHIFT[key] = tuple(v[:, None, None].to(pixels.device) for v in (1 / (255 * s), -m / s))
    scale, shift = _SCALE_SHIFT[key]
    return torch.addcmul(shift, pixels.float(), scale)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, width)
    labels: torch.Tensor  # (rows, width), IGNORE_INDEX where nothing is predicted
    attention_mask: torch.Tensor | None = None  # (rows, width) 1/0; None when packed
    position_ids: torch.Tensor | None = None  # (rows, width), restarting per sample when packed
    # (crops of every image, 3, H, W) or None for a text-only batch: float32 as the model takes
    # them, or uint8 from the data loader with pixel_mean / pixel_std (see pixels())
    pixel_values: torch.Tensor | None = None
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    # crops per image, in placeholder order (data.image.crops); None: one crop each. A host-side
    # list, so the model splits the crops without waiting for the device.
    image_crops: list[int] | None = None
    num_samples: int = 0  # samples in the batch (packed rows hold several)
    num_tokens: int = 0  # non-padding tokens
    num_targets: int = 0  # answer tokens the loss counts (count_targets(labels))
    sample_ids: list[Any] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason) replaced on the way
    streams: list[int] = field(default_factory=list)  # each sample's dataset in a mixture

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward (absent fields left out; pixels normalized)."""
        inputs = {k: getattr(self, k) for k in MODEL_INPUTS if getattr(self, k) is not None}
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixels()
        return inputs

    def pixels(self) -> torch.Tensor | None:
        """pixel_values as the model takes them: uint8 pixels from the loader are normalized here,
        where the batch is. The loader hands uint8 on (a quarter of the bytes through the workers'
        shared memory and to the GPU); normalizing after the copy costs the GPU next to nothing."""
        if self.pixel_values is None or self.pixel_values.dtype != torch.uint8:
            return self.pixel_values
        if self.pixel_mean is None or self.pixel_std is None:
            raise ValueError("uint8 pixel_values need pixel_mean and pixel_std (the image processor's) to be "
                             "normalized: collate them with Collator(pixel_mean=..., pixel_std=...)")
        return normalize_pixels(self.pixel_values, self.pixel_mean, self.pixel_std)

    def causal_only(self) -> "Batch":
        """This batch with an all-ones attention mask when its padding is all on the right (or
        absent); otherwise itself. Asked on the host, before the batch moves to the GPU.

        In training a right-padded batch needs no padding mask: its padding keys come after
        every real query, so causal attention alone gives the real tokens the same result, the
        position ids of real tokens are the same, and what padding positions compute never
        reaches the loss (their labels are IGNORE_INDEX). A batch already on a GPU is left as it
        is: reading its mask there would make the host wait. With its real mask, transformers
        builds a (b, 1, s, s) mask and attention cannot use the flash kernel; with all ones it
        runs plain causal attention. (No mask at all would be worse: transformers then looks for
        packed sequences in the position ids and builds the 4-D mask anyway.)"""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.device.type != "cpu" or pads_before_tokens(mask):
            return self  # packed rows (positions restart), a pad before a real token, or already on a GPU
        return replace(self, attention_mask=torch.ones_like(mask))

    @property
    def num_images(self) -> int:
        if self.pixel_values is None:
            return 0
        return len(self.image_crops) if self.image_crops is not None else int(self.pixel_values.shape[0])

    @property
    def num_crops(self) -> int:
        """Crops the vision tower runs on (every image's tiles and thumbnail)."""
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    def first_images(self, n: int) -> tuple[torch.Tensor | None, list[int] | None]:
        """(pixel_values, image_crops) of the batch's first `n` images."""
        if self.pixel_values is None:
            return None, None
        crops = None if self.image_crops is None else self.image_crops[:n]
        head = replace(self, pixel_values=self.pixel_values[:n if crops is None else sum(crops)])
        return head.pixels(), crops  # (only these images normalized)

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on `device` (asynchronous copies where the source allows)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
