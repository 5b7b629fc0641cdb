"""The trained detector as an MLflow pyfunc: a clip encoder + per-section scoring backends.

It serves the prototype network or the kNN detector, whichever the ``meta.json`` of its model
folder names (:mod:`pipelines.serving.encoders`), with one input and output contract.
Logged as MLflow *models from code* (:mod:`pipelines.serving.pyfunc_entry`), so no version in the
registry holds a pickle: its data are plain artifacts, read as tensors (``torch.load`` with
``weights_only=True``) and JSON (see :func:`pipelines.serving.registry.log_pyfunc_model`):

* ``model``    — the model folder the scoring job exported (``Detector.export``): ``meta.json``
  (detector, feature settings; the kNN's clip representation) and, for the network, its
  ``model.pt`` state dict, loaded with :func:`pipelines.checkpoints.load_model`;
* ``sections`` — ``sections.pt``: every (machine, section)'s scoring backend as a state dict:
  the network's prototypes, precision (inverse covariance), threshold and class keys
  (:class:`asd.backend.SectionModel`), or the kNN's training vectors, their scales, threshold and
  attribute classes (:class:`asd.knn_backend.KnnSection`);
* ``settings`` — ``scoring.json``: how the scoring job embedded clips (``embedding`` "whole" or
  "windows", ``window_hop``, ``crop_frames``, ``batch_size``: the network's) and the element
  type of the feature store (``feature_dtype``), so that a prediction repeats the scoring job's
  numbers.

Input: a ``pandas.DataFrame`` with ``machine``, ``section`` ("00"; ints are zero-padded) and
exactly one clip column per row:

* ``audio``    — the audio file's bytes (WAV, or another format soundfile decodes), or those
  bytes as base64 text: the form MLflow's scoring server JSON carries
  (``{"dataframe_records": [{"machine": "valve", "section": "00", "audio": "UklGR..."}]}``);
* ``path``     — a regular file of at most :data:`MAX_CLIP_BYTES` under the input root, the
  directory named by ``$ASD_INPUT_ROOT`` when the model is loaded (a host setting, never part of
  the model); relative paths are relative to it. Without it, path input is refused. Paths are
  resolved (symlinks included) before the check, and a refused path and a missing, unreadable or
  too large one give the same error (:data:`PATH_REFUSED`), so a caller cannot probe which files
  exist;
* ``waveform`` — 1-D float samples at the model's sample rate (an optional ``sample_rate``
  column resamples).

Output: one row per input row (same index) with ``score`` (min Mahalanobis distance, or the
kNN's scaled distance (``knn.distance``) to the nearest training clip),
``decision`` (1 anomalous, 0 normal), ``nearest_attribute`` and ``error`` (None, or why the row
could not be scored, e.g. a constant signal such as stereo channels that cancel in the down-mix;
the other rows are still scored). A failed row's ``score``, ``decision``
and ``nearest_attribute`` are None (object columns), so the scoring server answers ``null``,
never a bare ``NaN``; ``out["score"].astype(float)`` gives NaN for them.

Loads with ``mlflow.pyfunc.load_model("models:/<name>@champion")`` when the ``asd`` and
``pipelines`` packages are importable. :meth:`AsdPyfuncModel.from_logged_model` builds it from
a downloaded model folder's artifacts alone (no code from the folder runs), and
:meth:`AsdPyfuncModel.from_dir` from a local ``asd score`` output folder without MLflow.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import mlflow.pyfunc
from mlflow.models import Model

from asd.audio import AudioFormatError, load_audio, prepare_waveform, require_signal
from asd.backend import decide
from asd.contracts import META_FILE, SCORING_MODEL_DIR as MODEL_DIR, SECTIONS_FILE, SETTINGS_FILE
from asd.contracts import section_key
from asd.features import log_mel
from pipelines.checkpoints import feature_config, load_meta
from pipelines.serving.encoders import encoder_type
DEFAULT_SETTINGS = {"embedding": "whole", "window_hop": 32, "crop_frames": 64, "batch_size": 32,
                    "feature_dtype": "float32"}
INPUT_ROOT_ENV = "ASD_INPUT_ROOT"
# One message for every path that is not scored for where it is: outside the root, missing,
# not a regular file, too large, unreadable. Distinct messages would tell a caller which files exist.
PATH_REFUSED = "path not allowed or not readable"
# The largest audio file read from a path (asd predict's files, the ``path`` column): 64 MiB is
# over half an hour of 16 kHz 16-bit stereo, and bounds the memory a mistaken argument can take.
MAX_CLIP_BYTES = 64 * 2**20
CLIP_COLUMNS = ("audio", "path", "waveform")


def normalize_section(section) -> str:
    """``0``/``"0"``/``"00"``/``"section_00"``/``0.0`` -> ``"00"``; other ids as strings."""
    if section is None or (isinstance(section, float) and math.isnan(section)):
        raise ValueError("section is missing")
    if isinstance(section, (bool, np.bool_)):
        raise ValueError(f"section must be an id like '00', got {section!r}")
    if isinstance(section, (int, np.integer)):
        return f"{int(section):02d}"
    if isinstance(section, (float, np.floating)):
        if float(section).is_integer():
            return f"{int(section):02d}"
        raise ValueError(f"section must be an id like '00', got {section!r}")
    text = str(section).strip()
    if text.startswith("section_"):
        text = text[len("section_"):]
    if not text:
        raise ValueError("section is empty")
    return text.zfill(2) if text.isdigit() else text


def scoring_settings(cfg) -> dict:
    """The embedding settings of a :class:`pipelines.config.PipelineConfig` (what predictions need)."""
    return {
        "embedding": cfg.score.embedding,
        "window_hop": int(cfg.score.window_hop),
        "crop_frames": int(cfg.train.crop_frames),
        "batch_size": int(cfg.score.batch_size),
        "feature_dtype": str(cfg.extract.dtype),
        "feature_version": cfg.features.version,
        "threshold_quantile": float(cfg.score.threshold_quantile),
    }


def write_settings(cfg, directory: str | Path) -> Path:
    """Write ``scoring.json`` (the settings of ``cfg``) into ``directory``."""
    path = Path(directory) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scoring_settings(cfg), indent=2, sort_keys=True))
    return path


def is_scoring_folder(directory: str | Path) -> bool:
    """Whether ``directory`` is an ``asd score`` output folder with a served model."""
    directory = Path(directory)
    return (directory / MODEL_DIR / META_FILE).is_file() and (directory / SECTIONS_FILE).is_file()


def input_root() -> Path | None:
    """The resolved ``$ASD_INPUT_ROOT`` (None when unset); a setting that names no directory
    fails the load rather than refusing every path later."""
    value = os.environ.get(INPUT_ROOT_ENV, "").strip()
    if not value:
        return None
    root = Path(value).resolve()
    if not root.is_dir():
        raise ValueError(f"{INPUT_ROOT_ENV}={value} is not a directory")
    return root


def audio_bytes(value) -> bytes:
    """The file bytes of an ``audio`` cell: bytes as given, text as base64 (what JSON carries)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as err:
            raise ValueError(f"audio is not valid base64: {err}") from err
    raise TypeError(f"audio must be bytes or base64 text, got {type(value).__name__}")


def read_clip_file(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), at most :data:`MAX_CLIP_BYTES`;
    ``ValueError`` for anything else, ``OSError`` when it cannot be opened or read. Checked on the
    opened file, so that nothing swapped in after a check is read: reading a FIFO blocks until a
    writer comes (opened non-blocking here), ``/dev/zero`` never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:  # one byte over the limit tells a file that grew
            data = fh.read(MAX_CLIP_BYTES + 1) if info.st_size <= MAX_CLIP_BYTES else None
    finally:
        os.close(fd)
    if data is None or len(data) > MAX_CLIP_BYTES:
        raise ValueError(f"larger than the {MAX_CLIP_BYTES // 2**20} MiB an audio file may have")
    return data


def load_sections(path: str | Path, section_type: type) -> dict:
    """``sections.pt`` as ``section_type`` backends (the served detector's: its encoder's ``section_type``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: section_type.from_state_dict(v) for k, v in state.items()}


def load_scoring_sections(directory: str | Path) -> dict:
    """The per-section backends an ``asd score`` output folder saved, read as the detector of its
    exported model reads them; a folder without one (a detector scored in the job only) saved none."""
    directory = Path(directory)
    if not (directory / MODEL_DIR / META_FILE).is_file():
        return {}
    return load_sections(directory / SECTIONS_FILE, encoder_type(load_meta(directory / MODEL_DIR)).section_type)


class AsdPyfuncModel(mlflow.pyfunc.PythonModel):
    """A clip encoder (network or kNN representation) + per-section backends with thresholds;
    scores audio bytes, confined paths or waveforms."""

    def __init__(self) -> None:
        self.encoder = None
        self.features = None
        self.sections: dict = {}
        self.settings: dict = dict(DEFAULT_SETTINGS)
        self.input_root: Path | None = None

    # ------------------------------------------------------------------ loading
    def load_context(self, context) -> None:
        self._load(context.artifacts)

    def _load(self, artifacts: dict, fallback_settings: dict | None = None) -> None:
        """Read the artifacts; ``fallback_settings`` fill in for a missing ``scoring.json``."""
        settings = dict(DEFAULT_SETTINGS)
        if artifacts.get("settings") and Path(artifacts["settings"]).is_file():
            settings.update(json.loads(Path(artifacts["settings"]).read_text()))
        else:
            settings.update(fallback_settings or {})
        meta = load_meta(artifacts[MODEL_DIR])
        encoder = encoder_type(meta)
        self.encoder = encoder(artifacts[MODEL_DIR], meta, settings)
        self.features = feature_config(meta)
        self.sections = load_sections(artifacts["sections"], encoder.section_type)
        self.settings = settings
        self.input_root = input_root()

    @classmethod
    def from_logged_model(cls, directory: str | Path) -> "AsdPyfuncModel":
        """Load a logged pyfunc folder (``MLmodel``) from its artifacts only: unlike
        ``mlflow.pyfunc.load_model``, no code file or pickle in the folder is executed, so a
        tampered registry entry cannot run code here. Artifact paths must stay in the folder."""
        directory = Path(directory).resolve()
        conf = Model.load(str(directory)).flavors.get("python_function", {})
        artifacts = {}
        for key, info in (conf.get("artifacts") or {}).items():
            path = (directory / str(info.get("path", ""))).resolve()
            if not path.is_relative_to(directory):
                raise ValueError(f"{directory}: artifact {key!r} points outside the model folder")
            artifacts[key] = path
        if MODEL_DIR not in artifacts or "sections" not in artifacts:
            raise ValueError(f"{directory} is not an ASD model "
                             f"(needs the artifacts {MODEL_DIR!r} and 'sections')")
        self = cls()
        self._load(artifacts)
        return self

    @classmethod
    def from_dir(cls, directory: str | Path, settings: dict | None = None) -> "AsdPyfuncModel":
        """Load from an ``asd score`` output folder (``model/``, ``sections.pt``, ``scoring.json``).

        ``settings`` fills in for a missing ``scoring.json`` (else the defaults: whole clips)."""
        directory = Path(directory)
        if not is_scoring_folder(directory):
            raise FileNotFoundError(f"{directory} is not a scoring output folder "
                                    f"(needs {MODEL_DIR}/{META_FILE} and {SECTIONS_FILE})")
        self = cls()
        self._load({MODEL_DIR: directory / MODEL_DIR, "sections": directory / SECTIONS_FILE,
                    "settings": directory / SETTINGS_FILE}, settings)
        return self

    def known_sections(self) -> list[str]:
        return sorted(self.sections)

    # ------------------------------------------------------------------ features
    def confined_bytes(self, path) -> bytes:
        """The bytes of ``path`` if it resolves (symlinks followed) to a readable regular file of
        at most :data:`MAX_CLIP_BYTES` under the input root (:func:`read_clip_file`); else
        :data:`PATH_REFUSED`, the same whether or not it exists."""
        try:
            if self.input_root is not None:  # root / an absolute path is that path
                resolved = (self.input_root / os.fspath(path)).resolve()
                if resolved.is_relative_to(self.input_root):
                    return read_clip_file(resolved)
        except (OSError, RuntimeError, TypeError, ValueError):  # unreadable, too large, link loop, not a path
            pass
        raise PermissionError(PATH_REFUSED)

    def clip_features(self, row) -> torch.Tensor:
        """[n_mels, T] features of one row's clip (``audio``, ``path`` or ``waveform``), as the
        feature store holds them."""

        f = self.features
        given = [c for c in CLIP_COLUMNS if not _missing(row.get(c))]
        if len(given) != 1:
            raise ValueError(f"a row needs exactly one of {', '.join(CLIP_COLUMNS)}; got "
                             f"{', '.join(given) or 'none'}")
        if given[0] == "waveform":
            wave = torch.as_tensor(np.asarray(row["waveform"], dtype=np.float32)).reshape(-1)
            rate = row.get("sample_rate")
            wave = prepare_waveform(wave, f.sample_rate if _missing(rate) else int(rate), f.sample_rate,
                                    f.resample, "waveform")
        else:  # decoded from bytes, so that no error message names a file on this host
            data = audio_bytes(row["audio"]) if given[0] == "audio" else self.confined_bytes(row["path"])
            wave, info = load_audio(data, f.sample_rate, resample=f.resample, channels=f.channels)
            require_signal(info)  # as the feature store refuses it: silence has no score
        feats = log_mel(wave.float().contiguous(), f)
        dtype = getattr(torch, str(self.settings.get("feature_dtype", "float32")), torch.float32)
        if dtype != torch.float32:  # the scoring job reads features back from a store of this type
            feats = feats.to(dtype).to(torch.float32)
        need = self.min_frames()
        if feats.shape[-1] < need:
            raise AudioFormatError(f"clip too short: {feats.shape[-1]} frames, the model needs {need}")
        return feats

    def min_frames(self) -> int:
        """The fewest feature frames a clip needs: the encoder's, and the front end's."""
        return max(self.encoder.min_frames(), int(getattr(self.features, "min_frames", 1) or 1))

    # ------------------------------------------------------------------ predict
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if self.encoder is None:
            raise RuntimeError("model not loaded: use mlflow.pyfunc.load_model or AsdPyfuncModel.from_dir")

        df = _as_frame(model_input)
        n = len(df)
        score, decision = [None] * n, [None] * n
        nearest_attr, error = [None] * n, [None] * n
        by_key: dict[str, list[tuple[int, int]]] = {}  # section -> (row position, feature index)
        features: list[torch.Tensor] = []
        for pos, (_, row) in enumerate(df.iterrows()):
            try:
                machine = row.get("machine")
                if _missing(machine) or not str(machine).strip():
                    raise ValueError("machine is missing")
                key = section_key(str(machine).strip(), normalize_section(row.get("section")))
                if key not in self.sections:
                    raise KeyError(f"unknown machine/section {key}; the model knows "
                                   f"{', '.join(self.known_sections()) or 'none'}")
                feats = self.clip_features(row)
            except Exception as err:  # one bad row must not stop the others
                msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                error[pos] = str(msg) or type(err).__name__
                continue
            by_key.setdefault(key, []).append((pos, len(features)))
            features.append(feats)
        if features:
            vectors = self.encoder.encode(features)  # a network embeds under no_grad
            for key, items in by_key.items():
                backend = self.sections[key]
                scores, nearest = backend.score(vectors[torch.as_tensor([i for _, i in items])])
                decisions = decide(scores, backend.threshold).tolist()
                for (pos, _), s, d, k in zip(items, scores.tolist(), decisions, backend.nearest_keys(nearest)):
                    if not math.isfinite(s):
                        error[pos] = "the model gave a non-finite score"
                        continue
                    score[pos], decision[pos] = float(s), int(d)
                    nearest_attr[pos] = None if k is None else str(k)
        # object columns: a failed row's score is None, which JSON writes as null (a float
        # column's NaN would be a bare NaN, invalid JSON for strict clients)
        return pd.DataFrame({
            "score": pd.Series(score, index=df.index, dtype=object),
            "decision": pd.Series(decision, index=df.index, dtype=object),
            "nearest_attribute": pd.Series(nearest_attr, index=df.index, dtype=object),
            "error": pd.Series(error, index=df.index, dtype=object),
        }, index=df.index)


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return False


def _as_frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    if isinstance(model_input, list):
        return pd.DataFrame(model_input)
    raise TypeError(f"expected a pandas.DataFrame (machine, section, audio|path|waveform), "
                    f"got {type(model_input)}")
