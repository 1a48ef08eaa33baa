"""train.compile (pargo_dist.backends.compile): each transformer block's forward through torch.compile.

Reference: the same model run eagerly. The tests compile with the aot_eager backend: dynamo
traces every block into a graph and AOTAutograd builds its joint forward/backward, exactly as
for inductor, but no kernels are generated (seconds instead of minutes on 2 CPU cores).
Eager and traced graphs compute the same function; the model runs in float64, where any
difference in op order or decomposition rounds to ~1e-15, so losses and gradients must agree to
1e-10 on any CPU (a real fault moves them by far more). Inductor on CPU was checked by hand the
same way (a 4-step tiny-cpu run: losses equal to 1e-7) and runs in the GPU benchmark's
"compiled" row.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model

from pargo_dist.backends.compile import compile_blocks, transformer_blocks
from pargo_dist.models.mllm import insert_image_tokens


def loss_and_grads(model, ids, pixels, mask=None):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [insert_image_tokens([1, IMAGE_TOKEN] + torch.randint(3, 60, (n,), generator=g).tolist(), IMAGE_TOKEN,
                                model.num_image_tokens()) for n in lengths]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, torch.randn(len(rows), 3, 32, 32, generator=g)


def test_compiled_blocks_give_the_eager_loss_and_gradients_with_one_graph_per_block_class():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = tiny_model().double().train()  # 2 decoder layers, tower layers, 2 projector layers; all train
    eager.freeze("full")
    compiled = copy.deepcopy(eager)
    blocks = transformer_blocks(compiled)
    kinds = {type(b).__name__ for b in blocks}
    assert len(blocks) >= 5 and len(kinds) == 3, kinds  # tower, projector and LLM layers
    assert compile_blocks([compiled], backend="aot_eager") == len(blocks)
    assert compile_blocks([compiled], backend="aot_eager") == 0  # once only

    graphs = []
    for lengths in ([5, 9], [7, 7, 3], [4, 12]):  # new shapes recompile once, as dynamic, then hold
        ids, mask, pixels = batch(eager, lengths)
        ref_loss, ref_grads = loss_and_grads(eager, ids, pixels, mask)
        loss, grads = loss_and_grads(compiled, ids, pixels, mask)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
        assert grads.keys() == ref_grads.keys() and any(n.startswith("vision_tower") for n in grads)
        for name in grads:
            assert grads[name].dtype == torch.float64, name
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])

    # Every layer of a class runs the same compiled code: one graph per block class, not one per
    # layer (a guard on the module itself would compile each layer again); a second shape adds
    # the dynamic-shape graph of each class, a third none.
    assert graphs == [len(kinds), 2 * len(kinds), 2 * len(kinds)], graphs


def test_a_copy_of_a_compiled_model_runs_its_own_weights():
    """compile_blocks binds the compiled forward to each block, so a deepcopy (EMA, a reference
    model) runs the copy's parameters, not the original's."""
    torch._dynamo.reset()
    model = tiny_model()
    compile_blocks([model], backend="aot_eager")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.language_model.parameters():
            p.mul_(0.5)
    ids, mask, pixels = batch(model, [6])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = twin(input_ids=ids, pixel_values=pixels).logits
    assert not torch.allclose(a, b)
    block = twin.language_model.model.layers[0]
    assert block.forward.__self__ is block


def test_an_unknown_compile_backend_lists_the_known_ones():
    from pargo_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.compile_backend='inductr'.*'inductor'"):
        load_config(None, ["train.compile=true", "train.compile_backend=inductr"])
