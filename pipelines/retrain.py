"""``asd retrain``: retrain when new machine recordings arrive; promote only if not worse.

1. Take a lock (``<run_dir>/retrain.lock``) so two scheduled runs never overlap.
2. Diff the data tree against the feature-store manifest; no new clips -> "nothing to do", exit 0.
3. Extract only the new clips (the extraction is incremental).
4. Fine-tune from the current ``champion`` model (or pre-train + fine-tune from scratch when
   ``retrain.from_scratch``) on all training clips, old and new.
5. Score on the frozen evaluation set: the test clips the first pipeline run scored
   (``<run_dir>/frozen_eval_set.json``), so champion and challenger are compared on the same clips.
6. Register the new version as ``challenger``; promote it to ``champion`` only if its official
   score >= champion's - ``retrain.tolerance``. The decision, both scores, the data manifest
   digest and the parent version are tags on the new version, and the decision with both scores
   and the rule is its description; the previous champion keeps the alias ``previous_champion``
   for rollback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError
from pipelines.locks import LockBusy, exclusive_lock

log = logging.getLogger("asd.retrain")
FROZEN_EVAL_SET = "frozen_eval_set.json"


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
    from pipelines.extract import pending_clips

    return pending_clips(Path(cfg.data.root), cfg.path(cfg.extract.store), cfg.features)


def freeze_eval_set(run_dir: Path, test_paths: list[str]) -> list[str]:
    """The evaluation set of the first scoring, kept fixed for every later comparison."""
    f = Path(run_dir) / FROZEN_EVAL_SET
    if not f.is_file():
        f.write_text(json.dumps(sorted(test_paths), indent=0))
    return json.loads(f.read_text())


def champion_model_dir(name: str, dst: Path) -> tuple[Path, object]:
    """Download the champion's network (model.pt + meta.json) from the registry."""
    import mlflow

    from pipelines.registry import get_alias_version

    version = get_alias_version(name, "champion")
    if version is None:
        raise UserError(f"registered model {name!r} has no champion: run `asd run` first")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(dst)))
    found = [p.parent for p in local.rglob("model.pt") if (p.parent / "meta.json").is_file()]
    if not found:
        raise RuntimeError(f"champion {name} v{version.version} carries no model.pt + meta.json")
    return found[0], version


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


def retrain(cfg: PipelineConfig) -> dict:
    import mlflow

    from pipelines import registry, tracking
    from pipelines.extract import extract_from_config
    from pipelines.score import ScoringResult, labelled_results, run_scoring
    from pipelines.store import manifest_digest
    from pipelines.train import run_training

    run_dir = Path(cfg.run_dir)
    with run_lock(run_dir / "retrain.lock"):
        pending = new_clips(cfg)
        if not pending:
            print("retrain: nothing to do (no new clips)")
            return {"status": "nothing_to_do", "new_clips": 0}
        print(f"retrain: {len(pending)} new clip(s)")
        tracking.setup(cfg)
        name = cfg.mlflow.registered_model
        stamp = time.strftime("%Y%m%d-%H%M%S")
        work = run_dir / "retrain" / stamp
        store = cfg.path(cfg.extract.store)
        with mlflow.start_run(run_name=f"retrain-{stamp}") as parent:
            mlflow.log_params(tracking.flatten(cfg.to_dict()))
            with tracking.stage_run("extract"):
                ex = extract_from_config(cfg, store=store)
                mlflow.log_metrics({k: float(v) for k, v in ex.counts().items()})
            data_digest = manifest_digest(store)
            champion_dir, champion = champion_model_dir(name, work / "champion")
            uri = tracking.tracking_uri(cfg)
            if cfg.retrain.from_scratch:
                init = None
                if cfg.pretrain.enabled:
                    with tracking.stage_run("pretrain") as run:
                        tracking.log_manifest_input(store, "training", digest=data_digest)
                        init = run_training(cfg, "pretrain", store=store, out_dir=work / "pretrain",
                                            mlflow_run_id=run.info.run_id, tracking_uri=uri,
                                            run_name=f"retrain-pretrain-{stamp}")
            else:
                init = champion_dir
            with tracking.stage_run("finetune") as run:
                tracking.log_manifest_input(store, "training", digest=data_digest)
                model_dir = run_training(cfg, "finetune", store=store, out_dir=work / "finetune",
                                         init_model=init, mlflow_run_id=run.info.run_id,
                                         tracking_uri=uri, run_name=f"retrain-finetune-{stamp}")
            result = run_scoring(cfg, model_dir, store, work / "scoring", ground_truth_root=cfg.data.root)
            frozen = set(freeze_eval_set(run_dir, result.scores["path"].tolist()))
            on_frozen = result.scores[result.scores["path"].isin(frozen)]
            frozen_result = ScoringResult(result.scores, result.sections, labelled_results(on_frozen),
                                          result.out_dir)
            challenger_score = frozen_result.official_score
            champion_score = float(champion.tags.get("official_score", "nan"))
            promote = (challenger_score is not None and
                       not champion_score > challenger_score + cfg.retrain.tolerance)
            reg = registry.log_scoring(cfg, frozen_result)
            tags = {"retrain_decision": "promoted" if promote else "kept_champion",
                    "challenger_official_score": challenger_score,
                    "champion_official_score": champion_score,
                    "data_manifest_digest": data_digest, "parent_version": champion.version,
                    "new_clips": len(pending), "extracted_clips": ex.extracted}
            registry.set_version_tags(name, reg["version"], tags)
            registry.describe_version(name, reg["version"], decision_text(
                promote, challenger_score, champion_score, champion.version, cfg.retrain.tolerance,
                len(on_frozen), len(pending), data_digest))
            mlflow.set_tags({f"retrain.{k}": str(v) for k, v in tags.items()})
            if promote:
                registry.promote(name, reg["version"])
            summary = {"status": "promoted" if promote else "kept_champion", "version": reg["version"],
                       "parent_version": champion.version, "challenger_score": challenger_score,
                       "champion_score": champion_score, "new_clips": len(pending),
                       "extracted": ex.extracted, "run_id": parent.info.run_id}
        (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"retrain: version {summary['version']} {summary['status']} "
              f"(challenger {challenger_score}, champion {champion_score})")
        return summary


def register(subparsers) -> None:
    p = subparsers.add_parser("retrain", help="retrain on newly arrived recordings; promote if not worse",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.set_defaults(func=main_args)


def main_args(args) -> int:
    from pipelines import console

    cfg = load_config(args.config, args.overrides)
    console.log_to_file(Path(cfg.run_dir) / "logs", "retrain")
    try:
        retrain(cfg)
    except RetrainLocked as err:
        print(f"retrain: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain")
    register(parser.add_subparsers(dest="command"))
    sys.exit(main_args(parser.parse_args(["retrain", *sys.argv[1:]])))
