"""Megatron-core backend: tensor (TP) and pipeline (PP) parallel LLM, data parallel over the rest.

Implements `pargo_dist.backends.base.Backend`.

Ranks are laid out tp-pp-dp (TP fastest): the TP x PP ranks of one model replica are
consecutive, so the streaming loader gives those `replication = TP*PP` consecutive ranks the
same samples (mosaicml-streaming's `replication`) and shards over data-parallel replicas.

Per optimizer step, megatron's own schedule (1F1B for PP > 1, plain for PP = 1) runs the
micro-batches; megatron's DDP reduces gradients over the data-parallel group (its distributed
optimizer shards Adam state there on GPU); `finalize_model_grads` also all-reduces the tied
embedding gradient between the first and last pipeline stage. The loss is normalised by the
global count of answer tokens, as in the DeepSpeed backend, so both follow the same curve.

Weights: a pretrained LLM (model.llm.path) is never built whole. The loop builds the HF model
with its LLM on the meta device and this backend reads only this rank's tensor-parallel slice
and pipeline layers from the safetensors files. A random-init LLM (a config only) comes from
the HF model the loop builds (same seed, so every layout starts from identical weights),
converted to this rank's shard. Either way the HF LLM stays on the meta device, for FLOP counts. Checkpoints use megatron's distributed checkpointing
(model + optimizer, sharded by global tensor coordinates), so a checkpoint saved at one
TP/PP/DP layout loads at another.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pargo_dist.backends.megatron import cpu as megatron_cpu
megatron_cpu.apply()
# optional fused kernels (apex, Transformer Engine) that the megatron-core wheel does not ship
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex|transformer_engine).*")

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer.optimizer_config import ParamKey  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from pargo_dist.backends.megatron.convert import iter_megatron_state_from_checkpoint, megatron_state_from_hf, \
    transformer_config_kwargs  # noqa: E402
from pargo_dist.backends.megatron.layout import check_layout, num_experts  # noqa: E402
from pargo_dist.backends.megatron.model import ParGoMegatron, needs_padding_mask  # noqa: E402
from pargo_dist.batch import Batch  # noqa: E402
from pargo_dist.checkpoint.state import MEGATRON_DIR  # noqa: E402
from pargo_dist.errors import UserError  # noqa: E402
from pargo_dist.backends.optim import PART_LR_KEYS, fuse_adamw, lr_lambda, part_lr  # noqa: E402


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def transformer_config(cfg, text_config) -> TransformerConfig:
    """megatron's TransformerConfig from the HF text config and the recipe's backend section."""
    b, bf16 = cfg.backend, cfg.train.precision == "bf16"
    gpu = _on_gpu()
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if cfg.train.activation_checkpointing else {}
    model = transformer_config_kwargs(text_config)
    coef = cfg.train.moe_aux_loss_coef
    if num_experts(text_config) and coef:
        # HF weighs one load-balancing loss over all layers' routing; megatron adds one per layer:
        # coef / layers keeps the recipe's coefficient on the layers' mean in both backends
        model.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=coef / text_config.num_hidden_layers)
    return TransformerConfig(
        **model,
        tensor_model_parallel_size=b.tensor_parallel,
        pipeline_model_parallel_size=b.pipeline_parallel,
        sequence_parallel=b.sequence_parallel and b.tensor_parallel > 1,
        params_dtype=torch.float32,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        variable_seq_lengths=b.pipeline_parallel > 1,  # batches are padded to their own longest sample
        expert_model_parallel_size=b.expert_parallel,
        # (megatron checks the MoE dispatcher even without experts; alltoall sends each token to its
        # experts' rank, whatever each rank's sequence length; on the CPU through megatron_cpu's patch)
        moe_token_dispatcher_type="alltoall",
        batch_p2p_comm=gpu,  # gloo has no batched isend/irecv
        use_cpu_initialization=not gpu,
        # The weights come from the HF model, but megatron marks tensor-parallel weights (what
        # grad-norm and clipping rely on to skip TP duplicates) only while initialising them.
        perform_initialization=True,
        # On a GPU, the two fusions megatron-core writes with its own jit fuser (torch.compile):
        # SwiGLU as one kernel forward and one backward, keeping only its input for the backward,
        # and bias + dropout + residual add. Off on the CPU, where each would compile a C++ kernel
        # at start (~30 s on 2 cores) for no gain. The rest need apex / Transformer Engine
        # kernels that the megatron-core wheel does not ship; the softmax fusion is moot
        # (megatron_attention.SDPAttention).
        bias_activation_fusion=gpu, bias_dropout_fusion=gpu, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        **recompute,
    )


def _experts_always_expert_parallel(stage: torch.nn.Module) -> None:
    """Mark every expert weight as megatron marks them only when EP > 1 (`allreduce=False`), so
    that they always get their own optimizer in the chain (dense, experts) and their gradients
    the expert-data-parallel reduction (the whole data-parallel group at EP=1: the same sum).
    The optimizer's checkpoint then has the same structure at every EP, and reshards from EP=2
    to EP=1 and back; otherwise EP=1 has one optimizer and its checkpoint cannot read EP=2's."""
    for module in stage.modules():
        if getattr(module, "is_expert", False):
            for param in module.parameters(recurse=False):
                param.allreduce = False


class MegatronBackend:
    name = "megatron"
    generates = False  # captions come from the exported HF model
    synced_gpus = False
    reads_pretrained_llm = True  # setup() reads this rank's TP x PP share of model.llm.path
    param_gather = None  # its parameters are never partitioned before setup

    def __init__(self, cfg):
        self.cfg = cfg
        self._async_saves = None  # megatron-core's AsyncCallsQueue, from the first background save
        self.tp, self.pp, self.ep = cfg.backend.tensor_parallel, cfg.backend.pipeline_parallel, cfg.backend.expert_parallel
        self.replication = self.tp * self.pp
        self.model = self.ddp = self.optimizer = None
        self._grad_norm: float | None = None
        self._lr_factor = lr_lambda(cfg)

    # -- process groups ------------------------------------------------------------------

    def init_distributed(self) -> tuple[int, int]:
        if not dist.is_initialized():
            if _on_gpu():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            from pargo_dist.runtime.process_group import join_process_group

            join_process_group("nccl" if _on_gpu() else "gloo")
        world = dist.get_world_size()
        if world % self.replication:
            raise UserError(f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
                             f"{self.tp} x {self.pp}: launch a multiple of {self.replication} ranks")
        if not parallel_state.model_parallel_is_initialized():
            # its groups get the collective timeout too (in whole minutes, as megatron takes it)
            minutes = max(1, math.ceil(self.cfg.train.collective_timeout_s / 60))
            # expert parallel ranks are data-parallel replicas next to each other ("ep-dp"): with
            # ep = 1 the order is tp-pp-dp, as the samples' replication assumes
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp,
                                                     pipeline_model_parallel_size=self.pp,
                                                     expert_model_parallel_size=self.ep, order="tp-pp-ep-dp",
                                                     distributed_timeout_minutes=minutes)
        tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.run.seed, inference_rng_tracker=not _on_gpu())
        return dist.get_rank(), world

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if _on_gpu() else torch.device("cpu")

    @property
    def module(self) -> ParGoMegatron:
        return self.model

    def load_pretrained_llm(self, model) -> None:
        """Nothing yet: `setup` reads this rank's share when it builds its GPTModel stage."""

    # -- model and optimizer ---------------------------------------------------------------

    def setup(self, hf_model) -> None:
        """Convert the (already frozen for its stage) HF model into this rank's stage, wrap it in
        megatron DDP and build the optimizer."""
        cfg = self.cfg
        text = hf_model.config.text_config
        check_layout(text, self.tp, self.pp, self.ep)
        if self.ep > 1 and not num_experts(text):
            raise UserError(f"backend.expert_parallel={self.ep} splits experts, and {text.model_type} has none: set "
                            "backend.expert_parallel=1")
        config = transformer_config(cfg, text)
        first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
        trains_llm = any(p.requires_grad for p in hf_model.language_model.parameters())
        stage = ParGoMegatron(config, hf_model, pre_process=first, post_process=last)
        where = dict(tp=self.tp, tp_rank=parallel_state.get_tensor_model_parallel_rank(), pp=self.pp,
                     pp_rank=parallel_state.get_pipeline_model_parallel_rank(), ep=self.ep,
                     ep_rank=parallel_state.get_expert_model_parallel_rank())
        if cfg.model.llm.path:  # only this rank's TP slice, PP layers and experts leave the files, one tensor at a time
            self._fill(stage.language_model, iter_megatron_state_from_checkpoint(cfg.model.llm.path, text, **where))
        else:  # a random-init LLM: the seeded HF init, so every layout starts from the same weights
            shard = megatron_state_from_hf(hf_model.language_model.state_dict(), text, **where)
            stage.language_model.load_state_dict(shard, strict=True)
            del shard
        stage.language_model.requires_grad_(trains_llm)
        _experts_always_expert_parallel(stage)
        hf_model.language_model.to("meta")  # the HF copy is only needed for FLOP counts now
        stage.to(self.device)
        self.model = stage
        if config.bf16:  # bf16 weights; inputs cast on the first stage, fp32 loss out of the last
            from megatron.core.transformer.module import Float16Module

            stage = Float16Module(config, stage)
        use_dist_opt = cfg.backend.distributed_optimizer and _on_gpu()
        self.ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt,
                                                  overlap_grad_reduce=False),
            stage)
        o = cfg.optim
        ocfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr * o.min_lr_ratio, weight_decay=o.weight_decay,
                               adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
                               bf16=config.bf16, params_dtype=torch.float32, use_distributed_optimizer=use_dist_opt)
        # One group per part with its own rate; weight decay applies to every trained tensor, as
        # in the DeepSpeed backend.
        overrides = {ParamKey(name=(f"{part}.*", f"*.{part}.*")): {"max_lr": part_lr(cfg, part)}
                     for part in PART_LR_KEYS}
        self.optimizer = get_megatron_optimizer(ocfg, [self.ddp], config_overrides=overrides)
        fuse_adamw(self.optimizer)  # without apex / TE megatron falls back to torch AdamW, unfused
        self._name_groups()
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        self.config = config
        if not use_dist_opt and cfg.backend.distributed_optimizer and parallel_state.get_data_parallel_rank() == 0 \
                and dist.get_rank() == 0:
            print("megatron: no GPU, so Adam state is replicated over data-parallel ranks (the distributed "
                  "optimizer needs CUDA)", flush=True)

    @staticmethod
    def _fill(module: torch.nn.Module, tensors) -> None:
        """Copy (name, tensor) pairs into `module`'s parameters as they come, checking that every
        parameter got exactly one of the right shape (what load_state_dict(strict=True) checks)."""
        params = dict(module.named_parameters())
        filled = set()
        with torch.no_grad():
            for name, tensor in tensors:
                if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
                    raise RuntimeError(f"megatron stage has no parameter {name} of shape {tuple(tensor.shape)}")
                params[name].copy_(tensor)
                filled.add(name)
        missing = sorted(set(params) - filled)
        if missing:
            raise RuntimeError(f"the checkpoint filled no tensor for the megatron stage's {missing[:5]}")

    def _name_groups(self) -> None:
        """Label each optimizer group with the parts it holds, for logging. (A "name" key in the
        overrides would split equal-rate parts into groups that the distributed checkpoint
        then fails to reload.)"""
        names = {id(p): part for part, m in self.model.parts().items() for p in m.parameters()}
        for group in self.optimizer.param_groups:
            parts = {names.get(id(p)) for p in group["params"]} - {None}
            group["name"] = "+".join(sorted(parts)) if parts else "all"

    def set_step(self, step: int) -> None:
        """The LR of every group for optimizer step `step` (the schedule is a function of it)."""
        factor = self._lr_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["max_lr"] * factor

    def layout(self) -> dict[str, int]:
        layout = {"tp": self.tp, "pp": self.pp, "dp": dist.get_world_size() // self.replication}
        return {**layout, "ep": self.ep} if self.ep > 1 else layout

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", "all"): g["lr"] for g in self.optimizer.param_groups if g["params"]}

    def train(self, mode: bool = True) -> None:
        self.ddp.train(mode)

    # -- one optimizer step ----------------------------------------------------------------

    def _run_schedule(self, micro_batches: list[Batch], scale: float, forward_only: bool) -> torch.Tensor:
        """Run the micro-batches through megatron's schedule; returns this rank's summed token
        loss (on the last stage's TP rank 0; zero elsewhere, so a sum over all ranks counts each
        token once)."""
        device = self.device
        n = len(micro_batches)
        counts_here = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0

        def step_fn(data_iterator, model):
            batch = next(data_iterator)
            masked = batch.attention_mask is not None and needs_padding_mask(batch.attention_mask)
            packed = batch.attention_mask is None and batch.position_ids is not None  # data.train.pack
            batch = batch.to(device)
            out = model(batch.input_ids, batch.attention_mask if masked else None, labels=batch.labels,
                        pixel_values=batch.pixels(), position_ids=batch.position_ids if packed else None,
                        image_crops=batch.image_crops)

            def loss_fn(per_token):
                total = per_token.float().sum()
                return total * scale * n, {"loss_sum": total.detach()}

            return out, loss_fn

        seq = max(int(b.input_ids.shape[1]) for b in micro_batches)
        results = get_forward_backward_func()(
            forward_step_func=step_fn, data_iterator=iter(micro_batches), model=[self.ddp], num_microbatches=n,
            seq_length=seq, micro_batch_size=len(micro_batches[0]), forward_only=forward_only)
        total = torch.zeros((), device=device)
        if counts_here:
            for r in results:
                total += r["loss_sum"]
        return total

    def train_batch(self, micro_batches: list[Batch], targets: float, step: int) -> torch.Tensor:
        """Forward + backward over the micro-batches and one optimizer step.

        `targets`: answer tokens in the whole global batch. Each micro-batch's summed loss is
        scaled by dp / targets: DDP averages over the dp replicas, so the gradient is that of
        (sum of all token losses) / targets."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        dp = parallel_state.get_data_parallel_world_size()
        loss_sum = self._run_schedule(micro_batches, dp / max(targets, 1.0), forward_only=False)
        self.set_step(step)
        # megatron's fp32 and bf16 optimizers step whatever the gradients hold (only fp16's loss
        # scaler looks for inf/NaN): a non-finite norm (the same on every rank: gradients are
        # reduced, the norm over model-parallel ranks) skips the step, as DeepSpeed skips it
        # (the fp32 optimizer's grads are in main_grad until then; step() repeats the copy, which is
        # harmless in fp32 and bf16: only fp16's loss scaler, which we never use, would unscale twice)
        self.optimizer.prepare_grads()
        norm = float(self.optimizer.get_grad_norm())
        if math.isfinite(norm):
            ok, norm, _ = self.optimizer.step()
            if not ok:
                raise RuntimeError(f"megatron optimizer step {step} failed (non-finite gradients)")
        self._grad_norm = None if norm is None else float(norm)
        self.set_step(step + 1)  # what the next step will use (and what the loop logs, as with DeepSpeed)
        self._moe_aux = self._take_moe_aux_loss(len(micro_batches))
        return loss_sum

    def _take_moe_aux_loss(self, micro_batches: int) -> float | None:
        """The step's load-balancing loss from megatron's tracker (per layer, unweighted, summed over
        micro-batches; zero on the layers of other stages), then cleared: the mean over layers,
        micro-batches and data-parallel replicas (tensor-parallel ranks hold the same values)."""
        if self.config.moe_router_load_balancing_type != "aux_loss":
            return None
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracked = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        values = tracked["values"].detach().float().clone() if tracked else torch.zeros(self.config.num_layers)
        dist.all_reduce(values)
        clear_aux_losses_tracker()
        copies = dist.get_world_size() // self.pp  # every layer: on one stage, tp x dp times
        return float(values.sum()) / (values.numel() * copies * micro_batches)

    def moe_aux_loss(self) -> float | None:
        return getattr(self, "_moe_aux", None)

    @torch.no_grad()
    def eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        return self._run_schedule([batch], 1.0, forward_only=True)

    def grad_norm(self) -> float | None:
        return self._grad_norm

    # -- checkpoints -------------------------------------------------------------------------

    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading)}

    def saves_pending(self) -> bool:
        """Collective (megatron-core agrees across ranks whether its writes are done, and then
        writes the checkpoint's metadata): every rank calls it at the same step."""
        if self._async_saves is None:
            return False
        self._async_saves.maybe_finalize_async_calls(blocking=False)
        return self._async_saves.get_num_unfinalized_calls() > 0

    def wait_for_saves(self) -> None:
        if self._async_saves is not None:
            self._async_saves.maybe_finalize_async_calls(blocking=True)

    def save(self, step_dir: Path, background: bool = False) -> None:
        """megatron-core's distributed checkpoint. `background`: megatron-core's own asynchronous
        save: the shards are copied to host memory now and written by a forked process while
        training goes on; `saves_pending` / `wait_for_saves` finalize it (its metadata file last)."""
        path = Path(step_dir) / MEGATRON_DIR
        if dist.get_rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        if not background:
            dist_checkpointing.save(self._sharded_state(loading=False), str(path))
            return
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self._async_saves is None:
            self._async_saves = AsyncCallsQueue()
        request = dist_checkpointing.save(self._sharded_state(loading=False), str(path), async_sharded_save=True)
        self._async_saves.schedule_async_request(request)

    def load(self, step_dir: Path, saved_world: int) -> None:
        """Distributed checkpoints reshard: model and optimizer come back exactly at any layout."""
        path = Path(step_dir) / MEGATRON_DIR
        if not path.is_dir():
            raise UserError(f"{step_dir} holds no megatron checkpoint ({MEGATRON_DIR}/): was it saved by the "
                            "deepspeed backend? Use `pargo-dist export` and start from the export")
        state = dist_checkpointing.load(self._sharded_state(loading=True), str(path))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
