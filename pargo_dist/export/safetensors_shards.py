"""Writing a model as HF safetensors shards while its tensors arrive, one shard in memory at most.

`save_pretrained` needs the whole model in one process (a 70B model: 140 GB in bf16, 280 GB in
fp32). Export instead hands tensors over one at a time; they are written in files of at most
`max_shard_bytes` with the index transformers reads (`model.safetensors.index.json`: every
tensor's file, and the total size), or as one `model.safetensors` when the model fits one file,
exactly as `save_pretrained` names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardWriter:
    """add(name, tensor) in any order, then close(). Shards are written under temporary names and
    renamed once their count is known (model-00001-of-00004.safetensors ...)."""

    def __init__(self, out: str | Path, max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"{name} was written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left, name the files, write the index; returns the shard files."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.out / SINGLE
            self._shards[0][0].rename(final)
            return [final]
        count, weight_map, files = len(self._shards), {}, []
        for i, (path, names) in enumerate(self._shards, 1):
            final = self.out / f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files
