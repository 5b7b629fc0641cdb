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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asd import metrics as M
from asd.backend import SectionModel, calibrate_threshold, decide, fit_gamma_threshold, fit_section
from asd.training import embed_clips
from pipelines.checkpoints import copy_model, load_meta, load_model
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError, first_line, require_feature_store

log = logging.getLogger(__name__)
SECTIONS_FILE = "sections.pt"
# Above this many clips, embeddings are computed on Ray Data actors instead of in-process.
RAY_EMBED_MIN_CLIPS = 4000


def section_key(machine: str, section: str) -> str:
    return f"{machine}/section_{section}"


@dataclass
class ScoringResult:
    scores: pd.DataFrame  # one row per test clip: meta + score, decision, nearest_attribute
    sections: dict[str, SectionModel]
    results: list  # asd.metrics.SectionResult for every labelled section
    out_dir: Path

    @property
    def official_score(self) -> float | None:
        return M.official_score(self.results)

    @classmethod
    def load(cls, out_dir: str | Path, ground_truth_root: str | Path | None = None) -> "ScoringResult":
        """The result :func:`run_scoring` wrote into ``out_dir``, read back from its files, so that
        ``asd score --register-only`` can log and register it when MLflow was down at scoring time."""
        from pipelines.pyfunc_model import load_sections

        out_dir = Path(out_dir)
        if not (out_dir / "scores.csv").is_file():
            raise UserError(f"{out_dir} holds no scores.csv: run `asd score` (without --register-only) first")
        scores = pd.read_csv(out_dir / "scores.csv", dtype={"section": str})
        results = labelled_results(scores, Path(ground_truth_root) if ground_truth_root else None)
        return cls(scores, load_sections(out_dir / SECTIONS_FILE), results, out_dir)


def embed_table(model, table, cfg: PipelineConfig, use_ray: bool | None = None) -> torch.Tensor:
    """Embeddings [N, D] of every clip of a ClipTable, whole-clip or window-mean (config)."""
    window = cfg.train.crop_frames if cfg.score.embedding == "windows" else None
    n = len(table.features)
    if use_ray is None:
        use_ray = n >= RAY_EMBED_MIN_CLIPS
    if use_ray:
        from pipelines.ray_embed import embed_with_ray

        return embed_with_ray(model, table.features, cfg, window)
    return embed_clips(model, table.features, range(n), cfg.score.batch_size,
                       window=window, hop=cfg.score.window_hop)


def fit_sections(train_meta: pd.DataFrame, train_emb: torch.Tensor, cfg: PipelineConfig
                 ) -> dict[str, SectionModel]:
    """One backend per (machine, section), prototypes of both domains, gamma threshold."""
    sections: dict[str, SectionModel] = {}
    for (machine, section), rows in train_meta.groupby(["machine", "section"], sort=True):
        idx = torch.tensor(rows.index.to_numpy())
        keys = sorted(rows["attribute_class"].unique().tolist())
        class_index = torch.tensor(rows["attribute_class"].map({k: i for i, k in enumerate(keys)}).to_numpy("int64"))
        model = fit_section(train_emb[idx], class_index, class_keys=keys,
                            shrinkage=cfg.score.shrinkage, covariance=cfg.score.covariance)
        sections[section_key(machine, section)] = calibrate_threshold(
            model, train_emb[idx], cfg.score.threshold_quantile)
    return sections


def score_clips(test_meta: pd.DataFrame, test_emb: torch.Tensor,
                sections: dict[str, SectionModel]) -> pd.DataFrame:
    """Scores, decisions and nearest attribute of every test clip whose section was trained."""
    out = test_meta.copy()
    out["score"], out["decision"], out["nearest_attribute"] = np.nan, -1, None
    for (machine, section), rows in test_meta.groupby(["machine", "section"], sort=True):
        key = section_key(machine, section)
        if key not in sections:
            raise ValueError(f"test clips of {key} have no training clips to fit the scorer")
        sm = sections[key]
        scores, nearest = sm.score(test_emb[torch.tensor(rows.index.to_numpy())])
        out.loc[rows.index, "score"] = scores.numpy()
        out.loc[rows.index, "decision"] = decide(scores, sm.threshold).numpy()
        out.loc[rows.index, "nearest_attribute"] = [str(k) for k in sm.nearest_keys(nearest)]
    return out


def _score_ae(model_dir, train, test, cfg: PipelineConfig) -> tuple[pd.DataFrame, dict]:
    """The AE baseline: clip score = mean reconstruction error; one gamma threshold per machine
    type, fitted to the scores of all its training clips (every section), as the official
    baseline's 00_train.py/01_test.py."""
    from pipelines.ae import ae_scores, load_ae

    models, meta = load_ae(model_dir)
    frames = meta["ae"]["frames"]
    train_scores, test_scores = ae_scores(models, train, frames), ae_scores(models, test, frames)
    scored = test.meta.copy()
    scored["score"], scored["decision"], scored["nearest_attribute"] = test_scores.numpy(), -1, None
    for machine, rows in test.meta.groupby("machine", sort=True):
        fit_rows = train.meta.index[train.meta["machine"] == machine]
        threshold = fit_gamma_threshold(train_scores[fit_rows.to_numpy()], cfg.score.threshold_quantile)
        scored.loc[rows.index, "decision"] = decide(test_scores[rows.index.to_numpy()], threshold).numpy()
    return scored, {}


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
    if ground_truth_root is not None and (ground_truth_root / "ground_truth_data").is_dir():
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
        gt = root / "ground_truth_data" / M.ground_truth_file_name(machine, section)
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
    """Embed, fit per-section backends, score, write submissions and tables; no MLflow here."""
    from pipelines.store import load_split

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = load_meta(model_dir)
    version = cfg.features.version
    t0 = time.perf_counter()
    train = load_split(store, "train", feature_version=version)
    test = load_split(store, "test", feature_version=version)
    if test.meta.empty:
        raise ValueError(f"the feature store {store} holds no test clips to score")
    if meta.get("stage") == "ae":
        scored, sections = _score_ae(model_dir, train, test, cfg)
    elif meta.get("stage") == "knn":
        from pipelines.knn import score_knn  # nearest training clip; thresholds from the model dir

        scored, sections = score_knn(model_dir, test, cfg)
    else:
        model, _ = load_model(model_dir)
        train_emb = embed_table(model, train, cfg)
        test_emb = embed_table(model, test, cfg)
        sections = fit_sections(train.meta, train_emb, cfg)
        scored = score_clips(test.meta, test_emb, sections)
    embed_seconds = time.perf_counter() - t0
    write_submissions(scored, out_dir / "submission")
    results = labelled_results(scored, Path(ground_truth_root) if ground_truth_root else None)
    scored.to_csv(out_dir / "scores.csv", index=False)
    torch.save({k: v.state_dict() for k, v in sections.items()}, out_dir / SECTIONS_FILE)
    if meta.get("stage") not in ("ae", "knn"):  # baselines: no network to copy or register
        from pipelines.pyfunc_model import write_settings

        copy_model(model_dir, out_dir / "model")
        write_settings(cfg, out_dir)  # what predictions need to embed exactly as this job did
    elif (out_dir / "model").is_dir():  # an earlier prototype scoring here: not this job's model
        import shutil

        shutil.rmtree(out_dir / "model")
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
    if cfg.method == "ae":
        return "AE baseline"
    if cfg.method == "knn":
        return "kNN baseline"
    if not cfg.finetune.enabled:
        return "Pre-train only"
    if cfg.finetune.from_scratch or not cfg.pretrain.enabled:
        return "Fine-tune (w/o pre-train)"
    return "Fine-tune (w/ pre-train)"


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
    p.set_defaults(func=_main)


def default_model_dir(cfg: PipelineConfig) -> Path:
    for stage in ("knn",) if cfg.method == "knn" else ("finetune", "pretrain", "ae"):
        d = cfg.path(f"models/{stage}")
        if (d / "meta.json").is_file():
            return d
    raise UserError(f"no trained model under {cfg.path('models')}: run `asd train` first or pass --model")


def _main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else cfg.path("scoring")
    result = ScoringResult.load(out, cfg.data.root) if args.register_only else _score(cfg, args, out)
    if not args.no_mlflow:
        _log_to_mlflow(cfg, result, args)
    return 0


def _score(cfg: PipelineConfig, args, out: Path) -> ScoringResult:
    """Score into ``out`` and print the results: they are on disk before any MLflow call."""
    store = args.store or cfg.path(cfg.extract.store)
    require_feature_store(store, cfg.features.version)
    if not args.model and cfg.method == "knn" and not (cfg.path("models/knn") / "meta.json").is_file():
        from pipelines.knn import run_knn_stage  # nothing to train: build it from the store now

        run_knn_stage(cfg, store=store, out_dir=cfg.path("models/knn"))
    model_dir = Path(args.model) if args.model else default_model_dir(cfg)
    result = run_scoring(cfg, model_dir, store, out, ground_truth_root=cfg.data.root)
    if result.results:
        print(results_markdown(result.results, method_label(cfg)))
    print(f"submission files: {out / 'submission'}", flush=True)
    return result


def _log_to_mlflow(cfg: PipelineConfig, result: ScoringResult, args) -> None:
    """Log and register ``result``; an MLflow failure keeps the local results and says how to
    register them later."""
    from mlflow.exceptions import MlflowException

    from pipelines.registry import log_scoring

    try:
        reg = log_scoring(cfg, result)
    except (MlflowException, OSError, UserError) as err:  # OSError: requests' connection errors too
        again = shlex.join(["asd", "score", "--register-only", "--config", args.config,
                            *(x for o in args.overrides for x in ("--set", o)), "--out", str(result.out_dir)])
        raise UserError(f"MLflow logging failed ({first_line(err)}); the results stay in {result.out_dir}: "
                        f"log and register them later with `{again}`") from err
    if reg.get("model_uri"):
        print(f"registered model: {reg['model_uri']}")
