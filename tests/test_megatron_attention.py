"""Our SDPA core attention (backends/megatron/attention.py) against megatron's own
DotProductAttention, in-process at TP=1 (a 1-rank group): outputs and the gradients of q, k and
v, for multi-head and grouped-query attention, with megatron's explicit masks and, for a
right-padded batch, with no mask at all (causal). TP=2 runs end to end in test_megatron.py (the
TP=2 loss curve and gradients against DeepSpeed's)."""

from __future__ import annotations

import pytest
import torch

import pargo_dist.backends.megatron.backend  # noqa: F401  (megatron's CPU shims first)
from pargo_dist.backends.megatron.attention import SDPAttention
from pargo_dist.backends.megatron.model import causal_padding_mask

S, B, D = 9, 3, 8


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def attentions(heads: int, groups: int):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(num_layers=1, hidden_size=heads * D, num_attention_heads=heads, num_query_groups=groups,
                               kv_channels=D, attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                               masked_softmax_fusion=False)
    args = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(config, **args), SDPAttention(config, **args)


def run(attention, q, k, v, mask, rows):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * weights * rows[..., None]).sum().backward()
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_sdpa_core_attention_equals_megatrons(heads, groups, padding):
    # Two kernels for the same math: compared in float64, where their rounding differs by ~1e-15.
    # In float32 an entry that is exactly 0 (the first query's gradient: it sees only itself) came
    # out at 1e-6 on one CPU and not another; here 1e-10 is both strict and portable (a wrong or
    # shifted mask moves outputs and gradients by ~1).
    torch.manual_seed(0)
    q = torch.randn(S, B, heads, D, dtype=torch.float64)
    k, v = torch.randn(S, B, groups, D, dtype=torch.float64), torch.randn(S, B, groups, D, dtype=torch.float64)
    keep = torch.ones(B, S, dtype=torch.long)
    if padding == "right":
        keep[1, 6:], keep[2, 3:] = 0, 0
    elif padding == "left":
        keep[1, :4], keep[2, :2] = 0, 0
    rows = keep.T.double()  # (s, b): what reaches the loss
    mask = causal_padding_mask(keep)
    theirs, ours = attentions(heads, groups)
    want = run(theirs, q, k, v, mask, rows)
    cases = {"explicit mask": mask}
    if padding != "left":  # padding keys after every real query: causal alone is exact
        cases["no mask (causal)"] = None
    for case, given in cases.items():
        got = run(ours, q, k, v, given, rows)
        assert got[0].dtype == torch.float64
        torch.testing.assert_close(got[0] * rows[..., None], want[0] * rows[..., None], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{case}: output: {m}")
        for name, a, b in zip("qkv", got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{case}: grad {name}: {m}")


def test_a_right_padded_batch_needs_no_mask():
    from pargo_dist.backends.megatron.model import needs_padding_mask

    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert not needs_padding_mask(right) and not needs_padding_mask(torch.ones(2, 5, dtype=torch.long))
    assert needs_padding_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    assert needs_padding_mask(torch.tensor([[1, 0, 1]]))  # a hole
