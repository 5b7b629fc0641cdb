"""MLflow side of the pipeline: where runs go, nested stage runs, metrics and artifacts.

Tracking URI: ``mlflow.tracking_uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite store inside the run directory (``sqlite:///<run_dir>/mlflow.db``, artifacts
in ``<run_dir>/mlartifacts``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.config import PipelineConfig  # noqa: E402


def tracking_uri(cfg: PipelineConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


def setup(cfg: PipelineConfig) -> str:
    """Point MLflow at the config's store and experiment; return the tracking URI."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
        location = None
        if uri.startswith("sqlite:"):  # keep local artifacts beside the local database
            location = (Path(cfg.run_dir) / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.mlflow.experiment)
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"pretrain.epochs": "120", ...} for mlflow.log_params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


@contextlib.contextmanager
def stage_run(name: str, params: dict | None = None):
    """A nested MLflow run for one pipeline stage under the active parent run."""
    with mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("stage", name)
        if params:
            mlflow.log_params(flatten(params))
        yield run


def log_epoch_metrics(uri: str, run_id: str, stage: str, metrics: dict, step: int) -> None:
    """Training curves from Ray Train's rank 0 (no active run needed in the worker)."""
    client = MlflowClient(uri)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)) and key != "epoch":
            client.log_metric(run_id, f"{stage}/{key}", float(value), step=step)
