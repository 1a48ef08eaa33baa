"""The ParGo MLLM with a megatron-core GPTModel as its LLM (one pipeline stage of it).

The vision tower and projector stay the ordinary torch modules of the HF model: they run on
the first pipeline stage, replicated over the tensor-parallel ranks (every TP rank sees the
same batch and receives the full gradient of the decoder input, so their gradients agree
without a TP reduction). Their output is spliced into the word embeddings exactly as the HF
model does it (`splice_visual_tokens`), and the result enters the GPTModel as its
`decoder_input`: the transformer itself is megatron's own code.

The three parts keep the HF model's names (vision_tower, projector, language_model), so the
training stages, per-part learning rates and checkpoints speak the same language as the
DeepSpeed backend.

Positions: megatron's RoPE uses positions 0..s-1, so batches must be right-padded (the
training loader's default); packed rows are refused by the backend.
"""

from __future__ import annotations

import functools

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from pargo_dist.backends.megatron.attention import SDPAttention
from pargo_dist.backends.megatron.convert import gpt_model_kwargs
from pargo_dist.batch import pads_before_tokens
from pargo_dist.constants import IGNORE_INDEX, PARTS
from pargo_dist.models.mllm import encode_visual, splice_visual_tokens


def _router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's MoE router (moe_utils.router_gating_linear) tests a name,
    `te_general_gemm`, that the module defines only when Transformer Engine imports: without TE
    (every CPU, and our GPU image) routing raises NameError. None is what it means to test for."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt(config: TransformerConfig, hf_text_config, pre_process: bool, post_process: bool) -> GPTModel:
    """A GPTModel (local layer spec: plain torch ops, no Transformer Engine) for one pipeline stage,
    its core attention torch's SDPA (megatron_attention.SDPAttention). An MoE LLM gets megatron's
    MoELayer (router, token dispatcher, SequentialMLP of the rank's experts)."""
    if config.num_moe_experts:
        _router_without_transformer_engine()
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return GPTModel(config, spec, pre_process=pre_process, post_process=post_process,
                    **gpt_model_kwargs(hf_text_config))


def needs_padding_mask(mask_2d: torch.Tensor) -> bool:
    """Whether a (b, s) key mask needs an explicit attention mask. A right-padded batch (each row
    its tokens, then padding) does not: its padding keys come after every real query, so causal
    attention alone gives the real tokens the same result, and what padding queries compute never
    reaches the loss. Asked of the batch on the host, before it moves to the GPU (no sync)."""
    return pads_before_tokens(mask_2d)


def causal_padding_mask(mask_2d: torch.Tensor) -> torch.Tensor:
    """(b, s) 1/0 key mask -> megatron's (b, 1, s, s) boolean mask, True where attention is
    *not* allowed: future keys and padding keys."""
    s = mask_2d.shape[1]
    future = torch.ones(s, s, dtype=torch.bool, device=mask_2d.device).triu(1)
    return future[None, None] | (mask_2d[:, None, None, :] == 0)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) position ids of packed rows (restarting at 0 where a sample starts) -> megatron's
    (b, 1, s, s) boolean mask, True where attention is *not* allowed: another sample's tokens,
    and the future. Each sample attends only to itself, as if alone."""
    sample = (position_ids == 0).cumsum(-1)  # which sample of the row each token belongs to
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (sample[:, :, None] == sample[:, None, :]) & causal
    return ~allowed[:, None]


def rope_at_positions(gpt: GPTModel) -> None:
    """Let `gpt`'s rotary embedding follow per-token positions. megatron-core without Transformer
    Engine rotates token i by position i of its row; a packed row restarts positions at each
    sample. While `gpt.rotary_pos_emb.positions` holds (b, s) position ids, the embedding it
    returns (s, 1, 1, d) is gathered per token into (s, b, 1, d), which megatron's
    apply_rotary_pos_emb broadcasts over heads as before. An instance attribute, not a wrapper
    module: parameter and buffer names (and so checkpoints) stay megatron's."""
    rotary = getattr(gpt, "rotary_pos_emb", None)
    if rotary is None or getattr(rotary, "positions", "unset") != "unset":
        return
    base = rotary.forward
    rotary.positions = None

    def forward(*args, **kwargs):
        emb = base(*args, **kwargs)
        if rotary.positions is None:
            return emb
        return emb[rotary.positions.t()].squeeze(2)  # (s, b, 1, 1, d) -> (s, b, 1, d)

    rotary.forward = forward


class ParGoMegatron(MegatronModule):
    """One pipeline stage of the ParGo MLLM: [vision tower + projector +] GPT layers [+ loss]."""

    def __init__(self, config: TransformerConfig, hf_model, pre_process: bool, post_process: bool):
        super().__init__(config)
        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules look for
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = hf_model.config.image_token_id
        self.always_run_vision = hf_model.config.always_run_vision
        if pre_process:
            self.vision_tower = hf_model.vision_tower
            self.projector = hf_model.projector
        self.language_model = build_gpt(config, hf_model.config.text_config, pre_process, post_process)
        rope_at_positions(self.language_model)  # packed rows (data.train.pack)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in PARTS if hasattr(self, n)}

    # finalize_model_grads all-reduces a tied embedding's gradient between the first and last
    # pipeline stage; it asks the stage's model for these two.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand a non-first stage its input here."""
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, pixel_values: torch.Tensor, image_crops=None) -> torch.Tensor:
        return encode_visual(self.vision_tower, self.projector, pixel_values, image_crops)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                image_crops: list[int] | None = None) -> torch.Tensor:
        """Returns the per-token loss (b, s) on the last stage when labels are given (HF's
        shift: position i predicts token i+1; ignored positions give 0), logits (b, s, V/TP)
        without labels, and the hidden states (s, b, h) on other stages. attention_mask None:
        causal attention only (a right-padded batch needs no more: see needs_padding_mask).
        position_ids (packed rows, data.train.pack; no attention_mask): positions restart per
        sample, and each sample attends only to itself (packed_causal_mask)."""
        b, s = input_ids.shape
        decoder_input = None
        if self.pre_process:
            embeds = self.language_model.embedding.word_embeddings(input_ids)  # (b, s, h), all-reduced over TP
            dummy = self.vision_tower.image_size if self.training and self.always_run_vision else None
            embeds = splice_visual_tokens(embeds, input_ids, pixel_values, image_token_id=self.image_token_id,
                                          encode=functools.partial(self.encode_images, image_crops=image_crops),
                                          dummy_side=dummy)
            decoder_input = embeds.transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        rotary = getattr(self.language_model, "rotary_pos_emb", None)
        if position_ids is not None:
            mask = packed_causal_mask(position_ids)
            if rotary is not None:
                rotary.positions = position_ids
        else:
            position_ids = torch.arange(s, device=input_ids.device)[None].expand(b, s)
            mask = causal_padding_mask(attention_mask) if attention_mask is not None else None
        target = None
        if labels is not None and self.post_process:
            labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
            shifted = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1)
            target, keep = shifted.clamp(min=0), shifted != IGNORE_INDEX
        try:
            out = self.language_model(None, position_ids, mask, decoder_input=decoder_input, labels=target)
        finally:
            if rotary is not None:
                rotary.positions = None
        if target is not None:
            return out * keep
        return out
