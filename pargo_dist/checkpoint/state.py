"""What a checkpoint holds besides the backend's shards: the run's `TrainState` (meta.json) and
each rank's RNG states, and the names of a step directory's files.

    step_<N:08d>/
        ds/ or megatron/     the backend's model and optimizer shards (DEEPSPEED_DIR, MEGATRON_DIR)
        rank_<r:05d>.pt      per rank: RNG states (python, numpy, torch CPU and CUDA)
        meta.json            rank 0: TrainState (META)
        config.yaml          rank 0: the resolved recipe (CONFIG)
        COMPLETE             written last (pargo_dist/checkpoint/pruning.py: COMPLETE)
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pargo_dist.errors import UserError

META = "meta.json"
CONFIG = "config.yaml"
DEEPSPEED_DIR = "ds"  # DeepSpeed's checkpoint tag: engine.save_checkpoint(step_dir, tag=DEEPSPEED_DIR)
MEGATRON_DIR = "megatron"  # a megatron-core distributed checkpoint (reshards to any TP/PP/DP layout)


# -- RNG state -------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every RNG this process draws from, so a resumed run continues the same random stream."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored for the devices both the
    saving and the restoring process have (a resume may see a different device count)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[device], device)


# -- the run-level state ---------------------------------------------------------------


@dataclass
class TrainState:
    """Where a run stands at a checkpoint, for every rank alike (meta.json, readable without torch).

    Versioned: `version` says which fields a file has. Files from before versioning (version 0)
    read with the defaults below; a file from a newer pargo_dist is refused rather than half read.
    """

    step: int
    samples_seen: int = 0  # global samples consumed (any rank count): where the data resumes
    tokens_seen: int = 0
    skipped: int = 0  # corrupt samples replaced so far
    stream_samples: dict[str, int] = field(default_factory=dict)  # per dataset of a mixture
    world_size: int = 1  # ranks that wrote it (another count resumes elastically, see Backend.load)
    stage: str = "finetune"
    backend: str = "deepspeed"  # only this backend can resume it
    layout: dict[str, int] = field(default_factory=dict)  # dp / tp / pp / zero_stage
    loader: dict[str, Any] | None = None  # the streaming loader's state_dict
    trackers: dict[str, str] = field(default_factory=dict)  # tracker -> run id (W&B, MLflow), continued on resume
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient norm (version 2)
    rollbacks: int = 0  # returns to an earlier checkpoint after a divergence (version 3; divergence.py)
    excluded_samples: dict[str, str] = field(default_factory=dict)  # sample id -> why it is skipped (version 3)
    version: int = 3

    VERSION = 3  # (not a field: no annotation). 2: skipped_steps; 3: rollbacks, excluded_samples

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, where: Path | str = META) -> "TrainState":
        version = data.get("version", 0)
        if not isinstance(version, int) or version > cls.VERSION:
            raise UserError(f"{where}: train state version {version!r} is newer than this pargo_dist reads "
                            f"({cls.VERSION}): resume with the version that wrote it, or upgrade")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and version == cls.VERSION:
            raise UserError(f"{where}: unknown train state fields {unknown} (a damaged or foreign file?)")
        if "step" not in data:
            raise UserError(f"{where}: no 'step' in the train state")
        return cls(**{k: v for k, v in data.items() if k in names and k != "version"})
