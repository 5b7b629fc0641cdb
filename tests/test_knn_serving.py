"""The kNN detector served as the prototype network is: the scoring job exports it (meta.json +
per-section KnnSection backends, tensors only), the pyfunc built from those artifacts repeats the
job's scores.csv, ``asd predict`` scores with it, and (against a REAL MLflow server) it is logged as
models from code, registered with aliases and loaded through ``models:/<name>@champion``.

The feature store is written directly (tests/store_writer.py) from the features of real WAV files,
computed as ``asd.features.log_mel`` computes them and rounded to the store's float16, so the
scoring job and the served model start from the same numbers without a Ray extraction.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from asd.audio import load_audio
from asd.contracts import SCORES_FILE, SECTIONS_FILE, labelled_clip_name
from asd.features import FeatureConfig, log_mel
from pipelines import cli
from pipelines.config import KnnConfig, PipelineConfig

SR = 16000
TOL = 1e-6
# linear STFT bins (features.kind=spectrum), small enough for a fast test; 1 s clips give 126 frames
FEATURES = FeatureConfig(kind="spectrum", n_fft=256, hop_length=128)
MACHINES = {"fan": 500.0, "valve": 1300.0}
MODEL_NAME = "asd-test-knn"


def _clip(rng: np.random.Generator, f0: float, attribute: int, anomaly: bool) -> np.ndarray:
    """1 s of a machine tone (its frequency set by the attribute) in noise; anomalies add a band."""
    t = np.arange(SR) / SR
    x = np.sin(2 * np.pi * f0 * (1 + 0.1 * attribute) * t) + 0.1 * rng.standard_normal(t.size)
    if anomaly:
        x += 0.4 * np.sin(2 * np.pi * 5200 * t) * (rng.uniform(size=t.size) < 0.5)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _write_data(root: Path, store: Path) -> None:
    """Per machine (section 00): 6 source + 3 target training clips, 8 test clips; the WAVs under
    ``root`` and their float16-rounded features in ``store``."""
    from store_writer import clip_row, write_store

    rng = np.random.default_rng(0)
    clips = []
    for machine, f0 in MACHINES.items():
        plan = [("train", "source", "normal", i % 2, i) for i in range(6)]
        plan += [("train", "target", "normal", 2, i) for i in range(3)]
        plan += [("test", domain, label, 2 if domain == "target" else i % 2, i)
                 for domain in ("source", "target") for label in ("normal", "anomaly") for i in range(2)]
        for split, domain, label, attribute, index in plan:
            name = labelled_clip_name("00", domain, split, label, index, f"pat_{attribute:02d}")
            path = root / "dev_data" / machine / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _clip(rng, f0, attribute, label == "anomaly"), SR, subtype="PCM_16")
            wave, _ = load_audio(path, SR)
            feats = log_mel(wave, FEATURES).half().float().numpy()  # as the store of float16 reads back
            row = clip_row(machine, "00", split, domain, label, index, f"pat_{attribute:02d}", FEATURES.n_bins,
                           feats.shape[1], FEATURES.version, f"h{len(clips):06d}")
            clips.append((row, feats))
    write_store(store, FEATURES.version, clips)


@pytest.fixture(scope="module")
def knn_scoring(tmp_path_factory):
    """The spectral kNN (spectrum_shape vectors, local scales) fitted and scored by the real job."""
    from pipelines.detectors.knn import run_knn_stage
    from pipelines.stages.score import run_scoring

    base = tmp_path_factory.mktemp("knn-serving")
    root, store = base / "data", base / "store"
    _write_data(root, store)
    cfg = PipelineConfig(name="knn-serving-test", run_dir=str(base / "run"), method="knn", features=FEATURES,
                         knn=KnnConfig(representation="spectrum_shape", normalisation="local",
                                       distance="standardised_euclidean"))  # the default detector's
    cfg.data.root = str(root)
    model_dir = run_knn_stage(cfg, store=store, out_dir=base / "models" / "knn")
    result = run_scoring(cfg, model_dir, store, base / "scoring", ground_truth_root=root)
    scores = pd.read_csv(result.out_dir / SCORES_FILE, dtype={"section": str})
    scores["wav"] = [str(root / p) for p in scores["path"]]
    return types.SimpleNamespace(cfg=cfg, result=result, root=root, scores=scores)


def _audio_rows(scores: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"machine": scores["machine"], "section": scores["section"],
                         "audio": [Path(p).read_bytes() for p in scores["wav"]]})


def _assert_repeats_the_job(out: pd.DataFrame, scores: pd.DataFrame, sections: dict) -> None:
    """Scores to 1e-6, the job's decisions (and the sections' thresholds behind them), nearest classes."""
    assert list(out.columns) == ["score", "decision", "nearest_attribute", "error"]
    assert out["error"].isna().all(), out["error"].dropna().tolist()
    np.testing.assert_allclose(out["score"].to_numpy(float), scores["score"].to_numpy(float), rtol=TOL, atol=TOL)
    assert out["decision"].astype(int).tolist() == scores["decision"].astype(int).tolist()
    thresholds = [sections[f"{m}/section_{s}"].threshold for m, s in zip(scores["machine"], scores["section"])]
    assert out["decision"].astype(int).tolist() == [int(x > t) for x, t in zip(out["score"].astype(float), thresholds)]
    assert out["nearest_attribute"].tolist() == scores["nearest_attribute"].tolist()


# ----------------------------------------------------------------------------- without MLflow
def test_scoring_job_exports_the_knn_for_serving(knn_scoring):
    """model/meta.json names the detector and its representation; sections.pt holds tensors,
    numbers and strings only, read back as the job's KnnSection backends."""
    from asd.knn_backend import KnnSection
    from pipelines.stages.score import ScoringResult

    out = knn_scoring.result.out_dir
    meta = json.loads((out / "model" / "meta.json").read_text())
    assert (meta["detector"], meta["representation"], meta["normalisation"]) == ("knn", "spectrum_shape", "local")
    assert sorted(p.name for p in (out / "model").iterdir()) == ["meta.json"]
    state = torch.load(out / SECTIONS_FILE, weights_only=True)
    assert sorted(state) == ["fan/section_00", "valve/section_00"]
    assert state["fan/section_00"]["vectors"].shape == (9, FEATURES.n_bins)
    reloaded = ScoringResult.load(out).sections
    for key, section in knn_scoring.result.sections.items():
        assert isinstance(reloaded[key], KnnSection) and reloaded[key].threshold == section.threshold
        assert torch.equal(reloaded[key].scales, section.scales)


def test_served_knn_repeats_the_scoring_job(knn_scoring):
    """Audio bytes, base64 text and waveforms score as scores.csv; an unknown section is a row error."""
    import base64

    from pipelines.serving.pyfunc_model import AsdPyfuncModel

    model = AsdPyfuncModel.from_dir(knn_scoring.result.out_dir)
    scores, sections = knn_scoring.scores, knn_scoring.result.sections
    _assert_repeats_the_job(model.predict(None, _audio_rows(scores)), scores, sections)
    as_text = _audio_rows(scores).assign(audio=lambda df: [base64.b64encode(b).decode() for b in df["audio"]])
    _assert_repeats_the_job(model.predict(None, as_text), scores, sections)
    first = scores.iloc[0]
    out = model.predict(None, pd.DataFrame([
        {"machine": first["machine"], "section": 0, "waveform": load_audio(first["wav"], SR)[0].numpy()},
        {"machine": first["machine"], "section": "07", "waveform": np.zeros(SR, np.float32)}]))
    assert out.loc[0, "score"] == pytest.approx(first["score"], rel=TOL, abs=TOL)
    assert "section_07" in out.loc[1, "error"] and out.loc[1, "score"] is None


def test_asd_predict_scores_with_a_knn_scoring_folder(knn_scoring, capsys):
    scores = knn_scoring.scores
    rc = cli.main(["predict", "--model", str(knn_scoring.result.out_dir), "--json", *scores["wav"]])
    clips = {c["path"]: c for c in json.loads(capsys.readouterr().out)["clips"]}
    assert rc == 0
    for row in scores.itertuples():
        assert clips[row.wav]["score"] == pytest.approx(row.score, rel=TOL, abs=TOL)
        assert (clips[row.wav]["decision"], clips[row.wav]["nearest_attribute"]) == (row.decision,
                                                                                     row.nearest_attribute)


@pytest.mark.timeout(120)  # a read that blocks on the FIFO fails here instead of hanging
def test_asd_predict_reports_odd_files_and_silence_per_clip_and_scores_the_rest(knn_scoring, tmp_path, capsys):
    """A FIFO, /dev/zero and stereo channels in anti-phase (silence once down-mixed) are one error
    line each, in the order given; the good clips around them still score as scores.csv."""
    import os

    scores = knn_scoring.scores[knn_scoring.scores["machine"] == "fan"].iloc[:2]
    os.mkfifo(tmp_path / "fifo.wav")
    wave = sf.read(scores["wav"].iloc[0], dtype="int16")[0].clip(-32767, 32767)  # -(-32768) overflows
    sf.write(tmp_path / "anti.wav", np.stack([wave, -wave], axis=1), SR, subtype="PCM_16")
    odd = [str(tmp_path / "fifo.wav"), "/dev/zero", str(tmp_path / "anti.wav")]  # the FIFO first: see timeout
    clips = [scores["wav"].iloc[0], *odd, scores["wav"].iloc[1]]
    rc = cli.main(["predict", "--model", str(knn_scoring.result.out_dir), "--machine", "fan", "--section", "00",
                   *clips])
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert rc == 1 and [line[0] for line in lines] == clips and "3 of 5 clip(s) failed" in err
    for (_, score, decision, _), row in zip((lines[0], lines[-1]), scores.itertuples()):
        assert float(score) == pytest.approx(row.score, rel=TOL, abs=TOL) and int(decision) == row.decision
    assert lines[1][1] == lines[2][1] == "ERROR: cannot read the file: not a regular file"
    assert lines[3][1].startswith("ERROR: constant signal after down-mixing 2 channels")


# ----------------------------------------------------------------------------- MLflow registry
@pytest.fixture(scope="module")
def registered_knn(knn_scoring, mlflow_server):
    """The kNN's scoring run logged and registered against the server (first version: champion)."""
    import mlflow

    from pipelines.serving import registry

    cfg = knn_scoring.cfg
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(
        cfg.mlflow, tracking_uri=mlflow_server, experiment="asd-knn-serving-test", registered_model=MODEL_NAME))
    try:
        yield registry.log_scoring(cfg, knn_scoring.result)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.mark.slow
def test_knn_is_registered_without_pickle_and_served_from_the_champion(knn_scoring, registered_knn,
                                                                       mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    assert registered_knn["version"] == 1 and registered_knn["model_uri"] == f"models:/{MODEL_NAME}/1"
    client = mlflow.MlflowClient(mlflow_server)
    assert sorted(client.get_model_version(MODEL_NAME, "1").aliases) == ["challenger", "champion"]
    local = Path(download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path),
                                    tracking_uri=mlflow_server))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert not {n for n in files if n.endswith((".pkl", ".pickle"))} and "model.pt" not in files
    assert {"pyfunc_entry.py", "meta.json", "sections.pt", "scoring.json"} <= files
    conf = Model.load(str(local)).flavors["python_function"]
    assert "python_model" not in conf and Path(conf["model_code_path"]).name == "pyfunc_entry.py"

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    scores = knn_scoring.scores
    _assert_repeats_the_job(model.predict(_audio_rows(scores)), scores, knn_scoring.result.sections)

    rc = cli.main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--tracking-uri", mlflow_server,
                   "--machine", "fan", "--section", "00", *scores[scores["machine"] == "fan"]["wav"]])
    assert rc == 0
