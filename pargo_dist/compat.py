"""Environment shims, kept in one place: the torchvision import beside a CPU torch (armed by
`import pargo_dist`, see patch_torchvision_on_import) and DeepSpeed on a CPU-only machine.

torchvision from PyPI is built against CUDA; beside a CPU-only torch its import fails with
"operator torchvision::nms does not exist" because its Python side registers fake kernels
for C++ ops whose schemas were never loaded. transformers and mosaicml-streaming import
torchvision, so one broken import breaks both. If (and only if) that exact failure happens,
we define the missing operator schemas with torch.library and import again: the pure
Python parts (transforms, io helpers) work; the C++ ops stay unavailable, which nothing in
this project uses. Where torchvision imports normally nothing is changed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive (its definitions die with it)
torchvision_patched = False


def patch_torchvision() -> bool:
    """Make `import torchvision` work beside a CPU torch. Returns True if a patch was needed."""
    global _library, torchvision_patched
    if torchvision_patched or importlib.util.find_spec("torchvision") is None:
        return torchvision_patched
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _library.define(schema)
    importlib.import_module("torchvision")
    torchvision_patched = True
    return True


class _TorchvisionShim(importlib.abc.MetaPathFinder):
    """First on sys.meta_path until torchvision is first imported: then it imports torchvision
    itself through `patch_torchvision` (shimmed if this torch needs it), steps aside, and hands
    the import system the module it already holds."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        patch_torchvision()
        module = sys.modules["torchvision"]
        real = module.__spec__
        spec = importlib.machinery.ModuleSpec("torchvision", _AlreadyLoaded(), origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec


class _AlreadyLoaded(importlib.abc.Loader):
    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module) -> None:
        pass


def patch_torchvision_on_import() -> None:
    """Run `patch_torchvision` when (and if) torchvision is first imported, not now."""
    if "torchvision" in sys.modules or torchvision_patched:
        return
    if not any(isinstance(f, _TorchvisionShim) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionShim())


def configure_deepspeed_env() -> None:
    """DeepSpeed picks its accelerator at import: without a GPU, tell it to use the CPU one
    (gloo, no IPEX / oneCCL needed). Must run before `import deepspeed`."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def skip_deepspeed_cpu_shm_op() -> None:
    """Without a GPU, DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op with
    g++ on first use (~26 s on a fresh machine: every CI run) to speed up large CPU all-reduces.
    Our CPU runs are tests and demos whose all-reduces are tiny; gloo's own does them. Must run
    after `import deepspeed`, before the process group starts. Nothing changes on a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    # (not `import deepspeed.comm.torch as m`: deepspeed.comm's attribute `torch` is torch itself)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def return_freed_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim); a no-op elsewhere.

    Building and loading a model frees many tensor-sized blocks (whole modules before ZeRO-3
    partitions them, conversions, DeepSpeed's copies into its flat buffers). glibc serves blocks
    under its mmap threshold from the heap, and raises that threshold up to 32 MiB after the
    first large free, so it keeps most of them; they would count against the rank's memory for
    the whole run (measured: 0.3 GiB of a 302M model's 2-rank ZeRO-3 load, benchmarks/startup.py)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)
