"""`pargo-dist export`: a DeepSpeed checkpoint (any ZeRO stage, any rank count) or a megatron
one (any TP/PP/DP layout) -> one HF directory that `ParGoForConditionalGeneration.from_pretrained`
(or AutoModelForImageTextToText) loads on one process, with its tokenizer and processor. The
directory also carries the model's and the processor's code (portable.py), so plain transformers
loads it without pargo_dist: AutoProcessor + AutoModelForImageTextToText, trust_remote_code=True.

The model is the checkpoint's own config.yaml rebuilt (same seed, same pretrained paths, same
model.init_from), with the checkpoint's weights over it. It is written one block at a time
(one decoder layer, one embedding), never whole: a pretrained LLM stays on the meta device and
each block is filled, written and dropped in turn, taking every tensor from the first of

  1. the checkpoint (what trained): DeepSpeed's ZeRO-3 tensors put together one at a time, a
     megatron checkpoint of any TP/PP layout read one decoder layer at a time
     (backends/megatron/weights.py),
  2. model.init_from, for the parts it names (weights of an earlier stage),
  3. the pretrained LLM's safetensors (model.llm.path), or the rebuilt tower and projector.

So a 70B export holds one shard being written (`--max-shard-size`) and one layer, not 280 GB.
In the `align` stage the checkpoint holds only the trained weights: the frozen backbones come
from 2 and 3, and a trained weight missing from it is an error, not a silent random weight.
A LoRA run is exported merged (peft merges each adapted layer as it is written: a plain model),
or as its adapters alone (`--adapters-only`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from pargo_dist import build
from pargo_dist.checkpoint.manager import resolve_checkpoint
from pargo_dist.config import Config, load_config
from pargo_dist.errors import UserError
from pargo_dist.export.portable import write_remote_code
from pargo_dist.data.processor import ParGoProcessor
from pargo_dist.backends.trained_weights import checkpoint_weights

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_LAYER = re.compile(r"(.*?\.layers\.\d+)\.")
_ADAPTER = re.compile(r"\.(?:base_layer|lora_\w+)\.")


def plain_name(name: str) -> str:
    """The name a parameter has without peft's wrapping (what an export and init_from hold):
    language_model.base_model.model.X.q_proj.base_layer.weight -> language_model.X.q_proj.weight."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer.", ".")


def block_of(name: str) -> str:
    """The unit export fills and writes at once: a decoder layer, else the parameter's module
    (a LoRA-wrapped module's base weight and adapters together)."""
    layer = _LAYER.match(name)
    if layer:
        return layer.group(1)
    parts = _ADAPTER.split(name, maxsplit=1)
    return parts[0] if len(parts) > 1 else name.rpartition(".")[0]


class StreamedModel:
    """A run's model for export: a skeleton whose pretrained LLM is on the meta device, and the
    sources its weights come from, checked up front (nothing is written for a checkpoint that
    does not fit). `tensors()` fills one block at a time and yields its tensors."""

    def __init__(self, cfg: Config, step_dir: Path, tokenizer):
        self.step_dir = step_dir
        self.model = build.build_model(cfg, tokenizer, llm_weights=not cfg.model.llm.path)
        self.model.freeze(cfg.train.stage)
        if cfg.model.lora.r:
            from pargo_dist.models.lora import apply_lora

            apply_lora(self.model, cfg.model.lora)
        self.trained = checkpoint_weights(step_dir, self.model, lazy=True)
        self.init_from: Mapping[str, torch.Tensor] = {}
        self.init_prefixes = tuple(f"{p}." for p in cfg.model.init_parts) if cfg.model.init_from else ()
        if cfg.model.init_from:
            self.init_from = checkpoint_weights(cfg.model.init_from, self.model, lazy=True)
        self.llm_checkpoint = None
        if cfg.model.llm.path:
            from pargo_dist.models.pretrained import HFCheckpoint

            self.llm_checkpoint = HFCheckpoint(cfg.model.llm.path)
        llm = self.model.language_model
        self._embeddings = {id(m.weight) for m in (llm.get_input_embeddings(), llm.get_output_embeddings())
                            if m is not None}
        self._check(cfg)

    def _check(self, cfg: Config) -> None:
        params = dict(self.model.named_parameters())
        known = set(self.model.state_dict(keep_vars=True))
        unexpected = sorted(set(self.trained) - known)
        if unexpected:
            raise UserError(f"{self.step_dir} does not fit the model: it holds {len(unexpected)} tensors the model "
                            f"lacks ({unexpected[:5]})")
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in self.trained)
        if missing:
            raise UserError(f"{self.step_dir} lacks {len(missing)} weights the model needs: {missing[:5]}")
        if self.init_prefixes:
            lacking = sorted(plain_name(n) for n in params if n not in self.trained
                             and plain_name(n).startswith(self.init_prefixes) and plain_name(n) not in self.init_from)
            if lacking:
                raise UserError(f"model.init_from={cfg.model.init_from} lacks {len(lacking)} weights the model "
                                f"needs: {lacking[:5]}")

    def _value(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The tensor `name` gets, from the first source that has it."""
        shape = tuple(param.shape)
        if name in self.trained:
            value, source = self.trained[name], self.step_dir
        elif self.init_prefixes and plain_name(name).startswith(self.init_prefixes):
            value, source = self.init_from[plain_name(name)], "model.init_from"
        elif param.is_meta:  # the pretrained LLM, never built whole
            from pargo_dist.models.pretrained import checkpoint_name, read_whole

            llm_name = plain_name(name).removeprefix("language_model.")
            key = checkpoint_name(self.llm_checkpoint, llm_name, getattr(self.model.language_model,
                                                                          "base_model_prefix", "model"))
            if key is None:
                raise UserError(f"{self.llm_checkpoint.path} has no tensor for the model's {llm_name}")
            self.llm_checkpoint.release_except(key)
            return read_whole(self.llm_checkpoint, key, shape, torch.float32, id(param) in self._embeddings)
        else:  # built: the tower, the projector, a config-only LLM
            return param.detach().float()
        if tuple(value.shape) != shape:
            raise UserError(f"{source}: {name} has shape {tuple(value.shape)}, the model {shape} "
                            "(a different projector or LLM config?)")
        return value.float()

    def _fill(self, name: str, param: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(self._value(name, param), requires_grad=False)

    def _empty(self, name: str, param: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        self.model.get_submodule(module_name)._parameters[attr] = param  # the meta placeholder again

    def _merge_adapters(self, block: str) -> None:
        from peft.tuners.lora import LoraLayer

        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and (name == block or name.startswith(f"{block}.")):
                module.merge()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, fp32 tensor) in the plain model's names, one block filled at a time; a block
        of the pretrained LLM goes back to the meta device once its tensors are handed over."""
        named = list(self.model.named_parameters())  # a tied weight once, under its first name
        for block, members in itertools.groupby(named, key=lambda item: block_of(item[0])):
            members = list(members)
            for name, param in members:
                self._fill(name, param)
            self._merge_adapters(block)
            for name, param in members:
                if ".lora_" not in name:
                    yield plain_name(name), self.model.get_parameter(name).detach()
            for name, param in members:
                if param.is_meta:
                    self._empty(name, param)
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for name, buffer in self.model.state_dict(keep_vars=True).items():  # persistent buffers
            if name not in params:
                yield plain_name(name), (self.trained[name] if name in self.trained else buffer).detach().float()

    def fill_for_adapters(self) -> None:
        """Fill what peft's adapter files take (the adapters, and the embeddings when the vocabulary
        grew) and the projector; the rest of the LLM stays on the meta device."""
        for name, param in list(self.model.named_parameters()):
            if ".lora_" in name or id(param) in self._embeddings or name.startswith("projector."):
                self._fill(name, param)


def export(checkpoint: str | Path, out: str | Path, adapters_only: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str = "fp32") -> Path:
    """Write the checkpoint's model to `out` (safetensors in shards of at most max_shard_bytes,
    as `dtype`). With LoRA (model.lora.r > 0) the adapters are merged into the LLM weights, or,
    with `adapters_only`, written alone in peft's format (lora.py)."""
    if dtype not in DTYPES:
        raise UserError(f"export dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    cfg = load_config(step_dir / "config.yaml")
    tokenizer = build.build_tokenizer(cfg)
    streamed = StreamedModel(cfg, step_dir, tokenizer)
    model = streamed.model
    out = Path(out)
    from pargo_dist.models import lora
    if adapters_only:
        if not lora.is_lora(model):
            raise UserError(f"{step_dir}: --adapters-only needs a LoRA run (model.lora.r > 0); this one trained "
                            "the LLM's own weights")
        streamed.fill_for_adapters()
        lora.save_adapters(model, out)
    else:
        from pargo_dist.export.safetensors_shards import ShardWriter

        writer = ShardWriter(out, max_shard_bytes)
        for name, tensor in streamed.tensors():
            writer.add(name, tensor.to(DTYPES[dtype]))
        writer.close()
        config = model.config
        config.architectures = [type(model).__name__]
        config.dtype = DTYPES[dtype]
        config.auto_map = write_remote_code(out)  # plain transformers loads it (trust_remote_code=True)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # so `generate` stops where training's
            setattr(config.text_config, name, getattr(tokenizer, name))  # captions ended, with no arguments
        config.save_pretrained(out)
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        processor = ParGoProcessor(tokenizer, build.image_processor(cfg), build.visual_tokens(cfg, model),
                                   cfg.data.train.caption_prompt)
        processor.save_pretrained(out, auto_map={"AutoProcessor": config.auto_map["AutoProcessor"]})
    tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text((step_dir / "config.yaml").read_text())  # the recipe it came from
    return out
