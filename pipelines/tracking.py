"""MLflow side of the pipeline: where runs go, nested stage runs, metrics and artifacts.

Tracking URI: ``mlflow.tracking_uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite store inside the run directory (``sqlite:///<run_dir>/mlflow.db``, artifacts
in ``<run_dir>/mlartifacts``).

An http(s) tracking server is probed once when the pipeline connects (:func:`connect`), so a
dead URI fails in seconds with one line instead of MLflow's minutes of retries, and MLflow's
HTTP timeouts and retries are bounded (:data:`HTTP_LIMITS`) unless the environment sets them.
Per-epoch training metrics are best effort (:func:`log_epoch_metrics`), and so is every MLflow call
of a pipeline run once it is connected (:func:`best_effort`, :func:`tolerant_run`): a server that
goes down mid-run is one warning, the run finishes its local work (stage records, models, scores and
submission files) and says how to log and register the results later. Training and scoring runs
name the clips they used: the feature store's manifest as an MLflow dataset input
(:func:`log_manifest_input`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import ssl
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

from pipelines import store as store_mod
from pipelines.config import PipelineConfig
from pipelines.errors import UserError, first_line

log = logging.getLogger(__name__)

# MLflow's defaults (7 retries with backoff factor 2, 120 s per request) keep a client retrying a
# dead server for minutes; these bound one call to about a minute and a half at worst
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_TIMEOUT_S = 5.0
# The manifest columns a dataset input carries (its schema and profile; the rows stay in the store)
MANIFEST_COLUMNS = ("path", "content_hash", "split", "label", "machine", "section", "domain")
_unlogged_runs: set[str] = set()  # runs whose per-epoch logging failed: not retried every epoch
# The first MLflow failure of this command ("<what it was doing>: <why>"); cleared by connect()
_outage: list[str] = []
# What MLflow's client raises when its server is gone: MlflowException once its retries are spent,
# OSError for requests' connection errors (and a local store's disk)
MLFLOW_ERRORS = (MlflowException, OSError)


class TrackingUnavailable(UserError):
    """The MLflow tracking server does not answer."""


def tracking_uri(cfg: PipelineConfig) -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def bound_http(uri: str) -> None:
    """:data:`HTTP_LIMITS` for an http(s) tracking URI, where the environment sets none."""
    if _is_http(uri):
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One GET of the server's ``/health`` (unauthenticated on MLflow servers); raise
    :class:`TrackingUnavailable` when nothing answers or the answer is a server error (a proxy
    whose MLflow is down). Any other answer, a TLS one included (certificates are MLflow's
    client's business, with its own settings), means a server is there."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return
        reason = f"HTTP {err.code}"
    except OSError as err:  # URLError (refused, unknown host) or a timeout
        cause = getattr(err, "reason", err)
        if isinstance(cause, ssl.SSLError):
            return
        reason = str(cause) or type(cause).__name__
    raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}): start it, or set "
                              "mlflow.tracking_uri / $MLFLOW_TRACKING_URI to one that runs (unset both "
                              "for the local SQLite store in run_dir)")


def connect(uri: str) -> None:
    """Point MLflow's tracking and registry at ``uri``; an http(s) server gets bounded retries
    and must answer now (before Ray or any stage starts)."""
    bound_http(uri)
    if _is_http(uri):
        probe(uri)
    _outage.clear()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def setup(cfg: PipelineConfig) -> str:
    """Point MLflow at the config's store and experiment; return the tracking URI."""
    uri = tracking_uri(cfg)
    connect(uri)
    try:
        if mlflow.get_experiment_by_name(cfg.mlflow.experiment) is None:
            location = None
            if uri.startswith("sqlite:"):  # keep local artifacts beside the local database
                location = (Path(cfg.run_dir) / "mlartifacts").resolve().as_uri()
            mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
        mlflow.set_experiment(cfg.mlflow.experiment)
    except MLFLOW_ERRORS as err:  # gone between the probe and here: nothing has started yet
        raise TrackingUnavailable(f"MLflow tracking server {uri} failed ({first_line(err)}): start it, or "
                                  "set mlflow.tracking_uri / $MLFLOW_TRACKING_URI to one that runs") from err
    return uri


def outage() -> str | None:
    """What the first MLflow failure of this command was doing, and why; None while MLflow works."""
    return _outage[0] if _outage else None


def best_effort(what: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, an MLflow call of a pipeline run, or None when MLflow fails: an
    outage never stops the run or loses its local work. The first failure is one warning; every
    later call of this command is skipped (each would wait out the HTTP retries again)."""
    if _outage:
        return None
    try:
        return call(*args, **kwargs)
    except MLFLOW_ERRORS as err:
        _failed(what, err)
        return None


def record_outage(what: str, err: BaseException) -> str:
    """Remember an MLflow failure that the caller reports itself (the first one of this command
    stands), so that later MLflow calls of the command are skipped in silence; returns it."""
    if not _outage:
        _outage.append(f"{what}: {first_line(err)}")
    return _outage[0]


def _failed(what: str, err: BaseException) -> None:
    """Remember the first MLflow failure of this command and say it, in one line."""
    if not _outage:
        record_outage(what, err)
        log.warning("warning: MLflow failed while %s (%s); going on without MLflow, every result stays on disk",
                    what, first_line(err))


@contextlib.contextmanager
def tolerant_run(name: str, tags: dict | None = None, params: dict | None = None):
    """A run nested under the active one (if any), as the active run for the block; yields its id,
    or None when MLflow is down (:func:`best_effort`). It is ended FINISHED, or FAILED on an
    exception, even after an outage (MLflow takes it off its stack first, then one bounded
    request), so that no stale run stays active in this process."""
    run = best_effort(f"starting the MLflow run {name!r}", mlflow.start_run, run_name=name,
                      nested=mlflow.active_run() is not None)
    if run is not None:
        best_effort(f"tagging the MLflow run {name!r}", mlflow.set_tags, tags or {})
        if params:
            best_effort(f"logging the parameters of the MLflow run {name!r}", mlflow.log_params, flatten(params))
    status = "FAILED"
    try:
        yield run.info.run_id if run is not None else None
        status = "FINISHED"
    finally:
        if run is not None:
            try:
                mlflow.end_run(status)
            except MLFLOW_ERRORS as err:
                _failed(f"ending the MLflow run {name!r}", err)


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


class _ManifestDataset(PandasDataset):
    """A manifest as an MLflow dataset: its columns are strings (the store's schema), so the
    schema is stated instead of inferred value by value (seconds for 25,000 clips)."""

    @property
    def schema(self) -> Schema:
        return Schema([ColSpec("string", c, required=not self.df[c].isna().any())
                       for c in self.df.columns])


def log_manifest_input(store: str | os.PathLike, context: str, manifest=None,
                       digest: str | None = None) -> str | None:
    """Log the feature store's manifest (current feature version) as a dataset input of the active
    run, with ``context`` ("training", "scoring"); return its digest.

    The dataset's digest is :func:`pipelines.store.manifest_digest` (every clip's path and
    content hash, and the feature version: the ``data_manifest_digest`` tag), not MLflow's own
    (which hashes only the first 10,000 rows); its source is the store's ``manifest.parquet``.
    Only the schema and profile (row count) go to the server. Best effort: a manifest problem
    is a warning, never a lost run. ``manifest``/``digest`` skip reading them again."""
    try:
        version = store_mod.current_version(store)
        if manifest is None:
            manifest = store_mod.store_manifest(store, version)
        if digest is None:
            digest = store_mod.manifest_digest(store, version)
        frame = manifest[[c for c in MANIFEST_COLUMNS if c in manifest.columns]]
        path = store_mod.version_dir(store, version).resolve() / store_mod.MANIFEST
        with warnings.catch_warnings():  # MLflow registers its local-file source twice, and says so
            warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
            source = resolve_dataset_source(str(path))
        dataset = _ManifestDataset(frame, source, name=f"feature-store-{version}", digest=digest)
    except Exception as err:
        log.warning("feature-store manifest of %s not logged as a dataset input: %s", store,
                    first_line(err))
        return None
    best_effort(f"logging the feature-store manifest as the {context} input", mlflow.log_input, dataset,
                context=context)
    return digest


def log_epoch_metrics(uri: str, run_id: str, stage: str, metrics: dict, step: int) -> None:
    """Training curves from Ray Train's rank 0 (no active run needed in the worker), in one request.

    Best effort: an MLflow outage must not stop training, whose checkpoints carry every epoch's
    metrics (history.csv beside the model). The first failure is one warning, and later epochs
    of that run are not sent (each attempt would wait out the retries again)."""
    if run_id in _unlogged_runs:
        return
    bound_http(uri)
    now = int(time.time() * 1000)
    batch = [Metric(f"{stage}/{key}", float(value), now, step) for key, value in metrics.items()
             if isinstance(value, (int, float)) and math.isfinite(float(value)) and key != "epoch"]
    try:
        MlflowClient(uri).log_batch(run_id, metrics=batch)
    except Exception as err:  # whatever the client raises (HTTP, store, auth): training goes on
        _unlogged_runs.add(run_id)
        log.warning("MLflow: per-epoch metrics of run %s not logged to %s from epoch %d on (%s); "
                    "training continues, history.csv beside the model keeps every epoch",
                    run_id, uri, step, first_line(err))
