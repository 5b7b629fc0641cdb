"""``asd retrain``: retrain when new machine recordings arrive; promote only if not worse.

A stage list over the same runner as ``asd run`` (pipelines.operations.runner):

1. Take a lock (``<run_dir>/retrain.lock``) so two scheduled runs never overlap.
2. Diff the data tree against the feature-store manifest; no new clips (and no unfinished
   retraining to resume) -> "nothing to do", exit 0.
3. ``extract`` only the new clips (the extraction is incremental).
4. ``finetune`` from the current ``champion`` model (or the detector's stages from scratch when
   ``retrain.from_scratch``, or for a detector that learns no weights, the kNN) on all training
   clips, old and new.
5. ``challenger``: score on the frozen evaluation set (the test clips the first pipeline run
   scored, ``<run_dir>/frozen_eval_set.json``), so champion and challenger are compared on the
   same clips; register the new version as ``challenger`` and apply the promotion rule: promote
   it to ``champion`` only if its official score >= champion's - ``retrain.tolerance``. The
   decision, both scores, the data manifest digest and the parent version are tags on the new
   version, and the decision with both scores and the rule is its description; the previous
   champion keeps the alias ``previous_champion`` for rollback.

The work happens in ``<run_dir>/retrain/pending/`` with the runner's stage records, so a
retraining that was interrupted resumes there (finished stages skipped); a finished one is
kept as ``<run_dir>/retrain/<timestamp>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import mlflow

from asd.contracts import META_FILE, MODEL_FILE
from pipelines import console, detectors, tracking
from pipelines.serving import registry
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError
from pipelines.stages.extract import pending_clips
from pipelines.locks import LockBusy, exclusive_lock
from pipelines.operations.run import extract_stage, freeze_eval_set, training_stages
from pipelines.operations.runner import Stage, StageBook, StageContext, run_stages
from pipelines.stages.score import ScoringResult, labelled_results, run_scoring

log = logging.getLogger(__name__)
PENDING = "pending"  # the retraining in progress, under <run_dir>/retrain/
DECISION_FILE = "decision.json"
EXIT_LOCKED = 3


class RetrainLocked(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(path: Path):
    """One retrain per run directory (released by the kernel when the process ends)."""
    try:
        with exclusive_lock(path, "the run directory's retrain lock"):
            yield
    except LockBusy as err:
        raise RetrainLocked(f"another retrain holds {path}; not starting a second one") from err


def new_clips(cfg: PipelineConfig) -> list[str]:
    """Clips of the data tree the feature store does not hold yet: a cheap diff that decides
    whether to start at all (the extraction itself then hashes content)."""
    return pending_clips(Path(cfg.data.root), cfg.path(cfg.extract.store), cfg.features)


def champion_model_dir(name: str, dst: Path) -> tuple[Path, object]:
    """Download the champion's network (model.pt + meta.json) from the registry."""
    version = champion_version(name)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(dst)))
    found = [p.parent for p in local.rglob(MODEL_FILE) if (p.parent / META_FILE).is_file()]
    if not found:
        raise RuntimeError(f"champion {name} v{version.version} carries no {MODEL_FILE} + {META_FILE}")
    return found[0], version


def champion_version(name: str):
    version = registry.get_alias_version(name, "champion")
    if version is None:
        raise UserError(f"registered model {name!r} has no champion: run `asd run` first")
    return version


def decision_text(promoted: bool, challenger_score, champion_score, champion_version, tolerance: float,
                  eval_clips: int, new_clips: int, data_digest: str) -> str:
    """The retraining decision as a model version's description (Markdown)."""
    def fmt(score) -> str:
        return "none" if score is None or math.isnan(float(score)) else f"{float(score):.4f}"

    rule = (f"challenger >= champion - tolerance: {fmt(challenger_score)} >= {fmt(champion_score)} "
            f"- {tolerance:g}")
    verdict = (f"**promoted** to `champion` (version {champion_version} keeps `previous_champion`)"
               if promoted else f"**kept champion** version {champion_version}; this version stays "
               "`challenger`")
    return (f"Retraining decision: {verdict}.\n\n"
            f"- challenger (this version) official score: {fmt(challenger_score)}\n"
            f"- champion (version {champion_version}) official score: {fmt(champion_score)}\n"
            f"- rule: {rule} ({'met' if promoted else 'not met'}), on the frozen evaluation set "
            f"({eval_clips} clips)\n"
            f"- data: {new_clips} new clip(s), feature-store manifest {data_digest}")


def promotes(challenger_score: float | None, champion_score: float, tolerance: float) -> bool:
    """The promotion rule: challenger >= champion - tolerance (a missing champion score never
    blocks; a challenger without a score never wins)."""
    return challenger_score is not None and not champion_score > challenger_score + tolerance


# ----------------------------------------------------------------------------- the stages
def challenger_stage(cfg: PipelineConfig, model_stage: Stage, store: Path, work: Path, new: int) -> Stage:
    """Score the new model on the frozen evaluation set, register it, apply the promotion rule."""
    name = cfg.mlflow.registered_model

    def run(ctx: StageContext) -> dict:
        data_digest = ctx.earlier["extract"]["output_digest"]
        result = run_scoring(cfg, model_stage.output, store, work / "scoring", ground_truth_root=cfg.data.root)
        frozen = set(freeze_eval_set(Path(cfg.run_dir), result.scores["path"].tolist()))
        on_frozen = result.scores[result.scores["path"].isin(frozen)]
        frozen_result = ScoringResult(result.scores, result.sections, labelled_results(on_frozen), result.out_dir)
        champion = champion_version(name)
        challenger_score = frozen_result.official_score
        champion_score = float(champion.tags.get("official_score", "nan"))
        promote = promotes(challenger_score, champion_score, cfg.retrain.tolerance)
        reg = registry.log_scoring(cfg, frozen_result)
        tags = {"retrain_decision": "promoted" if promote else "kept_champion",
                "challenger_official_score": challenger_score, "champion_official_score": champion_score,
                "data_manifest_digest": data_digest, "parent_version": champion.version,
                "new_clips": new, "extracted_clips": ctx.earlier["extract"].get("extracted", 0)}
        registry.set_version_tags(name, reg["version"], tags)
        registry.describe_version(name, reg["version"], decision_text(
            promote, challenger_score, champion_score, champion.version, cfg.retrain.tolerance,
            len(on_frozen), new, data_digest))
        mlflow.set_tags({f"retrain.{k}": str(v) for k, v in tags.items()})
        if promote:
            registry.promote(name, reg["version"])
        decision = {"status": "promoted" if promote else "kept_champion", "version": reg["version"],
                    "parent_version": champion.version, "challenger_score": challenger_score,
                    "champion_score": champion_score}
        (work / "scoring" / DECISION_FILE).write_text(json.dumps(decision, default=str))
        return {**decision, "run_id": reg["run_id"]}
    return Stage("challenger", run, inputs=(model_stage.name,), fingerprint=cfg.digest("score", "retrain", "mlflow"),
                 output=work / "scoring", done_file=DECISION_FILE, mlflow_run=False)


def retrain_stages(cfg: PipelineConfig, work: Path, store: Path, tracking_uri: str, new: int) -> list[Stage]:
    detector = detectors.get(cfg.method)
    if cfg.retrain.from_scratch or not detector.retrains_from_champion:
        training = training_stages(cfg, detector, store, tracking_uri, model_root=work, run_prefix="retrain-")
    else:  # the last stage only, from the champion's weights
        last = detector.stages(cfg)[-1].name
        champion_dir, _ = champion_model_dir(cfg.mlflow.registered_model, work / "champion")
        training = training_stages(cfg, detector, store, tracking_uri, model_root=work,
                                   init_model=champion_dir, names=[last], run_prefix="retrain-")
    return [extract_stage(cfg, Path(cfg.data.root), store), *training,
            challenger_stage(cfg, training[-1], store, work, new)]


def retrain(cfg: PipelineConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir / "retrain.lock"):
        work = run_dir / "retrain" / PENDING
        pending = new_clips(cfg)
        if not pending and not work.is_dir():
            print("retrain: nothing to do (no new clips)")
            return {"status": "nothing_to_do", "new_clips": 0}
        work.mkdir(parents=True, exist_ok=True)
        started = work / "new_clips.json"  # a resumed retraining reports the clips that started it
        if not started.is_file():
            started.write_text(json.dumps(len(pending)))
        new = json.loads(started.read_text())
        print(f"retrain: {new} new clip(s)" + ("" if pending else " (resuming an interrupted retraining)"))
        uri = tracking.setup(cfg)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        store = cfg.path(cfg.extract.store)
        with mlflow.start_run(run_name=f"retrain-{stamp}") as parent:
            mlflow.log_params(tracking.flatten(cfg.to_dict()))
            stages = run_stages(retrain_stages(cfg, work, store, uri, new), StageBook(work))
            summary = {**stages["challenger"], "new_clips": new, "extracted": stages["extract"].get("extracted", 0),
                       "run_id": parent.info.run_id, "stages": stages}
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        work.rename(run_dir / "retrain" / stamp)
        print(f"retrain: version {summary['version']} {summary['status']} "
              f"(challenger {summary['challenger_score']}, champion {summary['champion_score']})")
        return summary


def register(subparsers) -> None:
    p = subparsers.add_parser("retrain", help="retrain on newly arrived recordings; promote if not worse",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    console.log_to_file(Path(cfg.run_dir) / "logs", "retrain")
    try:
        retrain(cfg)
    except RetrainLocked as err:
        print(f"retrain: {err}", file=sys.stderr)
        return EXIT_LOCKED
    return 0


