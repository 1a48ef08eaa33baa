"""DeepSpeed backend: ZeRO stage 0-3 (optional CPU offload) around a plain torch model.

Implements `pargo_dist.backends.base.Backend`. It knows nothing of data formats: it receives
collated `Batch`es and returns losses. It builds torch AdamW (one group per model part,
`pargo_dist.backends.optim`) and the LR schedule; DeepSpeed owns sharding, gradient reduction,
accumulation boundaries, clipping and checkpoint shards.

Checkpoints: `engine.save_checkpoint` into `<step_dir>/ds`. When some parameters are frozen
(the `align` stage, LoRA) they are left out (the backbones are referenced by the recipe, not
copied 7B times per checkpoint) and loading is non-strict. ZeRO's optimizer shards are per
rank: on another rank count or stage `load` goes through DeepSpeed's universal format
(deepspeed/universal.py), Adam's moments included. Background writes: deepspeed/background_engine.py.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pargo_dist.compat import configure_deepspeed_env, skip_deepspeed_cpu_shm_op

configure_deepspeed_env()

import deepspeed  # noqa: E402
from deepspeed.utils import logger as _ds_logger  # noqa: E402

from pargo_dist.checkpoint.background_save import BackgroundWriter  # noqa: E402
from pargo_dist.backends.deepspeed.background_engine import BackgroundCheckpointEngine  # noqa: E402
from pargo_dist.backends.deepspeed.buffers import buffer_sizes, persistence_threshold  # noqa: E402
from pargo_dist.backends.deepspeed.universal import universal_checkpoint  # noqa: E402
from pargo_dist.batch import Batch  # noqa: E402
from pargo_dist.backends.compile import transformer_blocks  # noqa: E402
from pargo_dist.checkpoint.state import DEEPSPEED_DIR  # noqa: E402
from pargo_dist.backends.optim import adamw, lr_lambda, param_groups  # noqa: E402

skip_deepspeed_cpu_shm_op()
# Keep the console to our progress lines: DeepSpeed logs INFO lines per rank, and calls
# torch.distributed APIs that warn on every step.
_ds_logger.setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*torch\.distributed\..*is deprecated", category=FutureWarning)


def init_distributed() -> tuple[int, int]:
    """Start the process group (gloo on CPU, nccl on GPU) once; returns (rank, world size).
    Its timeout is the set-up allowance until training sets its own (pargo_dist/runtime/process_group.py)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:  # our launcher, SLURM, torchrun
            from pargo_dist.runtime.process_group import join_process_group

            join_process_group(backend)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # its comm layer, over that group
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def zero_stage_for(cfg, world_size: int) -> tuple[int, str]:
    """The ZeRO stage to run, and why when it is not the recipe's: ZeRO-3 on one rank has nothing
    to partition, so its per-module gathers and hooks are pure cost; ZeRO-2 does the same
    arithmetic without them (and its checkpoints consolidate the same way). Offloaded parameters
    need stage 3, so they keep it, as does `backend.zero3_on_one_rank: true`."""
    stage = cfg.backend.zero_stage
    if stage == 3 and world_size == 1 and not cfg.backend.offload_params and not cfg.backend.zero3_on_one_rank:
        return 2, "ZeRO-3 on one rank partitions nothing: running ZeRO-2 (the same arithmetic, without ZeRO-3's " \
                  "per-module gathers; backend.zero3_on_one_rank=true keeps stage 3)"
    return stage, ""


def ds_config(cfg, world_size: int, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config from our recipe (batch sizes, ZeRO, precision, clipping).

    `model`: the model DeepSpeed will wrap. Its parameter counts size DeepSpeed's buckets and
    ZeRO-3's gathered-parameter limits (deepspeed_buffers: DeepSpeed's defaults are larger than a
    model under ~4B parameters, and doubled its gradients and weights in memory), and its LLM's
    width the parameters ZeRO-3 keeps whole. Without it (zero.Init's partitioning, which uses
    none of these), DeepSpeed's defaults."""
    stage, _ = zero_stage_for(cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if model is not None:
        trainable, total = _parameter_counts(model)
        zero.update(buffer_sizes(trainable, total, stage))
        if stage == 3:
            zero.update(stage3_param_persistence_threshold=persistence_threshold(
                model.config.text_config.hidden_size))
    zero.update(offload_config(cfg))
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.backend.offload_optimizer:
        out["zero_force_ds_cpu_optimizer"] = False  # our AdamW steps the offloaded partitions: offload_config
    if cfg.train.precision == "bf16":
        out["bf16"] = {"enabled": True}
    return out


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trained, all) parameters of the model, whole: zero.Init's partitioned parameters count
    by their full size (ds_numel), not by the empty placeholder they leave."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def offload_config(cfg) -> dict[str, Any]:
    """ZeRO-Offload's part of `zero_optimization`: the optimizer's fp32 partitions, their gradients
    and Adam's moments (`backend.offload_optimizer`), and under ZeRO-3 the parameters
    (`backend.offload_params`), in host memory; pinned where there is a GPU to copy to.

    Which optimizer steps the offloaded partitions: our client torch AdamW, the one the backend
    builds without offload (pargo_dist.backends.optim: the same param groups, LR schedule and fused
    kernel, which torch has for CPU tensors too), so an offloaded run does the same math and
    its checkpoints hold the same optimizer state, which any layout, offloaded or not, loads.
    DeepSpeed refuses a client optimizer with offload unless `zero_force_ds_cpu_optimizer` is
    off (ds_config turns it off). Its DeepSpeedCPUAdam was not chosen: it JIT-compiles a C++ op
    on every fresh machine (62 s on 2 cores; a compiler on every node), and bought nothing here:
    torch's fused CPU AdamW is also one multithreaded pass over a flat partition (13 ms per 20M
    elements on 2 cores against DeepSpeedCPUAdam's 13-14 ms; docs/scaling.md, "Offload")."""
    pin = torch.cuda.is_available()
    out: dict[str, Any] = {}
    if cfg.backend.offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.backend.offload_params:
        out["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return out


def zero3_partition(param: torch.nn.Parameter) -> tuple[torch.Tensor, int]:
    """This rank's share of a ZeRO-3 parameter: the flat partition tensor and the offset of its
    first element in the flattened parameter. ZeRO-3 pads the parameter to a multiple of its
    group's size and gives rank r the r-th equal slice (partition_parameters._partition_param)."""
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    return param.ds_tensor, rank * param.ds_tensor.ds_numel


class DeepSpeedBackend:
    name = "deepspeed"
    replication = 1  # every rank reads its own samples (pure data parallel)
    generates = True  # the engine's module is the HF model: sample captions during training

    def __init__(self, cfg):
        self.cfg = cfg
        self.world_size = 1
        self.engine = self.optimizer = self.scheduler = None
        self._writer: BackgroundWriter | None = None

    def init_distributed(self) -> tuple[int, int]:
        rank, self.world_size = init_distributed()
        return rank, self.world_size

    @property
    def zero_stage(self) -> int:
        """The stage run (zero_stage_for): known once the world size is."""
        return zero_stage_for(self.cfg, self.world_size)[0]

    @property
    def _zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def synced_gpus(self) -> bool:
        return self._zero3 and self.world_size > 1

    # -- building the model ---------------------------------------------------------------

    @functools.cached_property
    def partitioned_build(self) -> bool:
        """Whether the pretrained LLM is partitioned as it is read (zero.Init), so that no rank
        ever holds it whole: backend.zero_init, or with `auto` (null), when its fp32 copies on
        rank 0's node would take over a quarter of that node's memory (its cgroup limit where one
        is set). Decided on rank 0 and broadcast: ranks that decided apart (nodes of different
        sizes or limits) would wait in different collectives, some in zero.Init's and some not.
        Said once, on rank 0, with the numbers it was decided on. ZeRO-3 only; a random-init LLM
        is built whole."""
        choice = self.cfg.backend.zero_init
        if not self._zero3 or not self.cfg.model.llm.path:
            return False
        if choice is not None:
            partitioned, why = choice, f"backend.zero_init={str(choice).lower()}"
        else:
            decision = [None, None]
            if dist.get_rank() == 0:
                decision = list(self._auto_partition())
            dist.broadcast_object_list(decision, src=0)
            partitioned, why = decision
        if torch.distributed.get_rank() == 0:
            how = ("partitioned as it is read (zero.Init; each rank reads its partition)" if partitioned else
                   "built whole on each rank, then partitioned by DeepSpeed")
            print(f"ZeRO-3: the pretrained LLM is {how} ({why})", flush=True)
        return partitioned

    def _auto_partition(self) -> tuple[bool, str]:
        from pargo_dist.models.pretrained import HFCheckpoint
        from pargo_dist.runtime.node_memory import node_memory_bytes

        ckpt = HFCheckpoint(self.cfg.model.llm.path)
        params = sum(math.prod(ckpt.shape(n)) for n in ckpt.names())
        ckpt.close()
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        host = node_memory_bytes()
        partitioned = 4 * params * ranks > host / 4
        return partitioned, (f"backend.zero_init=auto: {params / 1e9:.2f}B parameters x {ranks} rank(s) on a node in "
                             f"fp32 = {4 * params * ranks / 2**30:.1f} GiB {'>' if partitioned else '<='} a quarter "
                             f"of rank 0's node's {host / 2**30:.1f} GiB")

    @property
    def reads_pretrained_llm(self) -> bool:
        return self.partitioned_build

    @property
    def param_gather(self):
        """Where partitioned parameters are whole and writable by rank 0 (init_from fills them)."""
        if not self.partitioned_build:
            return None
        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def load_pretrained_llm(self, model: torch.nn.Module) -> None:
        """The LLM built under zero.Init (each rank allocates only its partition), then each rank
        copies its partition of every tensor in from the safetensors, reading only the rows that
        hold it: no collective, no whole tensor, and the files are read once across the ranks."""
        from transformers import AutoModelForCausalLM

        from pargo_dist.models.pretrained import fill_causal_lm

        with deepspeed.zero.Init(config_dict_or_path=ds_config(self.cfg, self.world_size)):
            llm = AutoModelForCausalLM.from_config(model.config.text_config)
        dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
        fill_causal_lm(llm, self.cfg.model.llm.path, dtype, partition=zero3_partition)
        model.language_model = llm

    def setup(self, model: torch.nn.Module) -> None:
        """AdamW with one group per trained part, the warmup-cosine schedule, then DeepSpeed."""
        if self.cfg.train.precision == "bf16" and self.partitioned_build:
            # zero.Init made the LLM's partitions bf16; DeepSpeed then takes every other parameter
            # (tower, projector, LoRA adapters) as it finds it, and its flat buffers need one dtype
            for param in model.parameters():
                if not hasattr(param, "ds_id"):
                    param.data = param.data.to(torch.bfloat16)
        _, why = zero_stage_for(self.cfg, self.world_size)
        if why and torch.distributed.get_rank() == 0:
            print(why, flush=True)
        tower = self._take_out_frozen_tower(model)
        if self._zero3:
            self._whole_layers_as_leaves(model)
        optimizer = adamw(param_groups(model, self.cfg), self.cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))
        self.optimizer, self.scheduler = optimizer, scheduler
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(self.cfg, self.world_size, model=model))
        if tower is not None:
            dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
            tower.to(self.engine.device, dtype)
        offloaded = self.offloaded()
        if offloaded and torch.distributed.get_rank() == 0:
            print(f"ZeRO-Offload: {' and '.join(offloaded)} in host memory (DeepSpeed's offload path, "
                  f"our AdamW steps the host copies)", flush=True)

    def offloaded(self) -> list[str]:
        """What DeepSpeed's ZeRO optimizer says it keeps in host memory: its own flags after
        set-up (ZeRO-1/2: cpu_offload; ZeRO-3: offload_optimizer, offload_param), not the recipe's
        keys, so a key that never reached DeepSpeed shows here as nothing offloaded."""
        optimizer = getattr(self.engine, "optimizer", None)
        out = []
        if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False):
            out.append("optimizer state")
        if getattr(optimizer, "offload_param", False):
            out.append("parameters")
        return out

    @staticmethod
    def _whole_layers_as_leaves(model: torch.nn.Module) -> list[type]:
        """ZeRO-3 hooks every module and gathers each one's parameters as it is entered: a Llama
        layer is ~10 gathers and ~20 hooks per forward, and as many again in the backward. Marked
        as leaves (deepspeed.utils.set_z3_leaf_modules), the transformer blocks (of the LLM, and
        of the tower and projector when they are partitioned) are gathered whole, once each.
        Returns the classes marked."""
        from deepspeed.utils import set_z3_leaf_modules

        classes = {type(block) for block in transformer_blocks(model)}
        if classes:
            set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))
        return sorted(classes, key=lambda c: c.__name__)

    def _take_out_frozen_tower(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Under ZeRO-3, keep a frozen vision tower whole on every rank, out of DeepSpeed's hands.

        ZeRO-3 partitions every parameter of the module it wraps and gathers each one again in
        every forward; it has no way to leave a module out (DeepSpeed #7271). For a module that
        never changes that is pure cost: an all-gather per tower layer per step, and hooks on
        each of its modules. So the tower leaves the module tree DeepSpeed walks and stays a
        plain attribute of the model, which its forward calls as before; it is put on the device
        in the training precision. It holds nothing a checkpoint needs (frozen parameters come
        from the recipe), so checkpoints are unchanged. Returns the tower taken out, or None."""
        tower = model._modules.get("vision_tower")
        if not self._zero3 or tower is None or any(p.requires_grad for p in tower.parameters()):
            return None
        del model._modules["vision_tower"]
        object.__setattr__(model, "vision_tower", tower.eval())  # an attribute, not a submodule
        return tower

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def layout(self) -> dict[str, int]:
        return {"dp": self.world_size, "zero_stage": self.zero_stage}

    def set_step(self, step: int) -> None:
        """Put the LR schedule at `step` (LambdaLR's epoch is our optimizer step)."""
        self.scheduler.last_epoch = step
        self.engine.global_steps = step  # DeepSpeed's own counters (restored by an exact load too)
        self.engine.global_samples = step * self.engine.train_batch_size()
        factor = lr_lambda(self.cfg)(step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", "all"): g["lr"] for g in self.optimizer.param_groups}

    def train_batch(self, micro_batches: list[Batch], targets: float, step: int) -> torch.Tensor:
        """Forward + backward of each micro-batch; DeepSpeed steps the optimizer and the LR
        schedule at the accumulation boundary (after clipping). Returns this rank's summed
        token loss.

        HF's loss with num_items_in_batch is sum / num_items. DeepSpeed divides by grad_accum
        (in backward) and by the world size (gradient all-reduce average), so this makes the
        gradient that of sum(global token losses) / targets."""
        device = self.device
        # torch.full, not torch.tensor(float, device=...): a fill kernel instead of a blocking host copy
        num_items = torch.full((), targets / (self.world_size * len(micro_batches)), device=device)
        loss_sum = torch.zeros((), device=device)
        coef, aux_sum = self.cfg.train.moe_aux_loss_coef, None
        for batch in micro_batches:
            out = self.engine(**batch.to(device).model_inputs(), num_items_in_batch=num_items)
            self.engine.backward(out.loss)
            if self._writer is not None:  # a background save is still copying the state this step updates
                self._writer.wait_staged()
            self.engine.step()
            loss = out.loss.detach().float()
            aux = getattr(out, "aux_loss", None) if coef else None
            if aux is not None:  # HF added its weight x the load-balancing loss: the token loss is reported without it
                lm = self.engine.module.language_model
                loss = loss - lm.router_aux_loss_coef * aux.detach().float()
                aux = aux.detach().float() / lm.config.num_experts_per_tok  # megatron's scale: 1 when balanced
                aux_sum = aux if aux_sum is None else aux_sum + aux
            loss_sum += loss * num_items
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            # DeepSpeed skipped the update (a non-finite norm: its overflow path) and did not step
            # the LR schedule: it stays a function of the step
            self.set_step(step + 1)
        self._moe_aux = None
        if aux_sum is not None:
            dist.all_reduce(aux_sum)
            self._moe_aux = float(aux_sum) / (self.world_size * len(micro_batches))
        return loss_sum

    def moe_aux_loss(self) -> float | None:
        return getattr(self, "_moe_aux", None)

    @torch.no_grad()
    def eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        out = self.engine(**batch.to(self.device).model_inputs())
        return out.loss.detach().float() * float(batch.num_targets)

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def _has_frozen(self) -> bool:
        """Frozen parameters are left out of checkpoints (align: the backbones; LoRA: the LLM's
        own weights): what trains is decided by requires_grad, nothing else."""
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def save(self, step_dir, background: bool = False) -> None:
        """DeepSpeed's checkpoint of this rank. `background`: the state is copied to host memory
        now and written by a background thread (`saves_pending` / `wait_for_saves`)."""
        engine = self.engine
        if background:
            if self._writer is None:
                self._writer = BackgroundWriter()
                self._background_engine = BackgroundCheckpointEngine(
                    self._writer, zipfile=getattr(engine.checkpoint_engine, "zipfile_serialization", True))
            sync_engine, engine.checkpoint_engine = engine.checkpoint_engine, self._background_engine
        try:
            engine.save_checkpoint(str(step_dir), tag=DEEPSPEED_DIR, exclude_frozen_parameters=self._has_frozen)
        finally:
            if background:
                engine.checkpoint_engine = sync_engine

    def saves_pending(self) -> bool:
        return self._writer is not None and self._writer.pending()

    def wait_for_saves(self) -> None:
        if self._writer is not None:
            self._writer.wait()

    def load(self, step_dir, saved_world: int) -> None:
        """The checkpoint as saved when the layout is the same. Another rank count or ZeRO stage
        (ZeRO-3 writes per-rank model-state files, stages 0-2 one mp_rank_00 file; one rank runs
        ZeRO-3 as ZeRO-2) cannot take ZeRO's per-rank optimizer shards as they are: they are
        first put together per parameter (weights, Adam's moments, step) in DeepSpeed's universal
        format, which any layout loads (backends/deepspeed/universal.py: once per filesystem, in a
        process of its own, while the other ranks wait outside any collective)."""
        saved_zero3 = any((Path(step_dir) / DEEPSPEED_DIR).glob("zero_pp_rank_*_model_states.pt"))
        if saved_world == self.world_size and saved_zero3 == self._zero3:
            path, _ = self.engine.load_checkpoint(
                str(step_dir), tag=DEEPSPEED_DIR, load_module_strict=not self._has_frozen,
                load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {step_dir}")
            return
        from pargo_dist.runtime.store_sync import StoreSync

        say = print if dist.get_rank() == 0 else (lambda *_: None)
        self._load_universal(universal_checkpoint(Path(step_dir), StoreSync.default(), say=say))

    def _load_universal(self, folder: Path) -> None:
        """Weights, Adam's moments and step of every trained parameter from a universal checkpoint,
        into this layout's partitions, through ZeRO's own universal loader. The engine's
        load_checkpoint would also want the model-state files of this stage's layout, which a
        checkpoint of another stage does not have; what they hold besides the weights (the LR
        schedule, DeepSpeed's step counters) is set from our own state (`set_step`)."""
        zero = self.engine.optimizer
        base = zero.optimizer
        # ZeRO-3's universal loader copies group 0's hyperparameters into every group: keep ours
        groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        zero.load_state_dict(None, load_optimizer_states=True, load_from_fp32_weights=True,
                             checkpoint_folder=str(folder))
        for group, kept in zip(base.param_groups, groups):
            group.update(kept)
        if self._zero3:
            zero.checkpoint_event_epilogue()  # parameters kept whole (persistent) take their new values
        else:
            zero.update_lp_params()  # the fp32 master copies -> the training-precision weights
        # Adam's step count as a tensor of each parameter's own (fused AdamW wants it on the
        # parameters' device). A new tensor each: ZeRO-3's universal loader gives every group the
        # same step object, which an in-place `step += 1` would then advance once per group.
        for group in base.param_groups:
            for p in group["params"] or []:
                state = base.state.get(p, {})
                if "step" in state and (group.get("fused") or group.get("capturable")):
                    state["step"] = _own_step(state["step"], p.device)
        if self._zero3:  # ZeRO-3 sets a group's params only around its step: its flat partitions
            for flat in zero.fp32_partitioned_groups_flat:
                state = base.state.get(flat, {})
                if "step" in state:
                    state["step"] = _own_step(state["step"], flat.device)


def _own_step(step, device: torch.device) -> torch.Tensor:
    """Adam's step count as a float32 tensor that no other parameter shares."""
    return torch.tensor(float(step), dtype=torch.float32, device=device)
