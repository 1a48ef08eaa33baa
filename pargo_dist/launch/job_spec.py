"""What every job writer (the sbatch script, the Kubernetes manifests) checks of its flags the
same way: how many ranks a node runs, and the --export KEY=VALUE pairs."""

from __future__ import annotations

import re

from pargo_dist.errors import UserError


def ranks_per_node(nproc_per_node: int | None, gpus_per_node: int, where: str = "on each node") -> int:
    """--nproc-per-node, else one rank per GPU; UserError when neither says."""
    n = nproc_per_node or gpus_per_node
    if n < 1:
        raise UserError(f"say how many ranks run {where}: --gpus-per-node G (one rank per GPU) or, for CPU ranks, "
                        "--nproc-per-node N")
    return n


def exported(items: list[str]) -> list[tuple[str, str]]:
    """--export KEY=VALUE items as (key, value); UserError naming the first that is not one."""
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--export {item!r}: expected KEY=VALUE")
        pairs.append((key, value))
    return pairs
