"""The whole pipeline on the `tiny` preset against a real MLflow server on 127.0.0.1: one command
runs every stage, a re-run skips what is up to date, and scheduled retraining extracts exactly
the clips of a data drop, registers a challenger and records its decision."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipelines.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, mlflow_server, ray_session):
    from pipelines.operations.run import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config("tiny", [f"run_dir={root / 'run'}", f"data.root={root / 'data'}",
                               f"mlflow.tracking_uri={mlflow_server}",
                               "mlflow.registered_model=asd-pipeline-test",
                               "mlflow.experiment=asd-pipeline-test"])
    summary = run_pipeline(cfg)
    return cfg, summary


def test_run_executes_every_stage(tiny_pipeline):
    cfg, summary = tiny_pipeline
    stages = summary["stages"]
    assert set(stages) == {"extract", "pretrain", "finetune", "score"}
    assert stages["extract"]["extracted"] == stages["extract"]["discovered"] > 0
    assert 0.0 < stages["score"]["official_score"] <= 1.0
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "results.md").is_file() and (run_dir / "frozen_eval_set.json").is_file()
    client = mlflow.MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.data.tags["stage"] for r in children} >= {"extract", "pretrain", "finetune", "score"}
    for r in children:  # every stage that ran logs the peak memory of its process tree
        if r.data.tags["stage"] not in stages:
            continue
        assert r.data.metrics["peak_rss_mib"] == pytest.approx(stages[r.data.tags["stage"]]["peak_rss_mib"])
        assert r.data.metrics["peak_rss_mib"] > 100  # at least the driver (torch + mlflow imported)
    assert client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion").version == "1"
    # lineage: training and scoring runs name the feature store's manifest as their dataset
    digest = parent.data.tags["data_manifest_digest"]
    contexts = {"pretrain": "training", "finetune": "training", "score": "scoring"}
    for r in children:
        if r.data.tags["stage"] in contexts:
            assert _dataset_inputs(r) == [(contexts[r.data.tags["stage"]], digest)], r.data.tags["stage"]


def _dataset_inputs(run) -> list[tuple[str, str]]:
    """(context, digest) of a run's dataset inputs."""
    return [({t.key: t.value for t in d.tags}.get("mlflow.data.context"), d.dataset.digest)
            for d in run.inputs.dataset_inputs]


def test_rerun_skips_up_to_date_stages(tiny_pipeline):
    from pipelines.operations.run import run_pipeline

    cfg, _ = tiny_pipeline
    again = run_pipeline(cfg)
    assert again["stages"]["extract"]["extracted"] == 0
    for stage in ("pretrain", "finetune", "score"):
        assert again["stages"][stage].get("skipped") is True, stage


def test_retrain_on_a_data_drop(tiny_pipeline, monkeypatch):
    from pipelines.operations import retrain as retrain_module
    from pipelines.operations.retrain import retrain
    from pipelines.synth.generate import add_drop

    cfg, _ = tiny_pipeline
    added = add_drop(Path(cfg.data.root), "target", count=2, seed=5)
    added = [p for p in added if p.endswith(".wav")]
    assert added
    # interrupted after fine-tuning (the registry fails): the next call resumes that retraining,
    # although the store already holds the new clips, and does not fine-tune again
    log_scoring = retrain_module.registry.log_scoring

    def registry_down(*args, **kwargs):
        raise RuntimeError("registry down")
    monkeypatch.setattr(retrain_module.registry, "log_scoring", registry_down)
    with pytest.raises(RuntimeError, match="registry down"):
        retrain(cfg)
    monkeypatch.setattr(retrain_module.registry, "log_scoring", log_scoring)
    out = retrain(cfg)
    assert out["stages"]["finetune"].get("skipped") is True
    assert out["new_clips"] == len(added) and out["stages"]["extract"]["extracted"] == 0
    assert str(out["version"]) == "2" and str(out["parent_version"]) == "1"
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    v2 = client.get_model_version(cfg.mlflow.registered_model, "2")
    assert v2.tags["retrain_decision"] in ("promoted", "kept_champion")
    assert v2.tags["parent_version"] == "1" and v2.tags["data_manifest_digest"]
    assert float(v2.tags["champion_official_score"]) == pytest.approx(out["champion_score"])
    challenger = client.get_model_version_by_alias(cfg.mlflow.registered_model, "challenger")
    assert challenger.version == "2"
    champion = client.get_model_version_by_alias(cfg.mlflow.registered_model, "champion")
    promoted = out["challenger_score"] >= out["champion_score"] - cfg.retrain.tolerance
    assert champion.version == ("2" if promoted else "1")
    assert v2.tags["retrain_decision"] == ("promoted" if promoted else "kept_champion")
    if promoted:
        previous = client.get_model_version_by_alias(cfg.mlflow.registered_model, "previous_champion")
        assert previous.version == "1"
    # the decision is the version's description; its run names the clips it was scored on
    text = v2.description
    assert f"{out['challenger_score']:.4f}" in text and f"{out['champion_score']:.4f}" in text
    assert ("**promoted**" if promoted else "**kept champion**") in text
    assert f"tolerance: {out['challenger_score']:.4f} >= {out['champion_score']:.4f} - " in text
    assert _dataset_inputs(client.get_run(v2.run_id)) == [("scoring", v2.tags["data_manifest_digest"])]

    # nothing new: a second retrain does nothing and registers nothing
    again = retrain(cfg)
    assert again["status"] == "nothing_to_do"
    versions = client.search_model_versions(f"name = '{cfg.mlflow.registered_model}'")
    assert len(versions) == 2


def test_retrain_lock_prevents_overlap(tiny_pipeline):
    from pipelines.locks import run_dir_lock
    from pipelines.operations.retrain import RetrainLocked, retrain, run_lock

    cfg, _ = tiny_pipeline
    with run_lock(Path(cfg.run_dir)):  # another retraining
        with pytest.raises(RetrainLocked):
            retrain(cfg)
    with run_dir_lock(Path(cfg.run_dir)):  # an `asd run`, `train` or `score` of the run directory
        with pytest.raises(RetrainLocked, match="in use by another command"):
            retrain(cfg)


def test_summary_is_json(tiny_pipeline):
    cfg, _ = tiny_pipeline
    data = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert data["parent_run_id"]


def test_predict_scores_the_real_clips(tiny_pipeline, real_audio_dir, capsys):
    """Format path only (no quality claim): the real DCASE valve clips through `asd predict` with
    the champion trained on synthetic valve data; one finite score per clip, in the order given."""
    from pipelines.cli import main

    cfg, _ = tiny_pipeline
    clips = sorted(str(p) for p in real_audio_dir.glob("*.wav"))
    rc = main(["predict", "--model", f"models:/{cfg.mlflow.registered_model}@champion",
               "--tracking-uri", cfg.mlflow.tracking_uri, "--machine", "valve", "--json", *clips])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["failed"] == 0
    assert [r["path"] for r in doc["clips"]] == clips
    assert all(r["section"] == "00" and r["decision"] in (0, 1) and r["score"] > 0 for r in doc["clips"])


def test_cli_config_error_is_one_clear_line(capsys):
    from pipelines.cli import main

    rc = main(["train", "--stage", "pretrain", "--config", "tiny", "--set", "pretrain.prototype_embedding=mean"])
    err = capsys.readouterr().err
    assert rc == 2 and "prototype_embedding" in err and "Traceback" not in err
