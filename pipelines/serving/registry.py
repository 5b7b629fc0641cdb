"""MLflow logging of a scoring run, the pyfunc model, and the model registry with aliases.

:func:`log_scoring` puts everything of an ``asd score`` result into one MLflow run ("score",
nested under the active pipeline run, or top-level when there is none):

* params — the whole configuration, flattened (``pretrain.epochs``, ...);
* metrics — ``auc_source/<machine>/section_<XX>``, ``auc_target/...``, ``pauc/...`` for every
  labelled section, ``hmean/<machine>``, the paper's Table 1 summary ``source_auc``,
  ``target_auc``, ``pauc`` and ``official_score`` (fractions in [0, 1]);
* artifacts — ``submission/`` (the evaluator's CSVs), ``results/`` (results.md, results.csv,
  scores.csv), ``plots/`` (:mod:`pipelines.stages.plots`), ``config/config.yaml``, ``data/`` (feature
  store manifest summary, when :mod:`pipelines.store` provides one);
* inputs — the feature store's manifest as an MLflow dataset (context ``scoring``; its digest is
  the ``data_manifest_digest`` tag): :func:`pipelines.tracking.log_manifest_input`;
* the model — an MLflow pyfunc (:class:`pipelines.serving.pyfunc_model.AsdPyfuncModel`), logged as
  *models from code* (:mod:`pipelines.serving.pyfunc_entry`) so that no version holds a pickle, carrying
  the exported model folder (meta.json, + model.pt for the network), ``sections.pt`` and
  ``scoring.json`` as plain artifacts, with a signature (:func:`model_signature`) and a JSON input
  example, registered under ``cfg.mlflow.registered_model``, for every servable detector (the
  prototype network, the kNN). Every new version gets the alias ``challenger``; the first one
  also ``champion``. Later promotions go through :func:`promote` (the retraining job).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import re
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import yaml

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema

from asd import metrics as M
from asd.contracts import SCORES_FILE, SCORING_MODEL_DIR, SECTIONS_FILE, SETTINGS_FILE, split_section_key
from pipelines import store as store_mod
from pipelines import tracking
from pipelines.config import PipelineConfig
from pipelines.serving.pyfunc_model import AsdPyfuncModel, is_scoring_folder, write_settings
from pipelines.stages import plots

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous_champion"
MODEL_NAME_IN_RUN = "model"
# What the pyfunc needs at load time. Pinned to the versions installed here (requirements.txt);
# MLflow then neither infers nor resolves an environment. The project's own packages (asd,
# pipelines) must be installed where the model is loaded (`pip install -e .` or the image).
PYFUNC_PACKAGES = ("mlflow", "torch", "torchaudio", "numpy", "pandas", "soundfile", "PyYAML")
# The models-from-code file logged as the model (MLflow runs it at load; nothing is unpickled).
MODEL_CODE = Path(__file__).with_name("pyfunc_entry.py")
_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-. /]+")


# ----------------------------------------------------------------------------- registry helpers
def client() -> MlflowClient:
    return MlflowClient()


def _not_found(err: MlflowException) -> bool:
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def register_model(model_uri: str, name: str, tags: dict | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed); return the version.

    MLflow prints its own "Successfully registered" lines straight to stderr: they go to the log."""
    with contextlib.redirect_stderr(io.StringIO()) as said:
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    for line in said.getvalue().splitlines():
        logging.getLogger("mlflow").info(line)
    return str(mv.version)


def get_alias_version(name: str, alias: str):
    """The :class:`ModelVersion` that ``alias`` points to, or None (no such model or alias)."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE "... not found"
        if _not_found(err) or "not found" in str(err).lower():
            return None
        raise


def set_alias(name: str, alias: str, version) -> None:
    client().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version, tags: dict) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, "" if v is None else str(v))


def describe_version(name: str, version, description: str) -> None:
    """Set a model version's description (shown on its page in the MLflow UI)."""
    client().update_model_version(name, str(version), description=description)


def promote(name: str, version, previous_alias: str = PREVIOUS_CHAMPION) -> str | None:
    """Make ``version`` the champion; the old champion keeps ``previous_alias`` for rollback.

    Returns the previous champion's version (None if there was none or it is ``version``)."""
    current = get_alias_version(name, CHAMPION)
    previous = None
    if current is not None and str(current.version) != str(version):
        set_alias(name, previous_alias, current.version)
        previous = str(current.version)
    set_alias(name, CHAMPION, version)
    return previous


def rollback(name: str, previous_alias: str = PREVIOUS_CHAMPION) -> str:
    """Point ``champion`` back at ``previous_alias``'s version (the two swap); return it."""
    prev = get_alias_version(name, previous_alias)
    if prev is None:
        raise LookupError(f"registered model {name!r} has no {previous_alias!r} alias to roll back to")
    promote(name, prev.version, previous_alias=previous_alias)
    return str(prev.version)


# ----------------------------------------------------------------------------- the pyfunc model
def pip_requirements() -> list[str]:
    """Exact pins of the installed packages the pyfunc imports (no environment inference)."""
    pins = []
    for pkg in PYFUNC_PACKAGES:
        try:
            pins.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pins.append(pkg)
    return pins


def model_signature():
    """The model's columns. Inputs: ``machine`` (string) and ``section`` ("00", 0 or
    "section_00"), and per row one of ``audio`` (bytes, or base64 text in JSON), ``path`` and
    ``waveform`` (+ optional ``sample_rate``). The columns that take several types are ``Any``:
    MLflow would otherwise decode every ``binary`` cell as base64 (rows without audio fail the
    whole request) and refuse int sections or numpy waveforms. Outputs: ``score`` (null where
    the row failed), ``decision``, ``nearest_attribute``, ``error``."""
    inputs = Schema([
        ColSpec("string", "machine"), ColSpec(AnyType(), "section"),
        ColSpec(AnyType(), "audio", required=False), ColSpec("string", "path", required=False),
        ColSpec(AnyType(), "waveform", required=False), ColSpec(AnyType(), "sample_rate", required=False)])
    outputs = Schema([
        ColSpec("double", "score", required=False), ColSpec("long", "decision", required=False),
        ColSpec("string", "nearest_attribute", required=False), ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(scoring_dir: str | Path):
    """One row the model scores: a quiet noise clip generated here, long enough for the model,
    as base64 WAV (what JSON carries) for the first section the model knows (None if it knows
    none). MLflow stores it as JSON and runs it through the model once when logging."""
    model = AsdPyfuncModel.from_dir(scoring_dir)
    keys = model.known_sections()
    if not keys:  # a model without sections scores nothing: no example
        return None
    machine, section = split_section_key(keys[0])
    features = model.features
    noise = np.random.default_rng(0).standard_normal(model.min_frames() * features.hop_length) * 0.01
    wav = io.BytesIO()
    sf.write(wav, noise.astype(np.float32), features.sample_rate, format="WAV", subtype="PCM_16")
    return pd.DataFrame({"machine": [machine], "section": [section],
                         "audio": [base64.b64encode(wav.getvalue()).decode("ascii")]})


def log_pyfunc_model(scoring_dir: str | Path, cfg: PipelineConfig | None = None, name: str = MODEL_NAME_IN_RUN):
    """Log the pyfunc of an ``asd score`` output folder into the active run; returns ModelInfo."""
    scoring_dir = Path(scoring_dir)
    model_dir, sections = scoring_dir / SCORING_MODEL_DIR, scoring_dir / SECTIONS_FILE
    if not is_scoring_folder(scoring_dir):
        raise FileNotFoundError(f"cannot log the pyfunc model: {scoring_dir} holds no exported model "
                                f"({SCORING_MODEL_DIR}/ and {SECTIONS_FILE})")
    settings = scoring_dir / SETTINGS_FILE
    if cfg is not None:
        write_settings(cfg, scoring_dir)
    artifacts = {SCORING_MODEL_DIR: str(model_dir), "sections": str(sections)}
    if settings.is_file():
        artifacts["settings"] = str(settings)
    return _log_model(name, artifacts, input_example(scoring_dir))


def _log_model(name: str, artifacts: dict, example=None):
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=pip_requirements(),
        signature=model_signature(),
        input_example=example,
        metadata={"task": "anomalous sound detection (DCASE 2022 Task 2)",
                  "input": "DataFrame: machine, section, audio (bytes or base64) | path (under "
                           "$ASD_INPUT_ROOT) | waveform",
                  "output": "DataFrame: score (null where the row failed), decision, "
                            "nearest_attribute, error"},
    )


# ----------------------------------------------------------------------------- scoring run
def _metric_name(*parts: str) -> str:
    return "/".join(_METRIC_NAME.sub("_", str(p)) for p in parts)


def scoring_metrics(results: list) -> dict[str, float]:
    """The metrics :func:`log_scoring` logs, from a list of asd.metrics.SectionResult."""
    out: dict[str, float] = {}
    for r in results:
        for key in M.METRICS:
            v = getattr(r, key)
            if v is not None:
                out[_metric_name(key, r.machine, f"section_{r.section}")] = float(v)
    if not results:
        return out
    for machine, v in M.machine_scores(results).items():
        if v is not None:
            out[_metric_name("hmean", machine)] = float(v)
    row = M.paper_row(results)
    for key, col in (("source_auc", "Source AUC"), ("target_auc", "Target AUC"), ("pauc", "pAUC"),
                     ("official_score", "Overall")):
        if row.get(col) is not None:
            out[key] = float(row[col])
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _manifest(cfg: PipelineConfig) -> tuple[str | None, object, object]:
    """(digest, summary, manifest) of the feature store when pipelines.store can tell."""
    store = cfg.path(cfg.extract.store)
    if not Path(store).exists():
        return None, None, None
    digest = summary = manifest = None
    try:
        if hasattr(store_mod, "manifest_digest"):
            digest = store_mod.manifest_digest(store)
        if hasattr(store_mod, "store_manifest"):
            manifest = store_mod.store_manifest(store)
            summary = _summarise(manifest)
    except Exception as err:  # a manifest problem must not lose a finished scoring run
        log.warning("feature-store manifest of %s not logged: %s", store, err)
    return digest, summary, manifest


def _summarise(manifest) -> object:
    if isinstance(manifest, pd.DataFrame):
        cols = [c for c in ("dataset", "machine", "section", "split", "domain", "label")
                if c in manifest.columns]
        summary: dict = {"clips": int(len(manifest)), "columns": [str(c) for c in manifest.columns]}
        if cols:
            counts = manifest.groupby(cols, dropna=False).size().reset_index(name="clips")
            summary["counts"] = json.loads(counts.to_json(orient="records"))
        return summary
    return manifest


def log_scoring(cfg: PipelineConfig, result, parent_run_id: str | None = None,
                version_tags: dict | None = None) -> dict:
    """Log a :class:`pipelines.stages.score.ScoringResult` to MLflow and register its pyfunc model,
    with ``version_tags`` among the tags the version is created with (in the same call, so a
    version never exists without them).

    Returns ``{run_id, model_uri, version, official_score}`` (``model_uri`` is
    ``models:/<name>/<version>``; ``model_uri``/``version`` are None for a detector scored in the
    job only, the AE baseline, which exports no model to register)."""
    active = mlflow.active_run()
    if active is None:
        tracking.setup(cfg)
    out_dir = Path(result.out_dir)
    name = cfg.mlflow.registered_model
    official = result.official_score
    if parent_run_id and (active is None or active.info.run_id != parent_run_id):
        run_ctx = mlflow.start_run(run_name="score", parent_run_id=parent_run_id, nested=True)
    else:
        run_ctx = tracking.stage_run("score")
    with run_ctx as run:
        run_id = run.info.run_id
        mlflow.set_tag("stage", "score")
        mlflow.log_params(tracking.flatten(cfg.to_dict()))
        metrics = scoring_metrics(result.results)
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_metrics({"test_clips": float(len(result.scores))})

        if (out_dir / "submission").is_dir():
            mlflow.log_artifacts(str(out_dir / "submission"), "submission")
        for fname in ("results.md", "results.csv", SCORES_FILE, "timing.json"):
            if (out_dir / fname).is_file():
                mlflow.log_artifact(str(out_dir / fname), "results")
        with tempfile.TemporaryDirectory(prefix="asd-plots-") as tmp:
            try:
                written = plots.plot_all(result.scores, result.sections, tmp, result.results)
            except Exception as err:  # figures are a convenience, never a reason to fail
                log.warning("plots not written: %s", err)
                written = []
            for p in written:
                mlflow.log_artifact(str(p), "plots")
        mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/config.yaml")
        digest, summary, manifest = _manifest(cfg)
        if digest is not None:
            mlflow.set_tag("data_manifest_digest", str(digest))
            tracking.log_manifest_input(cfg.path(cfg.extract.store), "scoring", manifest, digest)
        if summary is not None:
            mlflow.log_dict(json.loads(json.dumps(summary, default=str)), "data/manifest_summary.json")

        reg: dict = {"run_id": run_id, "model_uri": None, "version": None, "official_score": official}
        if not is_scoring_folder(out_dir):
            log.info("no exported model in %s (a detector scored in the job only): nothing to register", out_dir)
            return reg
        info = log_pyfunc_model(out_dir, cfg)
        tags = {"official_score": official, "run_id": run_id, "config_digest": cfg.digest(),
                "stage": "score"}
        if digest is not None:
            tags["data_manifest_digest"] = digest
        tags.update(version_tags or {})
        version = register_model(info.model_uri, name,
                                 {k: v for k, v in tags.items() if v is not None})
        set_alias(name, CHALLENGER, version)
        if get_alias_version(name, CHAMPION) is None:
            set_alias(name, CHAMPION, version)
        mlflow.set_tags({"registered_model": name, "registered_version": version})
        reg.update(model_uri=f"models:/{name}/{version}", version=int(version),
                   logged_model_uri=info.model_uri)
        log.info("registered %s version %s (official score %s)", name, version,
                 "n/a" if official is None else f"{official:.4f}")
        return reg
