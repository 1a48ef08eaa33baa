"""Vision towers from transformers, turned into a grid of patch features for the projector.

Any transformers vision model that returns `hidden_states` works: CLIPVisionModel and
SiglipVisionModel are found from their config's model_type; others by class name. A tower
is either loaded from a local directory (`from_pretrained`, no hub access needed) or built
from a config with random weights (tests and the demo).

Feature selection follows LLaVA / ParGo: take the hidden states of one encoder layer
(`feature_layer`, -2 = penultimate, -1 = last block), drop the CLS token where the tower has
one, optionally apply the tower's final LayerNorm (ParGo's EVA-CLIP setting). Several crops of
one image, given as (images, crops, 3, H, W), come out concatenated along the sequence,
crop-major, raster order inside each crop.
"""

from __future__ import annotations

import contextlib

from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from pargo_dist.errors import UserError


def vision_config_from(source: str | Path | PretrainedConfig | dict) -> PretrainedConfig:
    """A vision config from a local path, a config object or a dict with `model_type`.

    A full CLIP / SigLIP checkpoint (text + vision) yields its `vision_config`.
    """
    if isinstance(source, dict):
        values = dict(source)
        model_type = values.pop("model_type", "clip_vision_model")
        config = AutoConfig.for_model(model_type, **values)
    elif isinstance(source, PretrainedConfig):
        config = source
    else:
        config = AutoConfig.from_pretrained(str(source))
    return getattr(config, "vision_config", None) or config


def vision_model_class(config: PretrainedConfig, class_name: str | None = None) -> type[PreTrainedModel]:
    """The transformers class that builds `config` (e.g. CLIPVisionModel), or `class_name`."""
    if class_name:
        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise UserError(f"vision class {class_name!r} is not a transformers class")
        return cls
    try:
        return MODEL_MAPPING[type(config)]
    except KeyError:
        raise UserError(
            f"no vision model class is registered for model_type={config.model_type!r}; "
            "name one with vision_class (e.g. 'CLIPVisionModel')"
        ) from None


class VisionTower(nn.Module):
    """A transformers vision model plus the feature selection ParGo needs. No parameters of its own.

    Frozen by default; while frozen it runs in eval mode and without autograd, so it keeps no
    activations and applies no dropout.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        feature_layer: int = -2,
        drop_cls: bool | None = None,
        post_layernorm: bool = False,
        trainable: bool = False,
    ):
        super().__init__()
        self.model = model.requires_grad_(trainable)  # frozen unless asked (ParGo's setting)
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.post_layernorm = post_layernorm
        cfg = model.config
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)
        self.width = cfg.hidden_size
        self.image_size = cfg.image_size
        if post_layernorm and self._final_norm() is None:
            raise UserError(f"{type(model).__name__} has no final LayerNorm for post_layernorm=True")

    @classmethod
    def build(
        cls,
        config: PretrainedConfig,
        path: str | Path | None = None,
        class_name: str | None = None,
        **selection,
    ) -> "VisionTower":
        """Random weights from `config`, or pretrained weights from the local `path`."""
        model_cls = vision_model_class(config, class_name)
        model = model_cls.from_pretrained(str(path)) if path else model_cls(config)
        return cls(model, **selection)

    def _final_norm(self) -> nn.Module | None:
        inner = getattr(self.model, "vision_model", self.model)
        return getattr(inner, "post_layernorm", None) or getattr(inner, "layernorm", None)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True) -> "VisionTower":
        """A frozen tower stays in eval mode (no dropout, no activation checkpointing)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def _encoder_layers(self) -> nn.ModuleList | None:
        inner = getattr(self.model, "vision_model", self.model)
        layers = getattr(getattr(inner, "encoder", None), "layers", None)
        return layers if isinstance(layers, nn.ModuleList) else None

    @property
    def layers_used(self) -> int | None:
        """Encoder blocks the features need: all up to feature_layer (hidden_states[0] is the
        embeddings). None for a model whose blocks are not an `encoder.layers` list."""
        layers = self._encoder_layers()
        return None if layers is None else self.feature_layer % (len(layers) + 1)

    @contextlib.contextmanager
    def _only_layers(self, used: int | None):
        """Run only the first `used` blocks (those up to feature_layer): with ParGo's -2 the last
        block's output is thrown away, so computing it is waste (1/24 of CLIP-L's FLOPs). The
        encoder is given the first blocks for this forward and its own list back after; its
        weights stay in place."""
        layers = self._encoder_layers()
        if layers is None or used is None or used == len(layers):
            yield
            return
        encoder = getattr(self.model, "vision_model", self.model).encoder
        encoder.layers = layers[:used]
        try:
            yield
        finally:
            encoder.layers = layers

    @property
    def num_patches(self) -> int:
        """Patches per crop after CLS removal."""
        return self.grid[0] * self.grid[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) or (n, crops, 3, H, W) -> (n, crops * patches, width)."""
        crops = 1
        if pixel_values.dim() == 5:
            n, crops = pixel_values.shape[:2]
            pixel_values = pixel_values.flatten(0, 1)
        used = self.layers_used  # the blocks past it do not run
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen), self._only_layers(used):
            dtype = next(self.model.parameters()).dtype
            out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.feature_layer if used is None else used]
            drop = self.drop_cls if self.drop_cls is not None else feats.shape[1] == self.num_patches + 1
            if drop:
                feats = feats[:, 1:]
            if self.post_layernorm:
                feats = self._final_norm()(feats)
        return feats.reshape(-1, crops * feats.shape[1], feats.shape[2])
