"""Experiment trackers besides TensorBoard: Weights & Biases and MLflow (optional extras).

Each tracker gets exactly what TensorBoard gets, from the same MetricsLogger call: every scalar
at its step, and the sample captions. The recipe is the run's config (W&B config; MLflow params
and a config.yaml artifact). Trackers live on rank 0 only, and start after a resume, so that a
requeued job appends to the run it started: the tracker's run id is kept in the checkpoint
(TrainState.trackers) and handed back here.

    logging:
      wandb: {project: pargo, name: stage1, mode: offline}        # pip install .[wandb]
      mlflow: {tracking_uri: file:///shared/mlruns, experiment: pargo}   # pip install .[mlflow]

Offline W&B needs no network (`wandb sync` uploads later); a local MLflow file store
(file:///path; MLflow 3 keeps it in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which is
set for file: URIs) needs no server. A tracker library that is not installed is a recipe error that names the extra.
"""

from __future__ import annotations

import html
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

from pargo_dist.errors import UserError


@dataclass
class WandbConfig:
    """The recipe's logging.wandb: off unless `project` is set."""

    project: str | None = None
    name: str | None = None  # the run's display name; default: run.dir's last part
    entity: str | None = None  # team or user; default: W&B's own default
    mode: str = "online"  # online | offline (no network: `wandb sync` later) | disabled
    tags: list[str] | None = None


@dataclass
class MlflowConfig:
    """The recipe's logging.mlflow: off unless `tracking_uri` is set."""

    tracking_uri: str | None = None  # http(s)://server, or file:///path for a local store
    experiment: str = "pargo_dist"
    run_name: str | None = None  # default: run.dir's last part


class Tracker(Protocol):
    name: str
    run_id: str

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def log_text(self, step: int, tag: str, text: str) -> None: ...

    def close(self) -> None: ...


def _need(module: str, extra: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{key} is set but {module} is not installed: pip install 'pargo_dist[{extra}]' "
                        f"(or remove {key} from the recipe)")


def check_trackers(wandb: WandbConfig, mlflow: MlflowConfig) -> None:
    """Recipe checks before any rank starts (the config loader calls it)."""
    if wandb.project:
        if wandb.mode not in ("online", "offline", "disabled"):
            raise UserError(f"logging.wandb.mode={wandb.mode!r}: must be online, offline or disabled")
        _need("wandb", "wandb", "logging.wandb.project")
    if mlflow.tracking_uri:
        _need("mlflow", "mlflow", "logging.mlflow.tracking_uri")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: WandbConfig, run_dir: Path, recipe: dict, run_id: str | None):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, name=cfg.name or run_dir.name, entity=cfg.entity,
                              mode=cfg.mode, tags=cfg.tags, dir=str(run_dir), config=recipe,
                              id=run_id, resume="allow" if run_id else None, reinit="create_new")
        self.run_id = self.run.id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, run_dir: Path, recipe: dict, run_id: str | None, recipe_yaml: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if cfg.tracking_uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode,
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # behind this opt-in; it still works
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
            run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name)
            run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flatten(recipe).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(run_id, params=params[start:start + 100])
            self.client.log_text(run_id, recipe_yaml, "config.yaml")
        else:  # a resumed run: the recipe is already there (MLflow refuses to change a param)
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:08d}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def start_trackers(wandb: WandbConfig, mlflow: MlflowConfig, run_dir: Path, recipe: dict, recipe_yaml: str,
                   run_ids: Mapping[str, str]) -> list[Tracker]:
    """The trackers the recipe asks for, continuing the runs in `run_ids` (from the checkpoint)."""
    trackers: list[Tracker] = []
    if wandb.project:
        trackers.append(WandbTracker(wandb, run_dir, recipe, run_ids.get("wandb")))
    if mlflow.tracking_uri:
        trackers.append(MlflowTracker(mlflow, run_dir, recipe, run_ids.get("mlflow"), recipe_yaml))
    return trackers
