"""A megatron checkpoint's weights by the HF model's names, read one decoder layer at a time.

Export and `model.init_from` read a checkpoint saved at any TP/PP/DP layout in one process.
Megatron's distributed checkpoint (torch.distributed.checkpoint underneath) stores each tensor
by its global coordinates; the decoder layers of one kind are one global tensor with a leading
layer axis. So layer i is the slice [i] of each of those tensors, at TP=1 whatever TP saved it,
and that slice alone is read (a load plan for just that chunk): a 70B checkpoint gives up one
0.9 GB layer at a time, never 280 GB.

Which global tensor and which offset each parameter lives at comes from megatron itself: the
one-stage (TP=PP=1) model is built on the meta device and asked for its sharded state dict.
The layer's megatron tensors are then converted to HF names (megatron_convert), and the vision
tower and projector, kept whole by the backend, are read whole.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader, load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pargo_dist.backends.megatron.convert import hf_ends_from_megatron, hf_layer_from_megatron

_LAYER = re.compile(r"language_model\.decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")  # one global tensor per layer kind, an expert axis after the layer's


def _block_of(name: str) -> str:
    """The read unit of a local state-dict name: one decoder layer, the replicated tower and
    projector, or what is around the layers (embeddings, final norm, output layer)."""
    layer = _LAYER.match(name)
    if layer:
        return f"layer {int(layer.group(1))}"
    return "vision_tower+projector" if name.startswith(("vision_tower.", "projector.")) else "ends"


class _ChunkPlanner(DefaultLoadPlanner):
    """A torch.distributed.checkpoint load plan that reads, for each requested tensor, only the
    chunk at its given global offset, of the requested tensor's shape."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, tensor in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[fqn]), sizes=tensor.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        """Where a read lands: its offsets are relative to the requested chunk (a plain tensor)."""
        tensor = self.state_dict[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor


class MegatronWeights:
    """Reader of one checkpoint: `names()` (HF names, without reading) and `read(name)`, which
    reads and converts the block holding `name` (one decoder layer, or the embeddings and
    norm) and keeps that one block until another is asked for."""

    def __init__(self, step_dir: str | Path, hf_model):
        from pargo_dist.backends.megatron.backend import MegatronBackend, ParGoMegatron, transformer_config
        from pargo_dist.checkpoint.state import MEGATRON_DIR
        from pargo_dist.config import load_config

        cfg = load_config(Path(step_dir) / "config.yaml")
        self.dir = Path(step_dir) / MEGATRON_DIR
        self.text = hf_model.config.text_config
        one = replace(cfg, backend=replace(cfg.backend, tensor_parallel=1, pipeline_parallel=1, expert_parallel=1,
                                           sequence_parallel=False))
        environ = dict(os.environ)
        self._run_alone(lambda: MegatronBackend(one).init_distributed())
        try:
            with torch.device("meta"):  # names, global keys and offsets; no weights
                stage = ParGoMegatron(transformer_config(one, self.text), hf_model, pre_process=True, post_process=True)
            sharded = stage.sharded_state_dict()
        finally:
            self._run_alone(None)
            os.environ.clear()  # the launcher variables of that group must not reach later processes
            os.environ.update(environ)
        # local state-dict name -> (global key, chunk offset, chunk shape, dtype); a decoder
        # layer's chunk has the layer axis in front (size 1), an expert's the layer and expert
        # axes (at EP=1 its local index is its global one), dropped once read
        self._where: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]] = {}
        for name, entry in sharded.items():
            data = getattr(entry, "data", None)
            if not torch.is_tensor(data):  # _extra_state objects
                continue
            layer, expert = _LAYER.match(name), _EXPERT.search(name)
            lead = (int(layer.group(1)),) if layer else ()  # megatron numbers them globally: TP=PP=1 here
            lead += (int(expert.group(1)),) if expert else ()
            offset = tuple(getattr(entry, "global_offset", None) or lead + (0,) * data.dim())  # a factory: none
            self._where[name] = (entry.key, offset, (1,) * len(lead) + tuple(data.shape), data.dtype)
        groups: dict[str, list[str]] = {}
        for name in self._where:
            groups.setdefault(_block_of(name), []).append(name)
        layers = sorted((k for k in groups if k.startswith("layer ")), key=lambda k: int(k.split()[1]))
        # the order export writes them in: tower and projector, the layers, the embeddings and norm
        self._members = {k: groups[k] for k in ("vision_tower+projector", *layers, "ends") if k in groups}
        self._blocks: dict[str, str] = {}  # HF name -> block
        for block in self._members:
            for hf_name in self._convert(block, meta=True):
                self._blocks[hf_name] = block
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    @staticmethod
    def _run_alone(start: Callable[[], object] | None) -> None:
        """A one-process group while megatron builds its meta model; torn down after. It is this
        process's own group even in a launched rank (`pargo-dist eval --nproc N` reads the
        checkpoint on rank 0 alone): the launcher's RANK / WORLD_SIZE / MASTER_PORT would make it
        wait for peers that never join, so they are replaced here (the caller restores them)."""
        from megatron.core import parallel_state

        from pargo_dist.runtime.rank_env import free_port

        if start is not None:
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            start()
            return
        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """One load of the chunks holding `names`. A layer's experts share one global tensor (an
        expert axis after the layer's): they are read as one chunk over their experts, then split."""
        by_key: dict[str, list[str]] = {}
        for n in names:
            by_key.setdefault(self._where[n][0], []).append(n)
        targets, offsets, parts = {}, {}, {}
        for key, members in by_key.items():
            offset, shape, dtype = self._where[members[0]][1:]
            if len(members) > 1:  # experts: the same chunk but for the expert axis (1)
                first = min(self._where[n][1][1] for n in members)
                offset = offset[:1] + (first,) + offset[2:]
                shape = shape[:1] + (len(members),) + shape[2:]
                parts.update({n: (key, self._where[n][1][1] - first) for n in members})
            else:
                parts[members[0]] = (key, None)
            targets[key], offsets[key] = torch.empty(shape, dtype=dtype), offset
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process, as meant
            warnings.simplefilter("ignore", UserWarning)
            load(targets, storage_reader=FileSystemReader(str(self.dir)), planner=_ChunkPlanner(offsets),
                 no_dist=True)
        out = {}
        for n, (key, index) in parts.items():
            chunk = targets[key] if index is None else targets[key].narrow(1, index, 1)
            out[n] = self._without_lead(n, chunk)
        return out

    def _without_lead(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A chunk without its leading layer (and expert) axes of size 1."""
        lead = (1 if _LAYER.match(name) else 0) + (1 if _EXPERT.search(name) else 0)
        return tensor.reshape(tensor.shape[lead:])

    def _convert(self, block: str, meta: bool = False) -> dict[str, torch.Tensor]:
        names = self._members[block]
        if meta:
            local = {n: torch.empty(self._where[n][2], dtype=self._where[n][3], device="meta") for n in names}
            local = {n: self._without_lead(n, t) for n, t in local.items()}
        else:
            local = self._read(names)
        if block == "vision_tower+projector":
            return local
        state = {(0, 0): {n.removeprefix("language_model."): t for n, t in local.items()}}
        if block == "ends":
            hf = hf_ends_from_megatron(state, self.text)
        else:
            index = int(block.split()[1])
            hf = hf_layer_from_megatron(state, self.text, 0, index, index)
        return {f"language_model.{k}": v for k, v in hf.items()}

    def names(self) -> list[str]:
        return list(self._blocks)

    def read(self, name: str) -> torch.Tensor:
        block = self._blocks[name]
        if self._cached is None or self._cached[0] != block:
            self._cached = None  # drop the last block before reading the next
            self._cached = (block, self._convert(block))
        return self._cached[1][name]

