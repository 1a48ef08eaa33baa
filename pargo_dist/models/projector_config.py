"""The projector's settings (ParGo, Q-Former, MLP): plain Python, no torch.

Kept apart from projector.py so that reading and checking a recipe (`pargo-dist train`'s
launcher, `submit`, `plan`) does not import torch: a launcher that only starts ranks
should not pay seconds of imports before it does.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

from pargo_dist.errors import UserError

ALL = "all"


@dataclass
class ProjectorConfig:
    """Settings of the projector. Defaults are the paper's (288 + 16 queries, BERT-small)."""

    type: str = "pargo"  # pargo | qformer | mlp
    num_partial: int = 288  # P: partial queries, one per region
    num_global: int = 16  # G: global queries (for qformer: the number of queries)
    depth: int = 4  # the release builds from a BERT-small config: 4 layers,
    width: int = 512  # width 512,
    heads: int = 8  # 8 heads,
    ffn: int = 2048  # FFN 2048
    dropout: float = 0.0  # hidden dropout (after query embedding and on each residual branch)
    attn_dropout: float = 0.0  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's
    init_std: float = 0.02  # BERT's init; small widths train faster with ~1/sqrt(width)
    # How the patch sequence is split into P regions:
    #   raster: P contiguous runs of N/P patches in raster order (the released code);
    #   window: h x w windows tiling each crop's patch grid (needs `grid` from the tower).
    region: str = "raster"
    window: list[int] | None = None  # [h, w] patches, region="window" only
    # Self-attention among partial queries:
    #   cascade: the paper's cascaded partial perception; layer l groups partial queries
    #            in runs of cascade[l] (1 = each only itself, "all" = all partial queries);
    #   block:   the release's fixed mask (partial <-> partial, global <-> global) in every layer.
    # In both, global queries see exactly the global queries, partial and global never mix.
    self_attn: str = "cascade"
    cascade: list[int | str] | None = None  # default: 1, 2, 4, ... then "all" in the last layer
    cross_attn_impl: str = "region"  # region (gathered, the fast path) | dense (masked reference)

    def __post_init__(self) -> None:
        choices = {
            "type": ("pargo", "qformer", "mlp"),
            "region": ("raster", "window"),
            "self_attn": ("cascade", "block"),
            "cross_attn_impl": ("region", "dense"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"projector.{key}={getattr(self, key)!r}: must be one of {allowed}")
        if self.type == "mlp":
            return
        for key in ("depth", "width", "heads", "ffn", "num_global"):
            if getattr(self, key) < (0 if key == "num_global" else 1):
                raise UserError(f"projector.{key}={getattr(self, key)} must be positive")
        if self.width % self.heads:
            raise UserError(
                f"projector.width={self.width} is not divisible by projector.heads={self.heads}"
            )
        if self.type == "qformer":
            return
        if self.num_partial < 1:
            raise UserError(f"projector.num_partial={self.num_partial}: ParGo needs >= 1 partial query")
        if self.region == "window":
            if self.window is None or len(self.window) != 2 or min(self.window) < 1:
                raise UserError(
                    f"projector.region='window' needs projector.window=[h, w] (patches), got {self.window}"
                )
        elif self.window is not None:
            raise UserError(
                f"projector.window={self.window} is only used with region='window' (region={self.region!r})"
            )
        if self.self_attn == "block" and self.cascade is not None:
            raise UserError("projector.cascade is only used with self_attn='cascade' (self_attn='block')")
        self.cascade_schedule()  # validates

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ProjectorConfig":
        """Build from a plain dict; an unknown key names the nearest valid ones."""
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                near = difflib.get_close_matches(key, valid, n=3) or valid
                raise UserError(f"unknown projector key {key!r}; did you mean one of {near}?")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cascade_schedule(self) -> list[int]:
        """Partial-query group size for every layer (P for "all")."""
        P = self.num_partial
        if self.self_attn == "block":
            return [P] * self.depth
        if self.cascade is None:
            return [min(2**i, P) for i in range(self.depth - 1)] + [P]
        if len(self.cascade) != self.depth:
            raise UserError(
                f"projector.cascade={list(self.cascade)} has {len(self.cascade)} entries "
                f"but projector.depth={self.depth}: give one group size per layer"
            )
        sizes = []
        for i, g in enumerate(self.cascade):
            size = P if g == ALL else g
            if not isinstance(size, int) or size < 1 or P % size:
                raise UserError(
                    f"projector.cascade[{i}]={g!r}: a group size must be 'all' or a positive "
                    f"divisor of num_partial={P}"
                )
            sizes.append(size)
        return sizes
