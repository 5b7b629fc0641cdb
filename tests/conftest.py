"""Shared, generic test helpers. Keep this file small: module-specific helpers belong in the test file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from scipy.io import wavfile

REAL_AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "real_audio"

# Ray workers unpickle functions defined in test modules by module name: put tests/ on the
# path of every process Ray starts from here (they inherit this environment).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _mlflow_uris_restored():
    """``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI`` (for subprocesses), and the
    pipeline reads that variable when a config names no server: a test that ran the pipeline
    against a server would send every later test's runs there. Put both back afterwards."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    import mlflow

    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None unsets the variable too
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# module scope: a module's own fixtures (a pipeline run shared by its tests) are undone after it
_module_mlflow_uris = pytest.fixture(scope="module", autouse=True, name="_module_mlflow_uris")(_mlflow_uris_restored)
_test_mlflow_uris = pytest.fixture(autouse=True, name="_test_mlflow_uris")(_mlflow_uris_restored)


@pytest.fixture
def write_wav():
    """``write_wav(path, samples, sr) -> Path``: write a numpy array with scipy.io.wavfile.

    int16 arrays become 16-bit PCM, float32 arrays IEEE-float WAV; [n] is mono, [n, ch] is
    ``ch`` channels. Parent folders are created. Independent of soundfile, which asd.audio uses.
    """

    def _write(path: str | os.PathLike, samples: np.ndarray, sr: int = 16000) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        wavfile.write(str(path), sr, np.asarray(samples))
        return path

    return _write


@pytest.fixture
def real_audio_dir() -> Path:
    """Folder of the real DCASE clips shared by the project (never copied into the repo); the test
    is skipped when it is absent."""
    env = os.environ.get("ASD_REAL_AUDIO_DIR")
    folder = Path(env) if env else REAL_AUDIO_DIR
    if not folder.is_dir() or not any(folder.glob("*.wav")):
        pytest.skip(f"real DCASE clips not available at {folder}")
    return folder


MLFLOW_SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "mlflow_server.sh"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI (``http://127.0.0.1:<port>``) of a real ``mlflow server`` started for the session with
    infra/mlflow_server.sh: SQLite backend and proxied artifacts in a tmp folder, a free port,
    same Python as the tests. Stopped (its whole process group) at the end of the session."""
    yield from serve_mlflow(tmp_path_factory.mktemp("mlflow-server"))


def serve_mlflow(state: Path):
    """Start a real ``mlflow server`` with its state in ``state`` (``state/server.pid`` is the
    leader of its process group), yield its URI, stop it."""
    import socket
    import subprocess
    import sys

    script = MLFLOW_SERVER_SCRIPT
    if not script.is_file():
        pytest.skip(f"{script} is missing")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    cmd = ["bash", str(script), "--port", str(port), "--dir", str(state), "--python", sys.executable,
           "--background", "--timeout", "180"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0:
        log = state / "server.log"
        tail = log.read_text()[-3000:] if log.is_file() else ""
        pytest.fail(f"mlflow server did not start:\n{proc.stdout}\n{proc.stderr}\n{tail}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(script), "--stop", "--dir", str(state)], capture_output=True,
                       text=True, timeout=60, env=env)


@pytest.fixture
def dead_tracking_uri(monkeypatch) -> str:
    """``http://127.0.0.1:<port>`` where nothing listens, with MLflow's HTTP settings left to the
    pipeline (pipelines.tracking bounds them only where the environment sets none)."""
    import socket

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded, so teardown also undoes what the pipeline sets
        monkeypatch.delenv(name)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, like CI) for every test that needs it; stopped at the end."""
    import ray

    from pipelines.ray_runtime import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _global_torch_state_is_left_alone():
    """A library call that flips process-wide torch state (grad mode, default dtype) breaks
    the tests that run after it, and a user's own code: fail the test that did it."""
    import torch

    before = (torch.is_grad_enabled(), torch.get_default_dtype())
    yield
    after = (torch.is_grad_enabled(), torch.get_default_dtype())
    torch.set_grad_enabled(before[0])
    torch.set_default_dtype(before[1])
    assert after == before, f"torch global state changed by this test: {before} -> {after}"
