"""Per-detail recall: which of an image's shapes a generated caption names correctly.

The synthetic captions (pargo_dist/data/synthetic.py) say "There are N shapes." and then one
sentence per shape, "A {small|large} {colour} {kind} at {position}.". Both the true caption and
the generated one are parsed with the same pattern, so the metric needs no scene metadata:
any MDS split of synthetic captions can be scored, and a caption from another dataset simply
has no shapes (the metric is then reported as not applicable, never as 0).

Shapes sit one per grid cell, so a position identifies a true shape. For each true shape:
  recall/position  some generated sentence puts a shape at its position
  recall/colour    ... a shape of its colour (at its position)
  recall/kind      ... a shape of its kind
  recall/size      ... a shape of its size
  recall/all       ... a shape of its colour *and* kind: the shape is named correctly
precision is the share of generated shape sentences that name a true shape (colour, kind and
position right): what the caption invents lowers it. count_acc is the share of captions
whose "There are N shapes" is right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SHAPE = re.compile(r"\ban?\s+(small|large)\s+([a-z]+)\s+([a-z]+)\s+at\s+"
                    r"(the\s+[a-z]+(?:\s+[a-z]+)?|row\s+\d+\s+column\s+\d+)\s*[.?]", re.IGNORECASE)
_COUNT = re.compile(r"\bthere\s+(?:is|are)\s+(\d+)\s+shapes?\b", re.IGNORECASE)
_QUESTION = re.compile(r"^\s*is\s+there\s+an?\s+([a-z]+)\s+([a-z]+)\s+at\s+(.+?)\s*\?\s*$", re.IGNORECASE)
RECALL_PARTS = ("all", "colour", "kind", "position", "size")


@dataclass(frozen=True)
class Shape:
    size: str
    colour: str
    kind: str
    position: str


def _norm_position(text: str) -> str:
    return " ".join(text.lower().split())


def parse_shapes(caption: str) -> list[Shape]:
    """The shape sentences of a caption, in order (words lower-cased, spacing normalised)."""
    return [Shape(size.lower(), colour.lower(), kind.lower(), _norm_position(pos))
            for size, colour, kind, pos in _SHAPE.findall(caption)]


def parse_count(caption: str) -> int | None:
    match = _COUNT.search(caption)
    return int(match.group(1)) if match else None


def parse_question(question: str) -> tuple[str, str, str] | None:
    """"Is there a red circle at the top left?" -> ("red", "circle", "the top left"), else None."""
    match = _QUESTION.match(question)
    return (match.group(1).lower(), match.group(2).lower(), _norm_position(match.group(3))) if match else None


def score_caption(truth: str, generated: str) -> dict[str, float] | None:
    """Counts for one image: hits per recall part, true shapes, generated shapes, correct ones.

    None when the true caption names no shapes (not a synthetic detail caption).
    """
    true_shapes = parse_shapes(truth)
    if not true_shapes:
        return None
    named = parse_shapes(generated)
    at: dict[str, list[Shape]] = {}
    for shape in named:
        at.setdefault(shape.position, []).append(shape)
    hits = dict.fromkeys(RECALL_PARTS, 0)
    for t in true_shapes:
        here = at.get(t.position, [])
        hits["position"] += bool(here)
        hits["colour"] += any(s.colour == t.colour for s in here)
        hits["kind"] += any(s.kind == t.kind for s in here)
        hits["size"] += any(s.size == t.size for s in here)
        hits["all"] += any(s.colour == t.colour and s.kind == t.kind for s in here)
    truth_keys = {(t.colour, t.kind, t.position) for t in true_shapes}
    correct = sum((s.colour, s.kind, s.position) in truth_keys for s in named)
    count = parse_count(truth)
    return {**{f"hit/{k}": float(v) for k, v in hits.items()}, "true": float(len(true_shapes)),
            "named": float(len(named)), "correct": float(correct),
            "count_right": float(count is not None and parse_count(generated) == count)}


def aggregate(scores: list[dict[str, float]]) -> dict[str, float]:
    """Pooled metrics over images: recall/<part> = hits / true shapes (micro-averaged), precision,
    count_acc, and how many images were scored."""
    scores = [s for s in scores if s is not None]
    if not scores:
        return {}
    total = {k: sum(s[k] for s in scores) for k in scores[0]}
    out = {f"recall/{k}": total[f"hit/{k}"] / total["true"] for k in RECALL_PARTS}
    out["precision"] = total["correct"] / total["named"] if total["named"] else 0.0
    out["count_acc"] = total["count_right"] / len(scores)
    out["images"] = float(len(scores))
    return out
