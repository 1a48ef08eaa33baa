"""The megatron-core backend, with real ranks over gloo on CPU.

References and tolerances (docs/architecture.md, "Testing: how tolerances are chosen"):
- Conversion: a random HF Llama / Qwen2 (GQA, q/k/v biases, tied embeddings) against its
  megatron GPTModel at TP=1 and TP=2, both in float64 (the same math in another order: TP splits
  the matmuls). HF keeps its RMSNorm in float32, so logits agree to ~1e-7 of their scale, not
  1e-15: the bound is FP32_SCALED (1e-5, ~84 float32 eps) of the largest logit. A packed row
  against its samples alone is megatron against itself: 1e-10. HF -> megatron -> HF is exact.
- Gradients: the ParGo MLLM through MegatronBackend (megatron's schedules, DDP buffers, TP/PP
  communication; float32 only) against the HF model on the same batch with the loss the
  DeepSpeed backend uses (HF loss normalised by the answer-token count): loss to 1e-6 relative
  (~8 eps of a mean over ~100 tokens; measured ~4e-8), every LLM and projector gradient to
  FP32_SCALED of the largest reference gradient (measured <= 6e-7 of it), megatron's grad norm
  (which must skip TP duplicates: counting the norm weights twice moves it by ~1e-4) to 1e-5
  relative against a float64 reference norm.
- Training: a TP=2 run follows the DeepSpeed loss curve (2 ranks x 4, the same global batch) to
  1e-4 relative; a resume at TP=2 replays the uninterrupted run to 1e-6; TP=2 -> TP=1 resume to
  1e-4 (the same math, other float order).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from support.ranks import run_ranks
from support.training import crash_copy, env, exported_eval_loss, losses, run_train, sample_ids, write_recipe

from support import forkserver
WORKER = Path(__file__).parent / "support" / "megatron_worker.py"
MEGATRON = ["backend.name=megatron"]
# float32 math in two orders (TP/PP splits, other kernels) differs by a few eps per reduction; 1e-5
# of the reference's largest entry (~84 float32 eps) bounds it on any CPU with 10x room, while a
# wrong layout, a missing term or a TP duplicate moves values by 1e-2 of it or more.
FP32_SCALED = 1e-5


def worker(tmp_path: Path, world: int, mode: str, *args: str) -> dict:
    out = tmp_path / f"result-{mode}.json"
    run_ranks(WORKER, [mode, str(out), *args], world, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def conversions(tmp_path_factory) -> dict:
    """Every (model type, TP) case of the conversion check, from one start of 2 ranks."""
    return worker(tmp_path_factory.mktemp("logits"), 2, "logits", *(f"{m}:{tp}" for m, tp in CONVERSIONS))


# Qwen3: q/k RMSNorm per head and a head_dim of 24 where hidden / heads is 16; untied and tied
CONVERSIONS = [("llama", 1), ("llama", 2), ("qwen2", 1), ("qwen2", 2), ("qwen3", 1), ("qwen3", 2), ("qwen3-tied", 2),
               # MoE (4 experts, top 2) through megatron's MoELayer: experts whole or split over 2
               # expert-parallel ranks (TP:EP), renormalised top-k (Qwen3-MoE, Mixtral) or not
               ("qwen3_moe", "1:1"), ("qwen3_moe", "1:2"), ("qwen3_moe", "2:1"), ("qwen3_moe-raw", "1:2"),
               ("mixtral", "1:2")]


@pytest.mark.parametrize("model_type,tp", CONVERSIONS)
def test_hf_logits_equal_megatron_logits_and_conversion_round_trips(conversions, model_type, tp):
    res = conversions[f"{model_type}:{tp}"]
    assert res["logit_scale"] > 0.1  # not a degenerate model
    assert res["max_abs_diff"] < FP32_SCALED * res["logit_scale"], res  # float64, but HF's RMSNorm in float32
    assert res["round_trip_identical"], res


@pytest.fixture(scope="module")
def grad_recipe(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("grad")
    return write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir)


@pytest.fixture(scope="module")
def gradients(tmp_path_factory, grad_recipe) -> dict:
    """The gradient check at TP2 PP1, TP1 PP2 (2 data-parallel replicas each) and TP2 PP2 tied, from
    one start of 4 ranks; and at TP2 with megatron's TransformerLayers compiled (train.compile:
    the tensor-parallel collectives inside the compiled graphs), from one start of 2 ranks (every
    rank compiles: on 4 ranks of 2 cores that costs 30 s; the HF blocks' compile is checked by
    tests/test_compile.py and test_train's compiled ZeRO-3 run)."""
    tmp = tmp_path_factory.mktemp("grads")
    eager = worker(tmp, 4, "grads", str(grad_recipe), "2:1:untied", "1:2:untied", "2:2:tied")
    return {**eager, **worker(tmp, 2, "grads", str(grad_recipe), "2:1:untied:compiled")}


@pytest.mark.parametrize("tp,pp,tied,compiled", [(2, 1, False, False), (1, 2, False, False), (2, 2, True, False),
                                                 (2, 1, False, True)])
def test_megatron_loss_and_gradients_equal_the_deepspeed_reference(gradients, tp, pp, tied, compiled):
    res = gradients[f"{tp}:{pp}:{'tied' if tied else 'untied'}" + (":compiled" if compiled else "")]
    assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-6)
    assert res["llm_tensors_compared"] == (20 if tied else 21)
    assert res["llm_grad_scale"] > 1e-2 and res["projector_grad_scale"] > 1e-2
    assert res["llm_grad_max_diff"] < FP32_SCALED * res["llm_grad_scale"], res
    assert res["projector_grad_max_diff"] < FP32_SCALED * res["projector_grad_scale"], res
    assert res["projector_copies"] == tp  # every TP rank of the first stage holds the same gradient
    assert res["grad_norm"] == pytest.approx(res["ref_grad_norm"], rel=1e-5)
    assert res["adamw_fused"] and set(res["adamw_fused"]) == {"AdamW"}  # every group: torch AdamW, fused


TP2 = [*MEGATRON, "backend.tensor_parallel=2", "train.micro_batch=8"]  # one replica of 8: the reference's global batch


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted megatron TP=2 run (2 ranks, one model replica reading 8 samples a step),
    shared below; checkpoints at steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("megatron_tp2")
    run_train(write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir), TP2, nproc=2)
    return tmp / "run"


def test_tp2_training_follows_the_deepspeed_loss_curve(tp2_run, reference):
    """The DeepSpeed reference: 2 ranks x 4 samples, ZeRO-3 (the same global batch of 8)."""
    ds, mg = reference(3, "finetune"), tp2_run
    a, b = losses(ds), losses(mg)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    ids_mg, ids_ds = sample_ids(mg), sample_ids(ds)
    for step in a:  # both TP ranks read (and log) the same samples: the DeepSpeed run's batches
        assert sorted(ids_mg[step]) == sorted(ids_ds[step] * 2)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
    assert losses(mg, "train/grad_norm")[1] == pytest.approx(losses(ds, "train/grad_norm")[1], rel=1e-4)
    assert losses(mg, "eval/loss")[6] == pytest.approx(losses(ds, "eval/loss")[6], rel=1e-4)
    assert b[6] < b[1] - 0.3


def resume_copy(tp2_run: Path, tmp_path: Path, data_dir) -> Path:
    """The TP=2 run as a crash after step 2 would leave it (support.training.crash_copy)."""
    return crash_copy(tp2_run, tmp_path, data_dir, after=2)


@pytest.fixture(scope="module")
def async_tp2_run(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """tp2_run's recipe with checkpoint.async_save (megatron-core's own asynchronous save: shards
    written by a forked process, finalized when every rank is done): its run dir and output."""
    tmp = tmp_path_factory.mktemp("megatron_async")
    out = run_train(write_recipe(tmp / "async.yaml", tmp / "run", data_dir), [*TP2, "checkpoint.async_save=true"],
                    nproc=2)
    return tmp / "run", out.stdout


def test_resume_at_the_same_layout_reproduces_the_uninterrupted_tp2_run(tp2_run, async_tp2_run, tmp_path, data_dir):
    """Model and optimizer from megatron's distributed checkpoint, at TP=2 again: steps 3..6 equal
    the uninterrupted run's. The checkpoint is the background-saving run's (equal to the
    synchronous run, test below): one written in the background resumes like a synchronous one."""
    out = run_train(resume_copy(async_tp2_run[0], tmp_path, data_dir), TP2, nproc=2)
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    ref, got = losses(tp2_run), losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, got)
    assert sample_ids(tmp_path / "run") == sample_ids(tp2_run)


def test_checkpoint_saved_at_tp2_resumes_at_tp1_with_optimizer_state(tp2_run, tmp_path, data_dir):
    """The TP=2 run's step-2 checkpoint, resumed on one rank at TP=1: steps 3..6 recomputed."""
    out = run_train(resume_copy(tp2_run, tmp_path, data_dir), [*MEGATRON, "backend.tensor_parallel=1",
                                                                "train.micro_batch=8"], nproc=1)
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    ref, got = losses(tp2_run), losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):  # Adam moments came along: the curve continues, not restarts
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, ref, got)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1} and meta["backend"] == "megatron"


def test_export_of_a_tp2_checkpoint_gives_the_logged_eval_loss(tp2_run, tmp_path):
    got, _ = exported_eval_loss(tp2_run, tmp_path / "hf")
    assert got == pytest.approx(losses(tp2_run, "eval/loss")[6], rel=1e-5)


def test_a_checkpoint_is_read_back_one_decoder_layer_at_a_time(tp2_run, monkeypatch):
    """Export and init_from read a TP=2 checkpoint at TP=1 through one chunk per tensor: each
    read holds the tower and projector, one decoder layer, or the embeddings and norm, and each
    is read once (the export's logits are checked above against the run's own eval loss)."""
    from pargo_dist import build
    from pargo_dist.backends.megatron import weights as megatron_weights
    from pargo_dist.checkpoint.manager import resolve_checkpoint
    from pargo_dist.config import load_config
    from pargo_dist.backends.trained_weights import checkpoint_weights

    reads = []
    read = megatron_weights.MegatronWeights._read

    def counted(self, names):
        out = read(self, names)
        reads.append(sum(t.numel() for t in out.values()))
        return out

    monkeypatch.setattr(megatron_weights.MegatronWeights, "_read", counted)
    step = resolve_checkpoint(tp2_run)
    cfg = load_config(step / "config.yaml")
    model = build.build_model(cfg, build.build_tokenizer(cfg))
    state = dict(checkpoint_weights(step, model, lazy=True).items())
    assert set(state) == {n for n, _ in model.named_parameters()}
    layers = model.config.text_config.num_hidden_layers
    layer = sum(t.numel() for k, t in state.items() if k.startswith("language_model.model.layers.0."))
    assert len(reads) == 1 + layers + 1
    assert reads[1:-1] == [layer] * layers  # one decoder layer per read, at TP=1
    assert sum(reads) == sum(t.numel() for t in state.values())  # each tensor read once
    for name, tensor in state.items():
        assert tensor.shape == model.get_parameter(name).shape, name


def test_megatron_recipe_errors_name_the_key(grad_recipe):
    from pargo_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="backend.name=megatron"):
        load_config(grad_recipe, ["backend.tensor_parallel=2"])
    def train(*args):  # refused by the command line, before any rank starts
        return forkserver.run([sys.executable, "-m", "pargo_dist.cli", "train", str(grad_recipe), *MEGATRON, *args],
                              capture_output=True, text=True, env=env(), timeout=300)

    out = train("backend.tensor_parallel=3", "--nproc", "3")
    assert out.returncode == 2 and "num_attention_heads=4 is not divisible by tensor parallel size 3" in out.stderr
    assert "Traceback" not in out.stderr and "started" not in out.stdout
    out = train("backend.tensor_parallel=2", "--nproc", "3")
    assert out.returncode == 2 and "3 rank(s) do not divide into tensor_parallel x pipeline_parallel = 2 x 1" \
        in out.stderr
    out = train("backend.expert_parallel=2", "--nproc", "3")
    assert out.returncode == 2 and "3 data-parallel replica(s) do not divide into expert_parallel = 2: launch a " \
        "multiple of 2 ranks" in out.stderr, out.stderr[-2000:]


def test_a_tp2_checkpoint_loaded_at_tp1_holds_the_same_adam_state(tp2_run, tmp_path):
    """megatron's distributed checkpoint reshards the optimizer: the step-2 checkpoint loaded on
    2 ranks at TP=2 (its own layout, which replays the run exactly, above) and on 1 rank at TP=1
    holds the same weights and Adam moments, put together across TP ranks: equal exactly."""
    recipe, step_dir = tp2_run.parent / "recipe.yaml", tp2_run / "checkpoints" / "step_00000002"
    states = {}
    for tp in (2, 1):
        out = tmp_path / f"tp{tp}.pt"
        run_ranks(WORKER, ["moments", str(out), str(recipe), str(step_dir), str(tp), "2"], tp,
                  env={"OMP_NUM_THREADS": "1"}, timeout=600)
        states[tp] = torch.load(out, weights_only=False)
    a, b = states[2], states[1]
    assert a["steps"] == b["steps"] == [2.0]
    for key in ("weight", "exp_avg", "exp_avg_sq"):
        assert a[key].keys() == b[key].keys() and len(a[key]) >= 20, key
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), (key, name)
    assert all(t.any() for t in a["exp_avg_sq"].values())  # Adam has stepped every LLM weight


def test_background_saves_train_like_synchronous_ones(tp2_run, async_tp2_run):
    """checkpoint.async_save: the run is the synchronous one, its checkpoints marked complete when
    written (its step-2 checkpoint resumes: test_resume_at_the_same_layout_...)."""
    run, out = async_tp2_run
    assert "saving checkpoint" in out and f"checkpoint {run / 'checkpoints' / 'step_00000006'} complete" in out
    assert losses(run) == pytest.approx(losses(tp2_run), rel=1e-6)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    return worker(tmp_path_factory.mktemp("packed"), 2, "packed", "llama:1", "llama:2", "qwen2:2", "qwen3:2")


@pytest.mark.parametrize("case", ["llama:1", "llama:2", "qwen2:2", "qwen3:2"])
def test_packed_samples_get_the_logits_they_get_alone(packed, case):
    """data.train.pack on megatron: three samples in one row (positions restarting, each sample
    attending only to itself, rotary at those positions) give each sample its logits alone,
    at TP 1 and 2; run alone they are HF's. Without the packing path they would not be."""
    res = packed[case]
    assert res["logit_scale"] > 0.1
    assert res["max_abs_diff"] < 1e-10, res  # megatron against itself, in float64
    assert res["hf_diff"] < FP32_SCALED * res["logit_scale"], res  # HF's RMSNorm is float32
    assert res["naive_diff"] > 1e-2, res  # the same row as one sequence: other logits


def test_packed_training_follows_the_unpacked_run(tp2_run, tmp_path, data_dir):
    """data.train.pack=true at TP=2: the same samples per step, several to a row; attending
    across samples would change the loss (the naive row differs by > 1e-2 above), so equal
    curves mean the packed path keeps every sample to itself."""
    run = tmp_path / "packed"
    run_train(write_recipe(tmp_path / "packed.yaml", run, data_dir), [*TP2, "data.train.pack=true"], nproc=2)
    ref, got = losses(tp2_run), losses(run)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, ref, got)
