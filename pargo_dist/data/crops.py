"""How an image becomes crops: one view (today's default), a fixed grid of tiles, or a grid
chosen per image by its aspect ratio plus a global thumbnail (the recipe's `data.image`).

High-resolution captions and documents lose their detail in one 336 px view. Like LLaVA-NeXT's
any-res and InternVL's dynamic tiles, the image is resized to `cols x rows` tiles of the tower's
input side and cut into them; the tower sees every tile at its native resolution. With more
than one tile a thumbnail (the whole image, preprocessed exactly as a single crop) is appended,
so the projector still has one global view. The projector gets all of a sample's crops at
once, concatenated along the patch sequence (crop-major), as PARGO.md describes.

The choice depends only on the image's size, so it is the same for a sample on every epoch,
every rank count and every resume. This module is plain Python (no torch, no PIL): the
launcher validates recipes with it before any heavy import.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_GRID = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class ImageConfig:
    """The recipe's `data.image` section: how every image (train, eval, captions) is cropped."""

    # 1: one view (resize + centre crop as the tower's processor does); "CxR": C columns by R
    # rows of tiles (e.g. 2x2, 2x1); "dynamic": the grid of at most max_tiles tiles whose
    # shape is closest to the image's aspect ratio
    crops: int | str = 1
    max_tiles: int = 6  # dynamic: the most tiles per image (the thumbnail not counted)
    min_tiles: int = 1  # dynamic: the fewest tiles per image
    thumbnail: bool = True  # append the whole image as one more crop when there is more than one tile


@dataclass(frozen=True)
class CropPolicy:
    """`data.image` checked and made usable: which grid an image of a given size is cut into."""

    mode: str = "single"  # single | grid | dynamic
    grid: tuple[int, int] = (1, 1)  # (cols, rows) for mode grid
    max_tiles: int = 1
    min_tiles: int = 1
    thumbnail: bool = True

    @classmethod
    def from_config(cls, cfg: ImageConfig | None) -> "CropPolicy":
        """Raises ValueError naming the key (the config loader turns it into a ConfigError)."""
        if cfg is None:
            return cls()
        spec = str(cfg.crops).strip().lower()
        if spec == "1":
            return cls()
        if spec == "dynamic":
            if not 1 <= cfg.min_tiles <= cfg.max_tiles:
                raise ValueError(f"data.image: need 1 <= min_tiles <= max_tiles (got {cfg.min_tiles}, {cfg.max_tiles})")
            return cls("dynamic", max_tiles=cfg.max_tiles, min_tiles=cfg.min_tiles, thumbnail=cfg.thumbnail)
        match = _GRID.match(spec)
        if match is None or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"data.image.crops={cfg.crops!r}: must be 1, a grid COLSxROWS (e.g. 2x2, 2x1) "
                             "or 'dynamic'")
        cols, rows = int(match[1]), int(match[2])
        if cols * rows == 1:
            return cls()
        return cls("grid", grid=(cols, rows), thumbnail=cfg.thumbnail)

    def tiles_for(self, width: int, height: int, side: int) -> tuple[int, int]:
        """(cols, rows) of tiles of `side` px for an image of this size; (1, 1): one ordinary view."""
        if self.mode == "single":
            return (1, 1)
        if self.mode == "grid":
            return self.grid
        return best_grid(width, height, side, self.min_tiles, self.max_tiles)

    def count(self, cols: int, rows: int) -> int:
        """Crops the tower sees for a (cols, rows) grid: the tiles, plus the thumbnail."""
        tiles = cols * rows
        return tiles + (1 if self.thumbnail and tiles > 1 else 0)

    def crops_for(self, width: int, height: int, side: int) -> int:
        return self.count(*self.tiles_for(width, height, side))

    def possible_counts(self) -> list[int]:
        """Every crop count an image can get (what the prompt, the projector and the planner must
        be ready for)."""
        if self.mode != "dynamic":
            return [self.count(*self.grid)] if self.mode == "grid" else [1]
        return sorted({self.count(c, r) for c, r in grids(self.min_tiles, self.max_tiles)})

    def describe(self) -> str:
        """One line for the start-up log."""
        counts = self.possible_counts()
        thumb = " + a thumbnail" if self.thumbnail else ""
        if self.mode == "grid":
            return f"a {self.grid[0]}x{self.grid[1]} grid of tiles{thumb} ({counts[0]} crops per image)"
        if self.mode == "dynamic":
            return (f"dynamic crops: {self.min_tiles}-{self.max_tiles} tiles by aspect ratio{thumb} "
                    f"({counts[0]}-{counts[-1]} crops per image)")
        return "one crop per image"

    @property
    def max_crops(self) -> int:
        return max(self.possible_counts())


def grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_tiles <= cols * rows <= max_tiles, fewest tiles first."""
    return sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                   if min_tiles <= c * r <= max_tiles), key=lambda g: (g[0] * g[1], g))


def best_grid(width: int, height: int, side: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid whose aspect ratio (cols / rows) is closest to the image's, on a log scale (2:1
    is as far from 1:1 as 1:2 is). Among grids equally close (1x1, 2x2, 3x3 for a square image)
    the one with the most tiles that the image still has the pixels for: each `side` x `side`
    tile should get at least half a tile's worth of the original image's pixels, so a small
    image is not blown up into many blurry tiles. The result depends on nothing but the sizes."""
    aspect = math.log(width / height)
    candidates = grids(min_tiles, max_tiles)
    closest = min(abs(aspect - math.log(c / r)) for c, r in candidates)
    ties = [(c, r) for c, r in candidates if abs(aspect - math.log(c / r)) <= closest + 1e-9]
    fit = [g for g in ties if width * height >= 0.5 * g[0] * g[1] * side * side]
    return max(fit, key=lambda g: g[0] * g[1]) if fit else ties[0]

