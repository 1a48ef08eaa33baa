"""Megatron-core on a machine without a GPU: every CPU-only workaround, in one place.

megatron-core assumes CUDA in a few fixed spots. On a CPU-only machine (CI, laptops, the
tests' gloo process groups) we redirect exactly those spots and nothing else:

- `torch.cuda.current_device()` is used as a *device* for new tensors (tensor-parallel
  gathers, attention buffers, grad buffers): it answers "cpu".
- `torch.cuda.synchronize()` (checkpoint writers, pipeline p2p) has nothing to wait for.
- The FP32 optimizer and the grad-norm / clipping helpers create `device='cuda'` scalars and
  assert `torch.cuda.FloatTensor` grads: their module-level `torch` is a view of torch in
  which device "cuda" means the CPU, and the clipping helper is replaced by the same
  arithmetic on CPU tensors.
- The pipeline schedules count tokens in a `device="cuda"` tensor: same view of torch.
- A tied embedding split over pipeline stages is synchronised with `weight.data.cuda()` at
  construction: there, and only there, `Tensor.cuda()` returns the tensor itself.
- MoE's all-to-all token dispatcher copies its split sizes to the host on a CUDA side stream:
  it is given no stream, and the sizes (already on the host) as numpy, as the GPU path has them.
- The CUDA RNG tracker is avoided by `model_parallel_cuda_manual_seed(...,
  inference_rng_tracker=True)` (the backend's job, see `megatron.seed`).

Not covered, on purpose: the distributed optimizer and the bf16 mixed-precision optimizer
check for `torch.cuda.*Tensor` types throughout; on CPU the backend uses the FP32 optimizer
(plain data-parallel all-reduce) and says so. `apply()` does nothing when CUDA is present.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def _cpu(device: Any) -> Any:
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


class _TorchOnCpu:
    """The torch module, except that tensor factories treat device 'cuda' as the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._module, name)
        if name in self._FACTORIES:
            @functools.wraps(attr)
            def factory(*args, device=None, **kwargs):
                return attr(*args, device=_cpu(device), **kwargs)

            return factory
        return attr


def _without_tensor_cuda(fn):
    """Run `fn` with `Tensor.cuda()` returning the tensor itself (it is on the only device there is)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapper


@torch.no_grad()
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 without the CUDA-type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        for p in parameters:
            grad = getattr(p, attr, None)
            if grad is not None:
                grad.mul_(coeff)


def _splits_on_host(self, point: str, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA streams: on the CPU the
    token counts are already on the host; the all-to-all takes its split sizes as numpy, as the
    GPU path gives them."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def apply() -> None:
    """Install the CPU workarounds (idempotent; a no-op when CUDA is available)."""
    global _APPLIED
    if _APPLIED or not needed():
        return
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as mcore_utils
    from megatron.core.models.common.language_module.language_module import LanguageModule

    torch.cuda.current_device = lambda: "cpu"  # used as `device=` for new tensors
    torch.cuda.synchronize = lambda device=None: None  # checkpoint writers, p2p: nothing to wait for
    on_cpu = _TorchOnCpu(torch)
    for module in (clip_grads, optimizer, schedules, mcore_utils):
        module.torch = on_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    LanguageModule.setup_embeddings_and_output_layer = _without_tensor_cuda(
        LanguageModule.setup_embeddings_and_output_layer)
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "host"  # (set, so that no CUDA stream is made)
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _splits_on_host
    _APPLIED = True
