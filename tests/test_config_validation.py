"""The validated configuration (pipelines/config.py), the CLI's one-line user errors
(pipelines/cli.py) and the pipeline's behaviour when the MLflow tracking server is down
(pipelines/tracking.py, ``asd score``). Every test here is fast: nothing starts Ray or a server."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import typing
from pathlib import Path

import pandas as pd
import pytest
import torch

from asd.features import FeatureConfig
from asd.model import ModelConfig
from pipelines.config import (CONFIG_DIR, FEATURE_RULES, MODEL_RULES, ConfigError, PipelineConfig, from_dict,
                              load_config)

CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _error(overrides: list[str], config: str | None = "tiny") -> str:
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- good configs
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg.features, FeatureConfig) and isinstance(cfg.model, ModelConfig)
    assert from_dict(PipelineConfig, cfg.to_dict()) == cfg  # what Ray workers and checkpoints rebuild


def test_defaults_are_valid_and_dataclass_helpers_work():
    cfg = PipelineConfig()
    assert load_config(None) == cfg
    assert dataclasses.asdict(cfg)["features"]["kind"] == "inverted_logmel"
    assert len(cfg.digest("features")) == 16 and cfg.digest() == load_config(None).digest()
    assert dataclasses.replace(cfg.score, embedding="whole").embedding == "whole"
    with pytest.raises(ValueError):  # replace() constructs, and construction validates
        dataclasses.replace(cfg.pretrain, lr=-1.0)


def test_every_asd_field_has_a_rule():
    """features and model are dataclasses of asd/ (no pydantic there): their ranges live in
    pipelines/config.py, and a new field must get one."""
    assert set(FEATURE_RULES) == {f.name for f in dataclasses.fields(FeatureConfig)}
    assert set(MODEL_RULES) == {f.name for f in dataclasses.fields(ModelConfig)}


def test_zero_epochs_is_the_untrained_reference():
    assert load_config("demo", ["pretrain.enabled=true", "pretrain.epochs=0"]).pretrain.epochs == 0


# ----------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("override, key, words", [
    ("pretrain.lr=-0.1", "pretrain.lr", "must be > 0 (got -0.1)"),
    ("finetune.lr=0", "finetune.lr", "must be > 0"),
    ("pretrain.lr=.inf", "pretrain.lr", "finite"),
    ("pretrain.momentum=1.0", "pretrain.momentum", "must be < 1"),
    ("finetune.momentum=-0.1", "finetune.momentum", "must be >= 0"),
    ("pretrain.weight_decay=-1e-4", "pretrain.weight_decay", "must be >= 0"),
    ("pretrain.tau=0", "pretrain.tau", "must be > 0"),
    ("finetune.tau=-1", "finetune.tau", "must be > 0"),
    ("pretrain.lr_gamma=0", "pretrain.lr_gamma", "must be > 0"),
    ("pretrain.epochs=-1", "pretrain.epochs", "must be >= 0"),
    ("ae.epochs=0", "ae.epochs", "must be >= 1"),
    ("pretrain.batch_size=0", "pretrain.batch_size", "must be >= 1"),
    ("score.batch_size=0", "score.batch_size", "must be >= 1"),
    ("ae.batch_size=0", "ae.batch_size", "must be >= 1"),
    ("extract.batch_size=0", "extract.batch_size", "must be >= 1"),
    ("train.num_workers=0", "train.num_workers", "must be >= 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker", "must be > 0"),
    ("train.threads_per_worker=0", "train.threads_per_worker", "must be >= 1"),
    ("ray.num_cpus=0", "ray.num_cpus", "must be >= 1"),
    ("pretrain.min_steps=0", "pretrain.min_steps", "must be >= 1"),
    ("finetune.min_steps=-5", "finetune.min_steps", "must be >= 1"),
    ("finetune.k=0", "finetune.k", "must be >= 1"),
    ("pretrain.mpe_ratio=0", "pretrain.mpe_ratio", "must be > 0"),
    ("pretrain.mpe_ratio=1.5", "pretrain.mpe_ratio", "must be <= 1"),
    ("score.threshold_quantile=1", "score.threshold_quantile", "must be < 1"),
    ("score.threshold_quantile=0", "score.threshold_quantile", "must be > 0"),
    ("ae.validation_split=1", "ae.validation_split", "must be < 1"),
    ("finetune.npe_lambda=[0.5, 1.5]", "finetune.npe_lambda[1]", "must be <= 1"),
    ("finetune.npe_lambda=[0.6, 0.5]", "finetune.npe_lambda", "lo <= hi"),
    ("finetune.npe_lambda=[0.5]", "finetune.npe_lambda", "at least 2"),
    ("score.shrinkage=1.5", "score.shrinkage", "[0, 1] or 'ledoit-wolf'"),
    ("score.shrinkage=lw", "score.shrinkage", "[0, 1] or 'ledoit-wolf'"),
    ("pretrain.lr_milestones=[3, 2]", "pretrain.lr_milestones", "strictly increasing"),
    ("finetune.lr_milestones=[0]", "finetune.lr_milestones[0]", "must be >= 1"),
    ("features.n_mels=0", "features.n_mels", "must be >= 1"),
    ("features.log_floor=0", "features.log_floor", "must be > 0"),
    ("model.blocks=[2, 0]", "model.blocks[1]", "must be >= 1"),
    ("model.blocks=[]", "model.blocks", "at least 1"),
    ("train.max_failures=-2", "train.max_failures", "must be >= -1"),
    ("retrain.tolerance=-0.1", "retrain.tolerance", "must be >= 0"),
    ("data.synth_seed=-1", "data.synth_seed", "must be >= 0"),
])
def test_out_of_range_values_are_one_line_naming_the_key(override, key, words):
    message = _error([override])
    assert message.startswith(f"{key}: ") and words in message


@pytest.mark.parametrize("value", ["0", "0.35", "1", "ledoit-wolf"])
def test_shrinkage_accepts_a_ratio_or_ledoit_wolf(value):
    assert load_config("tiny", [f"score.shrinkage={value}"]).score.shrinkage in (0.0, 0.35, 1.0, "ledoit-wolf")


@pytest.mark.parametrize("override, key", [
    ("pretrain.epochs='3'", "pretrain.epochs"),  # a YAML string is not an int
    ("pretrain.epochs=3.0", "pretrain.epochs"),
    ("train.use_gpu=1", "train.use_gpu"),
    ("pretrain.lr=fast", "pretrain.lr"),
    ("pretrain.lr_milestones=5", "pretrain.lr_milestones"),
    ("pretrain=3", "pretrain"),
])
def test_types_are_strict(override, key):
    assert _error([override]).startswith(f"{key}: ")


# ----------------------------------------------------------------------------- enumerations
@pytest.mark.parametrize("override, key", [
    ("method=kNN-cosine", "method"),
    ("pretrain.prototype_embedding=mean", "pretrain.prototype_embedding"),
    ("score.embedding=frames", "score.embedding"),
    ("score.covariance=full", "score.covariance"),
    ("train.data_loading=s3", "train.data_loading"),
    ("extract.dtype=float64", "extract.dtype"),
    ("features.kind=mfcc", "features.kind"),
    ("features.resample=sinc", "features.resample"),
    ("features.channels=left", "features.channels"),
    ("model.stem=wide", "model.stem"),
    ("data.synth_preset=huge", "data.synth_preset"),
])
def test_enumerated_options_list_the_choices(override, key):
    message = _error([override])
    assert message.startswith(f"{key}: must be one of ")


@pytest.mark.parametrize("override, key, known", [
    ("pretrain.lrr=0.1", "pretrain.lrr", "lr_milestones"), ("features.nmels=64", "features.nmels", "n_mels"),
    ("model.depth=3", "model.depth", "blocks"), ("trian.seed=1", "trian", "train"),
])
def test_unknown_keys_are_rejected_with_the_known_ones(override, key, known):
    message = _error([override])
    assert message.startswith(f"{key}: unknown key; known: ") and known in message


def test_every_config_key_is_read_by_the_code():
    """A key that no code reads is a setting that silently does nothing. Read means an attribute
    (``cfg.section.key``) or a quoted name in pipelines/ or asd/ outside config.py; features and
    model are the dataclasses of asd/ itself."""
    root = Path(__file__).resolve().parents[1]
    code = "\n".join(p.read_text() for package in ("pipelines", "asd") for p in (root / package).rglob("*.py")
                     if p != root / "pipelines" / "config.py")
    hints = typing.get_type_hints(PipelineConfig)
    keys = [(section.name, key.name) for section in dataclasses.fields(PipelineConfig)
            if dataclasses.is_dataclass(hints[section.name]) and section.name not in ("features", "model")
            for key in dataclasses.fields(hints[section.name])]
    dead = [f"{section}.{key}" for section, key in keys
            if not re.search(rf"\.{key}\b|[\"']{key}[\"']", code)]
    assert len(keys) > 50 and not dead


def test_several_problems_stay_on_one_line():
    message = _error(["pretrain.lr=-1", "finetune.tau=0"])
    assert "pretrain.lr: " in message and "; finetune.tau: " in message


# ----------------------------------------------------------------------------- rules between fields
@pytest.mark.parametrize("overrides, key, words", [
    (["method=ae"], "features.kind", "features.kind=librosa_logmel"),
    (["pretrain.epochs=2"], "pretrain.lr_milestones", "< epochs (2)"),
    (["finetune.epochs=1"], "finetune.lr_milestones", "< epochs (1)"),
    (["pretrain.enabled=false", "finetune.enabled=false"], "finetune.enabled", "trains nothing"),
    (["model.n_mels=64"], "model.n_mels", "features.n_mels (128)"),
    (["train.crop_frames=96"], "train.crop_frames", "features.min_frames (64)"),
    (["train.num_workers=32"], "pretrain.batch_size", "train.num_workers (32)"),
    (["train.num_workers=20", "pretrain.enabled=false"], "finetune.k", "train.num_workers (20)"),
])
def test_rules_between_fields_name_the_key_and_the_fix(overrides, key, words):
    message = _error(overrides)
    assert message.startswith(f"{key}: ") and words in message


@pytest.mark.parametrize("overrides", [
    ["method=ae", "features.kind=librosa_logmel"], ["method=ae", "features.kind=logmel"],
    ["method=knn", "model.n_mels=64"],  # no network: the model section does not matter
    ["pretrain.epochs=0"],  # an untrained stage has no schedule
    ["pretrain.epochs=3", "pretrain.lr_milestones=[]"],
])
def test_rules_allow_what_the_stages_accept(overrides):
    load_config("tiny", overrides)


# ----------------------------------------------------------------------------- files and overrides
def test_bad_yaml_and_overrides_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [1,\n")
    assert str(bad) in _error([], str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert "must be a mapping" in _error([], str(listed))
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("extends: missing.yaml\n")
    assert "missing.yaml" in _error([], str(orphan))
    selfish = tmp_path / "self.yaml"
    selfish.write_text("extends: self.yaml\n")
    assert f"cycle ({selfish} -> {selfish})" in _error([], str(selfish))
    (tmp_path / "a.yaml").write_text("extends: b.yaml\npretrain: {epochs: 1}\n")
    (tmp_path / "b.yaml").write_text("extends: ./a.yaml\n")
    assert f"cycle ({tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'})" in _error(
        [], str(tmp_path / "a.yaml"))
    assert "pretrain.lr is not a section" in _error(["pretrain.lr.x=1"])
    assert "not valid YAML" in _error(["pretrain.lr=[1"])


# ----------------------------------------------------------------------------- the CLI
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from pipelines.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray."""
    import pipelines.ray_runtime

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started before the user error was reported")

    monkeypatch.setattr(pipelines.ray_runtime, "init_ray", refuse)


def test_cli_bad_value_is_one_line_exit_2(capsys, tmp_path, no_ray):
    rc, err = _cli(["train", "--stage", "pretrain", "--config", "tiny", "--set", f"run_dir={tmp_path}",
                    "--set", "pretrain.lr=-0.1"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "pretrain.lr: must be > 0 (got -0.1)" in err


def test_cli_debug_shows_the_traceback(tmp_path):
    from pipelines.cli import main

    with pytest.raises(ConfigError, match="pretrain.lr"):
        main(["--debug", "train", "--stage", "pretrain", "--config", "tiny", "--set", "pretrain.lr=-0.1"])


@pytest.mark.parametrize("command", [["train", "--stage", "pretrain"], ["score", "--no-mlflow"]])
def test_cli_missing_feature_store_is_one_line_before_ray(command, capsys, tmp_path, no_ray):
    rc, err = _cli([*command, "--config", "tiny", "--set", f"run_dir={tmp_path}"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "features") in err and "asd extract" in err


def test_cli_score_without_a_model_is_one_line(capsys, tmp_path):
    from pipelines.store import MANIFEST_SCHEMA, record_store, version_dir, write_manifest

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    store = cfg.path(cfg.extract.store)  # an empty but valid feature store
    write_manifest(version_dir(store, cfg.features.version), MANIFEST_SCHEMA.empty_table().to_pandas())
    record_store(store, cfg.features.version, {"dtype": "float16"})
    rc, err = _cli(["score", "--no-mlflow", "--config", "tiny", "--set", f"run_dir={tmp_path}"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no trained model" in err and "asd train" in err


# ----------------------------------------------------------------------------- MLflow outages
@pytest.mark.timeout(60)
def test_dead_tracking_uri_fails_fast_in_one_line(dead_tracking_uri, tmp_path, capsys, no_ray):
    t0 = time.perf_counter()
    rc, err = _cli(["run", "--config", "tiny", "--set", f"run_dir={tmp_path / 'run'}",
                    "--set", f"data.root={tmp_path / 'data'}",
                    "--set", f"mlflow.tracking_uri={dead_tracking_uri}"], capsys)
    assert time.perf_counter() - t0 < 30
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert dead_tracking_uri in err and "unreachable" in err
    assert not (tmp_path / "data").exists()  # nothing synthesised or started before the check


def test_http_limits_are_defaults_the_user_can_override(dead_tracking_uri, monkeypatch):
    import os

    from pipelines import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracking.bound_http("sqlite:///x.db")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # only for http(s) servers
    tracking.bound_http(dead_tracking_uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


@pytest.mark.timeout(60)
def test_epoch_metrics_to_a_dead_server_only_warn_once(dead_tracking_uri, caplog):
    from pipelines.tracking import log_epoch_metrics

    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        for epoch in range(3):
            log_epoch_metrics(dead_tracking_uri, f"run-{dead_tracking_uri}", "pretrain",
                              {"epoch": epoch, "loss": 1.0 / (epoch + 1)}, epoch)
    warnings = [r for r in caplog.records if r.name == "pipelines.tracking"]
    assert len(warnings) == 1 and dead_tracking_uri in warnings[0].getMessage()
    assert time.perf_counter() - t0 < 20


def _scoring_folder(out: Path) -> None:
    """What run_scoring leaves for a baseline (no network to register): scores and sections."""
    rows = [{"path": f"dev_data/fan/test/section_00_{d}_test_{lab}_{i:04d}.wav", "dataset": "dev_data",
             "machine": "fan", "section": "00", "domain": d, "split": "test", "label": lab,
             "score": float(i + (5 if lab == "anomaly" else 0)), "decision": int(lab == "anomaly"),
             "nearest_attribute": None}
            for d in ("source", "target") for lab in ("normal", "anomaly") for i in range(3)]
    out.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(out / "scores.csv", index=False)
    torch.save({}, out / "sections.pt")


def test_register_only_reads_the_local_results(tmp_path):
    from pipelines.stages.score import ScoringResult

    _scoring_folder(tmp_path / "scoring")
    result = ScoringResult.load(tmp_path / "scoring")
    assert result.scores["section"].tolist()[0] == "00" and result.sections == {}
    assert len(result.results) == 1 and result.official_score == pytest.approx(1.0)


@pytest.mark.timeout(60)
def test_register_only_to_a_dead_server_keeps_the_results(dead_tracking_uri, tmp_path, capsys):
    out = tmp_path / "run" / "scoring"
    _scoring_folder(out)
    rc, err = _cli(["score", "--register-only", "--config", "tiny", "--set", f"run_dir={tmp_path / 'run'}",
                    "--set", f"mlflow.tracking_uri={dead_tracking_uri}"], capsys)
    assert rc == 2 and err.count("\n") == 1 and dead_tracking_uri in err
    assert "asd score --register-only" in err and str(out) in err
    assert (out / "scores.csv").is_file()


@pytest.mark.slow  # about 5 s: a fresh SQLite tracking store
def test_register_only_logs_the_local_results(tmp_path, capsys):
    """After the outage: the same command with --register-only logs the scoring folder's results
    (a baseline's: metrics and artifacts, no network to register) without scoring again."""
    import mlflow

    from pipelines.cli import main

    out = tmp_path / "run" / "scoring"
    _scoring_folder(out)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["score", "--register-only", "--config", "tiny", "--set", f"run_dir={tmp_path / 'run'}",
               "--set", f"mlflow.tracking_uri={uri}", "--set", "mlflow.experiment=register-later"])
    assert rc == 0, capsys.readouterr().err
    runs = mlflow.search_runs(experiment_names=["register-later"])
    assert len(runs) == 1 and runs["metrics.official_score"].iloc[0] == pytest.approx(1.0)
