"""The ranks of megatron-backend checks, started by tests/test_megatron.py via run_ranks. One
start runs several cases in turn (the model-parallel groups are rebuilt between them), so the
ranks pay their imports once.

    python megatron_worker.py logits  OUT MODEL_TYPE:TP[:EP] [MODEL_TYPE:TP[:EP] ...]
    python megatron_worker.py grads   OUT RECIPE TP:PP:TIED[:compiled] [...]
    python megatron_worker.py moments OUT RECIPE STEP_DIR TP SAVED_WORLD
    python megatron_worker.py packed  OUT MODEL_TYPE:TP [...]

`logits`: a random tiny HF causal LM (TINY_LLMS: Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) converted
to this rank's GPTModel shard (MoE: its experts of the rank's expert-parallel slice);
rank 0 writes the largest |HF logits - megatron logits| and whether HF -> megatron -> HF gives
back identical tensors.
`grads`: the tiny ParGo MLLM of RECIPE on one batch, through MegatronBackend at TP x PP (the
rest of the ranks data parallel, each replica on the same batch), and
the same HF model on rank 0 as the reference (what the DeepSpeed backend computes: HF's loss
normalised by the answer-token count). Rank 0 writes loss and gradient differences for the
projector and every LLM weight (megatron grads converted back to HF names). A case ending in
`:compiled` compiles megatron's TransformerLayers as train.compile does (aot_eager backend).
`packed`: a row of three packed samples through the GPTModel shard (restarting positions, the
block-diagonal mask) against each sample alone; rank 0 writes the largest difference.
`moments`: the checkpoint STEP_DIR loaded at TP (megatron's resharding load); rank 0 torch.saves
every LLM weight with its Adam moments, whole and under HF names, and Adam's step.
OUT gets one JSON object per case, keyed by the case as given (moments: a torch file).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

import pargo_dist  # noqa: F401  (compat shims first)
from pargo_dist.backends.megatron import cpu as megatron_cpu
megatron_cpu.apply()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from pargo_dist.backends.megatron.convert import hf_state_from_megatron, megatron_state_from_hf, \
    transformer_config_kwargs  # noqa: E402


def init(tp: int, pp: int = 1, ep: int = 1) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, order="tp-ep-pp-dp" if ep > 1 else "tp-pp-dp")
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)


# the tiny causal LMs by name: Qwen2 tied, Qwen3 with a head_dim other than hidden / heads (24, not
# 16), untied ("qwen3") and tied ("qwen3-tied")
TINY_LLMS = {"llama": ("llama", {}), "qwen2": ("qwen2", {"tie_word_embeddings": True}),
             "qwen3": ("qwen3", {"head_dim": 24, "tie_word_embeddings": False}),
             "qwen3-tied": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}),
             # MoE: 4 experts, top 2; Qwen3-MoE renormalises the top-k (as Mixtral always does) or not
             "qwen3_moe": ("qwen3_moe", {"head_dim": 24, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "norm_topk_prob": True}),
             "qwen3_moe-raw": ("qwen3_moe", {"head_dim": 24, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 32, "norm_topk_prob": False}),
             "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2})}


def tiny_llm(name: str):
    torch.manual_seed(0)
    model_type, extra = TINY_LLMS[name]
    cfg = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               rope_theta=10000.0, **extra)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero, norms at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.3)
    return model


def gather_shards(local: dict, tp_rank: int, pp_rank: int, ep_rank: int | None = None) -> dict:
    """Every rank's state dict by (tp_rank, pp_rank), or (tp_rank, pp_rank, ep_rank) with experts split."""
    everything = [None] * dist.get_world_size()
    key = (tp_rank, pp_rank) if ep_rank is None else (tp_rank, pp_rank, ep_rank)
    dist.all_gather_object(everything, (key, {k: v.detach().cpu() for k, v in local.items() if torch.is_tensor(v)}))
    return dict(everything)


def tiny_gpt(model_type: str, tp: int, ep: int = 1):
    """A random tiny HF causal LM and this TP rank's GPTModel shard of it (eval mode); -> (hf, gpt, tp rank).
    Both in float64: the same function in other orders (TP splits the matmuls) then differs by
    ~1e-15 on any CPU, not by float32 rounding that varies with the CPU's kernels. HF still takes
    its RMSNorm in float32 (by design), so HF vs megatron logits differ by ~1e-7 of their scale;
    megatron vs megatron (packed vs alone) by ~1e-15."""
    from megatron.core.transformer import TransformerConfig

    from pargo_dist.backends.megatron.model import build_gpt

    init(tp, ep=ep)
    hf = tiny_llm(model_type).double()
    config = TransformerConfig(**transformer_config_kwargs(hf.config), tensor_model_parallel_size=tp,
                               expert_model_parallel_size=ep, moe_token_dispatcher_type="allgather",
                               use_cpu_initialization=True, perform_initialization=False,
                               bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                               persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                               params_dtype=torch.float64)
    gpt = build_gpt(config, hf.config, pre_process=True, post_process=True).double().eval()
    rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    gpt.load_state_dict(megatron_state_from_hf(hf.state_dict(), hf.config, tp, rank, ep=ep, ep_rank=ep_rank),
                        strict=True)
    return hf, gpt, rank


def check_logits(model_type: str, tp: int, ep: int = 1) -> dict | None:
    from pargo_dist.backends.megatron.model import causal_padding_mask

    hf, gpt, rank = tiny_gpt(model_type, tp, ep)
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        local = gpt(ids, torch.arange(24)[None].expand(2, 24), causal_padding_mask(mask))
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(local)
    real = mask.bool()
    shards = gather_shards(gpt.state_dict(), rank, 0, parallel_state.get_expert_model_parallel_rank() if ep > 1 else None)
    if dist.get_rank() == 0:
        back = hf_state_from_megatron(shards, hf.config, tp, ep=ep)
        original = hf.state_dict()
        if getattr(hf.config, "tie_word_embeddings", False):
            original = {k: v for k, v in original.items() if k != "lm_head.weight"}
        identical = sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
        return {"max_abs_diff": float((logits - ref)[real].abs().max()), "logit_scale": float(ref.abs().max()),
                "round_trip_identical": identical, "keys": len(original)}
    return None


def check_packed(model_type: str, tp: int) -> dict | None:
    """A row packing three samples (positions restarting at each, packed_causal_mask, the rotary
    embedding at those positions) against each sample run alone: every sample's logits."""
    from pargo_dist.backends.megatron.model import packed_causal_mask, rope_at_positions

    hf, gpt, _ = tiny_gpt(model_type, tp)
    rope_at_positions(gpt)
    torch.manual_seed(3)
    lengths = [9, 14, 5]
    samples = [torch.randint(0, hf.config.vocab_size, (1, n)) for n in lengths]
    row = torch.cat(samples, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]

    def logits(ids, pos, mask):
        with torch.no_grad():
            return tensor_parallel.gather_from_tensor_model_parallel_region(gpt(ids, pos, mask))

    gpt.rotary_pos_emb.positions = positions
    try:
        packed = logits(row, positions, packed_causal_mask(positions))[0]
    finally:
        gpt.rotary_pos_emb.positions = None
    alone = torch.cat([logits(x, torch.arange(x.shape[1])[None], None)[0] for x in samples])
    naive = logits(row, torch.arange(row.shape[1])[None], None)[0]  # (collective: every rank)
    with torch.no_grad():
        hf_alone = torch.cat([hf(input_ids=x).logits[0] for x in samples])
    if dist.get_rank() == 0:
        return {"max_abs_diff": float((packed - alone).abs().max()), "hf_diff": float((alone - hf_alone).abs().max()),
                "naive_diff": float((naive - alone).abs().max()), "logit_scale": float(alone.abs().max())}
    return None


def batch_for(model, tokenizer, n: int = 3, seq: int = 40):
    from pargo_dist.batch import Batch, count_targets

    torch.manual_seed(2)
    k = model.num_image_tokens()
    ids = torch.randint(model.config.image_token_id + 1, 60, (n, seq))
    ids[:, 1:1 + k] = model.config.image_token_id
    labels = ids.clone()
    labels[:, :1 + k + 3] = -100
    mask = torch.ones_like(ids)
    mask[1, seq - 7:] = 0
    ids[1, seq - 7:] = tokenizer.pad_token_id
    labels[1, seq - 7:] = -100
    side = model.vision_tower.image_size
    return Batch(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=torch.randn(n, 3, side, side),
                 num_samples=n, num_tokens=int(mask.sum()), num_targets=count_targets(labels))


def torch_optimizers(opt) -> list:
    """The torch optimizers inside megatron's wrappers."""
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    inner = getattr(opt, "chained_optimizers", None) or [getattr(opt, "optimizer", None)]
    return [o for sub in inner if sub is not None for o in torch_optimizers(sub)]


def check_grads(tp: int, pp: int, recipe: str, overrides: list[str], compiled: bool = False) -> dict | None:
    from pargo_dist import build
    from pargo_dist.backends.megatron.backend import MegatronBackend
    from pargo_dist.backends.compile import compile_blocks
    from pargo_dist.config import load_config

    cfg = load_config(recipe, ["backend.name=megatron", f"backend.tensor_parallel={tp}",
                               f"backend.pipeline_parallel={pp}", "optim.clip_grad=0", *overrides])
    backend = MegatronBackend(cfg)
    parallel_state.destroy_model_parallel()  # the previous case's layout
    backend.init_distributed()
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    model.freeze(cfg.train.stage)
    reference = copy.deepcopy(model)
    batch = batch_for(model, tokenizer)
    targets = float((batch.labels[:, 1:] != -100).sum())  # counted here, independently of Batch
    backend.setup(model)
    if compiled:
        assert compile_blocks([backend.module], "aot_eager") > 0
    backend.train(True)
    backend.ddp.zero_grad_buffer()
    halves = [replace(batch, **{k: v[rows] for k, v in vars(batch).items() if torch.is_tensor(v)})
              for rows in (slice(0, 2), slice(2, None))]
    loss_sum = backend._run_schedule(halves, 1.0 / targets, forward_only=False)
    backend.ddp.finish_grad_sync()
    dist.all_reduce(loss_sum)  # every data-parallel replica ran the same batch: counted dp times
    dp = parallel_state.get_data_parallel_world_size()
    backend.optimizer.prepare_grads()  # main_grad -> grad, as step() does first
    grad_norm = backend.optimizer.get_grad_norm()  # megatron's, over TP/PP shards without duplicates
    stage = backend.model
    grads = {f"language_model.{k}": p.main_grad for k, p in stage.language_model.named_parameters()}
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    shards = gather_shards({k.removeprefix("language_model."): v for k, v in grads.items()}, tp_rank, pp_rank)
    first_replica = parallel_state.get_data_parallel_rank() == 0  # the others hold the same gradients
    projector = ({n: p.main_grad.clone() for n, p in stage.projector.named_parameters()}
                 if stage.pre_process and first_replica else None)
    projectors = [None] * dist.get_world_size()
    dist.all_gather_object(projectors, projector)
    if dist.get_rank() == 0:
        reference.train(True)
        inputs = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        ref_out = reference(**inputs, num_items_in_batch=torch.tensor(targets))
        ref_out.loss.backward()
        text = model.config.text_config
        hf_grads = hf_state_from_megatron(shards, text, tp, pp)
        ref_llm = {n: p.grad for n, p in reference.language_model.named_parameters()}
        llm_diff = max(float((hf_grads[n] - g).abs().max()) for n, g in ref_llm.items() if n in hf_grads)
        ref_proj = {n: p.grad for n, p in reference.projector.named_parameters()}
        proj_diffs = [max(float((pg[n] - g).abs().max()) for n, g in ref_proj.items()) for pg in projectors if pg]
        # in float64: a float32 norm over all ~100k entries at once is itself off by ~5e-6 relative
        ref_norm = torch.cat([p.grad.double().flatten() for p in reference.parameters() if p.grad is not None]).norm()
        return {"loss": float(loss_sum) / dp / targets, "ref_loss": float(ref_out.loss),
                   "grad_norm": float(grad_norm), "ref_grad_norm": float(ref_norm),
                   "llm_grad_max_diff": llm_diff, "llm_grad_scale": max(float(g.abs().max()) for g in ref_llm.values()),
                   "projector_grad_max_diff": max(proj_diffs), "projector_copies": len(proj_diffs),
                   "projector_grad_scale": max(float(g.abs().max()) for g in ref_proj.values()),
                   "llm_tensors_compared": sum(n in hf_grads for n in ref_llm),
                   "adamw_fused": [bool(g["fused"]) and type(o).__name__ for o in torch_optimizers(backend.optimizer)
                                   for g in o.param_groups]}
    return None


def loaded_moments(recipe: str, step_dir: str, tp: int, saved_world: int) -> dict | None:
    """The checkpoint in `step_dir` loaded by MegatronBackend at TP=`tp` (the path a resume takes);
    every LLM weight and its Adam moments and step, put together across TP ranks and converted to
    HF names (rank 0 returns them). Two layouts loading one checkpoint must agree exactly."""
    from pargo_dist import build
    from pargo_dist.backends.megatron.backend import MegatronBackend
    from pargo_dist.config import load_config

    cfg = load_config(recipe, ["backend.name=megatron", f"backend.tensor_parallel={tp}"])
    backend = MegatronBackend(cfg)
    parallel_state.destroy_model_parallel()
    backend.init_distributed()
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    model.freeze(cfg.train.stage)
    backend.setup(model)
    backend.load(step_dir, saved_world)
    inner = torch_optimizers(backend.optimizer)
    state = {}
    for opt in inner:
        state.update(opt.state)
    params = dict(backend.model.language_model.named_parameters())
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    out, steps = {}, set()
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        local = {n: (p if key == "weight" else state[p][key]) for n, p in params.items() if p.requires_grad}
        shards = gather_shards(local, tp_rank, pp_rank)
        if dist.get_rank() == 0:
            out[key] = hf_state_from_megatron(shards, model.config.text_config, tp, 1)
    steps = {float(s["step"]) for s in state.values() if "step" in s}
    return {**out, "steps": sorted(steps)} if dist.get_rank() == 0 else None


if __name__ == "__main__":
    mode, out, *rest = sys.argv[1:]
    results = {}
    if mode in ("logits", "packed"):
        check = check_logits if mode == "logits" else check_packed
        for case in rest:  # MODEL_TYPE:TP, or MODEL_TYPE:TP:EP for an MoE LLM's experts over EP ranks
            model_type, tp, *ep = case.split(":")
            results[case] = check(model_type, int(tp), *map(int, ep))
    elif mode == "moments":  # RECIPE STEP_DIR TP SAVED_WORLD: the state a load gives, to torch.save
        recipe, step_dir, tp, saved_world = rest
        state = loaded_moments(recipe, step_dir, int(tp), int(saved_world))
        if dist.get_rank() == 0:
            torch.save(state, out)
        dist.barrier()
        dist.destroy_process_group()
        sys.exit(0)
    else:
        recipe, *cases = rest
        for case in cases:
            tp, pp, tied, *compiled = case.split(":")
            extra = ["model.llm.config.tie_word_embeddings=true"] if tied == "tied" else []
            results[case] = check_grads(int(tp), int(pp), recipe, extra, compiled == ["compiled"])
    if dist.get_rank() == 0:
        json.dump(results, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
