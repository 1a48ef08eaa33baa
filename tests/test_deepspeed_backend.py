"""The DeepSpeed backend's own choices, in-process on a 1-rank gloo group: what ZeRO-3 is given
to partition. Training behaviour across ranks (loss curves, resume) is in test_train.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.training import write_recipe

from pargo_dist import build
from pargo_dist.config import load_config


@pytest.fixture(scope="module", autouse=True)
def one_rank_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "file"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed asserts it
        yield
    dist.destroy_process_group()


def built(tmp_path, *overrides: str):
    cfg = load_config(write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", tmp_path / "data"), list(overrides))
    tokenizer = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tokenizer)
    build.init_freeze_and_adapt(model, cfg)
    return cfg, model


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_keeps_the_frozen_tower_whole_and_out_of_its_partitions(tmp_path, precision):
    """ZeRO-3 partitions what it wraps and gathers it in every forward: the frozen tower is left
    out (whole, in the training precision, no ZeRO attributes, no DeepSpeed hooks), what trains is
    partitioned, and the model computes what it computed before set-up."""
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend

    # (one rank runs ZeRO-3 as ZeRO-2 unless parameters are offloaded: offloading keeps stage 3 here)
    cfg, model = built(tmp_path, "backend.zero_stage=3", "backend.offload_params=true", f"train.precision={precision}")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.encode_images(pixels)
    tower = model.vision_tower
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    engine_params = {id(p) for p in backend.module.parameters()}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, p in tower.named_parameters():
        assert id(p) not in engine_params and not hasattr(p, "ds_id"), name
        assert p.dtype == dtype and p.numel() > 0, name
    assert not any(name.startswith("vision_tower.") for name in backend.module.state_dict())
    assert all(hasattr(p, "ds_id") for p in backend.module.language_model.parameters())
    assert all(not m._forward_pre_hooks for m in tower.modules())
    assert backend.module.vision_tower is tower
    # whole transformer blocks are ZeRO-3 leaves (one gather each); small parameters stay whole
    from deepspeed.utils import z3_leaf_module

    assert all(z3_leaf_module(layer) for layer in backend.module.language_model.model.layers)
    assert all(z3_leaf_module(layer) for layer in backend.module.projector.layers)
    hidden = model.config.text_config.hidden_size
    zero = backend.engine.config["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == max(100_000, 10 * hidden)
    with torch.no_grad():
        got = backend.module.encode_images(pixels.to(dtype))
    tol = 1e-6 if precision == "fp32" else 5e-2  # fp32: the same modules, the same ops (bit-equal): a replay
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_a_trained_tower_stays_with_zero3(tmp_path):
    """A tower that trains needs its optimizer partitions: it stays in the module DeepSpeed wraps."""
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend

    cfg, model = built(tmp_path, "backend.zero_stage=3", "backend.offload_params=true", "train.stage=full")
    assert any(p.requires_grad for p in model.vision_tower.parameters())
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    assert all(hasattr(p, "ds_id") for p in backend.module.vision_tower.parameters())


def test_zero3_on_one_rank_runs_as_zero2_and_says_so(tmp_path, capsys):
    """One rank has nothing to partition: ZeRO-3's gathers and hooks would be pure cost. The run
    says what it chose; more ranks, or offloaded parameters (stage 3 only), keep stage 3."""
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend, zero_stage_for

    cfg, model = built(tmp_path, "backend.zero_stage=3")
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    assert "ZeRO-3 on one rank partitions nothing: running ZeRO-2" in capsys.readouterr().out
    assert backend.engine.zero_optimization_stage() == 2 and backend.layout() == {"dp": 1, "zero_stage": 2}
    assert not any(hasattr(p, "ds_id") for p in backend.module.parameters())
    assert zero_stage_for(cfg, 2) == (3, "")
    offloaded, _ = built(tmp_path, "backend.zero_stage=3", "backend.offload_params=true")
    assert zero_stage_for(offloaded, 1) == (3, "")
    kept, _ = built(tmp_path, "backend.zero_stage=3", "backend.zero3_on_one_rank=true")
    assert zero_stage_for(kept, 1) == (3, "")  # asked for (the benchmark's ZeRO-3 row on one GPU)


def _tensors(obj, prefix=""):
    """Every tensor in a nested state dict, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def test_a_background_save_holds_the_state_from_before_the_next_step(tmp_path, monkeypatch):
    """The copy of a background save runs beside the next step; that step's optimizer update must
    wait for it. With the copy slowed by a fault knob (1 s), the files written in the background
    equal a synchronous save made at the same moment, tensor for tensor, though the next step
    (taken at once) changed every weight and moment before the copy was done."""
    import sys
    from pathlib import Path

    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend
    import time

    from pargo_dist.checkpoint import background_save

    sys.path.insert(0, str(Path(__file__).parent / "support"))
    from elastic_worker import fixed_batches

    cfg, model = built(tmp_path, "backend.zero_stage=2", "optim.lr=1e-2")
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    batches = fixed_batches(backend.module, build.build_tokenizer(cfg), steps=2, rank=0, world=1)
    backend.train_batch([batches[0][0]], float(batches[0][1]), 0)  # Adam's state exists from here on
    backend.save(tmp_path / "sync")
    copy = background_save.host_snapshot
    monkeypatch.setattr(background_save, "host_snapshot", lambda *a, **k: time.sleep(1) or copy(*a, **k))
    backend.save(tmp_path / "background", background=True)
    backend.train_batch([batches[1][0]], float(batches[1][1]), 1)
    backend.wait_for_saves()
    files = sorted(p.relative_to(tmp_path / "sync") for p in (tmp_path / "sync").rglob("*.pt"))
    written = sorted(p.relative_to(tmp_path / "background") for p in (tmp_path / "background").rglob("*.pt"))
    assert files and files == written
    backend.save(tmp_path / "after")  # the state the step left, for contrast
    changed = 0
    for name in files:
        want = _tensors(torch.load(tmp_path / "sync" / name, weights_only=False))
        got = _tensors(torch.load(tmp_path / "background" / name, weights_only=False))
        later = _tensors(torch.load(tmp_path / "after" / name, weights_only=False))
        assert want.keys() == got.keys() and want, name
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)
            changed += not torch.equal(want[key], later[key])
    assert changed > 10  # the step did change the weights and moments the background save holds from before it


def _zero3_run(tmp_path, steps: int):
    """A 1-rank ZeRO-3 backend (stage 3 kept), `steps` fp32 steps, then one more forward: the
    losses, and the parameter elements left gathered after that forward."""
    import sys
    from pathlib import Path

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend

    sys.path.insert(0, str(Path(__file__).parent / "support"))
    from elastic_worker import fixed_batches

    tmp_path.mkdir()
    cfg, model = built(tmp_path, "backend.zero_stage=3", "backend.zero3_on_one_rank=true", "optim.lr=1e-2")
    backend = DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    batches = fixed_batches(backend.module, build.build_tokenizer(cfg), steps=steps + 1, rank=0, world=1)
    losses = [float(backend.train_batch([batch], float(targets), step)) for step, (batch, targets) in
              enumerate(batches[:steps])]
    batch, targets = batches[steps]
    backend.engine(**batch.model_inputs(), num_items_in_batch=torch.tensor(float(targets)))
    gathered = sum(p.ds_numel for p in backend.module.parameters()
                   if hasattr(p, "ds_status") and p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist)
    return backend, losses, gathered


def test_zero3_buffers_are_sized_to_the_model(tmp_path, monkeypatch):
    """DeepSpeed's 5e8-element gradient bucket and 1e9-element reuse distance are larger than a
    model under ~4B parameters: ZeRO-3 then copied every gradient into the bucket (a second full
    gradient) and kept every parameter gathered through the step (a second full model); a 278M
    model peaked at 6.2 GiB per rank against megatron TP=2's 2.6. Sized to the model
    (backends/deepspeed/buffers; its latency floor lowered so that this tiny model counts as
    large, and none of its small weights kept whole): the bucket holds 1/8 of the trained parameters, and after a forward at most the
    reuse distance plus one prefetch stays gathered, where DeepSpeed's defaults keep every
    partitioned parameter. The losses are those of the defaults: bucket sizes change when a
    gradient is reduced, not its value."""
    from pargo_dist.backends.deepspeed import backend as deepspeed, buffers as deepspeed_buffers
    monkeypatch.setattr(deepspeed_buffers, "LATENCY_FLOOR", 0)
    monkeypatch.setattr(deepspeed, "persistence_threshold", lambda hidden: 0)  # (no tiny weight kept whole)
    backend, losses, gathered = _zero3_run(tmp_path / "sized", steps=2)
    zero = backend.engine.config["zero_optimization"]
    params = [p for p in backend.module.parameters() if hasattr(p, "ds_id")]
    total = sum(p.ds_numel for p in params)
    partitioned = sum(p.ds_numel for p in params if not p.ds_persist)
    trainable = sum(p.ds_numel for p in params if p.requires_grad)
    assert zero["reduce_bucket_size"] == trainable // 8
    assert zero["stage3_max_reuse_distance"] == zero["stage3_max_live_parameters"] == total // 4
    assert backend.engine.optimizer.ipg_buckets[torch.float32].buffer.numel() == trainable // 8
    largest_leaf = max(sum(p.ds_numel for p in m.parameters()) for m in backend.module.language_model.model.layers)
    assert 0 < gathered <= zero["stage3_max_reuse_distance"] + zero["stage3_prefetch_bucket_size"] + largest_leaf

    monkeypatch.setattr(deepspeed, "buffer_sizes", lambda *args: {})  # DeepSpeed's own sizes
    default, default_losses, default_gathered = _zero3_run(tmp_path / "default", steps=2)
    assert default.engine.optimizer.reduce_bucket_size == deepspeed_buffers.DS_REDUCE_BUCKET
    assert default_gathered == partitioned  # the whole model stays gathered
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(default_losses, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("zero", [2, 3])
def test_the_planner_counts_the_buffers_deepspeed_allocates(tmp_path, monkeypatch, zero):
    """`pargo-dist plan`'s buffer memory against what DeepSpeed itself allocates for the same recipe,
    measured in a real engine (one rank; the latency floor lowered so that this tiny model's
    buffers are sized by their share of the model, as a large model's are): the gradient bucket
    DeepSpeed holds (ZeRO-2's staging buffer, ZeRO-3's reduce bucket) is the bucket the plan counts,
    byte for byte, and the parameters ZeRO-3 keeps gathered after a forward never exceed the plan's
    gathered-parameter bytes. (The plan's 4.5x for ZeRO-1/2 over several ranks is DeepSpeed's
    documented figure for overlap_comm, which is off on CPU: not measured here.)"""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from pargo_dist.backends.deepspeed import backend as deepspeed, buffers
    from pargo_dist.plan.estimate import FRAMEWORK_RESERVE_GIB, GiB, Layout, buffer_bytes, zero3_live_bytes
    from pargo_dist.plan.trace import shapes_of

    sys.path.insert(0, str(Path(__file__).parent / "support"))
    from elastic_worker import fixed_batches

    monkeypatch.setattr(buffers, "LATENCY_FLOOR", 0)
    monkeypatch.setattr(deepspeed, "persistence_threshold", lambda hidden: 0)  # (no tiny weight kept whole)
    one_rank_zero3 = ["backend.zero3_on_one_rank=true"] if zero == 3 else []
    cfg, model = built(tmp_path, f"backend.zero_stage={zero}", *one_rank_zero3)
    backend = deepspeed.DeepSpeedBackend(cfg)
    backend.init_distributed()
    backend.setup(model)
    assert backend.zero_stage == zero
    batches = fixed_batches(backend.module, build.build_tokenizer(cfg), steps=2, rank=0, world=1)
    optimizer, held = backend.engine.optimizer, []

    def bucket_bytes() -> int:  # ZeRO-2 stages into a list of buffers, ZeRO-3 reduces from one
        return sum(b.numel() * b.element_size() for bucket in optimizer.ipg_buckets.values()
                   for b in (bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]) if b is not None)

    if zero == 2:  # its buffers live during the backward only: read them as DeepSpeed allocates them
        allocate = optimizer.setup_buckets
        monkeypatch.setattr(optimizer, "setup_buckets", lambda: (allocate(), held.append(bucket_bytes())))
    backend.train_batch([batches[0][0]], float(batches[0][1]), 0)
    measured_bucket = max(held) if zero == 2 else bucket_bytes()

    shapes = shapes_of(cfg, micro_batch=cfg.train.micro_batch, seq_len=64)
    planned = buffer_bytes(shapes, Layout("deepspeed", zero_stage=zero), 1, cfg.train.precision)["buffers"]
    planned -= FRAMEWORK_RESERVE_GIB * GiB
    if zero == 2:
        assert measured_bucket > 0 and planned == measured_bucket
        return
    live = zero3_live_bytes(shapes, cfg.train.precision)
    assert measured_bucket > 0 and planned - live == measured_bucket
    backend.engine(**batches[1][0].model_inputs(), num_items_in_batch=torch.tensor(float(batches[1][1])))
    gathered = sum(p.ds_numel * p.element_size() for p in backend.module.parameters()
                   if hasattr(p, "ds_status") and p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_persist)
    assert 0 < gathered <= live, (gathered, live)
