"""Weighted mixtures of datasets (data.train.streams), text-only samples beside images, and ZeRO-3
with a rank whose micro-batch has no image."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
from support.ranks import run_ranks
from support.training import losses, run_train, sample_ids, write_recipe

from pargo_dist.data.convert import write_dataset
from pargo_dist.data.schema import make_sample
from pargo_dist.data.synthetic import KINDS, SyntheticConfig, synthetic_samples

STREAMS = ("data.train.streams=[{{local: {img}, proportion: 0.75, name: images}}, "
           "{{remote: {txt}, local: {cache}, proportion: 0.25}}]")


def text_only(n: int) -> list[dict]:
    """Instruction-style samples without an image, in the synthetic tokenizer's words."""
    return [make_sample(f"text:{i}", None, messages=[
        {"role": "user", "content": f"Is there a red {KINDS[i % 4]} at the top left?"},
        {"role": "assistant", "content": "There are 2 shapes." if i % 2 else "no"}]) for i in range(n)]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, s3_server):
    """Images in a local dir, text-only samples in the S3 bucket (moto): a mixture of both kinds of source."""
    root = tmp_path_factory.mktemp("mixture")
    write_dataset(((s, None) for s in synthetic_samples(SyntheticConfig(num_samples=96, image_size=48))),
                  str(root / "img"), progress=False)
    text = s3_server.make_bucket("mixture-test") + "/txt"
    write_dataset(((s, None) for s in text_only(40)), text, progress=False, report=str(root / "txt-report.jsonl"))
    return root, text


def mixture_args(mixture, tmp_path, *extra):
    root, text = mixture
    return ["data.train.local=null", STREAMS.format(img=root / "img", txt=text, cache=tmp_path / "txt-cache"),
            "data.train.epoch_size=64", "data.synthetic.num_samples=0", "data.eval=null", "train.steps=4",
            "checkpoint.every=2", *extra]


def stream_of(sample_id: str) -> str:
    return "images" if sample_id.startswith("synthetic:") else "txt"


def test_mixture_is_counted_per_stream_and_resumes_on_another_rank_count(mixture, tmp_path, data_dir):
    """2 ranks, 4 steps of 8 over a 3:1 mixture of local images and text-only samples on S3: the
    per-stream counts in the logs are what the ranks really read; a resume on 1 rank (2
    micro-batches a step) reads the same global batches as the uninterrupted run and continues
    the counts."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", run, data_dir)
    run_train(recipe, mixture_args(mixture, tmp_path), nproc=2)
    ids = sample_ids(run)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    for row in log:
        seen = [i for step in range(1, row["step"] + 1) for i in ids[step]]
        assert row["data/stream/images"] == sum(stream_of(i) == "images" for i in seen)
        assert row["data/stream/txt"] == sum(stream_of(i) == "txt" for i in seen)
    assert log[-1]["data/stream/images"] + log[-1]["data/stream/txt"] == 32
    assert log[-1]["data/stream/txt"] > 0 and log[-1]["data/stream/images"] > log[-1]["data/stream/txt"]
    from pargo_dist.observe.report import read_scalars

    assert read_scalars(run / "tb")["data/stream/txt"][-1] == (4, log[-1]["data/stream/txt"])

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    for f in resumed.glob("sample_ids.rank*.jsonl"):
        f.unlink()
    recipe2 = write_recipe(tmp_path / "recipe2.yaml", resumed, data_dir)
    out = run_train(recipe2, mixture_args(mixture, tmp_path / "again", "train.grad_accum=2"), nproc=1)
    assert "elastic resume (dp 2, zero_stage 3 -> dp 1, zero_stage 2): weights, optimizer moments" in out.stdout
    again = sample_ids(resumed)
    for step in (3, 4):
        assert sorted(again[step]) == sorted(ids[step])
    # the weights after step 2 are the same, so is step 3's loss (then Adam's moments restart)
    assert losses(resumed)[3] == pytest.approx(losses(run)[3], rel=1e-5)
    last = [json.loads(line) for line in (resumed / "train_log.jsonl").read_text().splitlines()][-1]
    assert (last["data/stream/images"], last["data/stream/txt"]) == \
        (log[-1]["data/stream/images"], log[-1]["data/stream/txt"])


def test_mixture_errors_name_the_streams(mixture, tmp_path, data_dir):
    from pargo_dist import build
    from pargo_dist.config import load_config

    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    img = mixture[0] / "img"
    bad = ["data.train.local=null", "data.synthetic.num_samples=0",
           f"data.train.streams=[{{local: {img}, proportion: 0.5}}, {{local: {img}}}]"]
    cfg = load_config(recipe, bad)
    model = build.build_model(cfg, build.build_tokenizer(cfg))
    with pytest.raises(ValueError, match="data streams: .*proportion"):
        build.loader(cfg, cfg.data.train, model, build.build_tokenizer(cfg), 4)
    both = load_config(recipe, [f"data.train.streams=[{{local: {img}}}]", "data.synthetic.num_samples=0"])
    with pytest.raises(ValueError, match="remote/local or streams"):
        build.loader(both, both.data.train, model, build.build_tokenizer(both), 4)
    with pytest.raises(ValueError, match="unknown key 'data.train.streams\\[0\\].weight'"):
        load_config(recipe, [f"data.train.streams=[{{local: {img}, weight: 2}}]"])


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    import pargo_dist
    from pargo_dist import build
    from pargo_dist.config import load_config
    from pargo_dist.backends.deepspeed.backend import DeepSpeedBackend
    from pargo_dist.data.collate import Collator
    from pargo_dist.data.prompt import PromptBuilder

    recipe, out = sys.argv[1], sys.argv[2]
    cfg = load_config(recipe, ["backend.zero_stage=3", "train.stage=full"])
    backend = DeepSpeedBackend(cfg)
    rank, world = backend.init_distributed()
    tok = build.build_tokenizer(cfg)
    model = build.build_model(cfg, tok)
    build.init_freeze_and_adapt(model, cfg)
    backend.setup(model)
    backend.train(True)
    prompt = PromptBuilder(tok, model.num_image_tokens(), 128)
    side = model.vision_tower.image_size
    g = torch.Generator().manual_seed(rank)
    examples = []
    for i in range(2):
        if rank == 0:  # images on this rank only
            ids, labels = prompt("A small red circle at the top left.", [], True)
            pixels = torch.randn(3, side, side, generator=g)
        else:
            ids, labels = prompt("", [{"role": "user", "content": "Is there a red circle at the top?"},
                                      {"role": "assistant", "content": "no"}], False)
            pixels = None
        examples.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "id": f"{rank}:{i}"})
    batch = Collator(pad_id=tok.pad_token_id)(examples)
    before = [p.ds_tensor.clone() for p in model.projector.parameters()]  # this rank's ZeRO-3 shard
    losses = [float(backend.train_batch([batch], 8.0, step)) for step in range(2)]
    moved = sum(float((p.ds_tensor - b).abs().sum()) for p, b in zip(model.projector.parameters(), before))
    json.dump({"losses": losses, "moved": moved, "has_images": batch.pixel_values is not None},
              open(f"{out}.rank{rank}.json", "w"))
    torch.distributed.barrier()
""")


def test_zero3_rank_without_images_runs_the_same_modules(tmp_path, data_dir):
    """ZeRO-3 gathers each module's parameters collectively: a rank that skipped the tower and the
    projector because its micro-batch has no image would hang the other. Both must finish."""
    from support.ranks import read_rank_results

    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_ranks(script, [str(recipe), str(tmp_path / "out")], world_size=2, timeout=240)
    results = read_rank_results(tmp_path / "out", 2)
    assert [r["has_images"] for r in results] == [True, False]
    assert all(r["moved"] > 0 for r in results)  # both shards of the projector were updated
    assert all(len(r["losses"]) == 2 for r in results)
