"""Ranks of the reshardable-optimizer check (tests/test_checkpoint_elastic.py), started by run_ranks.

    python elastic_worker.py RECIPE OUT ZERO_STAGE CASE [--load DIR SAVED_WORLD STEP LOADED_OUT]
                                                        [--train N] [--save DIR]

Builds the tiny ParGo model of RECIPE for CASE (full: tower, projector and LLM all train, with a
tied output layer and odd sizes that ZeRO pads (ODD_TIED); align:
the projector only; lora: the projector and LoRA adapters on the frozen LLM) through
DeepSpeedBackend at ZERO_STAGE on this world size (one rank keeps ZeRO-3 when asked, as
backend.zero3_on_one_rank does), then in order:
  --load DIR SAVED_WORLD STEP LOADED_OUT
                          restores the checkpoint DIR written by SAVED_WORLD ranks at optimizer
                          step STEP (backend.load and set_step, the path a resume takes) and
                          writes the state it holds then to LOADED_OUT;
  --train N               N optimizer steps on fixed batches (each rank its own rows of them);
  --save DIR              backend.save into DIR.
Rank 0 writes OUT (the state at the end) and LOADED_OUT: for every trained parameter, its full fp32 master weights and Adam moments
as DeepSpeed assembles them across ranks (deepspeed.utils.safe_get_full_*) and the module's own
weight, Adam's step, and the LLM's output layer (is it the embedding, and its weight), so that a
test can compare the state one layout saved with the state another layout loaded.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import pargo_dist  # noqa: F401  (compat shims first)


# full: the LLM ties its output layer to its embedding, and the LLM's width (45), vocabulary (117)
# and the tower's width (33) are odd, so that under 2 ranks many tensors (norms, biases, the tied
# embedding) do not split evenly and ZeRO pads their partitions (3 heads of 16 and 3 of 11: RoPE
# wants even head sizes, CLIP does not care).
ODD_TIED = ["model.llm.config.tie_word_embeddings=true", "model.llm.config.vocab_size=117",
            "model.llm.config.hidden_size=45", "model.llm.config.intermediate_size=97",
            "model.llm.config.num_attention_heads=3", "model.llm.config.num_key_value_heads=1",
            "model.llm.config.head_dim=16", "model.vision.config.hidden_size=33",
            "model.vision.config.num_attention_heads=3"]
CASES = {"full": ["train.stage=full", *ODD_TIED], "align": ["train.stage=align"],
         "lora": ["train.stage=finetune", "model.lora.r=4", "model.lora.alpha=8"]}


def fixed_batches(model, tokenizer, steps: int, rank: int, world: int, rows: int = 4):
    """`steps` global batches of `rows` samples; this rank's share of each (rows / world)."""
    from pargo_dist.batch import Batch, count_targets

    g = torch.Generator().manual_seed(5)
    k, side = model.num_image_tokens(), model.vision_tower.image_size
    out = []
    for _ in range(steps):
        ids = torch.randint(model.config.image_token_id + 1, 60, (rows, 24 + k), generator=g)
        ids[:, 1:1 + k] = model.config.image_token_id
        labels = ids.clone()
        labels[:, :1 + k + 2] = -100
        pixels = torch.randn(rows, 3, side, side, generator=g)
        mine = slice(rank * rows // world, (rank + 1) * rows // world)
        b = Batch(input_ids=ids[mine], labels=labels[mine], attention_mask=torch.ones_like(ids[mine]),
                  pixel_values=pixels[mine], num_samples=rows // world, num_tokens=int(ids[mine].numel()),
                  num_targets=count_targets(labels[mine]))
        out.append((b, count_targets(labels)))
    return out


def full_state(backend) -> dict:
    """name -> fp32 master weights, exp_avg, exp_avg_sq and the module's own weight (what the forward
    uses), whole, on CPU, for every trained parameter; Adam's step; whether the LLM's output layer
    is its input embedding (tied) and that layer's weight as the forward sees it. Collective (ZeRO-3
    gathers the partitions)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    module = backend.engine.module
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    lm = module.language_model
    output = lm.get_output_embeddings().weight
    state = {}
    with deepspeed.zero.GatheredParameters([p for _, p in trained] + [output]):
        for name, p in trained:
            state[name] = {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone(),
                           "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone(),
                           "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone(),
                           "weight": p.detach().cpu().clone()}
        output_weight = output.detach().cpu().clone()
    base = backend.engine.optimizer.optimizer
    steps = {float(s["step"]) for s in base.state.values() if "step" in s}
    return {"params": state, "adam_steps": sorted(steps), "output_weight": output_weight,
            "tied": output is lm.get_input_embeddings().weight}


def deepspeed_rank(cfg, seed: int | None = None):
    """This rank's DeepSpeed backend with the recipe's model: the process group joined, the model
    built (after torch.manual_seed(seed), if given), frozen / adapted for its stage and set up.
    Returns (backend, model, tokenizer, rank, world)."""
    from pargo_dist import build
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend

    backend = DeepSpeedBackend(cfg)
    rank, world = backend.init_distributed()
    tokenizer = build.build_tokenizer(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = build.build_model(cfg, tokenizer)
    build.init_freeze_and_adapt(model, cfg, gather=backend.param_gather)
    backend.setup(model)
    return backend, model, tokenizer, rank, world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("out")
    ap.add_argument("zero", type=int)
    ap.add_argument("case", choices=list(CASES))
    ap.add_argument("--load", nargs=4, metavar=("DIR", "SAVED_WORLD", "STEP", "LOADED_OUT"))
    ap.add_argument("--train", type=int, default=0)
    ap.add_argument("--save")
    args = ap.parse_args()

    from pargo_dist.config import load_config

    cfg = load_config(args.recipe, [f"backend.zero_stage={args.zero}", "backend.zero3_on_one_rank=true",
                                    "train.micro_batch=2", *CASES[args.case]])
    backend, model, tokenizer, rank, world = deepspeed_rank(cfg, seed=0)
    backend.train(True)
    start = 0
    if args.load:
        directory, saved_world, start, loaded_out = args.load
        start = int(start)
        backend.load(directory, int(saved_world))
        backend.set_step(start)
        state = full_state(backend)
        if rank == 0:
            torch.save(state, loaded_out)
    for i, (batch, targets) in enumerate(fixed_batches(model, tokenizer, args.train, rank, world)):
        backend.train_batch([batch], float(targets), start + i)
    if args.save:
        backend.save(args.save)
    state = full_state(backend)
    if rank == 0:
        torch.save(state, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
