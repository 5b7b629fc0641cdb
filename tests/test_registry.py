"""MLflow side against a REAL tracking server (fixture ``mlflow_server``): logging a scoring run,
the pyfunc model (models from code: no pickle in a version), its input boundary (audio bytes,
paths only under ``$ASD_INPUT_ROOT``), registry aliases, and ``asd predict``.

The trained model and the scoring result are built here (a tiny untrained-but-normalised
EmbeddingNet on synthetic DCASE-named clips), so the test does not depend on the training job.
The scoring result comes from the real ``pipelines.stages.score.run_scoring`` on features extracted by
``pipelines.stages.extract`` into a real Parquet store.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

pytest.importorskip("mlflow")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from asd import metrics as M  # noqa: E402
from asd.audio import load_audio  # noqa: E402
from asd.features import FeatureConfig, log_mel  # noqa: E402
from asd.metadata import discover_clips, parse_clip_name  # noqa: E402
from asd.model import EmbeddingNet, ModelConfig  # noqa: E402
from asd.training import input_stats  # noqa: E402
from pipelines import cli  # noqa: E402
from pipelines.serving import registry  # noqa: E402
from pipelines.checkpoints import save_model  # noqa: E402
from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.serving.pyfunc_model import INPUT_ROOT_ENV, PATH_REFUSED  # noqa: E402

SR = 16000
SECONDS = 3
MACHINES = {"valve": 310.0, "fan": 125.0}
MODEL_NAME = "asd-test-registry"
TOL = 1e-5


# ----------------------------------------------------------------------------- synthetic data
def _clip(rng, f0, attribute, anomaly):
    t = np.arange(SR * SECONDS) / SR
    f = f0 * (1 + 0.08 * attribute)
    x = sum(0.3 / k * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3))
    x = x + 0.05 * rng.standard_normal(t.size)
    if anomaly:
        x = x + 0.03 * np.sin(2 * np.pi * 3100 * t) * (rng.uniform(size=t.size) < 0.5)
        x = x + 0.03 * rng.standard_normal(t.size) * (np.sin(2 * np.pi * 2 * t) > 0)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def make_dev_data(root: Path) -> Path:
    """2 machines x section 00: train 6 source (pat_00, pat_01) + 3 target (pat_02) clips; test
    3 normal + 3 anomaly per domain. DCASE names, 3 s, 16 kHz, written with soundfile."""
    rng = np.random.default_rng(0)
    for machine, f0 in MACHINES.items():
        folder = root / "dev_data" / machine
        plan = [("train", "source", "normal", a, i) for i, a in enumerate((0, 0, 0, 1, 1, 1))]
        plan += [("train", "target", "normal", 2, i) for i in range(3)]
        for domain, attrs in (("source", (0, 1, 0)), ("target", (2, 2, 2))):
            plan += [("test", domain, label, a, i) for label in ("normal", "anomaly")
                     for i, a in enumerate(attrs)]
        for split, domain, label, attr, idx in plan:
            name = f"section_00_{domain}_{split}_{label}_{idx:04d}_pat_{attr:02d}.wav"
            path = folder / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _clip(rng, f0, attr, label == "anomaly"), SR, subtype="PCM_16")
    return root


def _features(path: Path, fcfg: FeatureConfig) -> torch.Tensor:
    wave, _ = load_audio(path, fcfg.sample_rate)
    return log_mel(wave, fcfg)


def make_model(root: Path, out: Path, fcfg: FeatureConfig) -> Path:
    torch.manual_seed(0)
    mcfg = ModelConfig(width=8, embedding_dim=16)
    net = EmbeddingNet(mcfg)
    train = [_features(p, fcfg) for p in sorted((root / "dev_data").glob("*/train/*.wav"))]
    net.set_input_stats(*input_stats(train))
    classes = sorted({"/".join(c.attribute_class) for c in discover_clips(root / "dev_data").clips})
    meta = {"model": dataclasses.asdict(mcfg), "features": dataclasses.asdict(fcfg),
            "class_keys": classes, "stage": "finetune"}
    return save_model(out, net, meta)


def _resolve(path: str, root: Path) -> str:
    for cand in (Path(path), root / path, root / "dev_data" / path):
        if cand.is_file():
            return str(cand)
    raise FileNotFoundError(path)


def strict_json(text: str | bytes):
    """``json.loads`` that rejects NaN and Infinity, as strict JSON clients do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _restore_mlflow_uris(saved: dict) -> None:
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(mlflow_server, ray_session, tmp_path_factory):
    """Data, model, scoring result, and two log_scoring calls against the server."""
    from pipelines.stages.score import run_scoring

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    base = tmp_path_factory.mktemp("registry")
    root = make_dev_data(base / "data")
    fcfg = FeatureConfig()
    model_dir = make_model(root, base / "models" / "finetune", fcfg)
    cfg = PipelineConfig(name="registry-test", run_dir=str(base / "run"))
    cfg.data.root = str(root)
    cfg.extract.dtype = "float32"
    cfg.score.embedding = "windows"  # the pyfunc must follow the saved settings, not the default
    cfg.score.window_hop = 16
    cfg.mlflow.tracking_uri = mlflow_server
    cfg.mlflow.experiment = "asd-registry-test"
    cfg.mlflow.registered_model = MODEL_NAME
    store, out = cfg.path(cfg.extract.store), base / "scoring"

    from pipelines.stages.extract import extract

    extract(root, store, cfg.features, dtype=cfg.extract.dtype, batch_size=16, ray_num_cpus=2)
    result = run_scoring(cfg, model_dir, store, out, ground_truth_root=root)

    reg1 = registry.log_scoring(cfg, result)
    c = MlflowClient(mlflow_server)
    aliases_after_first = sorted(c.get_model_version(MODEL_NAME, "1").aliases)
    reg2 = registry.log_scoring(cfg, result)
    try:
        yield types.SimpleNamespace(cfg=cfg, result=result, root=root, uri=mlflow_server,
                                    reg1=reg1, reg2=reg2, first_aliases=aliases_after_first,
                                    client=c)
    finally:
        _restore_mlflow_uris(saved)


@pytest.fixture(scope="module")
def test_clips(setup) -> pd.DataFrame:
    """The scoring job's rows with absolute WAV paths."""
    scores = setup.result.scores.copy()
    scores["wav"] = [_resolve(p, setup.root) for p in scores["path"]]
    return scores.sort_values("wav").reset_index(drop=True)


# ----------------------------------------------------------------------------- registry
@pytest.mark.slow
def test_first_version_is_champion_and_challenger(setup):
    assert setup.reg1["version"] == 1
    assert setup.first_aliases == ["challenger", "champion"]
    assert setup.reg1["model_uri"] == f"models:/{MODEL_NAME}/1"
    mv = setup.client.get_model_version(MODEL_NAME, "1")
    assert mv.tags["run_id"] == setup.reg1["run_id"]
    assert mv.tags["config_digest"] == setup.cfg.digest()
    assert float(mv.tags["official_score"]) == pytest.approx(setup.result.official_score, abs=1e-12)


@pytest.mark.slow
def test_second_version_is_challenger_only(setup):
    assert setup.reg2["version"] == 2
    c = setup.client
    assert c.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    assert c.get_model_version_by_alias(MODEL_NAME, "challenger").version == "2"
    assert registry.get_alias_version(MODEL_NAME, "champion").version == "1"
    assert registry.get_alias_version(MODEL_NAME, "no-such-alias") is None
    assert registry.get_alias_version("no-such-registered-model", "champion") is None


@pytest.mark.slow
def test_scoring_run_is_nested_under_active_parent(setup):
    mlflow.set_tracking_uri(setup.uri)
    with mlflow.start_run(run_name="parent") as parent:
        reg = registry.log_scoring(setup.cfg, setup.result)
    run = setup.client.get_run(reg["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.run_name == "score"
    assert reg["version"] == 3
    assert registry.get_alias_version(MODEL_NAME, "champion").version == "1"


@pytest.mark.slow
def test_logged_metrics_equal_metrics_of_submission_csvs(setup):
    """Recompute every metric from the evaluator files the scoring job wrote (labels from names)."""
    run = setup.client.get_run(setup.reg1["run_id"])
    logged = run.data.metrics
    sub = setup.result.out_dir / "submission" / "dev_data"
    files = sorted(sub.glob("anomaly_score_*.csv"))
    assert len(files) == len(MACHINES)
    results = []
    for f in files:
        machine, section = M.parse_score_file_name(f.name)
        names, scores = M.read_scores_csv(f)
        metas = [parse_clip_name(n, machine) for n in names]
        y_true = np.array([m.label == "anomaly" for m in metas], dtype=int)
        y_domain = np.array([m.domain == "target" for m in metas], dtype=int)
        r = M.section_metrics(y_true, y_domain, scores, machine=machine, section=section)
        results.append(r)
        for key in M.METRICS:
            assert logged[f"{key}/{machine}/section_{section}"] == pytest.approx(getattr(r, key), abs=1e-9)
    for machine, v in M.machine_scores(results).items():
        assert logged[f"hmean/{machine}"] == pytest.approx(v, abs=1e-9)
    row = M.paper_row(results)
    assert logged["source_auc"] == pytest.approx(row["Source AUC"], abs=1e-9)
    assert logged["target_auc"] == pytest.approx(row["Target AUC"], abs=1e-9)
    assert logged["pauc"] == pytest.approx(row["pAUC"], abs=1e-9)
    assert logged["official_score"] == pytest.approx(M.official_score(results), abs=1e-9)
    assert setup.reg1["official_score"] == pytest.approx(M.official_score(results), abs=1e-9)
    assert run.data.params["score.embedding"] == "windows"


@pytest.mark.slow
def test_artifacts_of_scoring_run(setup):
    from mlflow.artifacts import download_artifacts

    run_id = setup.reg1["run_id"]
    c = setup.client

    def listing(path):
        return {Path(a.path).name for a in c.list_artifacts(run_id, path)}

    assert {"submission", "results", "plots", "config"} <= listing("")
    assert {f"anomaly_score_{m}_section_00_test.csv" for m in MACHINES} <= listing("submission/dev_data")
    assert {"results.md", "results.csv", "scores.csv"} <= listing("results")
    plots = listing("plots")
    assert {f"roc_{m}.png" for m in MACHINES} | {f"hist_{m}.png" for m in MACHINES} <= plots
    assert "hmean_per_machine.png" in plots
    cfg_yaml = Path(download_artifacts(run_id=run_id, artifact_path="config/config.yaml",
                                       tracking_uri=setup.uri)).read_text()
    assert "registered_model: asd-test-registry" in cfg_yaml
    # the registered model carries the network, the sections and the scoring settings
    local = Path(download_artifacts(f"models:/{MODEL_NAME}/1", tracking_uri=setup.uri))
    assert (local / "MLmodel").is_file()
    names = {p.name for p in local.rglob("*")}
    assert {"model.pt", "meta.json", "sections.pt", "scoring.json"} <= names
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "mlflow==" in reqs


@pytest.mark.slow
def test_registered_model_holds_no_pickle(setup, tmp_path):
    """Models from code: the version holds its code file and plain artifacts, nothing unpickled."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path),
                                    tracking_uri=setup.uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".pkl", ".pickle")]
    conf = Model.load(str(local)).flavors["python_function"]
    assert "python_model" not in conf and Path(conf["model_code_path"]).name == "pyfunc_entry.py"
    assert (local / "pyfunc_entry.py").is_file()
    assert "cloudpickle" not in (local / "requirements.txt").read_text()


@pytest.mark.slow
def test_version_has_signature_and_scoring_input_example(setup, monkeypatch, tmp_path):
    """The version states its columns and carries a JSON input example (base64 WAV) that scores."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    local = Path(download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path),
                                    tracking_uri=setup.uri))
    mlmodel = Model.load(str(local))
    inputs = {c.name: c for c in mlmodel.signature.inputs.inputs}
    assert list(inputs) == ["machine", "section", "audio", "path", "waveform", "sample_rate"]
    assert inputs["machine"].required and inputs["section"].required
    assert not any(inputs[c].required for c in ("audio", "path", "waveform", "sample_rate"))
    assert mlmodel.signature.outputs.input_names() == ["score", "decision", "nearest_attribute", "error"]
    info = mlmodel.saved_input_example_info
    assert info["artifact_path"].endswith(".json")
    strict_json((local / info["artifact_path"]).read_text())
    example = mlmodel.load_input_example(str(local))
    assert list(example.columns) == ["machine", "section", "audio"]
    assert (example.loc[0, "machine"], example.loc[0, "section"]) in {(m, "00") for m in MACHINES}
    out = _load_champion(setup, monkeypatch, None).predict(example)
    assert out.loc[0, "error"] is None and math.isfinite(out.loc[0, "score"])
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert serving["dataframe_split"]["columns"] == ["machine", "section", "audio"]


@pytest.mark.slow
def test_scoring_run_has_the_feature_store_manifest_as_dataset_input(setup):
    """Lineage: the scoring run names the exact clips (the manifest's digest and row count)."""
    from pipelines.store import current_version, manifest_digest, store_manifest
    from pipelines.tracking import MANIFEST_COLUMNS

    store = setup.cfg.path(setup.cfg.extract.store)
    run = mlflow.MlflowClient(setup.uri).get_run(setup.reg1["run_id"])
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert tags["mlflow.data.context"] == "scoring"
    assert ds.digest == manifest_digest(store) == run.data.tags["data_manifest_digest"]
    mv = setup.client.get_model_version(MODEL_NAME, str(setup.reg1["version"]))
    assert mv.tags["data_manifest_digest"] == ds.digest
    assert json.loads(ds.profile)["num_rows"] == len(store_manifest(store))
    assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == list(MANIFEST_COLUMNS)
    assert ds.source_type == "local"
    assert Path(json.loads(ds.source)["uri"]) == (Path(store) / f"v-{current_version(store)}"
                                                  / "manifest.parquet").resolve()


@pytest.mark.slow
def test_plots_write_pngs(setup, tmp_path):
    from pipelines.stages import plots

    written = plots.plot_all(setup.result.scores, setup.result.sections, tmp_path)
    assert len(written) == 2 * len(MACHINES) + 1
    for p in written:
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- pyfunc
def _load_champion(setup, monkeypatch, root: Path | None):
    """The champion through mlflow.pyfunc.load_model, with ``root`` as the input root (or none)."""
    if root is None:
        monkeypatch.delenv(INPUT_ROOT_ENV, raising=False)
    else:
        monkeypatch.setenv(INPUT_ROOT_ENV, str(root))
    mlflow.set_tracking_uri(setup.uri)
    mlflow.set_registry_uri(setup.uri)
    return mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")


@pytest.mark.slow
@pytest.mark.parametrize("column", ["path", "audio", "audio_base64"])
def test_champion_pyfunc_reproduces_scoring_job(setup, test_clips, monkeypatch, column):
    """Paths under the input root, WAV bytes and base64 text score as the scoring job did."""
    model = _load_champion(setup, monkeypatch, setup.root)
    clips = {"path": list(test_clips["wav"]),
             "audio": [Path(p).read_bytes() for p in test_clips["wav"]]}
    clips["audio_base64"] = [base64.b64encode(b).decode("ascii") for b in clips["audio"]]
    df = pd.DataFrame({"machine": test_clips["machine"], "section": test_clips["section"],
                       column.split("_")[0]: clips[column]})
    out = model.predict(df)
    assert list(out.columns) == ["score", "decision", "nearest_attribute", "error"]
    assert out["error"].isna().all()
    np.testing.assert_allclose(out["score"].to_numpy(float), test_clips["score"].to_numpy(float),
                               rtol=TOL, atol=TOL)
    assert out["decision"].astype(int).tolist() == test_clips["decision"].astype(int).tolist()
    assert out["nearest_attribute"].tolist() == test_clips["nearest_attribute"].astype(str).tolist()


@pytest.mark.slow
def test_pyfunc_paths_confined_to_input_root(setup, test_clips, monkeypatch, tmp_path):
    """Outside the root, `../`, through a symlink, missing, a folder: one error, whether or not
    the file exists; inside the root (relative or absolute) the clip scores."""
    first = test_clips.iloc[0]
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    shutil.copy(first["wav"], root / "clips" / "a.wav")
    shutil.copy(first["wav"], tmp_path / "outside.wav")
    (root / "link.wav").symlink_to(tmp_path / "outside.wav")
    refused = [str(tmp_path / "outside.wav"), str(tmp_path / "missing.wav"), "../outside.wav",
               "../missing.wav", "clips/../../outside.wav", "link.wav", "clips/missing.wav", "clips",
               first["wav"]]
    allowed = ["clips/a.wav", str(root / "clips" / "a.wav")]

    def predict(model, paths):
        return model.predict(pd.DataFrame({"machine": first["machine"], "section": first["section"],
                                           "path": paths}))

    out = predict(_load_champion(setup, monkeypatch, root), refused + allowed)
    assert out["error"].iloc[:len(refused)].tolist() == [PATH_REFUSED] * len(refused)
    assert out["score"].iloc[:len(refused)].isna().all()
    assert out["error"].iloc[len(refused):].isna().all()
    np.testing.assert_allclose(out["score"].iloc[len(refused):].astype(float), first["score"],
                               rtol=TOL, atol=TOL)
    # without a root no path is read at all
    out = predict(_load_champion(setup, monkeypatch, None), allowed + [first["wav"]])
    assert out["error"].tolist() == [PATH_REFUSED] * 3
    with pytest.raises(Exception, match=INPUT_ROOT_ENV):
        _load_champion(setup, monkeypatch, tmp_path / "no-such-folder")


@pytest.mark.slow
def test_scoring_server_json_carries_base64_audio(setup, test_clips, monkeypatch):
    """The request body `mlflow models serve` parses: base64 audio scores, a path outside the
    root and bad base64 are per-row errors."""
    from mlflow.pyfunc import scoring_server

    model = _load_champion(setup, monkeypatch, setup.root / "dev_data" / "fan")
    first = test_clips.iloc[0]
    audio = base64.b64encode(Path(first["wav"]).read_bytes()).decode("ascii")
    base = {"machine": first["machine"], "section": first["section"]}
    outside = next((setup.root / "dev_data" / "valve" / "train").glob("*.wav")).name
    body = json.dumps({"dataframe_records": [{**base, "audio": audio}, {**base, "path": "/etc/passwd"},
                                             {**base, "path": f"../valve/train/{outside}"},
                                             {**base, "audio": "not base64!"}]})
    resp = scoring_server.invocations(body, "application/json", model, None)
    assert resp.status == 200
    rows = strict_json(resp.response)["predictions"]
    assert rows[0]["error"] is None
    assert rows[0]["score"] == pytest.approx(first["score"], rel=TOL, abs=TOL)
    assert [r["error"] for r in rows[1:3]] == [PATH_REFUSED] * 2
    assert "base64" in rows[3]["error"]
    assert [r["score"] for r in rows[1:]] == [None] * 3 and [r["decision"] for r in rows[1:]] == [None] * 3


@pytest.mark.slow
def test_pyfunc_waveform_int_section_and_bad_rows(setup, test_clips, monkeypatch):
    model = _load_champion(setup, monkeypatch, setup.root)
    first = test_clips.iloc[0]
    wave, _ = load_audio(first["wav"])
    df = pd.DataFrame([
        {"machine": first["machine"], "section": int(first["section"]), "waveform": wave.numpy(), "path": None},
        {"machine": first["machine"], "section": "00", "path": "/nonexistent/clip.wav", "waveform": None},
        {"machine": first["machine"], "section": 7, "path": first["wav"], "waveform": None},
        {"machine": "toaster", "section": "00", "path": first["wav"], "waveform": None},
        {"machine": first["machine"], "section": "00", "path": first["wav"], "waveform": None},
        {"machine": first["machine"], "section": "00", "path": first["wav"], "waveform": wave.numpy()},
    ])
    out = model.predict(df)
    assert out.loc[0, "error"] is None
    assert out.loc[0, "score"] == pytest.approx(first["score"], rel=TOL, abs=TOL)
    assert out.loc[1, "error"] == PATH_REFUSED
    assert "section_07" in out.loc[2, "error"] and "toaster" in out.loc[3, "error"]
    assert out.loc[1, "score"] is None and out.loc[2, "decision"] is None
    assert out.loc[4, "score"] == pytest.approx(first["score"], rel=TOL, abs=TOL)
    assert "exactly one of audio, path, waveform" in out.loc[5, "error"]


# ----------------------------------------------------------------------------- mlflow models serve
def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.slow
def test_mlflow_models_serve_scores_as_asd_predict(setup, test_clips, tmp_path, capsys):
    """The documented `mlflow models serve -m models:/<name>/<version> --env-manager local`, with
    the venv's bin on PATH (MLflow execs `uvicorn` by name): base64 WAVs (dataframe_records) and
    paths under $ASD_INPUT_ROOT (dataframe_split) score as `asd predict` scores the same files;
    bad rows come back with a null score and an error; every body is strict JSON."""
    import signal
    import subprocess
    import sys
    import time

    uri = f"models:/{MODEL_NAME}/1"
    rc = cli.main(["predict", "--model", uri, "--tracking-uri", setup.uri, "--json", *test_clips["wav"]])
    expected = {c["path"]: c for c in json.loads(capsys.readouterr().out)["clips"]}
    assert rc == 0 and len(expected) == len(test_clips)

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=setup.uri,
               MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false",
               **{INPUT_ROOT_ENV: str(setup.root)})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                if _http(f"{base}/ping", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server not up in 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)

        # base64 WAVs as records, plus one undecodable and one refused path
        records = [{"machine": r.machine, "section": r.section,
                    "audio": base64.b64encode(Path(r.wav).read_bytes()).decode("ascii")}
                   for r in test_clips.itertuples()]
        first = test_clips.iloc[0]
        bad = [{"machine": first["machine"], "section": first["section"], "audio": "not base64!"},
               {"machine": first["machine"], "section": first["section"], "path": "/etc/passwd"}]
        status, body = _http(f"{base}/invocations", {"dataframe_records": records + bad})
        assert status == 200, body[:2000]
        rows = strict_json(body)["predictions"]
        assert len(rows) == len(records) + 2
        for row, clip in zip(rows, test_clips.itertuples()):
            want = expected[clip.wav]
            assert row["error"] is None
            assert row["score"] == pytest.approx(want["score"], rel=TOL, abs=TOL)
            assert (row["decision"], row["nearest_attribute"]) == (want["decision"], want["nearest_attribute"])
        assert "base64" in rows[-2]["error"] and rows[-1]["error"] == PATH_REFUSED
        assert [r["score"] for r in rows[-2:]] == [None, None]

        # paths relative to the input root, as split
        rel = [str(Path(p).relative_to(setup.root)) for p in test_clips["wav"]]
        split = {"columns": ["machine", "section", "path"],
                 "data": [[m, s, p] for m, s, p in zip(test_clips["machine"], test_clips["section"], rel)]}
        status, body = _http(f"{base}/invocations", {"dataframe_split": split})
        assert status == 200, body[:2000]
        rows = strict_json(body)["predictions"]
        assert [r["error"] for r in rows] == [None] * len(rel)
        np.testing.assert_allclose([r["score"] for r in rows],
                                   [expected[p]["score"] for p in test_clips["wav"]], rtol=TOL, atol=TOL)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# ----------------------------------------------------------------------------- asd predict
def _parse_lines(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.strip().splitlines()]


@pytest.mark.slow
def test_predict_cli_registry_model_with_one_unreadable_clip(setup, test_clips, capsys):
    valve = test_clips[test_clips["machine"] == "valve"].head(3)
    paths = valve["wav"].tolist() + ["/nonexistent/valve/test/section_00_source_test_normal_9999.wav"]
    rc = cli.main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--tracking-uri", setup.uri,
                   "--machine", "valve", "--section", "00", *paths])
    out = capsys.readouterr().out
    assert rc == 1
    lines = _parse_lines(out)
    assert [ln[0] for ln in lines] == paths
    for ln, expected in zip(lines[:3], valve.itertuples()):
        assert len(ln) == 4
        assert float(ln[1]) == pytest.approx(expected.score, abs=2e-6 + TOL)
        assert int(ln[2]) == int(expected.decision) and ln[3] == str(expected.nearest_attribute)
    assert lines[3][1].startswith("ERROR: ")


@pytest.mark.slow
def test_predict_cli_infers_machine_section_from_dcase_paths(setup, test_clips, capsys):
    paths = test_clips["wav"].tolist()
    rc = cli.main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--tracking-uri",
                   setup.uri, "--json", *paths])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == 0 and len(doc["clips"]) == len(paths)
    got = {c["path"]: c for c in doc["clips"]}
    for row in test_clips.itertuples():
        c = got[row.wav]
        assert (c["machine"], c["section"]) == (row.machine, row.section)
        assert c["score"] == pytest.approx(row.score, rel=TOL, abs=TOL)


@pytest.mark.slow
def test_predict_cli_usage_errors(setup, test_clips, capsys):
    clip = test_clips["wav"].iloc[0]
    base = ["predict", "--tracking-uri", setup.uri]
    rc = cli.main([*base, "--model", f"models:/{MODEL_NAME}@champion", "--machine", "valve",
                   "--section", "07", clip])
    assert rc == 2 and "section 07" in capsys.readouterr().err
    rc = cli.main([*base, "--model", "models:/no-such-model@champion", clip])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-model" in err
    rc = cli.main([*base, "--model", str(setup.result.out_dir / "nope"), clip])
    assert rc == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_cli_local_folders(setup, test_clips, capsys):
    """--model as an `asd score` output folder and as a downloaded pyfunc folder."""
    from mlflow.artifacts import download_artifacts

    pyfunc_dir = download_artifacts(f"models:/{MODEL_NAME}/2", tracking_uri=setup.uri)
    valve = test_clips[test_clips["machine"] == "valve"].head(2)
    for model in (str(setup.result.out_dir), pyfunc_dir):
        rc = cli.main(["predict", "--model", model, *valve["wav"]])
        lines = _parse_lines(capsys.readouterr().out)
        assert rc == 0 and len(lines) == 2
        for ln, row in zip(lines, valve.itertuples()):
            assert float(ln[1]) == pytest.approx(row.score, abs=2e-6 + TOL)


@pytest.mark.slow
def test_predict_cli_runs_no_code_from_the_model(setup, test_clips, tmp_path, capsys):
    """`asd predict` builds the model from the artifacts: a replaced code file in a downloaded
    model folder is never run."""
    from mlflow.artifacts import download_artifacts

    folder = Path(download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path / "model"),
                                     tracking_uri=setup.uri))
    marker = tmp_path / "ran"
    (folder / "pyfunc_entry.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    row = test_clips.iloc[0]
    rc = cli.main(["predict", "--model", str(folder), row["wav"]])
    lines = _parse_lines(capsys.readouterr().out)
    assert rc == 0 and not marker.exists()
    assert float(lines[0][1]) == pytest.approx(row["score"], abs=2e-6 + TOL)


@pytest.mark.slow
def test_predict_cli_real_dcase_clips(setup, real_audio_dir, capsys):
    clips = sorted(str(p) for p in real_audio_dir.glob("*.wav"))
    rc = cli.main(["predict", "--model", f"models:/{MODEL_NAME}@champion", "--tracking-uri", setup.uri,
                   "--machine", "valve", "--section", "00", *clips])
    lines = _parse_lines(capsys.readouterr().out)
    assert rc == 0
    assert [ln[0] for ln in lines] == clips
    for ln in lines:  # format only: the tiny model says nothing about quality
        assert len(ln) == 4 and math.isfinite(float(ln[1])) and ln[2] in ("0", "1") and ln[3]


# ----------------------------------------------------------------------------- promotion helpers
@pytest.mark.slow
def test_promote_and_rollback(setup):
    assert registry.promote(MODEL_NAME, 2) == "1"
    assert registry.get_alias_version(MODEL_NAME, "champion").version == "2"
    assert registry.get_alias_version(MODEL_NAME, "previous_champion").version == "1"
    assert registry.rollback(MODEL_NAME) == "1"
    assert registry.get_alias_version(MODEL_NAME, "champion").version == "1"
    registry.set_version_tags(MODEL_NAME, 2, {"retrain_decision": "kept_champion"})
    assert setup.client.get_model_version(MODEL_NAME, "2").tags["retrain_decision"] == "kept_champion"


def test_section_and_path_inference():
    from pipelines.serving.predict import infer_machine_section
    from pipelines.serving.pyfunc_model import normalize_section

    assert [normalize_section(s) for s in (0, "0", "00", "section_01", 3.0, np.int64(2))] == \
        ["00", "00", "00", "01", "03", "02"]
    assert infer_machine_section("d/fan/test/section_02_target_test_normal_0001_x.wav") == ("fan", "02")
    assert infer_machine_section("d/fan/section_00_test_0001.wav") == ("fan", "00")
    assert infer_machine_section("d/x/clip.wav", "valve", "1") == ("valve", "1")
    with pytest.raises(ValueError, match="--section"):
        infer_machine_section("d/fan/test/clip.wav")
