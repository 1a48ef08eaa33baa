"""Mixture-of-Experts LLMs (Qwen3-MoE, HF's own modules) under DeepSpeed ZeRO-3, with real ranks.

ZeRO-3 gathers a module's parameters as the module is entered; an MoE block runs only the
experts its tokens were routed to, so two ranks that route differently would gather different
experts and wait in different collectives. The backend makes every decoder layer a ZeRO-3 leaf
(one gather of the whole layer, experts included), so routing cannot desynchronise the ranks.
DeepSpeed 0.19.8 also lists HF's Mixtral, Qwen2-MoE and Qwen3-MoE blocks as default leaves
(`zero_optimization.leaf_module`); either alone passes this test, and with both off it fails
(DeepSpeed's check that the ranks fetched the same parameters, a rank exiting; checked by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.ranks import run_ranks
from support.training import write_recipe

WORKER = Path(__file__).parent / "support" / "moe_worker.py"


def moe_run(tmp_path: Path, data_dir: Path, world: int, steps: int = 3) -> dict:
    out = tmp_path / f"moe-{world}.json"
    recipe = write_recipe(tmp_path / "recipe.yaml", tmp_path / "run", data_dir)
    run_ranks(WORKER, [str(recipe), str(out), str(steps)], world, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    return json.loads(out.read_text())


def test_zero3_ranks_that_route_to_different_experts_train_as_one_rank(tmp_path, data_dir):
    """Two ZeRO-3 ranks forced onto disjoint experts (rank 0: experts 0, 1; rank 1: 2, 3) neither
    hang nor lose a gradient: their loss curve is one rank's over the same rows, routed alike."""
    two = moe_run(tmp_path, data_dir, world=2)
    one = moe_run(tmp_path, data_dir, world=1)
    assert two["stage"] == 3 and two["experts"] == [[0, 1], [2, 3]], two
    assert one["experts"] == [[0, 1, 2, 3]], one
    assert len(two["losses"]) == 3 and two["losses"][2] < two["losses"][0]  # it trains
    for a, b in zip(two["losses"], one["losses"]):
        assert a == pytest.approx(b, rel=1e-5), (two, one)
