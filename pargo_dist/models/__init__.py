"""Model definitions: no parallelism, no ranks, no data formats in here.

Names are resolved on first use (PEP 562), so importing a light submodule such as
`pargo_dist.models.projector_config` does not import transformers.
"""

import importlib

_WHERE = {
    "ParGoConfig": "mllm", "ParGoForConditionalGeneration": "mllm",
    "insert_image_tokens": "mllm", "ProjectorConfig": "projector_config", "build_projector": "projector",
    "VisionTower": "vision",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pargo_dist.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pargo_dist.models.{_WHERE[name]}"), name)
