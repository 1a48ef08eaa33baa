"""The planner: its activation trace on the meta device against what autograd really keeps on
CPU, its model-state memory against DeepSpeed's own estimators and against a real ZeRO run's
process memory, and `pargo-dist plan` on the shipped recipes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from pargo_dist import cli
from pargo_dist.config import load_config
from pargo_dist.plan.estimate import Hardware, Layout, candidates, estimate, fits, model_state_bytes
from pargo_dist.plan.trace import shapes_of, trace_activations

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("stage", ["align", "finetune", "full"])
def test_meta_trace_counts_what_autograd_keeps_on_cpu(text_type, stage):
    """The planner traces on the meta device (no memory); a real CPU forward of the same model
    keeps the same bytes for the backward: exactly for the LLM layer and head, within 1% for
    the projector (its masked attention), in every stage (a frozen LLM in `align` still keeps
    what the projector's gradient needs)."""
    real_model = tiny_model(text_type)
    real_model.freeze(stage)
    real_model.train()
    with torch.device("meta"):
        meta_model = type(real_model)(real_model.config)
    meta_model.freeze(stage)
    meta_model.train()
    real, real_split = trace_activations(real_model, micro_batch=2, seq_len=40)
    meta, meta_split = trace_activations(meta_model, micro_batch=2, seq_len=40)
    assert meta["llm_layer"] == real["llm_layer"] > 0 and meta_split == real_split
    assert meta["llm_head"] == real["llm_head"] > 0
    assert meta["vision"] == real["vision"]
    assert (real["vision"] > 0) == (stage == "full")  # a frozen tower keeps nothing
    assert meta["projector"] == pytest.approx(real["projector"], rel=0.01)
    if stage == "align":  # frozen Linears keep no inputs: less than when the LLM trains
        full, _ = trace_activations(tiny_model(text_type), micro_batch=2, seq_len=40)
        assert 0 < real["llm_layer"] < full["llm_layer"]


def test_flash_like_trace_keeps_no_square_attention_matrix():
    """At 2,048 tokens the S x S probabilities of the math path would dominate a layer; the
    planner models FlashAttention, which keeps q, k, v, the output and the log-sum-exp."""
    from pargo_dist.build import meta_model

    cfg = load_config(RECIPES / "paper-stage2-finetune.yaml")
    model = meta_model(cfg).to(torch.bfloat16)
    model.freeze("finetune")
    model.train()
    seq, heads = 2048, model.config.text_config.num_attention_heads
    flash, _ = trace_activations(model, micro_batch=1, seq_len=seq)
    math, _ = trace_activations(model, micro_batch=1, seq_len=seq, flash_like=False)
    assert math["llm_layer"] - flash["llm_layer"] >= heads * seq * seq * 2  # bf16 probabilities
    # what remains: ~29 bf16 hidden-widths per token (SwiGLU 3.5h, fp32 norm upcasts, HF eager)
    hidden = model.config.text_config.hidden_size
    assert 20 * hidden * 2 < flash["llm_layer"] / seq < 40 * hidden * 2


def test_bf16_model_states_match_deepspeeds_estimators():
    """DeepSpeed's estimators (fp16/bf16 mixed precision, all parameters trainable) count 18 bytes
    per parameter over the ranks plus, for ZeRO-3, 4 bytes per parameter of the largest layer;
    for ZeRO-2, 2 bytes of every parameter replicated. Ours must agree up to those terms."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(RECIPES / "llama3-8b-stage2.yaml", ["train.stage=full"])
    s = shapes_of(cfg, micro_batch=1, seq_len=128)
    total = sum(s.params.values())
    for gpus in (8, 64):
        ours3 = sum(model_state_bytes(s, Layout("deepspeed", zero_stage=3), gpus).values())
        _, ds3, *_ = estimate_zero3_model_states_mem_needs(total, s.largest_module, num_gpus_per_node=gpus,
                                                           cpu_offload=False)
        assert ours3 == pytest.approx(ds3 - 4 * s.largest_module, rel=1e-6)
        ours2 = sum(model_state_bytes(s, Layout("deepspeed", zero_stage=2), gpus).values())
        _, ds2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
        assert ours2 == pytest.approx(ds2 - 2 * total / gpus, rel=1e-6)


def test_zero3_counts_a_frozen_tower_whole_on_every_gpu():
    """The DeepSpeed backend keeps a frozen vision tower out of ZeRO-3's partitions (whole on each
    rank); the planner counts it so: the rest partitioned over the GPUs, the tower once per GPU."""
    cfg = load_config(RECIPES / "llama3-8b-stage2.yaml")  # finetune: the tower is frozen
    s = shapes_of(cfg, micro_batch=1, seq_len=128)
    assert cfg.train.stage == "finetune" and cfg.train.precision == "bf16" and not s.trainable["vision_tower"]
    tower, total = s.params["vision_tower"], sum(s.params.values())
    for gpus in (8, 64):
        got = model_state_bytes(s, Layout("deepspeed", zero_stage=3), gpus)["weights"]
        assert got == pytest.approx(2.0 * (total - tower) / gpus + 2.0 * tower)


def test_megatron_states_shrink_with_tensor_and_pipeline_parallel():
    cfg = load_config(RECIPES / "llama3-70b-stage2.yaml")
    s = shapes_of(cfg, micro_batch=1, seq_len=256)
    hw = Hardware(gpus=256)
    w = {(tp, pp): estimate(cfg, hw, Layout("megatron", tp=tp, pp=pp), s).memory["weights"]
         for tp, pp in ((1, 1), (8, 1), (8, 4))}
    assert w[(1, 1)] / w[(8, 1)] == pytest.approx(8, rel=0.05)  # vision + projector stay whole
    assert 3.0 < w[(8, 1)] / w[(8, 4)] < 4.0  # the first stage also holds the embedding


def test_fit_search_returns_the_first_layout_that_fits():
    cfg = load_config(RECIPES / "qwen2.5-32b-stage2.yaml")
    hw = Hardware(gpus=8, gpu_mem_gib=80)
    s = shapes_of(cfg)
    results = [(lay, estimate(cfg, hw, lay, s)) for lay in candidates(cfg, hw)]
    verdicts = [fits(e, hw) for _, e in results]
    assert not verdicts[0]  # ZeRO-1 with a 32B model's full bf16 weights cannot fit 80 GiB
    first = verdicts.index(True)
    assert results[first][0].zero_stage == 3 or results[first][0].offload_optimizer


def test_plan_cli_prints_memory_time_and_the_fitting_layout(capsys):
    recipe = str(RECIPES / "paper-stage2-finetune.yaml")
    assert cli.main(["plan", recipe, "--gpus", "64", "--fit", "model.lora.r=0"]) == 0  # full fine-tuning
    out = capsys.readouterr().out
    assert "8.06B parameters" in out and "7.76B trainable" in out
    assert cli.main(["plan", recipe, "--gpus", "8"]) == 0  # as written: LoRA r=256 on q, k, v of 32 layers
    lora = capsys.readouterr().out
    adapters = 32 * 256 * ((4096 + 4096) + 2 * (4096 + 1024))  # r x (in + out); k, v project to 8 x 128
    assert f"{(adapters + 21.3e6) / 1e6:.1f}M trainable" in lora
    def ckpt(text: str) -> float:
        return float(re.search(r"checkpoint ([\d.]+) GB", text).group(1))

    assert ckpt(lora) < ckpt(out) / 5  # adapters + projector and their Adam state, not the 7B LLM
    # a save stops training for the write at 2 GB/s per node; in the background, for what is left
    # of each GPU's copy to host memory after the next forward and backward (here: nothing)
    sync_s, bg_s, copy_s, host = re.search(r"written in ~([\d.]+) s by 8 node\(s\).* background \(checkpoint.async_save\) "
                                           r"~([\d.]+) s \(a ([\d.]+) s copy to host memory.*, ([\d,]+) GiB", out).groups()
    assert float(sync_s) == pytest.approx(ckpt(out) / 8 / 2, abs=1) and float(bg_s) == 0.0
    assert float(copy_s) == pytest.approx(ckpt(out) / 64 / 20, abs=0.1) and int(host) == round(ckpt(out) * 1e9 / 8 / 2**30)
    for line in ("weights", "gradients", "optimizer", "activations", "buffers", "total"):
        assert re.search(rf"^\s+{line}\s+[\d.]+ GiB", out, re.M), line
    assert re.search(r"1,000,000 samples: [\d.]+ h", out) and "smallest layout that fits: ZeRO-" in out


def test_plan_cli_bad_override_names_the_key(capsys):
    assert cli.main(["plan", str(RECIPES / "paper-stage2-finetune.yaml"), "train.micro_bach=2"]) == 2
    assert "train.micro_batch" in capsys.readouterr().err


def test_start_up_host_memory_follows_how_each_backend_loads_the_checkpoint(capsys):
    """Per rank: a megatron rank holds its TP x PP share in fp32 before it moves to the GPU; a
    ZeRO rank that fills the whole LLM holds it in the training precision; ZeRO-3 partitioned as
    it is read holds its share of one tensor, and the ranks read the checkpoint once between
    them. A layout whose start-up exceeds --host-mem is refused."""
    from pargo_dist.plan.estimate import GiB, HOST_RESERVE_GIB, startup_host

    cfg = load_config(RECIPES / "qwen2.5-32b-stage2.yaml")
    s = shapes_of(cfg)
    hw = Hardware(gpus=64, host_mem_gib=256.0)
    llm, rest = s.params["language_model"], 4.0 * (s.params["vision_tower"] + s.params["projector"])
    base = HOST_RESERVE_GIB * GiB + rest
    whole = startup_host(s, Layout("deepspeed", zero_stage=3, zero_init=False), hw)
    assert whole["rank_gib"] * GiB == pytest.approx(base + 2.0 * llm)  # bf16: the LLM once per rank
    assert whole["node_gib"] == pytest.approx(8 * whole["rank_gib"]) and whole["read_gb"] == pytest.approx(16 * llm / 1e9)
    parts = startup_host(s, Layout("deepspeed", zero_stage=3, zero_init=None), hw)  # auto: 32B x 8 ranks > 64 GiB
    assert parts["partitioned"] and parts["rank_gib"] * GiB == pytest.approx(base + 6.0 * s.largest_module / 64)
    assert parts["read_gb"] == pytest.approx(8 / 64 * 2 * llm / 1e9)  # each rank its 1/64: the node its 8/64
    tp = startup_host(s, Layout("megatron", tp=8, pp=2), hw)
    stage = (math.ceil(s.llm_layers / 2) * s.llm_layer_params + s.llm_embed_params) / 8
    assert tp["rank_gib"] * GiB == pytest.approx(base + 4.0 * stage)
    assert tp["rank_gib"] < parts["rank_gib"] + 4.0 * stage / GiB < whole["rank_gib"]

    assert cli.main(["plan", str(RECIPES / "qwen2.5-32b-stage2.yaml"), "--gpus", "64", "--host-mem", "256",
                     "backend.zero_init=false"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"start-up: \d+ GiB host memory per node .* of 256 GiB: DOES NOT FIT: set backend.zero_init=true",
                     out)
    from dataclasses import replace

    from pargo_dist.plan.estimate import layout_of

    recipe_layout = layout_of(cfg)  # ZeRO-3 with recompute: fits the GPUs
    assert fits(estimate(cfg, hw, recipe_layout, s), hw)
    assert not fits(estimate(cfg, hw, replace(recipe_layout, zero_init=False), s), hw)  # not the host


_302M = [f"model.llm.config.{k}={v}" for k, v in dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=18,
                                                        num_attention_heads=16, num_key_value_heads=8,
                                                        vocab_size=32000).items()]


@pytest.mark.parametrize("recipe,overrides", [("tiny-cpu.yaml", _302M), ("llama3-8b-stage2.yaml", [])],
                         ids=["278M", "8B"])
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_gets_buffers_smaller_than_a_small_model_and_its_own_sizes_for_a_large_one(recipe, overrides, zero):
    """What the run gives DeepSpeed (ds_config, from the model it wraps): for a 278M model, a
    gradient bucket and a ZeRO-3 reuse distance well below the model (DeepSpeed's 5e8 and 1e9
    elements would hold every gradient, and keep every parameter gathered, through the step);
    for 8B, DeepSpeed's own defaults. For 8B on 8 GPUs in bf16 the plan then counts what
    DeepSpeed's documentation states: ZeRO-2's overlap_comm buckets at 4.5 x 5e8 elements x 2
    bytes. (How the plan's buffers compare with what a real engine allocates:
    test_deepspeed_backend.py::test_the_planner_counts_the_buffers_deepspeed_allocates.)"""
    from pargo_dist.backends.deepspeed.backend import ds_config
    from pargo_dist.build import meta_model
    from pargo_dist.plan.estimate import FRAMEWORK_RESERVE_GIB, GiB, buffer_bytes

    cfg = load_config(RECIPES / recipe, [*overrides, f"backend.zero_stage={zero}"])
    model = meta_model(cfg)
    model.freeze(cfg.train.stage)
    if zero == 3 and not any(p.requires_grad for p in model.vision_tower.parameters()):
        del model._modules["vision_tower"]  # as DeepSpeedBackend._take_out_frozen_tower hands it over
    given = ds_config(cfg, 8, model)["zero_optimization"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if total < 1e9:
        assert given["reduce_bucket_size"] <= trainable / 4
        if zero == 3:
            assert given["stage3_max_reuse_distance"] <= total / 2 and given["stage3_prefetch_bucket_size"] < total / 4
        return
    assert given["reduce_bucket_size"] == 500_000_000  # DeepSpeed's defaults (deepspeed.runtime.zero.config)
    if zero == 3:
        assert given["stage3_max_reuse_distance"] == given["stage3_max_live_parameters"] == 1_000_000_000
        assert given["stage3_prefetch_bucket_size"] == 50_000_000
        return
    planned = buffer_bytes(shapes_of(cfg, micro_batch=1, seq_len=64), Layout("deepspeed", zero_stage=zero), 8,
                           cfg.train.precision)["buffers"]
    assert cfg.train.precision == "bf16" and planned - FRAMEWORK_RESERVE_GIB * GiB == 4.5 * 500_000_000 * 2


def test_moe_counts_every_expert_split_by_ep_flops_of_the_active_ones_and_fit_chooses_ep():
    """Qwen3-30B-A3B (128 experts, 8 active): memory holds every expert, megatron splits them over
    EP ranks (the rest stays whole), ZeRO-3 over all ranks; FLOPs count the 8 experts a token
    runs (MFU of active parameters); `--fit` on 16 GPUs picks a layout with EP."""
    from pargo_dist.plan.estimate import GiB, options

    cfg = load_config(RECIPES / "qwen3-30b-a3b-stage2.yaml")
    s = shapes_of(cfg, micro_batch=1, seq_len=128)
    assert s.llm_experts == 128 and s.llm_expert_params == 128 * 3 * 2048 * 768
    experts = s.llm_layers * s.llm_expert_params  # 29B of the LLM's 30.5B
    hw = Hardware(gpus=16)
    weights = {ep: estimate(cfg, hw, Layout("megatron", ep=ep), s).memory["weights"] for ep in (1, 2, 8)}
    for ep in (2, 8):
        assert weights[1] - weights[ep] == pytest.approx(2.0 * experts * (1 - 1 / ep) / GiB, rel=1e-6)
    tower, total = s.params["vision_tower"], sum(s.params.values())
    zero3 = model_state_bytes(s, Layout("deepspeed", zero_stage=3), 16)["weights"]
    assert zero3 == pytest.approx(2.0 * (total - tower) / 16 + 2.0 * tower)
    two = ["model.llm.config.num_hidden_layers=2"]  # (FLOPs per layer: two layers say it, in less time)
    top8, top128 = (shapes_of(load_config(RECIPES / "qwen3-30b-a3b-stage2.yaml",
                                          [*two, f"model.llm.config.num_experts_per_tok={k}"]), micro_batch=1, seq_len=128)
                    for k in (8, 128))
    expert_flops = 6 * 128 * 2 * s.llm_expert_params  # forward + backward of every expert, per sample of 128 tokens
    assert top128.flops_per_sample - top8.flops_per_sample == pytest.approx(expert_flops * (1 - 8 / 128), rel=1e-3)
    fitting = [e for e in options(cfg, hw, s) if e.total_gib <= hw.gpu_mem_gib]
    assert fitting and fitting[0].layout.ep > 1, [e.layout.name() for e in fitting[:3]]
