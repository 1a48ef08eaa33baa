"""ParGo multimodal LLM: vision tower -> projector -> visual tokens in the LLM's embeddings.

`ParGoForConditionalGeneration` is a transformers `PreTrainedModel` with its own config
class, registered with the Auto classes, so `save_pretrained` / `from_pretrained` and
`AutoModelForImageTextToText` work as for any HF model. It knows nothing of ranks or data
formats: backends spread it over devices, the data pipeline builds its inputs.

Inputs follow the "expanded placeholder" convention: a prompt holds, for every image, as
many `image_token_id` tokens as the projector emits (`num_image_tokens`); their embeddings
are replaced by the visual tokens in order. Because the sequence length never changes
inside the model, padding (left or right), labels and generation line up without bookkeeping.
`insert_image_tokens` expands a single placeholder for callers that hold one per image.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.accelerate import init_empty_weights

from pargo_dist.constants import IGNORE_INDEX, PARTS, STAGES
from pargo_dist.errors import UserError
from pargo_dist.models.pretrained import fill_causal_lm
from pargo_dist.models.projector import (
    MLPProjector,
    ProjectorConfig,
    QueryProjector,
    build_projector,
    init_projector_weights,
)
from pargo_dist.models.vision import VisionTower, vision_config_from


class ParGoConfig(PretrainedConfig):
    """Config of a ParGo MLLM: a vision config, a text (causal LM) config and the projector.

    Args:
        vision_config: config (or dict with model_type) of the vision tower; default a tiny CLIP.
        text_config: config (or dict with model_type) of the causal LM; default a tiny Llama.
        projector: `ProjectorConfig` fields (type pargo | qformer | mlp, queries, depth, ...).
        image_token_id: the placeholder token id in input_ids (must be < the LLM vocab size).
        vision_feature_layer: which hidden state of the tower feeds the projector (-2: penultimate).
        vision_drop_cls: drop the CLS token (None: if the tower has one).
        vision_post_layernorm: apply the tower's final LayerNorm to the selected features.
        vision_class: transformers class name of the tower when its model_type is not enough.
        always_run_vision: in training, run tower + projector even on a batch without images
            (contributing zero), so every rank runs the same modules every step. ZeRO-3 gathers
            parameters per module; a rank that skips them while others gather hangs the job.
    """

    model_type = "pargo"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projector: dict | ProjectorConfig | None = None,
        image_token_id: int | None = None,
        vision_feature_layer: int = -2,
        vision_drop_cls: bool | None = None,
        vision_post_layernorm: bool = False,
        vision_class: str | None = None,
        always_run_vision: bool = True,
        **kwargs: Any,
    ):
        self.vision_config = vision_config_from(vision_config or {"model_type": "clip_vision_model"})
        if isinstance(text_config, dict):
            values = dict(text_config)
            text_config = AutoConfig.for_model(values.pop("model_type", "llama"), **values)
        self.text_config = text_config or AutoConfig.for_model("llama")
        if isinstance(projector, ProjectorConfig):
            projector = projector.to_dict()
        self.projector = ProjectorConfig.from_dict(projector or {}).to_dict()  # validated
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.vision_drop_cls = vision_drop_cls
        self.vision_post_layernorm = vision_post_layernorm
        self.vision_class = vision_class
        self.always_run_vision = always_run_vision
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def projector_config(self) -> ProjectorConfig:
        return ProjectorConfig.from_dict(self.projector)


class ParGoPreTrainedModel(PreTrainedModel):
    config_class = ParGoConfig
    base_model_prefix = "pargo"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: nn.Module) -> None:
        # Vision tower and LLM were initialised by their own classes; only ours is left.
        if isinstance(module, (QueryProjector, MLPProjector)):
            init_projector_weights(module, module.cfg.init_std)


class ParGoForConditionalGeneration(ParGoPreTrainedModel):
    """Vision tower + ParGo projector + any AutoModelForCausalLM."""

    def __init__(self, config: ParGoConfig, empty_llm: bool = False):
        """`empty_llm`: build the LLM's parameters on the meta device (no memory, no random init),
        for weights that come from a checkpoint afterwards (`from_components`, the backends)."""
        super().__init__(config)
        if config.image_token_id is None:
            raise UserError("ParGoConfig.image_token_id is not set: give the id of the image placeholder token")
        vocab = config.text_config.vocab_size
        if not 0 <= config.image_token_id < vocab:
            raise UserError(f"image_token_id={config.image_token_id} is outside the LLM vocabulary (size {vocab})")
        self.vision_tower = VisionTower.build(
            config.vision_config,
            class_name=config.vision_class,
            feature_layer=config.vision_feature_layer,
            drop_cls=config.vision_drop_cls,
            post_layernorm=config.vision_post_layernorm,
        )
        self.projector = build_projector(
            config.projector_config,
            self.vision_tower.width,
            config.text_config.hidden_size,
            self.vision_tower.grid,
        )
        with init_empty_weights(include_buffers=False) if empty_llm else contextlib.nullcontext():
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- construction from pretrained parts -----------------------------------------------

    @classmethod
    def from_components(
        cls,
        vision: str | Path | PretrainedConfig | dict,
        llm: str | Path | PretrainedConfig | dict,
        projector: dict | ProjectorConfig | None = None,
        image_token_id: int | None = None,
        llm_weights: bool = True,
        vocab_size: int | None = None,
        llm_dtype: torch.dtype = torch.float32,
        **config_kwargs: Any,
    ) -> "ParGoForConditionalGeneration":
        """Assemble from a vision tower and an LLM, each a local directory (pretrained weights)
        or a config (random weights). The projector always starts from its initialisation.

        A pretrained LLM is built without weights and filled from its safetensors tensor by
        tensor, as `llm_dtype` (the peak is one copy of it, not the three that a random init,
        `from_pretrained` and a copy would hold). `llm_weights=False` leaves it on the meta
        device, for a backend that reads only its own share (megatron, ZeRO-3 partitioned).
        `vocab_size`: the LLM's vocabulary when the tokenizer added tokens (grown rows start at
        the mean of the pretrained ones, see hf_checkpoint.read_rows)."""
        llm_is_path = isinstance(llm, (str, Path))
        text_config = AutoConfig.from_pretrained(str(llm)) if llm_is_path else llm
        if vocab_size is not None:
            if isinstance(text_config, dict):
                text_config = {**text_config, "vocab_size": vocab_size}
            else:
                text_config.vocab_size = vocab_size
        config = ParGoConfig(
            vision_config=vision_config_from(vision),
            text_config=text_config,
            projector=projector,
            image_token_id=image_token_id,
            **config_kwargs,
        )
        model = cls(config, empty_llm=llm_is_path)
        if isinstance(vision, (str, Path)):
            pretrained = VisionTower.build(config.vision_config, vision, config.vision_class).model
            model.vision_tower.model.load_state_dict(pretrained.state_dict())
        if llm_is_path and llm_weights:
            fill_causal_lm(model.language_model, llm, llm_dtype)
        return model

    # -- HF plumbing -----------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # -- stages ----------------------------------------------------------------------------

    def freeze(self, stage: str) -> None:
        """Set requires_grad for a training stage: align | finetune | full (see STAGES)."""
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}; valid stages: {sorted(STAGES)}")
        for name in PARTS:
            getattr(self, name).requires_grad_(name in STAGES[stage])
        self.vision_tower.train(self.vision_tower.training)  # a frozen tower drops to eval mode

    # -- forward ---------------------------------------------------------------------------

    def num_image_tokens(self, crops: int = 1) -> int:
        """Visual tokens one image of `crops` crops becomes (placeholders to put in input_ids)."""
        return self.projector.num_tokens(crops * self.vision_tower.num_patches)

    def encode_images(self, pixel_values: torch.Tensor, image_crops: Sequence[int] | None = None) -> torch.Tensor:
        """Visual tokens of a batch of images; see `encode_visual`."""
        return encode_visual(self.vision_tower, self.projector, pixel_values, image_crops)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_crops: Sequence[int] | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens spliced in at the image placeholders."""
        dummy_side = self.vision_tower.image_size if self.training and self.config.always_run_vision else None
        return splice_visual_tokens(self.get_input_embeddings()(input_ids), input_ids, pixel_values,
                                    image_token_id=self.config.image_token_id,
                                    encode=functools.partial(self.encode_images, image_crops=image_crops),
                                    dummy_side=dummy_side)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        image_crops: Sequence[int] | None = None,
        **kwargs: Any,
    ):
        """As the LLM's forward, plus pixel_values. Labels on visual tokens are ignored.

        pixel_values: (images, 3, H, W) with one crop per image, or every image's crops in a row
        (crops in all, 3, H, W) with `image_crops` (a host-side list: crops of each image, in
        the order their placeholders appear; see encode_visual).

        Without position_ids, they are derived from attention_mask, so a left-padded batch
        gives every sample the same positions (and logits) as it would alone. Packed rows
        (pargo_dist.data.collate) pass position_ids that restart per sample and no mask.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_crops)
        if labels is not None and input_ids is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and past_key_values is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if use_cache is None and past_key_values is None and (self.training or attention_mask is None):
            # No KV cache in training, nor for packed rows (position ids without a 2-D mask):
            # transformers derives the block-diagonal mask of packed samples only without a cache.
            use_cache = False
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_crops: Sequence[int] | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Generate after the prompt (pad it on the left for batches). Returns the new tokens only.

        Accepts every `GenerationMixin.generate` argument (num_beams=4, max_new_tokens=100 is
        the ParGo release's decoding).
        """
        embeds = self.embed(input_ids, pixel_values, image_crops)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )


def encode_visual(tower: nn.Module, projector: nn.Module, pixel_values: torch.Tensor,
                  image_crops: Sequence[int] | None = None) -> torch.Tensor:
    """Pixels -> visual tokens: (images, tokens, llm_hidden), or (tokens in all, llm_hidden), the
    images' tokens in a row, when their token counts differ (an MLP projector on mixed crops).

    pixel_values: (images, [crops,] 3, H, W), or with `image_crops` every image's crops in a row
    (crops in all, 3, H, W). The tower runs once over every crop of the batch and the projector
    once over every image, whatever the mix: ZeRO-3 gathers a module's weights collectively on
    each call, so every rank must make the same calls. An image gets its own crops' patches
    (crop-major); images with fewer crops are padded and masked (RaggedPatches), so each gets
    the tokens it gets alone.
    """
    feats = tower(pixel_values)
    if image_crops is None:
        return projector(feats)
    if isinstance(image_crops, torch.Tensor):  # a processor's output (BatchFeature makes tensors of lists)
        image_crops = image_crops.tolist()
    n = tower.num_patches
    if len(set(image_crops)) == 1:  # one crop count: one dense (images, crops x patches) batch
        return projector(feats.reshape(len(image_crops), image_crops[0] * n, feats.shape[-1]))
    lengths = [c * n for c in image_crops]
    per_image = feats.reshape(-1, feats.shape[-1]).split(lengths)
    out = projector(nn.utils.rnn.pad_sequence(per_image, batch_first=True), lengths)
    tokens = [projector.num_tokens(k) for k in lengths]
    if len(set(tokens)) == 1:
        return out
    return torch.cat([out[b, :t] for b, t in enumerate(tokens)])


def splice_visual_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, *,
                         image_token_id: int, encode, dummy_side: int | None = None) -> torch.Tensor:
    """Replace the image placeholders' rows of `embeds` (b, s, h) by `encode(pixel_values)`.

    A function, not a method, so a backend with its own (vocab-parallel) embedding table splices
    exactly as the HF model does. `dummy_side`: on a batch without images, still run `encode`
    on one blank image of that side (contributing zero) so every rank runs the same modules.
    """
    is_image = input_ids == image_token_id
    if pixel_values is not None:
        visual = encode(pixel_values)
        n_tokens = visual.shape[:-1].numel()
        _check(is_image.sum() == n_tokens, lambda: (
            f"input_ids hold {int(is_image.sum())} image placeholder tokens (id {image_token_id}) but "
            f"the images give {n_tokens} visual tokens ({tuple(visual.shape[:-1])}): expand each image's "
            "placeholder to its token count with insert_image_tokens (model.num_image_tokens(crops))"))
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype))
    _check(~is_image.any(), lambda: "input_ids hold image placeholder tokens but no pixel_values were given")
    if dummy_side:
        dummy = embeds.new_zeros(1, 3, dummy_side, dummy_side)
        embeds = embeds + 0.0 * encode(dummy).sum()
    return embeds


def _check(ok: torch.Tensor, message) -> None:
    """Raise ValueError(message()) unless the one-element tensor `ok` is true. On the CPU that is
    free; on an accelerator reading `ok` would make the host wait for the device in the middle of
    every forward (the placeholder count is only known there), so the check is a device-side
    assert instead: the step still fails, at the next kernel launch, without a sync. The batches
    the data pipeline collates always pass (their placeholders are expanded on the host)."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok)


def insert_image_tokens(ids: Iterable[int], image_token_id: int, num_tokens: int) -> list[int]:
    """Expand every single image placeholder in `ids` into `num_tokens` placeholders."""
    out: list[int] = []
    for tok in ids:
        out.extend([tok] * num_tokens if tok == image_token_id else [tok])
    return out


AutoConfig.register(ParGoConfig.model_type, ParGoConfig, exist_ok=True)
AutoModel.register(ParGoConfig, ParGoForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(ParGoConfig, ParGoForConditionalGeneration, exist_ok=True)
