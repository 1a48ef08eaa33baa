"""Elastic resume keeps the optimizer: a DeepSpeed checkpoint loads at another rank count and ZeRO
stage with Adam's moments, master weights and step, through DeepSpeed's universal checkpoint.

Reference: the state the saving layout held, assembled across its ranks by DeepSpeed
(`safe_get_full_*`, and the module's weights gathered), against the state the loading layout
holds right after the load, assembled the same way. Both are the same numbers cut into other
partitions: equal exactly. Real ranks over gloo (tests/support/elastic_worker.py). The full case's
LLM ties its output layer to its embedding and has odd sizes (as has its tower), so ZeRO pads
partitions of 2 ranks and the tied weight is one parameter under two names: both must come back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.ranks import run_ranks
from support.training import write_recipe

WORKER = Path(__file__).parent / "support" / "elastic_worker.py"


def worker(world: int, *args: str) -> None:
    run_ranks(WORKER, list(args), world, env={"OMP_NUM_THREADS": "1"}, timeout=600)


def assert_same_state(saved: dict, loaded: dict, step: int, case: str) -> None:
    names = set(saved["params"])
    assert names == loaded["params"].keys()
    trains = {"full": ("vision_tower", "projector", "language_model"), "align": ("projector",),
              "lora": ("projector", "language_model")}[case]
    assert {n.split(".")[0] for n in names} == set(trains)
    if case == "lora":
        assert all("lora_" in n for n in names if n.startswith("language_model"))
    for name, parts in saved["params"].items():  # fp32 master, both moments and the module's weight
        for key, tensor in parts.items():
            assert torch.equal(loaded["params"][name][key], tensor), (name, key)
    embedding = "language_model.model.embed_tokens.weight"
    if case == "full":
        # the output layer is the embedding, in every layout, and has its values as the forward sees it
        assert saved["tied"] and loaded["tied"] and "language_model.lm_head.weight" not in names
        assert torch.equal(loaded["output_weight"], saved["params"][embedding]["fp32"])
        # odd sizes: 2 ranks cannot split these evenly, so ZeRO pads their partitions (the tied
        # embedding, the LLM's and the tower's norms, biases)
        odd = {n for n, parts in saved["params"].items() if parts["fp32"].numel() % 2}
        assert {embedding, "language_model.model.norm.weight",
                "vision_tower.model.vision_model.pre_layrnorm.weight", "projector.proj.bias"} <= odd, sorted(odd)
    else:
        assert not saved["tied"] and not loaded["tied"]
    # Adam has stepped: moments that are not zero (but for a norm the tower's features never use)
    unused = {n for n, parts in saved["params"].items() if not parts["exp_avg_sq"].any()}
    assert unused <= {"vision_tower.model.vision_model.post_layernorm.weight",
                      "vision_tower.model.vision_model.post_layernorm.bias"}, unused
    assert saved["adam_steps"] == loaded["adam_steps"] == [float(step)]


@pytest.fixture(scope="module", params=["full", "lora"])
def states(request, tmp_path_factory, data_dir) -> dict:
    """2 ranks ZeRO-3 train 2 steps and save A; 1 rank (ZeRO-1 for full training, ZeRO-2 for LoRA)
    loads A, trains 2 steps, saves B; 2 ranks ZeRO-3 load B. Three starts, every state written
    down. Before the first load, A holds the remains of a conversion killed half-way, which must
    not be taken for one. (align, the projector alone, worked the same way when it was a case here:
    frozen parameters are left out as they are with LoRA.)"""
    case = request.param
    middle = "1" if case == "full" else "2"
    tmp = tmp_path_factory.mktemp(f"elastic_{case}")
    recipe = write_recipe(tmp / "recipe.yaml", tmp / "run", data_dir)
    a, b = tmp / "A", tmp / "B"
    worker(2, str(recipe), str(tmp / "saved_a.pt"), "3", case, "--train", "2", "--save", str(a))
    (a / "ds_universal.partial" / "zero").mkdir(parents=True)
    worker(1, str(recipe), str(tmp / "saved_b.pt"), middle, case, "--load", str(a), "2", "2", str(tmp / "loaded_a.pt"),
           "--train", "2", "--save", str(b))
    worker(2, str(recipe), str(tmp / "end.pt"), "3", case, "--load", str(b), "1", "4", str(tmp / "loaded_b.pt"))
    return {name: torch.load(tmp / f"{name}.pt", weights_only=False)
            for name in ("saved_a", "loaded_a", "saved_b", "loaded_b")} | {"a": a, "b": b, "case": case}


def test_two_zero3_ranks_to_one_zero1_or_2_rank_keep_adam_exactly(states):
    assert_same_state(states["saved_a"], states["loaded_a"], step=2, case=states["case"])
    universal = states["a"] / "ds_universal"
    assert (universal / "latest_universal").is_file()  # converted once, kept beside ds/
    assert not (states["a"] / "ds_universal.partial").exists()


def test_one_zero1_or_2_rank_to_two_zero3_ranks_keep_adam_exactly(states):
    saved, loaded = states["saved_b"], states["loaded_b"]
    for name, parts in saved["params"].items():  # (B was trained on from A: its own moments)
        if parts["exp_avg"].any():
            assert not torch.equal(parts["exp_avg"], states["saved_a"]["params"][name]["exp_avg"]), name
    assert_same_state(saved, loaded, step=4, case=states["case"])
