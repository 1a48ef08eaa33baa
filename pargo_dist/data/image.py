"""Image decode and the vision tower's preprocessing, fast enough for many dataloader workers.

The parameters (output size, resize rule, crop, mean/std) come from the tower's own HF image
processor config when the tower directory has one, else from its model type's defaults; the
pixel work itself is plain PIL + numpy (the HF processors round-trip through numpy float
arrays per step and are several times slower). `tests/test_data_pipeline.py` checks equality
with CLIPImageProcessor / SiglipImageProcessor.

With `data.image.crops` other than 1 (see crops.py), `load` returns the image's tiles and its
thumbnail, (crops, 3, size, size); the thumbnail is exactly the single-crop preprocessing.

Decoding uses PIL's JPEG draft mode: when the stored JPEG is at least twice the needed size,
libjpeg decodes it directly at 1/2, 1/4 or 1/8 scale (still >= the needed size), which skips
most of the IDCT work on large LAION-style images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pargo_dist.batch import normalize_pixels
from pargo_dist.data.crops import CropPolicy

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass
class ImagePreprocessor:
    """Resize (shortest edge, then centre crop; or straight to a square), rescale, normalize."""

    size: int  # output side in pixels
    resize_to: int | None = None  # shortest edge before the crop; None: resize to size x size
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.BICUBIC
    crops: CropPolicy = CropPolicy()  # one view, a fixed grid of tiles, or tiles by aspect ratio

    @classmethod
    def from_hf(cls, processor) -> "ImagePreprocessor":
        """Read the settings of a transformers image processor (CLIP, SigLIP, ...)."""
        size = dict(processor.size)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        resample = int(getattr(processor, "resample", Image.BICUBIC))
        if "shortest_edge" in size:
            crop = dict(getattr(processor, "crop_size", None) or {})
            out = crop.get("height", size["shortest_edge"]) if getattr(processor, "do_center_crop", True) else size["shortest_edge"]
            return cls(size=out, resize_to=size["shortest_edge"], mean=mean, std=std, resample=resample)
        return cls(size=size["height"], resize_to=None, mean=mean, std=std, resample=resample)

    @classmethod
    def for_tower(cls, vision_config, path: str | Path | None = None) -> "ImagePreprocessor":
        """The tower's preprocessing: from `path`'s preprocessor_config.json, else by model type."""
        if path is not None and (Path(path) / "preprocessor_config.json").exists():
            from transformers import AutoImageProcessor

            return cls.from_hf(AutoImageProcessor.from_pretrained(str(path)))
        side = vision_config.image_size
        if "siglip" in vision_config.model_type:
            return cls(size=side, resize_to=None, mean=HALF, std=HALF)
        return cls(size=side, resize_to=side)

    def tiles_for(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of tiles an image of this size is cut into ((1, 1): one ordinary view)."""
        return self.crops.tiles_for(width, height, self.size)

    def crop_count(self, width: int, height: int) -> int:
        """Crops (tiles, plus the thumbnail) the tower sees for an image of this size."""
        return self.crops.count(*self.tiles_for(width, height))

    def decode(self, data: bytes, tiles: tuple[int, int] = (1, 1)) -> Image.Image:
        """Encoded bytes -> RGB image, decoded at the smallest JPEG scale that is still big enough
        (for `tiles`, the (cols, rows) grid it will be cut into)."""
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            w, h = img.size
            cols, rows = tiles
            if cols * rows > 1:  # resized to exactly cols x rows tiles (the thumbnail needs less)
                scale = max(cols * self.size / w, rows * self.size / h)
            else:
                need = self.resize_to or self.size
                scale = need / min(w, h) if self.resize_to else max(need / w, need / h)
            if scale <= 0.5:
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")  # (convert would copy an RGB image too)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalized (3, size, size) float32 tensor: the single-crop view."""
        return self.normalize(self._view(img))

    def _view(self, img: Image.Image) -> torch.Tensor:
        """The single-crop view as uint8 (3, size, size)."""
        if self.resize_to is None:
            img = img.resize((self.size, self.size), self.resample)
        else:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_to, int(self.resize_to * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), self.resample)
            top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        return _uint8(img)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, on the tensor's device."""
        return normalize_pixels(pixels, self.mean, self.std)

    def cut(self, img: Image.Image, tiles: tuple[int, int], normalize: bool = True) -> torch.Tensor:
        """RGB image -> (crops, 3, size, size): the tiles of a (cols, rows) grid in raster order,
        then the thumbnail (the single-crop view) when the policy asks for one. `normalize=False`:
        uint8, for the data loader (normalize later, where the batch is: see Batch.pixels)."""
        cols, rows = tiles
        if cols * rows == 1:
            out = self._view(img).unsqueeze(0)
        else:
            side = self.size
            big = _uint8(img.resize((cols * side, rows * side), self.resample))  # (3, rows*S, cols*S)
            out = big.view(3, rows, side, cols, side).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, side, side)
            if self.crops.thumbnail:
                out = torch.cat([out, self._view(img).unsqueeze(0)])
        return self.normalize(out) if normalize else out.contiguous()

    def views(self, img: Image.Image) -> torch.Tensor:
        """A decoded RGB image -> normalized (crops, 3, size, size), cut as data.image says."""
        return self.cut(img, self.tiles_for(*img.size))

    def load(self, data: bytes, normalize: bool = True) -> torch.Tensor:
        """Encoded bytes -> (crops, 3, size, size); crops is 1 unless data.image asks for tiles.
        `normalize=False`: the uint8 pixels (what the data loader hands on: a quarter of the bytes
        through the workers' shared memory and to the GPU, normalized there)."""
        with Image.open(io.BytesIO(data)) as probe:  # the header alone: the grid follows the stored size
            tiles = self.tiles_for(*probe.size)
        return self.cut(self.decode(data, tiles), tiles, normalize)


def _uint8(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 (3, H, W): a copy of the bytes, then the transpose."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (np.array: a writable copy)
