"""The optimizer the DeepSpeed backend builds: fused AdamW makes the same update as the foreach
implementation, over parameter groups with their own learning rates and weight decay.

Two kernels for the same update: parameters and gradients are float64, where the kernels'
rounding differs by ~1e-16, so 1e-12 holds on any CPU (a weight decay 0.1% off already moves a
parameter by ~1e-5)."""

from __future__ import annotations

import torch

from pargo_dist.config import load_config
from pargo_dist.backends.optim import adamw


def step_with_random_grads(opt, params, steps: int) -> list[torch.Tensor]:
    """`steps` optimizer steps on seeded random gradients; the parameters after them."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return [p.detach() for p in params]


def assert_same_moved(runs: dict, start: list[torch.Tensor]) -> None:
    for a, b, s in zip(runs[True], runs[False], start):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.equal(a, s)  # they moved


def test_fused_adamw_steps_equal_the_foreach_ones():
    cfg = load_config(None, ["optim.weight_decay=0.1", "optim.eps=1e-8"])
    torch.manual_seed(0)
    start = [torch.randn(37, 11, dtype=torch.float64), torch.randn(64, dtype=torch.float64),
             torch.randn(5, 3, 7, dtype=torch.float64)]
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = adamw([{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3}], cfg, fused=fused)
        runs[fused] = step_with_random_grads(opt, params, 5)
        assert opt.defaults["fused"] is fused
    assert_same_moved(runs, start)


def test_fuse_adamw_reaches_torch_adamw_inside_wrappers_and_keeps_its_update():
    """megatron's fallback optimizer is torch AdamW (foreach) inside its wrappers; fuse_adamw
    switches it to the fused kernel, for the same update."""
    from types import SimpleNamespace

    from pargo_dist.backends.optim import fuse_adamw

    torch.manual_seed(0)
    start = [torch.randn(19, 7, dtype=torch.float64), torch.randn(23, dtype=torch.float64)]
    runs = {}
    for fuse in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        inner = torch.optim.AdamW([{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 2e-3}],
                                  weight_decay=0.1, foreach=True)
        if fuse:  # megatron's nesting: ChainedOptimizer -> mixed-precision optimizer -> torch's
            assert fuse_adamw(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=inner)])) == 1
        assert [bool(group["fused"]) for group in inner.param_groups] == [fuse, fuse]
        runs[fuse] = step_with_random_grads(inner, params, 4)
    assert_same_moved(runs, start)
