"""megatron-core's core attention as one torch `scaled_dot_product_attention` call.

Without Transformer Engine, megatron-core has one core attention, DotProductAttention: K and V
repeated per query head for GQA (repeat_interleave), a baddbmm into a full s x s score tensor,
a softmax under an explicit (b, 1, s, s) mask, a bmm. On a GPU that is several passes over s^2
memory per layer and head. torch's SDPA runs a flash or memory-efficient kernel (no s x s
tensor), takes grouped K/V as they are (`enable_gqa`), and needs no mask at all when attention
is plainly causal: a right-padded batch is (its padding keys come after every real query, and
what padding queries compute never reaches the loss).

`SDPAttention` keeps DotProductAttention's constructor (heads per tensor-parallel rank, softmax
scale, dropout) and replaces its forward; `megatron_model.build_gpt` names it as the layer
spec's core attention. Equal to DotProductAttention in logits and gradients
(tests/test_megatron_attention.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """query (sq, b, heads, d), key / value (sk, b, groups, d) for this TP rank; mask: megatron's
        boolean (b, 1, sq, sk), True where attention is not allowed, or None (causal). Returns
        (sq, b, heads * d), as DotProductAttention does."""
        if packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
            raise NotImplementedError("SDPAttention: packed sequences, attention bias and softmax offsets are not "
                                      "supported (neither are they by megatron's DotProductAttention)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, d)
        causal = attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask
            # a row that may attend nowhere (a left pad) gets NaN from SDPA, megatron's softmax a
            # uniform row: let it attend everywhere, as megatron's masked fill amounts to
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                                 is_causal=causal, scale=self.softmax_scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
