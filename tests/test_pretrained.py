"""Pretrained LLMs as the hub ships them (bf16 safetensors, several shards, an index): read
tensor by tensor and slice by slice, never built whole on a megatron rank; errors that name the
file and the tensor. The reference is transformers' own `from_pretrained` of the same files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.pretrained import save_hub_style
from support.training import losses, run_train, write_recipe

from pargo_dist import build
from pargo_dist.backends.megatron.convert import megatron_state_from_checkpoint, megatron_state_from_hf
from pargo_dist.config import load_config
from pargo_dist.data.tokenizer import load_tokenizer
from pargo_dist.errors import UserError
from pargo_dist.models.pretrained import HFCheckpoint




@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory) -> Path:
    return save_hub_style(tmp_path_factory.mktemp(request.param) / "llm", request.param)


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def recipe_for(path: Path, *extra: str):
    return load_config(None, [f"model.llm.path={path}", "model.llm.config={}", *extra])


def test_the_llm_is_filled_tensor_by_tensor_as_from_pretrained_fills_it(checkpoint):
    """fp32 training: the same numbers as transformers' from_pretrained (bf16 -> fp32 is exact);
    bf16 training: the checkpoint's own bf16 tensors. The tokenizer's extra tokens grow the
    vocabulary to a multiple of 64; the new rows start at the mean of the pretrained rows."""
    tok = load_tokenizer("synthetic")  # 116 tokens > the checkpoint's 100
    ref = reference(checkpoint)
    model = build.build_model(recipe_for(checkpoint), tok)
    llm = model.language_model
    assert llm.get_input_embeddings().weight.shape == (128, 64) and model.config.text_config.vocab_size == 128
    want = ref.state_dict()
    got = llm.state_dict()
    for name, tensor in want.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(got[name][:100], tensor), name
            assert torch.allclose(got[name][100:], tensor.double().mean(0).float().expand(28, -1)), name
        else:
            assert torch.equal(got[name], tensor), name
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(llm(ids).logits[..., :100], ref(ids).logits)
    tied = bool(ref.config.tie_word_embeddings)
    assert (llm.get_output_embeddings().weight is llm.get_input_embeddings().weight) == tied
    half = build.build_model(recipe_for(checkpoint), tok, llm_dtype=torch.bfloat16).language_model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.state_dict()["model.layers.1.mlp.down_proj.weight"],
                       want["model.layers.1.mlp.down_proj.weight"].bfloat16())


def test_partitions_read_row_ranges_that_reassemble_the_whole_fill(checkpoint):
    """ZeRO-3 gives rank r the r-th equal slice of each flattened, padded parameter; each rank
    reads only the rows that hold its slice. Three ranks (so most tensors need padding), the
    vocabulary grown past the checkpoint's: the slices put end to end equal the whole fill."""
    from transformers import AutoModelForCausalLM

    from pargo_dist.models.pretrained import fill_causal_lm

    tok = load_tokenizer("synthetic")
    whole = build.build_model(recipe_for(checkpoint), tok).language_model.state_dict()
    config = build.build_model(recipe_for(checkpoint), tok, llm_weights=False).config.text_config
    ranks, shares = 3, {}
    for rank in range(ranks):
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)

        def partition(param, rank=rank):
            size = -(-param.numel() // ranks)
            flat = torch.full((size,), float("nan"))
            shares[(rank, names[id(param)])] = flat
            return flat, rank * size

        names = {id(p): n for n, p in llm.named_parameters()}
        assert fill_causal_lm(llm, checkpoint, torch.float32, partition=partition) == len(names)
    for name in names.values():
        joined = torch.cat([shares[(r, name)] for r in range(ranks)])
        want = whole[name].reshape(-1)
        assert torch.equal(joined[:want.numel()], want), name
        assert joined[want.numel():].isnan().all(), name  # the padding is left alone


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_each_megatron_rank_reads_exactly_its_slice(checkpoint, tp, pp):
    """What every (tp_rank, pp_rank) reads from the files equals the slice that the tested
    whole-model conversion (test_megatron.py: logits equal HF's) gives it."""
    tok = load_tokenizer("synthetic")
    model = build.build_model(recipe_for(checkpoint), tok)  # filled whole: the reference
    text, full = model.config.text_config, model.language_model.state_dict()
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            want = megatron_state_from_hf(full, text, tp, tp_rank, pp, pp_rank)
            got = megatron_state_from_checkpoint(checkpoint, text, tp, tp_rank, pp, pp_rank)
            assert sorted(got) == sorted(want)
            for key in want:
                assert torch.equal(got[key], want[key]), (tp_rank, pp_rank, key)


def test_each_expert_parallel_rank_reads_only_its_experts(tmp_path):
    """An MoE checkpoint (Qwen3-MoE, bf16 hub style): what each (tp_rank, ep_rank) reads from the
    files equals its slice of the tested whole-model conversion (test_megatron.py: MoE logits
    equal HF's at EP 1 and 2), and it holds only its experts' weights."""
    from transformers import AutoModelForCausalLM

    path = save_hub_style(tmp_path / "llm", "qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    full, text = hf.state_dict(), hf.config
    for tp, ep in ((1, 2), (2, 2), (1, 4)):
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                want = megatron_state_from_hf(full, text, tp, tp_rank, ep=ep, ep_rank=ep_rank)
                got = megatron_state_from_checkpoint(path, text, tp, tp_rank, ep=ep, ep_rank=ep_rank)
                assert sorted(got) == sorted(want)
                experts = {k.split("local_experts.")[1].split(".")[0] for k in got if "local_experts" in k}
                assert experts == {str(i) for i in range(4 // ep)}, (tp, ep, experts)
                for key in want:
                    assert torch.equal(got[key], want[key]), (tp_rank, ep_rank, key)


def test_a_megatron_rank_never_builds_the_llm(checkpoint):
    tok = load_tokenizer("synthetic")
    model = build.build_model(recipe_for(checkpoint, "backend.name=megatron"), tok, llm_weights=False)
    assert {p.device.type for p in model.language_model.parameters()} == {"meta"}
    assert {p.device.type for p in model.projector.parameters()} == {"cpu"}
    assert all(b.device.type == "cpu" for b in model.language_model.buffers())  # rotary frequencies stay real


def test_a_damaged_checkpoint_is_an_error_naming_the_file_and_the_tensor(tmp_path):
    path = save_hub_style(tmp_path / "llm", "llama")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tok = load_tokenizer("synthetic")

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))  # weights of another size
    with pytest.raises(UserError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\), the model needs "
                                        r"\(256, 64\)"):
        build.build_model(recipe_for(path), tok)
    (path / "config.json").write_text(json.dumps(config))

    missing_tensor = dict(index)
    gone = missing_tensor.pop("model.layers.1.self_attn.v_proj.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": missing_tensor}))
    with pytest.raises(UserError, match=r"has no tensor for the model's model.layers.1.self_attn.v_proj.weight"):
        build.build_model(recipe_for(path), tok)
    with pytest.raises(UserError, match=r"has no tensor model.layers.1.self_attn.v_proj.weight"):
        megatron_state_from_checkpoint(path, build.build_model(recipe_for(path, "model.llm.config={}"), tok,
                                                               llm_weights=False).config.text_config)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    (path / gone).unlink()  # a shard the index names
    with pytest.raises(UserError, match=rf"{path}: shard {gone} is missing \(1 of 2 files\), the index names it for "
                                        r"\S+ and others"):
        HFCheckpoint(path)


def test_megatron_tp2_from_a_bf16_checkpoint_follows_deepspeed_from_the_same_checkpoint(tmp_path, data_dir):
    """End to end, real ranks: the same pretrained Qwen3 (bf16 safetensors, shards, index; the
    Llama layers plus q/k norms and a head_dim of its own, so the one case covers both) trained
    by DeepSpeed (the LLM filled whole, HF's own modules) and by megatron at TP=2 (each rank
    reading its half; the q/k norms in megatron's qk_layernorm): the same loss curve, from the
    first step."""
    path = save_hub_style(tmp_path / "llm", "qwen3")
    common = [f"model.llm.path={path}", "model.llm.config={}", "train.steps=3", "train.micro_batch=8",
              "checkpoint.every=0", "data.eval=null"]
    ds = write_recipe(tmp_path / "ds.yaml", tmp_path / "ds", data_dir)
    run_train(ds, common, nproc=1)
    mg = write_recipe(tmp_path / "mg.yaml", tmp_path / "mg", data_dir)
    run_train(mg, [*common, "backend.name=megatron", "backend.tensor_parallel=2"], nproc=2)
    a, b = losses(tmp_path / "ds"), losses(tmp_path / "mg")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)


def test_zero3_partitioned_as_it_is_read_starts_where_the_whole_build_does(tmp_path, data_dir):
    """ZeRO-3 on 2 ranks from a bf16 checkpoint. Partitioned as it is read (zero.Init, each rank
    reads the rows of its partition): after one step at lr 0 the consolidated weights are
    the checkpoint's (fp32 and bf16 training), and the first loss equals the whole build's.
    With backend.zero_init=auto (null) the ranks see nodes of different sizes (a fault knob: one
    rank's node has 1 MiB): rank 0 decides for all, so "whole" and "parts" build alike on both
    ranks, where deciding apart would leave one rank in zero.Init's collectives alone."""
    from pargo_dist.backends.trained_weights import checkpoint_weights

    path = save_hub_style(tmp_path / "llm", "llama")
    ref = reference(path).state_dict()
    common = [f"model.llm.path={path}", "model.llm.config={}", "train.steps=1", "optim.lr=0", "data.eval=null",
              "backend.zero_stage=3"]
    first = {}
    for name, extra, small_node in (("whole", ["backend.zero_init=null"], "1"),
                                    ("parts", ["backend.zero_init=null"], "0"),
                                    ("parts16", ["backend.zero_init=true", "train.precision=bf16"], None)):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, data_dir)
        knob = {"PARGO_TEST_NODE_MEMORY": f"{small_node}:{2**20}"} if small_node else {}
        out = run_train(recipe, [*common, *extra], nproc=2, extra_env=knob)
        if small_node:  # said once, by rank 0, with its decision
            said = [line for line in out.stdout.splitlines() if "the pretrained LLM is" in line]
            how = "partitioned as it is read" if name == "parts" else "built whole on each rank"
            assert len(said) == 1 and how in said[0] and "backend.zero_init=auto:" in said[0], said
        first[name] = losses(tmp_path / name)[1]
        if name != "whole":
            saved = checkpoint_weights(tmp_path / name)
            for key, tensor in ref.items():
                got = saved[f"language_model.{key}"]
                rows = slice(0, 100) if "embed_tokens" in key or "lm_head" in key else slice(None)
                assert torch.equal(got[rows], tensor), (name, key)
    assert first["parts"] == pytest.approx(first["whole"], rel=1e-6)
    assert first["parts16"] == pytest.approx(first["whole"], rel=2e-2)  # the same weights, bf16 arithmetic


def test_a_checkpoint_that_does_not_fit_stops_every_rank_with_the_named_tensor(tmp_path, data_dir):
    """Real ranks, each reading its own partition (ZeRO-3 partitioned as read): weights of another
    size end the job with exit 2 and one line naming the file and the tensor, not a traceback."""
    path = save_hub_style(tmp_path / "llm", "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    out = run_train(recipe, [f"model.llm.path={path}", "model.llm.config={}", "backend.zero_init=true"],
                    nproc=2, expect=2)
    err = out.stdout + out.stderr
    assert "Traceback" not in err, err[-3000:]
    assert "model.layers.0.mlp.gate_proj.weight has shape (128, 64), the model needs (256, 64)" in err, err[-3000:]


def test_node_memory_is_capped_by_the_cgroup_limit(tmp_path):
    """backend.zero_init=auto decides from what the job may use: a SLURM --mem or container limit
    (cgroup v2 memory.max, v1 memory.limit_in_bytes), not the machine's RAM that sysconf reports."""
    from pargo_dist.runtime.node_memory import node_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    (tmp_path / "memory.max").write_text("max\n")  # v2, no limit
    assert node_memory_bytes(tmp_path) == physical
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    assert node_memory_bytes(tmp_path) == min(physical, 2**30)
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert node_memory_bytes(tmp_path) == physical
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{3 * 2**29}\n")
    assert node_memory_bytes(tmp_path) == min(physical, 3 * 2**29)


def test_node_memory_reads_the_limit_on_an_ancestor_cgroup(tmp_path):
    """SLURM's cgroup v2 plugin puts a job's --mem on the job's group (and its step's), above the
    task's own group, whose memory.max says "max": the limit is read up the hierarchy (v1 alike)."""
    from pargo_dist.runtime.node_memory import node_memory_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    job = tmp_path / "system.slice" / "slurmstepd.scope" / "job_1234"
    task = job / "step_0" / "user" / "task_0"
    task.mkdir(parents=True)
    for group in (task, task.parent, task.parent.parent):
        (group / "memory.max").write_text("max\n")
    (job / "memory.max").write_text(f"{2**31}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/system.slice/slurmstepd.scope/job_1234/step_0/user/task_0\n")
    assert node_memory_bytes(tmp_path, proc) == min(physical, 2**31)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm" / "uid_0" / "job_9" / "step_0").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "uid_0" / "job_9" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    proc.write_text("5:memory:/slurm/uid_0/job_9/step_0\n")
    assert node_memory_bytes(v1, proc) == min(physical, 2**30)
