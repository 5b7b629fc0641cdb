"""``asd retrain``: retrain when new machine recordings arrive; promote only if not worse.

A stage list over the same runner as ``asd run`` (pipelines.operations.runner):

1. Take the run directory's lock (``<run_dir>/run.lock``) so two scheduled runs never overlap,
   nor a retraining and an ``asd run``, ``train`` or ``score`` of the same run directory.
2. Diff the data tree against the feature-store manifest; no new clips (and no unfinished
   retraining to resume) -> "nothing to do", exit 0.
3. ``extract`` only the new clips (the extraction is incremental).
4. ``finetune`` from the ``champion`` model of the retraining's start (or the detector's stages
   from scratch when ``retrain.from_scratch``, or for a detector that learns no weights, the kNN)
   on all training clips, old and new.
5. ``challenger``: score on the frozen evaluation set (the test clips the first pipeline run
   scored, ``<run_dir>/frozen_eval_set.json``), so champion and challenger are compared on the
   same clips; register the new version as ``challenger`` and apply the promotion rule: promote
   it to ``champion`` only if its official score >= champion's - ``retrain.tolerance``. The
   decision, both scores, the data manifest digest, the parent version and the champion compared
   with are tags on the new version, and the decision with both scores and the rule is its
   description; the previous champion keeps the alias ``previous_champion`` for rollback.

The work happens in ``<run_dir>/retrain/pending/`` with the runner's stage records, so a
retraining that was interrupted resumes there (finished stages skipped); a finished one is
kept as ``<run_dir>/retrain/<timestamp>/``. ``pending/retraining.json`` holds what a resumption
must know of the attempts before it (docs/reliability.md, retraining resumption): the
retraining's id (tagged on the version it registers, which a resumption finds instead of
registering again), its new clips (those that arrive before a resumption are added) and the
champion it started from. A resumption compares with the registry's champion of the moment: when
someone promoted another version in between, it says so in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import mlflow

from asd.contracts import META_FILE, MODEL_FILE
from pipelines import console, detectors, tracking
from pipelines.serving import registry
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError
from pipelines.stages.extract import pending_clips
from pipelines.locks import LockBusy, run_dir_lock
from pipelines.operations.run import extract_stage, freeze_eval_set, training_stages
from pipelines.operations.runner import Stage, StageBook, StageContext, run_stages
from pipelines.stages.score import ScoringResult, labelled_results, run_scoring
from pipelines.store import read_manifest, version_dir

log = logging.getLogger(__name__)
PENDING = "pending"  # the retraining in progress, under <run_dir>/retrain/
DECISION_FILE = "decision.json"
RETRAINING_FILE = "retraining.json"  # the retraining in pending/, across its attempts
RETRAIN_ID_TAG = "retrain_id"  # on the version a retraining registered
EXIT_LOCKED = 3


class RetrainLocked(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """The run directory's lock, shared with ``asd run``, ``train`` and ``score`` (released by
    the kernel when the process ends)."""
    held = contextlib.ExitStack()
    try:  # only a busy run directory is RetrainLocked, not a busy store met later
        held.enter_context(run_dir_lock(run_dir))
    except LockBusy as err:
        raise RetrainLocked(f"{err}; not starting a retraining") from err
    with held:
        yield


def new_clips(cfg: PipelineConfig) -> list[str]:
    """Clips of the data tree the feature store does not hold yet: a cheap diff that decides
    whether to start at all (the extraction itself then hashes content)."""
    return pending_clips(Path(cfg.data.root), cfg.path(cfg.extract.store), cfg.features)


def model_dir_of(name: str, version: str, dst: Path) -> Path:
    """Download a registered version's network (model.pt + meta.json)."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    found = [p.parent for p in local.rglob(MODEL_FILE) if (p.parent / META_FILE).is_file()]
    if not found:
        raise RuntimeError(f"{name} v{version} carries no {MODEL_FILE} + {META_FILE}")
    return found[0]


def champion_version(name: str):
    version = registry.get_alias_version(name, "champion")
    if version is None:
        raise UserError(f"registered model {name!r} has no champion: run `asd run` first")
    return version


def start_or_resume(work: Path, pending: list[str], name: str) -> dict:
    """The retraining in ``work``: ``id``, ``clips`` (its new clips) and ``parent_version`` (the
    champion when it started), written when it starts and read by every resumption, which adds
    the clips that arrived since."""
    path = work / RETRAINING_FILE
    if path.is_file():
        retraining = json.loads(path.read_text())
        retraining["clips"] = sorted(set(retraining["clips"]) | set(pending))
    else:
        retraining = {"id": uuid.uuid4().hex, "clips": sorted(pending),
                      "parent_version": str(champion_version(name).version)}
    work.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(retraining))
    os.replace(part, path)
    return retraining


def extracted_clips(store: Path, cfg: PipelineConfig, clips: list[str]) -> int:
    """How many of the retraining's ``clips`` the feature store holds: those its attempts extracted,
    an interrupted one's included (an extraction counts only what it did itself)."""
    held = set(read_manifest(version_dir(store, cfg.features.version))["path"])
    return sum(clip in held for clip in clips)


def register_once(cfg: PipelineConfig, result: ScoringResult, retraining: dict) -> tuple[str, str]:
    """(version, run id) of the retraining's model: the version an interrupted attempt registered,
    found by its ``retrain_id`` tag (set in the call that creates the version), else a new one."""
    name = cfg.mlflow.registered_model
    found = registry.client().search_model_versions(
        f"name = '{name}' and tags.{RETRAIN_ID_TAG} = '{retraining['id']}'")
    if found:
        print(f"retrain: version {found[0].version} was registered by the interrupted attempt; not registering again")
        registry.set_alias(name, registry.CHALLENGER, found[0].version)  # the attempt may have stopped before it
        return str(found[0].version), found[0].run_id
    reg = registry.log_scoring(cfg, result, version_tags={RETRAIN_ID_TAG: retraining["id"],
                                                          "parent_version": retraining["parent_version"]})
    return str(reg["version"]), reg["run_id"]


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


def registry_unavailable(work: Path, outage: str) -> tracking.TrackingUnavailable:
    """The one line for a retraining that cannot reach the registry to decide: what failed, and
    that the work done stays for the next attempt."""
    return tracking.TrackingUnavailable(
        f"MLflow failed ({outage}); the retraining's finished stages are kept in {work}: run `asd retrain` "
        "again once MLflow answers, it resumes at the challenger")


# ----------------------------------------------------------------------------- the stages
def challenger_stage(cfg: PipelineConfig, model_stage: Stage, store: Path, work: Path, retraining: dict) -> Stage:
    """Score the new model on the frozen evaluation set, register it (once per retraining), and
    apply the promotion rule against the registry's champion of the moment."""
    name = cfg.mlflow.registered_model

    def run(ctx: StageContext) -> dict:
        data_digest = ctx.earlier["extract"]["output_digest"]
        result = run_scoring(cfg, model_stage.output, store, work / "scoring", ground_truth_root=cfg.data.root)
        frozen = set(freeze_eval_set(Path(cfg.run_dir), result.scores["path"].tolist()))
        on_frozen = result.scores[result.scores["path"].isin(frozen)]
        frozen_result = ScoringResult(result.scores, result.sections, labelled_results(on_frozen), result.out_dir)
        if (earlier := tracking.outage()) is not None:  # a stage went on without MLflow; the decision needs it
            raise registry_unavailable(work, earlier)
        try:
            return decide(frozen_result, on_frozen, data_digest)
        except tracking.MLFLOW_ERRORS as err:
            raise registry_unavailable(work, tracking.record_outage("deciding on the challenger", err)) from err

    def decide(frozen_result: ScoringResult, on_frozen, data_digest: str) -> dict:
        challenger_score = frozen_result.official_score
        version, run_id = register_once(cfg, frozen_result, retraining)
        champion = champion_version(name)
        if str(champion.version) == version:  # promoted by the interrupted attempt: its decision stands
            compared = champion.tags["champion_version"]
            champion_score = float(champion.tags["champion_official_score"])
            promote = True
        else:
            compared, champion_score = str(champion.version), float(champion.tags.get("official_score", "nan"))
            if compared != retraining["parent_version"]:
                print(f"retrain: the champion is version {compared} now, not version {retraining['parent_version']} "
                      f"as when this retraining started; comparing with version {compared}")
            promote = promotes(challenger_score, champion_score, cfg.retrain.tolerance)
        tags = {"retrain_decision": "promoted" if promote else "kept_champion",
                "challenger_official_score": challenger_score, "champion_official_score": champion_score,
                "champion_version": compared, "data_manifest_digest": data_digest,
                "parent_version": retraining["parent_version"], "new_clips": len(retraining["clips"]),
                "extracted_clips": extracted_clips(store, cfg, retraining["clips"])}
        registry.set_version_tags(name, version, tags)
        registry.describe_version(name, version, decision_text(
            promote, challenger_score, champion_score, compared, cfg.retrain.tolerance,
            len(on_frozen), len(retraining["clips"]), data_digest))
        mlflow.set_tags({f"retrain.{k}": str(v) for k, v in tags.items()})
        if promote:
            registry.promote(name, version)
        decision = {"status": tags["retrain_decision"], "version": version, "champion_version": compared,
                    "parent_version": retraining["parent_version"], "challenger_score": challenger_score,
                    "champion_score": champion_score}
        (work / "scoring" / DECISION_FILE).write_text(json.dumps(decision, default=str))
        return {**decision, "run_id": run_id}
    return Stage("challenger", run, inputs=(model_stage.name,), fingerprint=cfg.digest("score", "retrain", "mlflow"),
                 output=work / "scoring", done_file=DECISION_FILE, mlflow_run=False)


def retrain_stages(cfg: PipelineConfig, work: Path, store: Path, tracking_uri: str, retraining: dict) -> list[Stage]:
    detector = detectors.get(cfg.method)
    if cfg.retrain.from_scratch or not detector.retrains_from_champion:
        training = training_stages(cfg, detector, store, tracking_uri, model_root=work, run_prefix="retrain-")
    else:  # the last stage only, from the weights of the champion the retraining started from
        last = detector.stages(cfg)[-1].name
        parent_dir = model_dir_of(cfg.mlflow.registered_model, retraining["parent_version"], work / "champion")
        training = training_stages(cfg, detector, store, tracking_uri, model_root=work,
                                   init_model=parent_dir, names=[last], run_prefix="retrain-")
    return [extract_stage(cfg, Path(cfg.data.root), store), *training,
            challenger_stage(cfg, training[-1], store, work, retraining)]


def retrain(cfg: PipelineConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir):
        work = run_dir / "retrain" / PENDING
        pending = new_clips(cfg)
        if not pending and not work.is_dir():
            print("retrain: nothing to do (no new clips)")
            return {"status": "nothing_to_do", "new_clips": 0}
        resumed = work.is_dir()
        uri = tracking.setup(cfg)
        retraining = start_or_resume(work, pending, cfg.mlflow.registered_model)
        new = len(retraining["clips"])
        print(f"retrain: {new} new clip(s)" + (" (resuming an interrupted retraining)" if resumed else ""))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        store = cfg.path(cfg.extract.store)
        with tracking.tolerant_run(f"retrain-{stamp}", params=cfg.to_dict(), tags={
                "retrain.id": retraining["id"], "retrain.parent_version": retraining["parent_version"]}) as parent_id:
            stages = run_stages(retrain_stages(cfg, work, store, uri, retraining), StageBook(work))
            summary = {**stages["challenger"], "new_clips": new,
                       "extracted": extracted_clips(store, cfg, retraining["clips"]),
                       "run_id": parent_id, "stages": stages}
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


