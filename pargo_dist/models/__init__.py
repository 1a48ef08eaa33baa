"""Model definitions: no parallelism, no ranks, no data formats in here."""

from pargo_dist.models.mllm import (
    IGNORE_INDEX,
    STAGES,
    ParGoConfig,
    ParGoForConditionalGeneration,
    insert_image_tokens,
)
from pargo_dist.models.projector import ProjectorConfig, build_projector
from pargo_dist.models.vision import VisionTower

__all__ = [
    "IGNORE_INDEX",
    "STAGES",
    "ParGoConfig",
    "ParGoForConditionalGeneration",
    "ProjectorConfig",
    "VisionTower",
    "build_projector",
    "insert_image_tokens",
]
