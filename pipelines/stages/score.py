"""``asd score``: anomaly scores, DCASE metrics, submission files, plots, MLflow.

Embeds the training and test clips of the feature store with a trained model, fits one
scoring backend per (machine, section) from its training embeddings (both domains), scores
the test clips (min Mahalanobis distance), sets gamma thresholds, writes the evaluator's
``anomaly_score_*.csv`` / ``decision_result_*.csv`` (dev and eval layouts), computes the
metrics where labels exist, and prints the paper's Table 1 row.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException

from asd import metrics as M
from asd.contracts import GROUND_TRUTH_DATA, SCORES_FILE, SCORING_MODEL_DIR, SECTIONS_FILE
from pipelines import detectors
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError, first_line, require_feature_store
from pipelines.locks import run_dir_lock
from pipelines.serving.pyfunc_model import load_scoring_sections, write_settings
from pipelines.serving.registry import log_scoring
from pipelines.store import load_split

log = logging.getLogger(__name__)


@dataclass
class ScoringResult:
    scores: pd.DataFrame  # one row per test clip: meta + score, decision, nearest_attribute
    sections: dict  # per-section backends (asd.backend.SectionModel, asd.knn_backend.KnnSection)
    results: list  # asd.metrics.SectionResult for every labelled section
    out_dir: Path

    @property
    def official_score(self) -> float | None:
        return M.official_score(self.results)

    @classmethod
    def load(cls, out_dir: str | Path, ground_truth_root: str | Path | None = None) -> "ScoringResult":
        """The result :func:`run_scoring` wrote into ``out_dir``, read back from its files, so that
        ``asd score --register-only`` can log and register it when MLflow was down at scoring time."""
        out_dir = Path(out_dir)
        if not (out_dir / SCORES_FILE).is_file():
            raise UserError(f"{out_dir} holds no {SCORES_FILE}: run `asd score` (without --register-only) first")
        scores = pd.read_csv(out_dir / SCORES_FILE, dtype={"section": str})
        results = labelled_results(scores, Path(ground_truth_root) if ground_truth_root else None)
        return cls(scores, load_scoring_sections(out_dir), results, out_dir)


def write_submissions(scored: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The evaluator's two CSVs per (dataset, machine, section) under out_dir/<dataset>/."""
    written = []
    for (dataset, machine, section), rows in scored.groupby(["dataset", "machine", "section"], sort=True):
        names = [Path(p).name for p in rows["path"]]
        written += M.write_submission(out_dir / dataset, machine, section, names,
                                      rows["score"].to_numpy(), rows["decision"].to_numpy())
    return written


def labelled_results(scored: pd.DataFrame, ground_truth_root: Path | None = None) -> list:
    """DCASE metrics of every section whose labels are known (dev names, or eval ground truth)."""
    scored = scored.copy()
    if ground_truth_root is not None and (ground_truth_root / GROUND_TRUTH_DATA).is_dir():
        scored = _attach_ground_truth(scored, ground_truth_root)
    results = []
    for (machine, section), rows in scored.groupby(["machine", "section"], sort=True):
        rows = rows[rows["label"].notna()]
        if rows.empty:
            continue
        y_true = (rows["label"] == "anomaly").astype(int).to_numpy()
        y_domain = (rows["domain"] == "target").astype(int).to_numpy() if rows["domain"].notna().all() else None
        results.append(M.section_metrics(y_true, y_domain, rows["score"].to_numpy(),
                                         machine=machine, section=section))
    return results


def _attach_ground_truth(scored: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Fill label/domain of unlabelled eval clips from the official ground-truth files."""
    for (machine, section), rows in scored[scored["label"].isna()].groupby(["machine", "section"]):
        gt = root / GROUND_TRUTH_DATA / M.ground_truth_file_name(machine, section)
        if not gt.is_file():
            continue
        names, y_true, y_domain = M.read_ground_truth(gt)
        label = dict(zip(names, np.where(y_true == 1, "anomaly", "normal")))
        basenames = rows["path"].map(lambda p: Path(p).name)
        scored.loc[rows.index, "label"] = basenames.map(label).to_numpy()
        if y_domain is not None:
            domain = dict(zip(names, np.where(y_domain == 1, "target", "source")))
            scored.loc[rows.index, "domain"] = basenames.map(domain).to_numpy()
    return scored


def run_scoring(cfg: PipelineConfig, model_dir: str | Path, store: str | Path, out_dir: str | Path,
                ground_truth_root: str | Path | None = None) -> ScoringResult:
    """Score the store's test clips with the detector that trained ``model_dir``; write
    submissions, tables and (for a servable detector) what predictions need; no MLflow here."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    detector = detectors.of_model_dir(model_dir)
    version = cfg.features.version
    t0 = time.perf_counter()
    train = load_split(store, "train", feature_version=version)
    test = load_split(store, "test", feature_version=version)
    if test.meta.empty:
        raise ValueError(f"the feature store {store} holds no test clips to score")
    scored, sections = detector.score(cfg, model_dir, train, test)
    embed_seconds = time.perf_counter() - t0
    write_submissions(scored, out_dir / "submission")
    results = labelled_results(scored, Path(ground_truth_root) if ground_truth_root else None)
    scored.to_csv(out_dir / SCORES_FILE, index=False)
    torch.save({k: v.state_dict() for k, v in sections.items()}, out_dir / SECTIONS_FILE)
    if (out_dir / SCORING_MODEL_DIR).is_dir():  # an earlier scoring's model here: not this job's
        shutil.rmtree(out_dir / SCORING_MODEL_DIR)
    if detector.servable:  # with sections.pt, what predictions need to score exactly as this job did
        detector.export(model_dir, out_dir / SCORING_MODEL_DIR)
        write_settings(cfg, out_dir)
    if results:
        rows = M.results_table(results)
        M.write_table_csv(rows, out_dir / "results.csv")
        (out_dir / "results.md").write_text(results_markdown(results, method_label(cfg)))
    n = len(train.features) + len(test.features)
    (out_dir / "timing.json").write_text(json.dumps(
        {"clips": n, "embed_seconds": embed_seconds, "clips_per_s": n / max(embed_seconds, 1e-9)}))
    log.info("scored %d test clips in %d sections", len(scored), len(sections))
    return ScoringResult(scored, sections, results, out_dir)


def method_label(cfg: PipelineConfig) -> str:
    """The row name of the paper's Table 1 that this configuration reproduces."""
    return detectors.get(cfg.method).label(cfg)


def results_markdown(results: list, method: str = "proposed") -> str:
    """The paper's Table 1 row, then per-section detail."""
    return ("## Results (paper's Table 1 layout)\n\n" + M.to_markdown([M.paper_row(results, method)])
            + "\n\n## Per section\n\n" + M.to_markdown(M.results_table(results)) + "\n")


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("score", help="score test clips, DCASE metrics, MLflow, registry",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--checkpoint", "--model", dest="model",
                   help="trained model directory (default: <run_dir>/models/finetune, else pretrain)")
    p.add_argument("--store", help="feature store (default: from the config)")
    p.add_argument("--out", help="output folder (default: <run_dir>/scoring)")
    mlflow_mode = p.add_mutually_exclusive_group()
    mlflow_mode.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow or register")
    mlflow_mode.add_argument("--register-only", action="store_true",
                             help="do not score: log and register the results already in --out "
                                  "(after an MLflow outage)")
    p.set_defaults(func=main)


def default_model_dir(cfg: PipelineConfig) -> Path:
    found = detectors.get(cfg.method).trained_model_dir(cfg)
    if found is None:
        raise UserError(f"no trained model under {cfg.path('models')}: run `asd train` first or pass --model")
    return found


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else cfg.path("scoring")
    with run_dir_lock(cfg.run_dir):  # an `asd run` or `asd train` of the same run directory would race
        result = ScoringResult.load(out, cfg.data.root) if args.register_only else _score(cfg, args, out)
        if not args.no_mlflow:
            _log_to_mlflow(cfg, result, args)
    return 0


def _score(cfg: PipelineConfig, args, out: Path) -> ScoringResult:
    """Score into ``out`` and print the results: they are on disk before any MLflow call."""
    store = args.store or cfg.path(cfg.extract.store)
    require_feature_store(store, cfg.features.version)
    detector = detectors.get(cfg.method)
    if not args.model and detector.fits_in_scoring and detector.trained_model_dir(cfg) is None:
        for stage in detector.stages(cfg):  # cheap and Ray-free: fit it from the store now
            detector.fit(cfg, stage.name, store=store, out_dir=detector.model_dir(cfg, stage.name))
    model_dir = Path(args.model) if args.model else default_model_dir(cfg)
    result = run_scoring(cfg, model_dir, store, out, ground_truth_root=cfg.data.root)
    if result.results:
        print(results_markdown(result.results, method_label(cfg)))
    print(f"submission files: {out / 'submission'}", flush=True)
    return result


def register_only_command(args, out_dir: str | Path) -> str:
    """The ``asd score --register-only`` command that logs and registers the results in ``out_dir``
    (written while MLflow was down) with the config of the command ``args`` parsed."""
    return shlex.join(["asd", "score", "--register-only", "--config", args.config,
                       *(x for o in args.overrides for x in ("--set", o)), "--out", str(out_dir)])


def _log_to_mlflow(cfg: PipelineConfig, result: ScoringResult, args) -> None:
    """Log and register ``result``; an MLflow failure keeps the local results and says how to
    register them later."""
    try:
        reg = log_scoring(cfg, result)
    except (MlflowException, OSError, UserError) as err:  # OSError: requests' connection errors too
        raise UserError(f"MLflow logging failed ({first_line(err)}); the results stay in {result.out_dir}: "
                        f"log and register them later with `{register_only_command(args, result.out_dir)}`") from err
    if reg.get("model_uri"):
        print(f"registered model: {reg['model_uri']}")
