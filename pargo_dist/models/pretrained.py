"""A pretrained HF checkpoint directory read tensor by tensor, slice by slice.

Hub checkpoints are directories of safetensors shards (Llama-3-70B: 30 files, 140 GB in bf16)
with a `model.safetensors.index.json` naming the file of every tensor. A rank that needs only
its tensor-parallel slice of a weight, or only its pipeline stage's layers, reads just those
bytes (`safe_open(...).get_slice`): no rank holds the whole model, and the shared filesystem
serves each byte to the ranks that need it, not to all of them.

A checkpoint that does not fit what the model expects is an error that names the file and the
tensor: a shard the index lists but that is missing, a tensor the model needs that no shard
holds, a tensor of another shape or of a dtype that is not floating point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from pargo_dist.errors import UserError

INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """The tensors of an HF directory: which file holds each, its shape and dtype, and reads of
    whole tensors or of row / column ranges, converted to the dtype asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map: is it a safetensors index?")
            self.files = {name: self.path / file for name, file in weight_map.items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise UserError(f"{self.path} holds no safetensors weights (neither {INDEX} nor *.safetensors): "
                                "save the model with save_pretrained(..., safe_serialization=True)")
            self.files = {}
            for shard in shards:
                self.files.update(dict.fromkeys(self._names_in(shard), shard))
        missing = sorted({f for f in self.files.values() if not f.is_file()})
        if missing:
            lost = next(n for n, f in self.files.items() if f == missing[0])
            raise UserError(f"{self.path}: shard {missing[0].name} is missing ({len(missing)} of "
                            f"{len(set(self.files.values()))} files), the index names it for {lost} and others")
        self._open: dict[Path, object] = {}

    @staticmethod
    def _names_in(shard: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(shard, framework="pt") as f:
            return list(f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return sorted(self.files)

    def _reader(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise UserError(f"{self.path} has no tensor {name} (the model needs it; the checkpoint holds "
                            f"{len(self.files)} tensors, e.g. {self.names()[:3]})")
        file = self.files[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="pt")
            except Exception as err:  # a truncated or overwritten header
                raise UserError(f"{file} cannot be read as safetensors ({type(err).__name__}: {err})") from None
        return self._open[file]

    def release_except(self, name: str) -> None:
        """Unmap every file but the one holding `name`: safetensors memory-maps a file, and the
        pages a read touched count as this process's memory until it is unmapped. Readers that go
        through the model in file order keep one shard mapped at a time."""
        keep = self.files.get(name)
        for file in [f for f in self._open if f != keep]:
            del self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._reader(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None,
             dtype: torch.dtype | None = None, expect: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` (its rows / columns range only, if given), as `dtype`, in memory of its own.
        `expect`: the full shape the model needs; another is an error naming the tensor and the file."""
        reader = self._reader(name)
        part = reader.get_slice(name)
        shape = tuple(part.get_shape())
        if expect is not None and shape != tuple(expect):
            raise UserError(f"{self.files[name]}: {name} has shape {shape}, the model needs {tuple(expect)} "
                            "(a checkpoint of another model size?)")
        if part.get_dtype() not in ("F16", "BF16", "F32", "F64"):
            raise UserError(f"{self.files[name]}: {name} is {part.get_dtype()}, not a floating-point weight "
                            "(a quantized checkpoint? use the unquantized one)")
        if rows is None and cols is None:
            tensor = part[:]
        elif cols is None:
            tensor = part[rows]
        else:
            tensor = part[rows or slice(None), cols]
        # a read is a view of the file's memory map: copy it out (converting on the way), so that
        # no parameter keeps a shard mapped and release_except can unmap it
        return tensor.to(dtype=dtype or tensor.dtype, copy=True)

    def close(self) -> None:
        self._open.clear()


# -- filling a model from a checkpoint ---------------------------------------------------

ROW_BLOCK = 8192  # rows read at a time when averaging an embedding


def checkpoint_name(ckpt: HFCheckpoint, name: str, base_prefix: str) -> str | None:
    """The checkpoint's name for the model's parameter `name`: the same, or without the base
    model's prefix (checkpoints saved from the base model: `embed_tokens.weight`)."""
    if name in ckpt:
        return name
    short = name.removeprefix(f"{base_prefix}.")
    return short if short != name and short in ckpt else None


def mean_row(ckpt: HFCheckpoint, name: str) -> torch.Tensor:
    """The mean of a 2-D tensor's rows, read ROW_BLOCK rows at a time (fp32)."""
    rows, width = ckpt.shape(name)
    total = torch.zeros(width, dtype=torch.float64)
    for start in range(0, rows, ROW_BLOCK):
        total += ckpt.read(name, rows=slice(start, min(start + ROW_BLOCK, rows)), dtype=torch.float64).sum(0)
    return (total / rows).float()


def read_rows(ckpt: HFCheckpoint, name: str, rows: range, width: int, dtype: torch.dtype,
              cols: slice | None = None) -> torch.Tensor:
    """Rows `rows` of a (vocab, width) embedding-like tensor. Rows past the checkpoint's own (the
    model's vocabulary grew: an <image> token, padding to a multiple of 64) are the mean of the
    pretrained rows: deterministic, the same on every rank and backend, and never trained for
    the image placeholder (its embedding is replaced by visual tokens) or the padding."""
    have, full_width = ckpt.shape(name)
    if full_width != width:
        raise UserError(f"{ckpt.files[name]}: {name} has width {full_width}, the model needs {width}")
    stop_old = min(rows.stop, have)
    parts = []
    if rows.start < stop_old:
        parts.append(ckpt.read(name, rows=slice(rows.start, stop_old), cols=cols, dtype=dtype))
    new = rows.stop - max(rows.start, have)
    if new > 0:
        mean = mean_row(ckpt, name)
        parts.append((mean if cols is None else mean[cols]).to(dtype).expand(new, -1))
    if len(parts) > 1:
        return torch.cat(parts)
    return parts[0] if new <= 0 else parts[0].contiguous()  # a read is already a tensor of its own


def read_whole(ckpt: HFCheckpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               embedding: bool = False) -> torch.Tensor:
    """Tensor `name` with the model's `shape` (an embedding may have more rows than the
    checkpoint: see read_rows), as `dtype`."""
    if embedding:
        return read_rows(ckpt, name, range(shape[0]), shape[1], dtype)
    return ckpt.read(name, dtype=dtype, expect=shape)


def read_flat(ckpt: HFCheckpoint, name: str, shape: tuple[int, ...], start: int, stop: int, dtype: torch.dtype,
              embedding: bool = False) -> torch.Tensor:
    """Elements [start, stop) of tensor `name` flattened, reading only the rows that hold them: a
    ZeRO-3 partition is a contiguous range of the flattened parameter. `shape` is the model's
    (an embedding may have more rows than the checkpoint: see read_rows)."""
    width = math.prod(shape[1:])
    first, last = start // width, -(-stop // width)
    if embedding:
        rows = read_rows(ckpt, name, range(first, last), shape[1], dtype)
    else:
        rows = ckpt.read(name, rows=slice(first, last), dtype=dtype, expect=shape)
    return rows.reshape(-1)[start - first * width:stop - first * width]


def fill_causal_lm(llm: torch.nn.Module, path: str | Path, dtype: torch.dtype,
                   partition: Callable[[torch.nn.Parameter], tuple[torch.Tensor, int]] | None = None) -> int:
    """Give every parameter of `llm` (an HF causal LM built without weights: on the meta device,
    or partitioned by ZeRO-3) the checkpoint's tensor, converted to `dtype`, one tensor at a time:
    the peak is the model plus its largest tensor, never a second copy of the model.

    partition: for partitioned parameters, this rank's share of one: the flat tensor that holds
    it and the offset of its first element in the flattened parameter (trailing padding is left
    alone). Then each rank reads only its share's rows from the files, with no collective: the
    filesystem serves each byte to the rank that keeps it. Tied weights are filled once.
    Returns the tensors filled."""
    ckpt = HFCheckpoint(path)
    prefix = getattr(llm, "base_model_prefix", "model")
    embeddings = {id(m.weight) for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
    filled = 0
    for name, param in list(llm.named_parameters()):  # tied: listed once
        source = checkpoint_name(ckpt, name, prefix)
        if source is None:
            raise UserError(f"{path} has no tensor for the model's {name}: is model.llm.path the checkpoint of "
                            f"this model type ({type(llm).__name__})?")
        shape = tuple(getattr(param, "ds_shape", param.shape))
        embedding = id(param) in embeddings
        ckpt.release_except(source)
        if partition is None:
            whole = read_whole(ckpt, source, shape, dtype, embedding)
            module_name, _, attr = name.rpartition(".")
            module = llm.get_submodule(module_name)
            module._parameters[attr] = torch.nn.Parameter(whole, requires_grad=param.requires_grad)
        else:
            target, offset = partition(param)
            count = min(target.numel(), math.prod(shape) - offset)
            if count > 0:
                with torch.no_grad():
                    target[:count].copy_(read_flat(ckpt, source, shape, offset, offset + count, target.dtype,
                                                   embedding))
        filled += 1
    if partition is None and getattr(llm.config, "tie_word_embeddings", False):
        llm.tie_weights()  # the output layer takes the filled input embedding again
    ckpt.close()
    return filled
