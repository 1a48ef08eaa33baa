"""`train.compile`: torch.compile each transformer block (vision tower, projector, LLM).

Why per block and not the whole model: a whole-model graph breaks at everything dynamo cannot
trace (DeepSpeed's ZeRO-3 hooks, megatron's pipeline schedule, transformers' mask helpers), and
a graph break costs what the compiler saved. A block is the unit that repeats: compiled once,
its code is reused by every layer of the same class (torch's inline_inbuilt_nn_modules treats
a layer's parameters as inputs, not constants), and it holds what compiling pays for: the
norm / rotary / activation / residual chains that eager mode runs as separate kernels.

What is compiled is each block's `forward`, not the module's `__call__`: the hooks a backend
puts on a block (ZeRO-3 gathers its parameters in a forward pre-hook) stay outside the graph
and run as before, and the module tree, parameter names and checkpoints are unchanged.

The blocks are the children of every ModuleList named `...layers`: the tower's encoder layers,
the ParGo projector's layers, the HF LLM's decoder layers, megatron's TransformerLayers. This is
the same rule the ZeRO-3 backend uses for its leaf modules (`transformer_blocks`).
"""

from __future__ import annotations

import types

import torch
from torch import nn

_COMPILED = "_pargo_compiled"


def transformer_blocks(root: nn.Module) -> list[nn.Module]:
    """The repeated blocks under `root`: the children of every non-empty ModuleList whose
    name ends in `layers`, in module order."""
    return [block for name, module in root.named_modules()
            if isinstance(module, nn.ModuleList) and name.endswith("layers") for block in module]


def compile_blocks(roots: list[nn.Module], backend: str = "inductor") -> int:
    """Replace the forward of every transformer block under `roots` by its torch.compile'd
    version (once: a block already compiled is left as it is). Returns how many were compiled.

    `backend`: torch.compile's; "inductor" generates fused kernels (Triton on GPU, C++ on
    CPU); "aot_eager" traces forward and backward the same way without generating code (what
    the CPU tests use: the same graphs, seconds instead of minutes of compiling)."""
    count, compiled = 0, {}
    for root in roots:
        for block in transformer_blocks(root):
            if getattr(block, _COMPILED, False):
                continue
            # One compiled function per block class, bound to each block as an instance attribute:
            # Module.__call__ looks up self.forward, so its hooks stay around the graph, and a
            # deepcopy binds the copy to its own block (a bound method would call the original).
            forward = type(block).forward
            if forward not in compiled:
                compiled[forward] = torch.compile(forward, backend=backend)
            block.forward = types.MethodType(compiled[forward], block)
            object.__setattr__(block, _COMPILED, True)
            count += 1
    return count
