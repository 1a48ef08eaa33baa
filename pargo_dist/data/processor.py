"""Images and a question -> the model's inputs, the way transformers users expect a processor.

`pargo-dist export` saves this processor next to the model (processor_config.json, the
tokenizer with its chat template) and copies this module with the model's own code into the
export (portable.py), so that plain transformers loads both without pargo_dist:

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    inputs = processor(images=Image.open("photo.jpg"))      # the caption prompt; or text="a question"
    out = model.generate(**inputs, max_new_tokens=100)
    print(processor.batch_decode(out, skip_special_tokens=True)[0])

It does exactly what training did to an image and a prompt: the tower's preprocessing with the
run's `data.image` crops, the chat template with the image marker in the user turn, and the
marker expanded to the image's visual token count (PromptBuilder.generation_prompt). Batches
are padded on the left, since generation appends on the right.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoTokenizer, BatchFeature

from pargo_dist.data.crops import CropPolicy
from pargo_dist.data.image import ImagePreprocessor
from pargo_dist.data.prompt import PromptBuilder
from pargo_dist.data.schema import CAPTION_PROMPT


class ParGoProcessor:
    """The tokenizer (with the `<image>` token and a chat template), the image preprocessing and
    the visual token count per crop count, saved as processor_config.json."""

    config_name = "processor_config.json"

    def __init__(self, tokenizer, image_processor: ImagePreprocessor, tokens_per_crops: dict[int, int],
                 caption_prompt: str = CAPTION_PROMPT):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompt = PromptBuilder(tokenizer, tokens_per_crops, max_len=10**9, caption_prompt=caption_prompt)

    # -- saving and loading -----------------------------------------------------------------

    def to_dict(self) -> dict:
        pre = self.image_processor
        return {"processor_class": type(self).__name__,
                "image": {"size": pre.size, "resize_to": pre.resize_to, "mean": list(pre.mean), "std": list(pre.std),
                          "resample": int(pre.resample), "crops": {**asdict(pre.crops), "grid": list(pre.crops.grid)}},
                "tokens_per_crops": {str(k): v for k, v in self.prompt.tokens_per_crops.items()},
                "caption_prompt": self.prompt.caption_prompt}

    def save_pretrained(self, path: str | Path, auto_map: dict | None = None) -> None:
        """processor_config.json (with `auto_map` when the export ships this module) and the tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        values = self.to_dict()
        if auto_map:
            values["auto_map"] = auto_map
        (path / self.config_name).write_text(json.dumps(values, indent=2) + "\n")
        self.tokenizer.save_pretrained(path)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """What transformers asks of a processor class it loaded as remote code: the export's
        processor_config.json already names this class in its auto_map, so nothing is left to do."""

    @classmethod
    def from_pretrained(cls, path: str | Path, **_ignored) -> "ParGoProcessor":
        """From an export directory (what AutoProcessor calls with trust_remote_code=True)."""
        path = Path(path)
        values = json.loads((path / cls.config_name).read_text())
        image = dict(values["image"])
        crops = dict(image.pop("crops"))
        crops["grid"] = tuple(crops["grid"])
        pre = ImagePreprocessor(**{**image, "mean": tuple(image["mean"]), "std": tuple(image["std"])},
                                crops=CropPolicy(**crops))
        tokens = {int(k): v for k, v in values["tokens_per_crops"].items()}
        return cls(AutoTokenizer.from_pretrained(str(path)), pre, tokens, values["caption_prompt"])

    # -- inputs ------------------------------------------------------------------------------

    def __call__(self, images=None, text: str | list[str] | None = None, return_tensors: str = "pt",
                 **_ignored) -> BatchFeature:
        """One PIL image (or a list) and the question(s) about it (default: the caption prompt
        training used) -> input_ids, attention_mask (left-padded), pixel_values (every image's
        crops in a row) and image_crops, ready for `model.generate(**inputs)` or `model(**inputs)`."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns PyTorch tensors ('pt')")
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        texts = [text] if isinstance(text, str) else list(text or [])
        if not images:
            raise ValueError("give images= (one PIL image or a list): ParGo prompts always hold an image")
        if not texts:
            texts = [self.prompt.caption_prompt] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts for {len(images)} images: give one question per image")
        views = [self.image_processor.views(img.convert("RGB")) for img in images]
        prompts = [self.prompt.generation_prompt(t, crops=len(v)) for t, v in zip(texts, views)]
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return BatchFeature({"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(views),
                             "image_crops": torch.tensor([len(v) for v in views])})

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(*args, **kwargs)]

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs).strip()
