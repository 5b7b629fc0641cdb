"""``asd run`` / ``python -m pipelines.run``: the whole pipeline from one config.

[synthesise data] -> extract -> pre-train -> fine-tune -> score -> register, under one MLflow
parent run with a nested run per stage. Every stage records the digest of its inputs
(config sections + upstream digests) in ``<run_dir>/stages/<stage>.json``; a stage whose
digest is unchanged and whose output exists is skipped, so re-running after a crash resumes
instead of starting over (an interrupted training stage resumes from its last epoch
checkpoint, because its Ray Train run name is derived from the same digest).

Each stage that runs records its wall time and the peak memory of the driver and every process
it started (``peak_rss_mib``, :mod:`pipelines.monitor`) in the summary and its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from pipelines import console
from pipelines.config import PipelineConfig, add_config_arguments, load_config
from pipelines.errors import UserError
from pipelines.monitor import PeakMemory

log = logging.getLogger("asd.run")


class StageBook:
    """Per-stage records: input digest, outputs, timing. Decides what can be skipped."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def get(self, stage: str) -> dict | None:
        f = self._file(stage)
        return json.loads(f.read_text()) if f.is_file() else None

    def done(self, stage: str, digest: str, output: Path | None = None) -> bool:
        rec = self.get(stage)
        return bool(rec and rec["digest"] == digest and (output is None or output.exists()))

    def record(self, stage: str, digest: str, **info) -> None:
        self._file(stage).write_text(json.dumps({"digest": digest, "finished": time.time(), **info},
                                                indent=2, default=str))


def combine(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def ensure_data(cfg: PipelineConfig) -> Path:
    """The dev_data root; synthesises the configured preset when it does not exist yet."""
    root = Path(cfg.data.root)
    if not (root / "dev_data").is_dir():
        if not cfg.data.synth_preset:
            raise UserError(f"{root}/dev_data does not exist; set data.root to the folder holding "
                            "DCASE dev_data/ (see README: running on real DCASE 2022 data)")
        from pipelines.synth.generate import PRESETS, generate

        log.info("synthesising preset %r into %s", cfg.data.synth_preset, root)
        generate(PRESETS[cfg.data.synth_preset], root, seed=cfg.data.synth_seed,
                 eval_data=cfg.data.synth_eval)
    return root


def run_pipeline(cfg: PipelineConfig, *, force: list[str] | None = None) -> dict:
    """Run every stage that is not up to date; return a summary dict."""
    import mlflow

    from pipelines import tracking
    from pipelines.extract import extract_from_config
    from pipelines.store import manifest_digest

    force = set(force or [])
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    book = StageBook(run_dir)
    uri = tracking.setup(cfg)
    summary: dict = {"run_dir": str(run_dir), "tracking_uri": uri, "stages": {}}
    t_start = time.perf_counter()
    root = ensure_data(cfg)  # a missing data tree fails before a pipeline run is opened

    with mlflow.start_run(run_name=f"pipeline-{cfg.name}") as parent:
        mlflow.log_params(tracking.flatten(cfg.to_dict()))
        mlflow.set_tag("pipeline", cfg.name)
        summary["parent_run_id"] = parent.info.run_id

        store = cfg.path(cfg.extract.store)
        with tracking.stage_run("extract") as run:
            t0 = time.perf_counter()
            with PeakMemory() as peak:
                ex = extract_from_config(cfg, root, store)
            mlflow.log_metrics({**{k: float(v) for k, v in ex.counts().items()},
                                "clips_per_s": ex.clips_per_s, "peak_rss_mib": peak.mib})
            summary["stages"]["extract"] = {"seconds": time.perf_counter() - t0, **ex.counts(),
                                            "peak_rss_mib": peak.mib, "run_id": run.info.run_id}
        data_digest = manifest_digest(store)
        mlflow.set_tag("data_manifest_digest", data_digest)

        model_dir, upstream = _train_stages(cfg, book, store, data_digest, uri, force, summary)
        score_digest = combine(upstream, cfg.digest("score", "mlflow"))
        score_dir = cfg.path("scoring")
        if book.done("score", score_digest, score_dir / "sections.pt") and "score" not in force:
            log.info("score: up to date, skipped")
            summary["stages"]["score"] = {"skipped": True, **(book.get("score") or {})}
        else:
            from pipelines.registry import log_scoring
            from pipelines.retrain import freeze_eval_set
            from pipelines.score import method_label, results_markdown, run_scoring

            t0 = time.perf_counter()
            with PeakMemory() as peak:
                result = run_scoring(cfg, model_dir, store, score_dir, ground_truth_root=root)
            freeze_eval_set(run_dir, result.scores["path"].tolist())  # retraining compares on these
            reg = log_scoring(cfg, result, extra_metrics={"peak_rss_mib": peak.mib})
            book.record("score", score_digest, official_score=result.official_score,
                        model_version=reg.get("version"), model_uri=reg.get("model_uri"))
            summary["stages"]["score"] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak.mib,
                                          "official_score": result.official_score, **reg}
            if result.results:
                (run_dir / "results.md").write_text(results_markdown(result.results, method_label(cfg)))
        summary["seconds"] = time.perf_counter() - t_start
        mlflow.log_metric("pipeline_seconds", summary["seconds"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _train_stages(cfg, book, store, data_digest, uri, force, summary) -> tuple[Path, str]:
    """Pre-train and fine-tune (or the AE / kNN baseline); returns the final model dir and its digest."""
    import mlflow

    from pipelines import tracking

    stages = []
    if cfg.method == "ae":
        stages.append(("ae", cfg.digest("features", "ae", "train"), None))
    elif cfg.method == "knn":  # nothing to train: the training clips' statistics (pipelines/knn.py)
        stages.append(("knn", cfg.digest("features"), None))
    else:
        if cfg.pretrain.enabled:
            stages.append(("pretrain", cfg.digest("features", "model", "train", "pretrain"), None))
        if cfg.finetune.enabled:
            init = None if cfg.finetune.from_scratch or not cfg.pretrain.enabled else "pretrain"
            stages.append(("finetune", cfg.digest("features", "model", "train", "finetune"), init))
    upstream, model_dir = data_digest, None
    for stage, own, init in stages:
        digest = combine(upstream if init or stage != "finetune" else data_digest, own)
        out = cfg.path(f"models/{stage}")
        output = out / {"ae": "ae.pt", "knn": "knn.pt"}.get(stage, "model.pt")
        if book.done(stage, digest, output) and stage not in force:
            log.info("%s: up to date, skipped", stage)
            summary["stages"][stage] = {"skipped": True}
        else:
            with tracking.stage_run(stage) as run:
                tracking.log_manifest_input(store, "training", digest=data_digest)
                t0 = time.perf_counter()
                with PeakMemory() as peak:
                    if stage == "knn":
                        from pipelines.knn import run_knn_stage

                        run_knn_stage(cfg, store=store, out_dir=out)
                    elif stage == "ae":
                        from pipelines.ae import run_ae_training

                        run_ae_training(cfg, store=store, out_dir=out, mlflow_run_id=run.info.run_id,
                                        tracking_uri=uri, run_name=f"ae-{digest}")
                    else:
                        from pipelines.train import run_training

                        run_training(cfg, stage, store=store, out_dir=out,
                                     init_model=cfg.path(f"models/{init}") if init else None,
                                     mlflow_run_id=run.info.run_id, tracking_uri=uri,
                                     run_name=f"{stage}-{digest}")
                seconds = time.perf_counter() - t0
                mlflow.log_metrics({"stage_seconds": seconds, "peak_rss_mib": peak.mib})
            book.record(stage, digest, seconds=seconds, peak_rss_mib=peak.mib)
            summary["stages"][stage] = {"seconds": seconds, "peak_rss_mib": peak.mib, "run_id": run.info.run_id}
        upstream, model_dir = digest, out
    return model_dir, upstream


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline from a config",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--force", action="append", default=[],
                   choices=["pretrain", "finetune", "ae", "knn", "score"], help="re-run a stage even if up to date")
    p.set_defaults(func=main_args)


def main_args(args) -> int:
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
    uri = summary["tracking_uri"]
    ui = (f"mlflow ui --backend-store-uri {uri} --port 5000" if uri.startswith("sqlite:")
          else f"open {uri}")
    print(f"MLflow: {ui}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.run")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    sys.exit(main_args(parser.parse_args(["run", *sys.argv[1:]])))
