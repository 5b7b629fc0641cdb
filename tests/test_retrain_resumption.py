"""Retraining interrupted at a given point and resumed by the next `asd retrain`: the spectral kNN
on the tiny preset, a local Ray and MLflow on SQLite (the registry is real; only the interruption
is injected, by making one call raise at that point)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipelines.config import load_config

pytestmark = pytest.mark.slow


class Interrupted(Exception):
    """The injected interruption (a crash, a killed driver)."""


def interrupt(*args, **kwargs):
    raise Interrupted("interrupted here")


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory, ray_session):
    """`asd run` of the spectral kNN; returns the overrides that load its config."""
    from pipelines.operations.run import run_pipeline

    root = tmp_path_factory.mktemp("retrain-resumption")
    overrides = [f"run_dir={root / 'run'}", f"data.root={root / 'data'}", "method=knn",
                 "features.kind=spectrum", "knn.representation=spectrum_shape", "knn.normalisation=local",
                 "mlflow.experiment=asd-retrain-resumption", "mlflow.registered_model=asd-retrain-resumption"]
    run_pipeline(load_config("tiny", overrides))
    return overrides


def _drop(cfg, seed: int) -> list[str]:
    from pipelines.synth.generate import add_drop

    return [p for p in add_drop(Path(cfg.data.root), "target", count=1, seed=seed) if p.endswith(".wav")]


def _retraining(cfg) -> dict:
    from pipelines.operations.retrain import PENDING, RETRAINING_FILE

    return json.loads((Path(cfg.run_dir) / "retrain" / PENDING / RETRAINING_FILE).read_text())


def _versions(cfg) -> list[str]:
    return sorted((str(v.version) for v in mlflow.MlflowClient().search_model_versions(
        f"name = '{cfg.mlflow.registered_model}'")), key=int)


def test_a_resumed_retraining_reports_the_clips_extracted_before_the_interruption(knn_run, monkeypatch):
    """Interrupted after extraction (in the kNN fit): the interrupted run already names its data,
    and the resumption, which extracts nothing itself, reports and tags the clips extracted."""
    from pipelines import detectors
    from pipelines.operations.retrain import retrain
    from pipelines.store import manifest_digest

    cfg = load_config("tiny", knn_run)
    added = _drop(cfg, seed=11)
    monkeypatch.setattr(detectors.get("knn"), "fit", interrupt)
    with pytest.raises(Interrupted):
        retrain(cfg)
    retraining = _retraining(cfg)
    interrupted = mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list",
                                     filter_string=f"tags.`retrain.id` = '{retraining['id']}'")
    assert len(interrupted) == 1
    assert interrupted[0].data.tags["data_manifest_digest"] == manifest_digest(cfg.path(cfg.extract.store))

    monkeypatch.undo()
    out = retrain(cfg)
    assert out["stages"]["extract"]["extracted"] == 0  # this attempt's extraction found them present
    assert out["extracted"] == out["new_clips"] == len(added) > 0
    version = mlflow.MlflowClient().get_model_version(cfg.mlflow.registered_model, str(out["version"]))
    assert version.tags["extracted_clips"] == str(len(added)) and version.tags["retrain_id"] == retraining["id"]


def test_a_resumption_compares_with_a_champion_promoted_meanwhile(knn_run, monkeypatch, capsys):
    """Interrupted before scoring; someone promotes another version; the resumption says so in one
    line and compares with that champion, and the version names both."""
    from pipelines.operations import retrain as retrain_module
    from pipelines.serving import registry

    cfg = load_config("tiny", knn_run)
    name = cfg.mlflow.registered_model
    _drop(cfg, seed=12)
    monkeypatch.setattr(retrain_module, "run_scoring", interrupt)
    with pytest.raises(Interrupted):
        retrain_module.retrain(cfg)
    monkeypatch.undo()
    parent = str(registry.get_alias_version(name, "champion").version)
    assert _retraining(cfg)["parent_version"] == parent
    client = mlflow.MlflowClient()
    source = client.get_model_version(name, parent)
    other = str(client.create_model_version(name, source.source, run_id=source.run_id, model_id=source.model_id,
                                            tags={"official_score": "0.123456"}).version)
    registry.promote(name, other)  # by someone else, between the attempts
    capsys.readouterr()

    out = retrain_module.retrain(cfg)
    said = [line for line in capsys.readouterr().out.splitlines() if "champion is version" in line]
    assert said == [f"retrain: the champion is version {other} now, not version {parent} as when "
                    f"this retraining started; comparing with version {other}"]
    assert (out["champion_version"], out["parent_version"]) == (other, parent)
    assert out["champion_score"] == pytest.approx(0.123456) and out["status"] == "promoted"
    tags = client.get_model_version(name, str(out["version"])).tags
    assert (tags["champion_version"], tags["parent_version"]) == (other, parent)
    assert float(tags["champion_official_score"]) == pytest.approx(0.123456)
    assert str(registry.get_alias_version(name, "previous_champion").version) == other


def test_a_crash_between_promotion_and_decision_registers_no_second_version(knn_run, monkeypatch, capsys):
    """The driver dies right after moving `champion`, before decision.json: the resumption finds
    the version the interrupted attempt registered (its retrain_id tag) and registers nothing."""
    from pipelines.operations import retrain as retrain_module
    from pipelines.serving import registry

    cfg = load_config("tiny", [*knn_run, "retrain.tolerance=1.0"])  # the challenger is promoted
    name = cfg.mlflow.registered_model
    _drop(cfg, seed=13)
    parent = str(registry.get_alias_version(name, "champion").version)
    before = _versions(cfg)
    promote = registry.promote

    def promote_then_crash(*args, **kwargs):
        promote(*args, **kwargs)
        raise Interrupted("killed after promote()")
    monkeypatch.setattr(retrain_module.registry, "promote", promote_then_crash)
    with pytest.raises(Interrupted):
        retrain_module.retrain(cfg)
    monkeypatch.undo()
    registered = [v for v in _versions(cfg) if v not in before]
    assert len(registered) == 1 and str(registry.get_alias_version(name, "champion").version) == registered[0]
    capsys.readouterr()

    out = retrain_module.retrain(cfg)
    assert _versions(cfg) == [*before, *registered]
    assert str(out["version"]) == registered[0] and out["status"] == "promoted"
    assert out["champion_version"] == out["parent_version"] == parent
    assert f"version {registered[0]} was registered by the interrupted attempt" in capsys.readouterr().out
    assert str(registry.get_alias_version(name, "champion").version) == registered[0]
    assert str(registry.get_alias_version(name, "previous_champion").version) == parent
