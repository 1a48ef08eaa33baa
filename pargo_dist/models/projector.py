"""Vision-to-language projectors: ParGo (Partial-Global) and its two baselines.

All three share one interface, `build_projector(cfg, vision_width, llm_width, grid)`:
a module mapping patch features (batch, patches, vision_width) to visual tokens
(batch, tokens, llm_width), with `num_tokens(num_patches)` telling how many tokens come out.

ParGo (see shared/PARGO.md): P partial + G global learned queries pass through N post-LN
layers of masked self-attention, masked cross-attention to the patches, and an FFN. Each
partial query sees only its own region of patches; each global query sees all of them.

The partial cross-attention is computed *per region*: the patch sequence is permuted once so
that every region is a contiguous run (raster regions already are), keys/values are projected
once, and each partial query attends over its own r = N/P keys in one fused attention call. Memory and FLOPs of the partial part therefore grow with
N (as the K/V projections already do), not with P x N as a dense masked attention would.
The dense masked attention is kept as `cross_attn_impl="dense"`: it is the reference the
tests compare against and the baseline the benchmark measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pargo_dist.errors import UserError
from pargo_dist.models.projector_config import ALL, ProjectorConfig  # noqa: F401  (re-exported)

# ----------------------------------------------------------------------------- regions


def partial_regions(
    num_patches: int,
    num_partial: int,
    region: str = "raster",
    grid: Sequence[int] | None = None,
    window: Sequence[int] | None = None,
) -> torch.Tensor:
    """Patch indices of every partial query's region: a (P, r) long tensor, r = N / P.

    The rows partition range(N): every patch belongs to exactly one region. Several crops are
    concatenated along the sequence (crop-major, raster order inside each crop).
    """
    N, P = num_patches, num_partial
    if region == "raster":
        if N % P:
            raise UserError(
                f"{N} patches cannot be split into num_partial={P} raster regions: "
                f"the number of patches must be a multiple of num_partial"
            )
        return torch.arange(N).view(P, N // P)
    if grid is None:
        raise UserError("region='window' needs the patch grid (rows, cols) of the vision tower")
    H, W = grid
    h, w = window
    if H % h or W % w:
        raise UserError(f"window {h}x{w} does not tile the {H}x{W} patch grid (rows/cols must divide)")
    if N % (H * W):
        raise ValueError(f"{N} patches are not a whole number of {H}x{W} crops")
    crops, per_crop = N // (H * W), (H // h) * (W // w)
    if crops * per_crop != P:
        raise UserError(
            f"window {h}x{w} on a {H}x{W} grid gives {per_crop} regions per crop; with {crops} "
            f"crop(s) that is {crops * per_crop} regions, but num_partial={P}"
        )
    # (crop, window-row, h, window-col, w) -> (crop, window-row, window-col, h, w)
    idx = torch.arange(N).view(crops, H // h, h, W // w, w).permute(0, 1, 3, 2, 4)
    return idx.reshape(P, h * w)


def cross_attention_mask(regions: torch.Tensor, num_patches: int, num_global: int) -> torch.Tensor:
    """Dense (P + G, N) boolean mask, True = may attend. The reference semantics."""
    P = regions.shape[0]
    mask = torch.zeros(P + num_global, num_patches, dtype=torch.bool)
    mask[torch.arange(P).unsqueeze(1), regions] = True
    mask[P:] = True
    return mask


def self_attention_mask(num_partial: int, num_global: int, group: int) -> torch.Tensor:
    """(P + G, P + G) boolean mask: partial queries in runs of `group`, globals among themselves."""
    P, G = num_partial, num_global
    mask = torch.zeros(P + G, P + G, dtype=torch.bool)
    ids = torch.arange(P) // group
    mask[:P, :P] = ids.unsqueeze(0) == ids.unsqueeze(1)
    mask[P:, P:] = True
    return mask


@dataclass
class RaggedPatches:
    """Where the real patches are when the samples of one batch have different crop counts.

    The batch's features are padded to the longest sample, (B, N_max, width). Sample b's
    regions are those of its own N_b patches (as if it were alone), padded to the longest
    region: `region_index` (B * P, r_max) are flat indices into the (B * N_max) patch rows and
    `region_mask` (B * P, 1, 1, r_max) marks the real ones; `patch_mask` (B, 1, 1, N_max) marks
    every sample's real patches for the global queries. Masked keys get zero weight, so each
    sample's tokens equal the tokens it gets alone.
    """

    region_index: torch.Tensor
    region_mask: torch.Tensor
    patch_mask: torch.Tensor


# ----------------------------------------------------------------------------- layers


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention among the queries with a fixed boolean mask."""

    def __init__(self, width: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.attn_dropout if self.training else 0.0
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p)))


class PartialGlobalCrossAttention(nn.Module):
    """Queries -> patch features. Partial query i sees region i only; global queries see all.

    `forward` takes the features already permuted region-major (see QueryProjector), so
    region i is the contiguous run of patches [i*r, (i+1)*r). The partial attention is then
    one fused attention call with (batch x region) as the batch dimension, a single query and
    r keys per region; its keys and values are *views* of the projected features (no gather,
    no copy), so memory and FLOPs grow with N, not with P x N.
    """

    def __init__(self, width: int, kv_width: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(kv_width, 2 * width)
        self.out = nn.Linear(width, width)

    def _qkv(self, x: torch.Tensor, feats: torch.Tensor):
        """q: (B, Q, H, d); k, v: (B, N, H, d), views of one projection."""
        B, N, _ = feats.shape
        q = self.q(x).unflatten(-1, (self.heads, -1))
        k, v = self.kv(feats).view(B, N, 2, self.heads, -1).unbind(2)
        return q, k, v

    def forward(self, x: torch.Tensor, feats: torch.Tensor, num_partial: int,
                ragged: "RaggedPatches | None" = None) -> torch.Tensor:
        q, k, v = self._qkv(x, feats)
        (B, Q, H, d), N, P = q.shape, feats.shape[1], num_partial
        p = self.attn_dropout if self.training else 0.0
        outs = []
        if P:  # (B*P, H, 1, d) queries against (B*P, H, r, d) keys/values
            qp = q[:, :P].reshape(B * P, 1, H, d).transpose(1, 2)
            if ragged is None:
                r, mask = N // P, None
                kp, vp = (t.reshape(B * P, r, H, d).transpose(1, 2) for t in (k, v))
            else:  # each sample's regions padded to the longest: gathered, padding masked out
                r, mask = ragged.region_index.shape[1], ragged.region_mask
                kp, vp = (t.reshape(B * N, H, d)[ragged.region_index].transpose(1, 2) for t in (k, v))
            out = F.scaled_dot_product_attention(qp, kp, vp, mask, dropout_p=p)
            outs.append(out.reshape(B, P, H * d))
        if Q > P:  # global queries: ordinary attention over every patch (but a sample's padding)
            out = F.scaled_dot_product_attention(
                q[:, P:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                None if ragged is None else ragged.patch_mask, dropout_p=p
            )
            outs.append(out.transpose(1, 2).reshape(B, Q - P, H * d))
        return self.out(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])

    def forward_dense(self, x: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reference: one dense (queries x patches) attention with a boolean mask."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, feats))
        p = self.attn_dropout if self.training else 0.0
        return self.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p)))


class ProjectorLayer(nn.Module):
    """Post-LN (BERT / Q-Former style): self-attn, cross-attn, FFN, each + residual + LayerNorm."""

    def __init__(self, cfg: ProjectorConfig, kv_width: int):
        super().__init__()
        W, eps = cfg.width, cfg.layer_norm_eps
        self.self_attn = SelfAttention(W, cfg.heads, cfg.attn_dropout)
        self.norm1 = nn.LayerNorm(W, eps=eps)
        self.cross_attn = PartialGlobalCrossAttention(W, kv_width, cfg.heads, cfg.attn_dropout)
        self.norm2 = nn.LayerNorm(W, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(W, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, W))
        self.norm3 = nn.LayerNorm(W, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, feats, self_mask, num_partial, cross_mask=None, ragged=None):
        x = self.norm1(x + self.drop(self.self_attn(x, self_mask)))
        if cross_mask is None:
            cross = self.cross_attn(x, feats, num_partial, ragged)
        else:
            cross = self.cross_attn.forward_dense(x, feats, cross_mask)
        x = self.norm2(x + self.drop(cross))
        return self.norm3(x + self.drop(self.ffn(x)))


# ----------------------------------------------------------------------------- projectors


def init_projector_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style init: Linear N(0, std) with zero bias, LayerNorm identity, queries N(0, std).

    A separate function (not only __init__) because models built under DeepSpeed's zero.Init
    skip constructor-time initialisation and must be initialised explicitly afterwards.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, QueryProjector):
            nn.init.normal_(m.queries, std=std)
            nn.init.normal_(m.query_pos, std=std)


class QueryProjector(nn.Module):
    """ParGo (num_partial > 0) or Q-Former (num_partial == 0): learned queries over patches."""

    def __init__(self, cfg: ProjectorConfig, vision_width: int, llm_width: int, grid=None):
        super().__init__()
        self.cfg, self.grid = cfg, tuple(grid) if grid is not None else None
        self.num_partial = cfg.num_partial if cfg.type == "pargo" else 0
        self.num_global = cfg.num_global
        Q, W = self.num_partial + self.num_global, cfg.width
        self.queries = nn.Parameter(torch.empty(Q, W))
        self.query_pos = nn.Parameter(torch.empty(Q, W))
        self.query_norm = nn.LayerNorm(W, eps=cfg.layer_norm_eps)
        self.query_drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(ProjectorLayer(cfg, vision_width) for _ in range(cfg.depth))
        self.proj = nn.Linear(W, llm_width)
        if self.num_partial:
            for i, group in enumerate(cfg.cascade_schedule()):
                mask = self_attention_mask(self.num_partial, self.num_global, group)
                self.register_buffer(f"self_mask_{i}", mask, persistent=False)
        self._regions: dict[int, torch.Tensor] = {}
        # Per (patches, device): the region indices and the dense cross mask. Copied to the
        # device once: a copy from host memory in every forward is a host sync mid-step.
        self._on_device: dict[tuple[int, str, str], torch.Tensor] = {}
        # Set by transformers' gradient_checkpointing_enable(), like its own decoder stacks.
        self.gradient_checkpointing = False
        init_projector_weights(self, cfg.init_std)

    def num_tokens(self, num_patches: int) -> int:
        return self.num_partial + self.num_global

    def regions(self, num_patches: int) -> torch.Tensor:
        """(P, r) patch indices per partial query for an input of `num_patches` (cached)."""
        if num_patches not in self._regions:
            cfg = self.cfg
            self._regions[num_patches] = partial_regions(
                num_patches, self.num_partial, cfg.region, self.grid, cfg.window
            )
        return self._regions[num_patches]

    def _cached(self, what: str, num_patches: int, device: torch.device) -> torch.Tensor:
        key = (num_patches, str(device), what)
        if key not in self._on_device:
            regions = self.regions(num_patches)
            host = regions if what == "regions" else cross_attention_mask(regions, num_patches, self.num_global)
            self._on_device[key] = host.to(device)
        return self._on_device[key]

    def _ragged(self, lengths: Sequence[int], n_max: int, device: torch.device):
        """(RaggedPatches, None) for the region path or (None, dense cross mask (B, 1, Q, N_max))
        for the dense reference, for samples of `lengths` patches padded to `n_max`."""
        P, B = self.num_partial, len(lengths)
        if self.cfg.cross_attn_impl == "dense" and P:
            mask = torch.zeros(B, 1, P + self.num_global, n_max, dtype=torch.bool, device=device)
            for b, n in enumerate(lengths):
                mask[b, 0, :, :n] = self._cached("cross_mask", n, device)
            return None, mask
        patch_mask = (torch.arange(n_max, device=device) < torch.tensor(lengths, device=device)[:, None])
        if not P:
            return RaggedPatches(None, None, patch_mask[:, None, None, :]), None
        r_max = max(lengths) // P
        index = torch.zeros(B, P, r_max, dtype=torch.long, device=device)
        valid = torch.zeros(B, P, r_max, dtype=torch.bool, device=device)
        for b, n in enumerate(lengths):
            regions = self._cached("regions", n, device)  # (P, n / P) indices into this sample's patches
            index[b, :, :regions.shape[1]] = regions + b * n_max
            valid[b, :, :regions.shape[1]] = True
        return RaggedPatches(index.view(B * P, r_max), valid.view(B * P, 1, 1, r_max), patch_mask[:, None, None, :]), None

    def forward(self, feats: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """(batch, patches, vision_width) -> (batch, P + G, llm_width).

        `lengths`: each sample's real patches when the batch mixes crop counts (features padded
        to the longest; see RaggedPatches). A host-side list, so no shape waits for the device."""
        B, N, _ = feats.shape
        x = self.query_drop(self.query_norm(self.queries + self.query_pos))
        x = x.unsqueeze(0).expand(B, -1, -1).contiguous()  # one layout for every layer (train.compile)
        P, cross_mask, ragged = self.num_partial, None, None
        if lengths is not None and any(n != N for n in lengths):
            ragged, cross_mask = self._ragged(lengths, N, feats.device)
        elif P:
            regions = self._cached("regions", N, feats.device)  # (the first call checks the layout)
            if self.cfg.cross_attn_impl == "dense":
                cross_mask = self._cached("cross_mask", N, feats.device)
            elif self.cfg.region != "raster":  # raster regions are already contiguous runs
                feats = feats.index_select(1, regions.flatten())
        for i, layer in enumerate(self.layers):
            self_mask = getattr(self, f"self_mask_{i}") if P else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x, feats, self_mask, P, cross_mask, ragged)
            else:
                x = layer(x, feats, self_mask, P, cross_mask, ragged)
        return self.proj(x)


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector: Linear, GELU, Linear; one visual token per patch."""

    def __init__(self, cfg: ProjectorConfig, vision_width: int, llm_width: int, grid=None):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(
            nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width)
        )
        init_projector_weights(self, cfg.init_std)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, feats: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Token i of a sample comes from its patch i alone: padding rows are computed and the
        caller keeps each sample's first `lengths[b]` tokens (num_tokens)."""
        return self.net(feats)


def build_projector(
    cfg: ProjectorConfig | dict, vision_width: int, llm_width: int, grid: Sequence[int] | None = None
) -> nn.Module:
    """The projector named by `cfg.type`, mapping vision_width patches to llm_width tokens."""
    if not isinstance(cfg, ProjectorConfig):
        cfg = ProjectorConfig.from_dict(dict(cfg))
    cls = MLPProjector if cfg.type == "mlp" else QueryProjector
    return cls(cfg, vision_width, llm_width, grid)


# The paper's name for the query projector with partial queries.
ParGoProjector = QueryProjector

__all__ = [
    "ProjectorConfig",
    "ParGoProjector",
    "RaggedPatches",
    "QueryProjector",
    "MLPProjector",
    "build_projector",
    "partial_regions",
    "cross_attention_mask",
    "self_attention_mask",
    "init_projector_weights",
]
