"""The recipe schema: typed sections, YAML files, dotted command-line overrides, validation.

    cfg = load_config("recipes/tiny-cpu.yaml", ["optim.lr=1e-4", "backend.zero_stage=2"])

OmegaConf parses the YAML and the `key.sub=value` overrides (values are YAML: numbers, lists,
null). The result is checked against the dataclasses below *before* any process group
starts: an unknown key names the nearest valid keys, a wrong type names the key, the value
and the expected type, and the recipe file. The resolved config (`to_yaml`) is saved with
every run and checkpoint, so a run is always reproducible from its own directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pargo_dist.constants import PARTS, STAGES
from pargo_dist.data.crops import CropPolicy, ImageConfig
from pargo_dist.data.sources import DataConfig
from pargo_dist.errors import UserError
from pargo_dist.models.lora import LoraConfig
from pargo_dist.observe.trackers import MlflowConfig, WandbConfig, check_trackers


def _recipes_dir() -> Path:
    """The shipped recipes: pargo_dist/recipes in an installed wheel, recipes/ in a source tree."""
    here = Path(__file__).resolve().parent
    packaged = here / "recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


RECIPES = _recipes_dir()
DEFAULT_RECIPE = RECIPES / "tiny-cpu.yaml"


class ConfigError(UserError):
    """A recipe or override that does not fit the schema. The message says what to change."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # checkpoints/, tb/, config.yaml, export/ live here
    seed: int = 0
    # after a rank dies (killed, a lost peer, a crash, the hang detector) the launcher starts every
    # rank again from the newest complete checkpoint, at most this many times within
    # restart_window_s; never for a bad input (exit 2) or the same error at the same step twice.
    # 0: off (a failure ends the run). Needs the launcher (--nproc > 1, launchers/launch.py, sbatch)
    max_restarts: int = 0
    restart_window_s: float = 3600.0


@dataclass
class VisionConfig:
    path: str | None = None  # local HF directory (CLIP, SigLIP, ...): pretrained weights
    config: dict[str, Any] = field(default_factory=dict)  # or an HF config (model_type, sizes): random init
    feature_layer: int = -2
    drop_cls: bool | None = None
    post_layernorm: bool = False
    class_name: str | None = None


@dataclass
class LLMConfig:
    path: str | None = None  # local HF causal-LM directory: pretrained weights
    config: dict[str, Any] = field(default_factory=dict)  # or an HF config: random init (vocab from the tokenizer)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: dict[str, Any] = field(default_factory=dict)  # ProjectorConfig fields
    tokenizer: str = "synthetic"  # "synthetic" or a local tokenizer dir (default: llm.path)
    # start these parts from an earlier run (stage 2 from stage 1): an export dir, a run dir or a
    # checkpoint dir; applied on a fresh start only (a resume takes everything from its checkpoint)
    init_from: str | None = None
    init_parts: list[str] = field(default_factory=lambda: ["projector"])
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SyntheticDataConfig:
    """Generate the built-in synthetic dataset into data.train.local (and data.eval.local) if absent."""

    num_samples: int = 0  # 0: off
    held_out: int = 0
    image_size: int = 64
    kind: str = "caption"
    seed: int = 0


@dataclass
class DataSection:
    train: DataConfig = field(default_factory=DataConfig)
    eval: DataConfig | None = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    image: ImageConfig = field(default_factory=ImageConfig)  # crops per image, for train, eval and captions


@dataclass
class OptimConfig:
    lr: float = 1e-4  # every trained part, unless its own lr is set
    lr_projector: float | None = None
    lr_llm: float | None = None
    lr_vision: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    clip_grad: float = 1.0  # 0: off


@dataclass
class TrainConfig:
    stage: str = "finetune"  # align (projector) | finetune (+ LLM) | full (+ vision)
    steps: int = 100  # optimizer steps
    micro_batch: int = 4  # samples per rank per micro-step
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    activation_checkpointing: bool = False
    # torch.compile each transformer block (tower, projector, LLM layers; pargo_dist.backends.compile):
    # fused kernels for the norm / rotary / activation chains; the first steps pay the compile
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: trace only, no codegen)
    # MoE LLMs (qwen3_moe, mixtral): weight of the load-balancing loss added to the training loss
    # (Switch Transformer's: experts x sum of each expert's token share x its mean router
    # probability, per MoE layer); logged as train/moe_aux_loss. 0: off. Qwen3-MoE trained with 1e-3
    moe_aux_loss_coef: float = 0.0
    eval_every: int = 0  # steps; 0: only at the end (if data.eval is set)
    eval_batches: int = 4
    sample_every: int = 0  # steps between sample captions in TensorBoard; 0: only at the end
    sample_count: int = 2
    max_new_tokens: int = 48
    hang_timeout_s: float = 1800.0  # a rank without progress this long dumps its stacks and ends the run; 0: off
    # Divergence (pargo_dist/train/divergence.py). A step whose loss or gradient norm is not finite is
    # skipped (no update, the data moves on). This many such steps in a row, or one loss above
    # loss_spike_factor x the mean of the last loss_spike_window steps, rolls the run back to the
    # newest checkpoint before them and skips the samples that caused it, by id (kept in the
    # checkpoints; data.train.skip_ids does it from the start); after max_rollbacks of those, the run
    # stops and names the samples. 0: never roll back / no spike check
    rollback_after_bad_steps: int = 3
    loss_spike_factor: float = 0.0
    loss_spike_window: int = 50
    max_rollbacks: int = 3
    # how long gloo / NCCL wait in one collective before failing it. Work of one rank (a download,
    # an elastic conversion) is waited for outside collectives, so this bounds training's own waits
    collective_timeout_s: float = 1800.0


@dataclass
class BackendConfig:
    name: str = "deepspeed"  # deepspeed (ZeRO data parallel) | megatron (tensor + pipeline parallel LLM)
    # deepspeed
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # ZeRO-3 on one rank partitions nothing, so it runs as ZeRO-2 (the log says so); true keeps
    # stage 3 there (to measure ZeRO-3's own cost on one GPU, or to write its checkpoint layout)
    zero3_on_one_rank: bool = False
    # ZeRO-3: partition the pretrained LLM as it is read (zero.Init; rank 0 reads each tensor),
    # so no rank holds it whole; null (auto): when its fp32 copies on a node's ranks would fill
    # over a quarter of the node's memory (the run says what it chose)
    zero_init: bool | None = None
    # megatron: world size = tensor_parallel x pipeline_parallel x data-parallel replicas
    tensor_parallel: int = 1  # splits every LLM layer over this many ranks (keep it within a node)
    pipeline_parallel: int = 1  # splits the LLM's layers into this many consecutive stages
    sequence_parallel: bool = False  # shard activations outside attention/MLP over TP ranks (GPU only)
    distributed_optimizer: bool = True  # shard Adam state over data-parallel ranks (GPU only)
    # megatron, MoE LLMs (qwen3_moe, mixtral): each MoE layer's experts split over this many of
    # the data-parallel replicas (divides them and the expert count); tokens go to their experts' rank
    expert_parallel: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0: only at the end and on SIGTERM / SIGUSR1
    keep_last: int = 3
    resume: str = "auto"  # auto (newest complete in run.dir) | none | a checkpoint dir
    # write the shards in the background while training goes on (copied to host memory at the
    # step; marked COMPLETE when every rank's write finished); null (auto): on a GPU
    async_save: bool | None = None
    # also keep every complete checkpoint in object storage (s3://bucket/prefix; gs://, oci://,
    # azure:// as mosaicml-streaming reaches them); resume finds it there when run.dir has none
    remote: str | None = None


@dataclass
class LoggingConfig:
    every: int = 10  # progress line every N steps (TensorBoard and train_log.jsonl get every step)
    tensorboard: bool = True
    sample_ids: bool = False  # write each rank's consumed sample ids per step (data-order audits)
    # every `every` steps, name a rank whose own work before the step's first collective (its
    # batch, the host's part) takes over this many times the median of the ranks (0: off)
    straggler_factor: float = 2.0
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases (pip install .[wandb])
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # MLflow (pip install .[mlflow])


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Cross-field rules that types alone cannot say."""
        choices = {"train.stage": (self.train.stage, tuple(STAGES)),
                   "train.precision": (self.train.precision, ("fp32", "bf16")),
                   "backend.name": (self.backend.name, ("deepspeed", "megatron")),
                   "backend.zero_stage": (self.backend.zero_stage, (1, 2, 3)),
                   "data.synthetic.kind": (self.data.synthetic.kind, ("caption", "qa", "mixed"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: must be one of {list(allowed)}")
        try:
            CropPolicy.from_config(self.data.image)
            check_trackers(self.logging.wandb, self.logging.mlflow)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for key in ("train.steps", "train.micro_batch", "train.grad_accum", "checkpoint.keep_last",
                    "backend.tensor_parallel", "backend.pipeline_parallel", "backend.expert_parallel"):
            section, name = key.split(".")
            if getattr(getattr(self, section), name) < 1:
                raise ConfigError(f"{key} must be >= 1")
        t = self.train
        if t.rollback_after_bad_steps < 0 or t.max_rollbacks < 0 or t.loss_spike_window < 1 or \
                not (t.loss_spike_factor == 0 or t.loss_spike_factor > 1):
            raise ConfigError("train.rollback_after_bad_steps and train.max_rollbacks must be >= 0, "
                              "train.loss_spike_window >= 1, train.loss_spike_factor 0 (off) or > 1 (got "
                              f"{t.rollback_after_bad_steps}, {t.max_rollbacks}, {t.loss_spike_window}, "
                              f"{t.loss_spike_factor})")
        if self.train.compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.train.compile_backend not in known:
                raise ConfigError(f"train.compile_backend={self.train.compile_backend!r}: must be one of {known} "
                                  "(torch.compile's backends; inductor is the one that generates kernels)")
        if self.backend.name == "deepspeed" and (self.backend.tensor_parallel > 1 or self.backend.pipeline_parallel > 1
                                                 or self.backend.expert_parallel > 1):
            raise ConfigError("backend.tensor_parallel / pipeline_parallel / expert_parallel need backend.name=megatron "
                              "(DeepSpeed ZeRO is data parallel only)")
        bad = [p for p in self.model.init_parts if p not in PARTS]
        if bad or not self.model.init_parts:
            raise ConfigError(f"model.init_parts={self.model.init_parts}: name one or more of {list(PARTS)}")
        if (self.backend.name == "megatron" and self.model.llm.path and self.model.init_from
                and "language_model" in self.model.init_parts):
            raise ConfigError("model.init_parts with language_model and backend.name=megatron: the megatron backend "
                              "reads the LLM from model.llm.path itself; point model.llm.path at an export of the "
                              "earlier run instead (`pargo-dist export`)")
        if self.backend.zero_init and not self.model.llm.path:
            raise ConfigError("backend.zero_init=true partitions a pretrained LLM (model.llm.path) as it is read; a "
                              "random-init LLM (model.llm.config) is built whole: set backend.zero_init=null")
        lora = self.model.lora
        if lora.r:
            if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
                raise ConfigError(f"model.lora: need r > 0, alpha > 0, 0 <= dropout < 1 (got r={lora.r}, "
                                  f"alpha={lora.alpha}, dropout={lora.dropout})")
            if self.train.stage != "finetune":
                raise ConfigError(f"model.lora.r={lora.r} is for train.stage=finetune (got {self.train.stage!r}): "
                                  "align trains no LLM weights, full trains all of them")
            if self.backend.name != "deepspeed":
                raise ConfigError("model.lora needs backend.name=deepspeed (megatron trains the whole LLM)")
            if lora.target_modules and lora.target_regex:
                raise ConfigError("model.lora: give target_modules or target_regex, not both")
        if not (self.model.vision.path or self.model.vision.config):
            raise ConfigError("model.vision needs a path (pretrained) or a config (random init)")
        if not (self.model.llm.path or self.model.llm.config):
            raise ConfigError("model.llm needs a path (pretrained) or a config (random init)")
        if self.data.synthetic.num_samples:
            from pargo_dist.data.synthetic import SyntheticConfig

            syn = self.data.synthetic
            try:
                SyntheticConfig(num_samples=syn.num_samples, image_size=syn.image_size, seed=syn.seed)
            except ValueError as err:
                raise ConfigError(f"data.synthetic: {err}") from None
            if not self.data.train.local:
                raise ConfigError("data.synthetic needs data.train.local (where to write the shards)")
        from pargo_dist.models.projector_config import ProjectorConfig

        try:
            ProjectorConfig.from_dict(dict(self.model.projector))
        except ValueError as err:
            raise ConfigError(f"model.projector: {err}") from None


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the annotation `tp` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(f'{prefix}.{n}' if prefix else n) for n in near)}? " if near else ""
            where = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key {full!r}: {hint}valid keys in {where}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (default: the embedded tiny-cpu) + `key.sub=value` overrides -> Config."""
    path = Path(recipe) if recipe else DEFAULT_RECIPE
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        base = OmegaConf.load(path)
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides or [])))
        values = OmegaConf.to_container(merged, resolve=True)
    except Exception as err:  # YAML syntax, a malformed override
        raise ConfigError(f"{path}: {err}") from None
    try:
        cfg = _build(Config, values or {})
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
