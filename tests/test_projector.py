"""ParGo projector: mask semantics, region layout, dense-reference equivalence, errors, shapes."""

from __future__ import annotations

import pytest
import torch

from pargo_dist.models.projector import (
    ProjectorConfig,
    build_projector,
    cross_attention_mask,
    partial_regions,
)

TINY = dict(width=32, heads=4, ffn=64)


def tiny(**kw) -> ProjectorConfig:
    return ProjectorConfig(**{**TINY, **kw})


def expected_region(i: int, N: int, P: int, region: str, grid=None, window=None) -> set[int]:
    """Spec of region i written out with plain loops, independent of partial_regions."""
    if region == "raster":
        r = N // P
        return set(range(i * r, (i + 1) * r))
    H, W = grid
    h, w = window
    per_row, per_crop = W // w, (H // h) * (W // w)
    crop, k = divmod(i, per_crop)
    a, b = divmod(k, per_row)
    return {
        crop * H * W + (a * h + y) * W + (b * w + x) for y in range(h) for x in range(w)
    }


# (grid, crops, P, region, window)
LAYOUTS = [
    ((24, 24), 1, 288, "raster", None),  # the release: 1x2 horizontal pairs
    ((24, 24), 4, 288, "raster", None),  # 4 crops: 1x8 strips
    ((24, 24), 1, 144, "window", [2, 2]),
    ((24, 24), 4, 288, "window", [4, 2]),
    ((4, 8), 2, 8, "window", [2, 4]),
    ((5, 5), 3, 15, "raster", None),  # 75 patches, runs of 5 (each row of one crop)
]


@pytest.mark.parametrize("grid,crops,P,region,window", LAYOUTS)
def test_regions_follow_the_spec(grid, crops, P, region, window):
    N = crops * grid[0] * grid[1]
    regions = partial_regions(N, P, region, grid, window)
    assert regions.shape == (P, N // P)
    assert sorted(regions.flatten().tolist()) == list(range(N))  # a partition of the patches
    for i in range(P):
        assert set(regions[i].tolist()) == expected_region(i, N, P, region, grid, window)


def test_release_raster_regions_are_horizontal_pairs_and_strips():
    one = partial_regions(576, 288, "raster")
    assert one[0].tolist() == [0, 1] and one[12].tolist() == [24, 25]  # row 1 starts at query 12
    four = partial_regions(4 * 576, 288, "raster")
    assert four[3].tolist() == list(range(24, 32))  # query 3: row 1, cols 0..7 of crop 0
    assert four[72].tolist() == list(range(576, 584))  # query 72: first strip of crop 1


def test_cross_attention_mask_partial_sees_region_global_sees_all():
    regions = partial_regions(16, 8, "raster")
    mask = cross_attention_mask(regions, 16, 3)
    assert mask.shape == (11, 16)
    assert mask[:8].sum(1).tolist() == [2] * 8
    assert mask[8:].all()
    assert mask[5].nonzero().flatten().tolist() == [10, 11]


EQUIV = [
    # grid, crops, P, G, region, window, self_attn, cascade, depth
    ((4, 4), 1, 8, 2, "raster", None, "cascade", None, 3),
    ((4, 4), 3, 8, 2, "raster", None, "block", None, 2),
    ((4, 4), 2, 8, 2, "window", [2, 2], "cascade", [1, 4], 2),
    ((6, 4), 1, 6, 3, "window", [2, 2], "cascade", [2, "all"], 2),
    ((8, 8), 2, 8, 4, "window", [4, 4], "block", None, 2),
    ((6, 6), 4, 24, 0, "window", [3, 2], "cascade", [1, 2, "all"], 3),  # no global queries
]


@pytest.mark.parametrize("grid,crops,P,G,region,window,self_attn,cascade,depth", EQUIV)
def test_region_gathered_attention_matches_dense_masked_reference(
    grid, crops, P, G, region, window, self_attn, cascade, depth
):
    torch.manual_seed(0)
    cfg = tiny(num_partial=P, num_global=G, region=region, window=window, self_attn=self_attn,
               cascade=cascade, depth=depth)
    proj = build_projector(cfg, vision_width=24, llm_width=40, grid=grid).eval()
    N = crops * grid[0] * grid[1]
    feats = torch.randn(3, N, 24, requires_grad=True)

    fast = proj(feats)
    fast_grads = torch.autograd.grad(fast.square().sum(), [feats, *proj.parameters()])
    proj.cfg.cross_attn_impl = "dense"
    ref = proj(feats)
    ref_grads = torch.autograd.grad(ref.square().sum(), [feats, *proj.parameters()])

    assert fast.shape == (3, P + G, 40)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _changed_queries(cfg: ProjectorConfig, grid, region_index: int, N: int | None = None) -> set[int]:
    """Which output tokens change when the patches of partial region `region_index` change."""
    torch.manual_seed(1)
    proj = build_projector(cfg, vision_width=24, llm_width=24, grid=grid).eval()
    N = N or grid[0] * grid[1]
    feats = torch.randn(1, N, 24)
    patches = proj.regions(N)[region_index]
    bumped = feats.clone()
    bumped[0, patches] += torch.randn(len(patches), 24)
    with torch.no_grad():
        delta = (proj(feats) - proj(bumped)).abs().amax(-1)[0]
    return set((delta > 1e-6).nonzero().flatten().tolist())


def test_one_layer_cascade_size_one_isolates_each_partial_query():
    P, G = 8, 3
    cfg = tiny(num_partial=P, num_global=G, depth=1, cascade=[1])
    for i in (0, 5):
        assert _changed_queries(cfg, (4, 4), i) == {i} | set(range(P, P + G))


def test_window_regions_isolate_too():
    cfg = tiny(num_partial=4, num_global=2, depth=1, cascade=[1], region="window", window=[2, 2])
    assert _changed_queries(cfg, (4, 4), 2) == {2, 4, 5}


def test_cascade_widens_with_depth_and_block_mask_mixes_all_partials():
    P, G = 8, 2
    globals_ = set(range(P, P + G))
    # Layer 2 groups partial queries in pairs: region 5 reaches queries 4 and 5 only.
    assert _changed_queries(tiny(num_partial=P, num_global=G, depth=2, cascade=[1, 2]), (4, 4), 5) == {4, 5} | globals_
    # Groups of 4 in layer 2: queries 4..7.
    assert _changed_queries(tiny(num_partial=P, num_global=G, depth=2, cascade=[1, 4]), (4, 4), 5) == {4, 5, 6, 7} | globals_
    # Size 1 in both layers: although globals changed in layer 1, no partial query sees them.
    assert _changed_queries(tiny(num_partial=P, num_global=G, depth=2, cascade=[1, 1]), (4, 4), 5) == {5} | globals_
    # The release's fixed mask: after the first layer every partial query has seen region 5.
    assert _changed_queries(tiny(num_partial=P, num_global=G, depth=2, self_attn="block"), (4, 4), 5) == set(range(P + G))


def test_default_cascade_schedule_widens_to_all():
    assert ProjectorConfig().cascade_schedule() == [1, 2, 4, 288]
    assert ProjectorConfig(self_attn="block").cascade_schedule() == [288] * 4
    assert ProjectorConfig(depth=2, cascade=[2, "all"]).cascade_schedule() == [2, 288]


def test_paper_shapes():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(), vision_width=1024, llm_width=4096, grid=(24, 24)).eval()
    with torch.no_grad():
        assert proj(torch.randn(1, 576, 1024)).shape == (1, 304, 4096)
        assert proj(torch.randn(1, 4 * 576, 1024)).shape == (1, 304, 4096)  # 4 crops, 1x8 strips
    assert proj.num_tokens(576) == 304
    n_params = sum(p.numel() for p in proj.parameters())
    W, V, F, L, Q, D = 512, 1024, 2048, 4, 304, 4096
    per_layer = (4 * W * W + 4 * W) + (2 * W * W + 2 * W) + (2 * V * W + 2 * W) + (2 * W * F + F + W) + 3 * 2 * W
    assert n_params == L * per_layer + 2 * Q * W + 2 * W + (W * D + D)  # 21.3M


def test_baselines_share_the_interface():
    torch.manual_seed(0)
    feats = torch.randn(2, 16, 24)
    mlp = build_projector({"type": "mlp"}, 24, 40)
    assert mlp(feats).shape == (2, 16, 40) and mlp.num_tokens(16) == 16
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "GELU", "Linear"]
    qformer = build_projector(tiny(type="qformer", num_global=5, depth=2), 24, 40)
    assert qformer(feats).shape == (2, 5, 40) and qformer.num_tokens(16) == 5
    pargo = build_projector(tiny(num_partial=8, num_global=5, depth=2), 24, 40)
    # Q-Former: same depth and width as ParGo, only global queries, no masks.
    assert len(qformer.layers) == len(pargo.layers)
    assert qformer.queries.shape[1] == pargo.queries.shape[1]
    # A Q-Former's query i sees every patch: changing any patch changes every token.
    bumped = feats.clone()
    bumped[:, 3] += 1.0
    with torch.no_grad():
        assert ((qformer(feats) - qformer(bumped)).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize(
    "kwargs,N,grid,message",
    [
        (dict(num_partial=7), 16, None, "16 patches cannot be split into num_partial=7"),
        (dict(num_partial=4, region="window", window=[3, 2]), 16, (4, 4), "window 3x2 does not tile the 4x4"),
        (dict(num_partial=8, region="window", window=[2, 2]), 16, (4, 4), "4 regions per crop; with 1 crop(s) that is 4 regions, but num_partial=8"),
        (dict(num_partial=4, region="window", window=[2, 2]), 20, (4, 4), "20 patches are not a whole number of 4x4 crops"),
    ],
)
def test_impossible_layouts_name_the_values(kwargs, N, grid, message):
    proj = build_projector(tiny(**kwargs), 24, 24, grid)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        proj(torch.randn(1, N, 24))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(depth=3, cascade=[1, 2]), r"cascade=\[1, 2\] has 2 entries but projector.depth=3"),
        (dict(num_partial=6, depth=2, cascade=[4, "all"]), r"cascade\[0\]=4: .* divisor of num_partial=6"),
        (dict(width=30, heads=4), "width=30 is not divisible by projector.heads=4"),
        (dict(region="window"), r"needs projector.window=\[h, w\]"),
        (dict(region="diagonal"), "projector.region='diagonal': must be one of"),
        (dict(self_attn="block", cascade=[1, 2, 4, "all"]), "only used with self_attn='cascade'"),
    ],
)
def test_impossible_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectorConfig(**kwargs)


def test_unknown_key_lists_nearest_valid_keys():
    with pytest.raises(ValueError, match=r"unknown projector key 'num_partials'.*'num_partial'"):
        ProjectorConfig.from_dict({"num_partials": 8})
