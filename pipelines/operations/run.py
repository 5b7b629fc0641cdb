"""``asd run``: the whole pipeline from one config, as a list of stages (pipelines.operations.runner).

[synthesise data] -> extract -> pre-train -> fine-tune -> score -> register, under one MLflow
parent run with a nested run per stage. Every stage records the digest of its inputs
(config sections + upstream digests) in ``<run_dir>/stages/<stage>.json``; a stage whose
digest is unchanged and whose output exists is skipped, so re-running after a crash resumes
instead of starting over (an interrupted training stage resumes from its last epoch
checkpoint, because its Ray Train run name is derived from the same digest). One ``asd run``
per run directory at a time (``<run_dir>/run.lock``, an ``flock``, shared with ``asd train``,
``asd score`` and ``asd retrain``): a second one stops at once.

Each stage that runs records its wall time and the peak memory of the driver and every process
it started (``peak_rss_mib``, :mod:`pipelines.monitor`) in the summary and its MLflow run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import mlflow

from asd.contracts import DEV_DATA, SECTIONS_FILE
from pipelines import console, detectors, tracking
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.detectors.base import Detector
from pipelines.errors import UserError
from pipelines.locks import run_dir_lock
from pipelines.stages.extract import extract_from_config
from pipelines.operations.runner import Stage, StageBook, StageContext, run_stages
from pipelines.serving.registry import log_scoring
from pipelines.stages.score import register_only_command, results_markdown, run_scoring
from pipelines.store import manifest_digest
from pipelines.synth.generate import PRESETS, check_generation_record, generate

log = logging.getLogger(__name__)
FROZEN_EVAL_SET = "frozen_eval_set.json"
DATA_DIGEST_TAG = "data_manifest_digest"  # the feature-store manifest a run used (pipelines.store)


def ensure_data(cfg: PipelineConfig) -> Path:
    """The dev_data root; synthesises the configured preset when it does not exist yet."""
    root = Path(cfg.data.root)
    if not cfg.data.synth_preset:
        if not (root / DEV_DATA).is_dir():
            raise UserError(f"{root}/{DEV_DATA} does not exist; set data.root to the folder holding "
                            f"DCASE {DEV_DATA}/ (see README: running on real DCASE 2022 data)")
        return root
    preset = PRESETS[cfg.data.synth_preset]
    try:  # a tree the generator made with other settings is not the configured preset
        check_generation_record(root, preset, cfg.data.synth_seed)
        if not (root / DEV_DATA).is_dir():
            log.info("synthesising preset %r into %s", cfg.data.synth_preset, root)
            generate(preset, root, seed=cfg.data.synth_seed, eval_data=cfg.data.synth_eval)
    except ValueError as err:
        raise UserError(str(err)) from None
    return root


def freeze_eval_set(run_dir: Path, test_paths: list[str]) -> list[str]:
    """The evaluation set of the first scoring, kept fixed for every later comparison (retraining)."""
    f = Path(run_dir) / FROZEN_EVAL_SET
    if not f.is_file():
        f.write_text(json.dumps(sorted(test_paths), indent=0))
    return json.loads(f.read_text())


# ----------------------------------------------------------------------------- the stages
def extract_stage(cfg: PipelineConfig, root: Path, store: Path) -> Stage:
    """Extraction (incremental by itself: always runs); its digest is the manifest's."""
    def run(ctx: StageContext) -> dict:
        ex = extract_from_config(cfg, root, store)
        digest = manifest_digest(store)
        if ctx.mlflow_run_id:  # None: MLflow is down (pipelines.tracking.best_effort)
            tracking.best_effort("logging the extraction's counts", mlflow.log_metrics,
                                 {**{k: float(v) for k, v in ex.counts().items()}, "clips_per_s": ex.clips_per_s},
                                 run_id=ctx.mlflow_run_id)
            parent = tracking.best_effort("finding the pipeline's MLflow run", mlflow.get_parent_run,
                                          ctx.mlflow_run_id)
            if parent:  # the pipeline's run names its data now: a run interrupted later carries it too
                tracking.best_effort("tagging the pipeline's MLflow run with its data",
                                     mlflow.MlflowClient().set_tag, parent.info.run_id, DATA_DIGEST_TAG, digest)
        return {**ex.counts(), "clips_per_s": ex.clips_per_s, "output_digest": digest}
    return Stage("extract", run)


def training_stages(cfg: PipelineConfig, detector: Detector, store: Path, tracking_uri: str, *,
                    model_root: Path | None = None, init_model: Path | None = None,
                    names: list[str] | None = None, run_prefix: str = "") -> list[Stage]:
    """The detector's training stages, each fed by the stage it starts from (or by extraction).

    ``model_root``: where the models go (default ``<run_dir>/models``); ``init_model``: the model
    the first stage starts from instead (retraining from the champion); ``names``: only these;
    ``run_prefix``: of the Ray Train run names (a run of the same name resumes its checkpoints)."""
    stages, dirs = [], {}
    for ts in detector.stages(cfg):
        out = (model_root / ts.name) if model_root else detector.model_dir(cfg, ts.name)
        dirs[ts.name] = out
        if names is not None and ts.name not in names:
            continue
        init = dirs[ts.init] if ts.init and names is None else init_model

        def run(ctx: StageContext, stage=ts.name, out=out, init=init) -> dict:
            tracking.log_manifest_input(store, "training", digest=ctx.earlier["extract"]["output_digest"])
            detector.fit(cfg, stage, store=store, out_dir=out, init_model=init, mlflow_run_id=ctx.mlflow_run_id,
                         tracking_uri=tracking_uri, run_name=f"{run_prefix}{stage}-{ctx.digest}")
            return {"model_dir": str(out)}
        inputs = (ts.init,) if ts.init and names is None else ("extract",)
        stages.append(Stage(ts.name, run, inputs=inputs, fingerprint=cfg.digest(*ts.sections),
                            output=out, done_file=detector.weights_file))
    return stages


def score_stage(cfg: PipelineConfig, model_stage: Stage, store: Path, root: Path) -> Stage:
    """Scoring and registration of ``model_stage``'s model (logs its own MLflow run); the clips it
    scores the first time become the frozen evaluation set of retraining."""
    score_dir = cfg.path("scoring")

    def run(ctx: StageContext) -> dict:
        result = run_scoring(cfg, model_stage.output, store, score_dir, ground_truth_root=root)
        freeze_eval_set(Path(cfg.run_dir), result.scores["path"].tolist())
        if result.results:
            (Path(cfg.run_dir) / "results.md").write_text(
                results_markdown(result.results, detectors.get(cfg.method).label(cfg)))
        # None when MLflow is down: the results are on disk for `asd score --register-only`
        reg = tracking.best_effort("logging and registering the scoring results", log_scoring, cfg, result)
        return {"official_score": result.official_score, **(reg or {})}
    return Stage("score", run, inputs=(model_stage.name,), fingerprint=cfg.digest("score", "mlflow"),
                 output=score_dir, done_file=SECTIONS_FILE, mlflow_run=False)


# ----------------------------------------------------------------------------- the pipeline
def pipeline_stages(cfg: PipelineConfig, root: Path, tracking_uri: str) -> list[Stage]:
    store = cfg.path(cfg.extract.store)
    training = training_stages(cfg, detectors.get(cfg.method), store, tracking_uri)
    return [extract_stage(cfg, root, store), *training, score_stage(cfg, training[-1], store, root)]


def run_pipeline(cfg: PipelineConfig, *, force: list[str] | None = None) -> dict:
    """Run every stage that is not up to date; return a summary dict."""
    names = ["extract", *(s.name for s in detectors.get(cfg.method).stages(cfg)), "score"]
    unknown = set(force or ()) - set(names)
    if unknown:  # before anything starts
        raise UserError(f"--force {', '.join(sorted(unknown))}: no such stage in this pipeline "
                        f"(stages: {', '.join(names)})")
    run_dir = Path(cfg.run_dir)
    with run_dir_lock(run_dir):  # two runs would train into and score from the same folders
        return _run_pipeline_locked(cfg, run_dir, force or [])


def _run_pipeline_locked(cfg: PipelineConfig, run_dir: Path, force: list[str]) -> dict:
    uri = tracking.setup(cfg)
    summary: dict = {"run_dir": str(run_dir), "tracking_uri": uri}
    t_start = time.perf_counter()
    root = ensure_data(cfg)  # a missing data tree fails before a pipeline run is opened
    stages = pipeline_stages(cfg, root, uri)
    with tracking.tolerant_run(f"pipeline-{cfg.name}", tags={"pipeline": cfg.name}, params=cfg.to_dict()) as parent:
        summary["parent_run_id"] = parent
        summary["stages"] = run_stages(stages, StageBook(run_dir), force=force)
        summary["seconds"] = time.perf_counter() - t_start
        if parent:
            tracking.best_effort("logging the pipeline's time", mlflow.log_metric, "pipeline_seconds",
                                 summary["seconds"], run_id=parent)
    summary["mlflow_outage"] = tracking.outage()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline from a config",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run a stage even if up to date (extract, a training stage such as pretrain, "
                        "finetune, ae, knn, or score)")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    console.log_to_file(Path(cfg.run_dir) / "logs", "run")
    summary = run_pipeline(cfg, force=args.force)
    results = Path(cfg.run_dir) / "results.md"
    if results.is_file():  # the Table 1 row here; every section in the file
        print(results.read_text().split("## Per section")[0].rstrip() + f"\n\nper section: {results}\n")
    for stage, info in summary["stages"].items():
        print(f"  {stage:<9} " + ("up to date, skipped" if info.get("skipped") else
                                  f"{info['seconds']:7.1f} s, peak memory {info['peak_rss_mib']:,.0f} MiB"
                                  " (driver + Ray processes)"))
    print(f"pipeline '{cfg.name}' finished in {summary['seconds']:.0f} s; outputs in {cfg.run_dir}/")
    score = summary["stages"].get("score", {})
    if score.get("model_uri"):
        print(f"registered model: {score['model_uri']} (version {score.get('version')})")
    if summary["mlflow_outage"]:  # warned once when it happened; here what to do about it
        unlogged = "score" in summary["stages"] and not score.get("skipped") and not score.get("run_id")
        print(f"MLflow: not logged from {summary['mlflow_outage']}" + (
            f"; log and register the results later with `{register_only_command(args, cfg.path('scoring'))}`"
            if unlogged else ""))
        return 0
    uri = summary["tracking_uri"]
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000" if uri.startswith("sqlite:")
          else f"open {uri}")
    print(f"MLflow: {ui}")
    return 0


