"""Reading a checkpoint's (or an export's) weights back, by the HF model's names, whatever wrote them.

One path for the three places that need it: `model.init_from` (some parts from an earlier
run), `pargo-dist export` (everything, into one HF model), and an elastic resume (a ZeRO
checkpoint on another rank count, whose optimizer shards do not fit). The formats are the
checkpoint layout's (pargo_dist/checkpoint/manager.py): an exported HF directory of safetensors, a
DeepSpeed tag dir (consolidated to fp32 by DeepSpeed's zero_to_fp32), a megatron distributed
checkpoint (read one decoder layer at a time: backends/megatron/weights.py). Each can be read
lazily, one tensor when it is asked for, so no reader needs the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, ContextManager, Iterable

import torch

from pargo_dist.checkpoint.manager import resolve_checkpoint
from pargo_dist.checkpoint.state import DEEPSPEED_DIR, MEGATRON_DIR
from pargo_dist.errors import UserError


class LazyWeights(Mapping):
    """Weights by name, each read when it is asked for (and not kept): a 70B checkpoint is read
    one tensor at a time. Built from a name -> reader table."""

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._readers[name]()

    def __iter__(self):
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def _export_weights(path: Path, names: set[str] | None, lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """Tensors of an exported HF directory (one or several safetensors files), only `names` if
    given: a 70B export holds 140 GB, its projector 40 MB."""
    from safetensors import safe_open

    readers = {}
    for f in sorted(path.glob("*.safetensors")):
        reader = safe_open(f, framework="pt")  # opened once, read per tensor
        readers.update({k: functools.partial(reader.get_tensor, k) for k in reader.keys()
                        if names is None or k in names})
    lazy_weights = LazyWeights(readers)
    return lazy_weights if lazy else dict(lazy_weights.items())


def _deepspeed_weights(step_dir: Path, lazy: bool) -> Mapping[str, torch.Tensor]:
    """fp32 weights consolidated from a DeepSpeed checkpoint of any ZeRO stage and rank count
    (DeepSpeed's zero_to_fp32). Lazily: its optimizer files memory-mapped, each ZeRO-3 tensor
    put together from the ranks' partitions when asked for (its lazy_mode)."""
    from pargo_dist.compat import configure_deepspeed_env

    configure_deepspeed_env()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; errors still raise
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_DIR, lazy_mode=lazy)
    if not lazy:
        return state
    return LazyWeights({k: v.contiguous for k, v in state.items()})  # a tensor, or DeepSpeed's GatheredTensor


def checkpoint_weights(source: str | Path, model: torch.nn.Module | None = None,
                       names: set[str] | None = None, lazy: bool = False) -> Mapping[str, torch.Tensor]:
    """The weights `source` holds, by the HF model's parameter names: an exported directory
    (safetensors), a DeepSpeed checkpoint (consolidated to fp32 from any ZeRO stage and rank
    count) or a megatron one (any TP/PP layout, read one decoder layer at a time; needs `model`
    for its names and shapes, and a process with no process group yet). `source` may be a run
    dir (its newest complete checkpoint). `lazy`: a mapping that reads each tensor when it is
    asked for (export, init_from)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if any(path.glob("*.safetensors")):
        return _export_weights(path, names, lazy)
    step_dir = resolve_checkpoint(path)
    if (step_dir / DEEPSPEED_DIR).is_dir():
        return _deepspeed_weights(step_dir, lazy)
    if (step_dir / MEGATRON_DIR).is_dir():
        if model is None or torch.distributed.is_initialized():
            raise UserError(f"{step_dir} is a megatron checkpoint, which is read back in a process of its own: "
                            "export it first (`pargo-dist export`) and use the export")
        from pargo_dist.backends.megatron.weights import MegatronWeights

        reader = MegatronWeights(step_dir, model)
        weights = LazyWeights({name: functools.partial(reader.read, name) for name in reader.names()})
        return weights if lazy else dict(weights.items())
    raise UserError(f"{step_dir} holds neither {DEEPSPEED_DIR}/ (DeepSpeed) nor {MEGATRON_DIR}/ (megatron) "
                    "checkpoint files, and no safetensors")


def load_trained_weights(model: torch.nn.Module, source: str | Path, parts: Iterable[str] | None = None,
                         gather: Callable[[list[torch.nn.Parameter]], ContextManager] | None = None) -> list[str]:
    """Copy the weights of `source` (see `checkpoint_weights`) into `model`; returns the names loaded.

    parts=None (the elastic resume): every parameter that trains must come from the source;
    frozen ones may be absent (align and LoRA checkpoints hold only what trains: the frozen rest
    comes from the recipe and model.init_from); a tensor the model does not have is an error.
    parts=[...] (model.init_from): every parameter of those parts must come from the source, the
    rest of the source is ignored. Shapes must match. Errors name the source and the keys.
    `gather`: a context in which partitioned parameters are whole and writable (ZeRO-3's
    GatheredParameters with a modifier rank), entered for one parameter at a time."""
    prefixes = tuple(f"{p}." for p in parts) if parts is not None else None
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)  # tied weights
    wanted = {n for n in params if prefixes is None or n.startswith(prefixes)}
    # lazily: each tensor is read when it is copied (init_from of a 70B LLM under ZeRO-3 never
    # holds that LLM whole on a rank)
    state = checkpoint_weights(source, model, names=wanted | set(buffers) if prefixes else None, lazy=True)
    if prefixes is not None:
        required = wanted
        keys = [k for k in state if k in wanted]
    else:
        unexpected = sorted(set(state) - set(params) - set(buffers) - aliases)
        if unexpected:
            raise ValueError(f"{source} does not fit the model: it holds {len(unexpected)} tensors the model lacks "
                             f"({unexpected[:5]})")
        required = {n for n, p in params.items() if p.requires_grad}
        keys = [k for k in state if k in params or k in buffers]
    missing = sorted(required - set(state))
    if missing:
        raise UserError(f"{source} lacks {len(missing)} weights the model needs: {missing[:5]}")
    targets = {k: params[k] if k in params else buffers[k] for k in keys}
    with torch.no_grad():
        for name, target in targets.items():  # one at a time: a gathered 70B model fits no GPU
            value = state[name]
            shape = tuple(getattr(target, "ds_shape", target.shape))
            if tuple(value.shape) != shape:
                raise UserError(f"{source}: {name} has shape {tuple(value.shape)}, the model {shape} "
                                "(a different projector or LLM config?)")
            with gather([target]) if gather else contextlib.nullcontext():
                target.copy_(value.to(target.dtype))
    return sorted(targets)
