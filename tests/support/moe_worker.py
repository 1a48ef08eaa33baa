"""Ranks of the MoE-under-ZeRO-3 check (tests/test_moe.py), started by run_ranks.

    python moe_worker.py RECIPE OUT STEPS

The tiny ParGo model of RECIPE with a Qwen3-MoE LLM (HF's own modules: 4 experts, top-2) through
DeepSpeedBackend (ZeRO-3 on 2 ranks; one rank runs ZeRO-2), STEPS optimizer steps on fixed
batches of 4 rows, each rank its own rows. Routing is forced by the row's half of the global
batch: a hook on every router adds a large logit to experts {0, 1} for the first two rows and
{2, 3} for the last two, so on 2 ranks rank 0 never runs experts 2 and 3 and rank 1 never runs
0 and 1 (the case that hangs ZeRO-3 when each expert is gathered as it is entered), and one
rank, holding all four rows, routes each row the same way. Rank 0 writes OUT: the step losses
(summed token losses over every rank / global targets) and the experts each rank ran.

DeepSpeed's own list of MoE blocks it gathers whole (zero_optimization.leaf_module: Mixtral,
Qwen2-MoE and Qwen3-MoE in 0.19.8) is emptied here, as it is for every MoE architecture it does
not list (DeepSeek, InternLM2-MoE, a custom model): what keeps the ranks together is then the
backend's own choice of leaves (DeepSpeedBackend._whole_layers_as_leaves) alone.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import pargo_dist  # noqa: F401  (compat shims first)

ROWS, EXPERTS, TOP_K = 4, 4, 2
MOE = ("model.llm.config={model_type: qwen3_moe, hidden_size: 48, intermediate_size: 96, moe_intermediate_size: 32, "
       f"num_experts: {EXPERTS}, num_experts_per_tok: {TOP_K}, norm_topk_prob: true, decoder_sparse_step: 1, "
       "num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 12, "
       "max_position_embeddings: 256}")


def force_routing(model, row_groups: torch.Tensor, ran: set[int]) -> None:
    """Every router's logits + 30 on the experts of each row's group (group g: experts 2g, 2g+1);
    the experts picked are added to `ran`."""
    bias = torch.zeros(2, EXPERTS)
    bias[0, :2] = bias[1, 2:] = 30.0

    def hook(_module, _inputs, logits):
        rows = len(row_groups)
        forced = logits.view(rows, -1, EXPERTS) + bias[row_groups][:, None, :].to(logits.dtype)
        ran.update(forced.topk(TOP_K, dim=-1).indices.unique().tolist())
        return forced.view_as(logits)

    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(hook)


def main() -> None:
    recipe, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from elastic_worker import deepspeed_rank, fixed_batches

    from pargo_dist.config import load_config

    from deepspeed.runtime.zero import leaf_module_config

    leaf_module_config.DEFAULT_LEAF_MODULE_CLASSES.clear()  # (see the module docstring)
    cfg = load_config(recipe, [MOE, "train.stage=full", "optim.lr=1e-2", "backend.zero_stage=3"])
    backend, _, tokenizer, rank, world = deepspeed_rank(cfg)
    mine = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    ran: set[int] = set()
    force_routing(backend.module, (torch.arange(ROWS) // (ROWS // 2))[mine], ran)
    losses = []
    for step, (batch, targets) in enumerate(fixed_batches(backend.module, tokenizer, steps, rank, world, rows=ROWS)):
        loss = backend.train_batch([batch], float(targets), step).detach().clone()
        dist.all_reduce(loss)
        losses.append(float(loss) / float(targets))
    experts = [None] * world
    dist.all_gather_object(experts, sorted(ran))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "experts": experts, "stage": backend.zero_stage}, f)


if __name__ == "__main__":
    main()
