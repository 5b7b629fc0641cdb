"""``asd predict``: score WAV files with a registered or local model.

    asd predict --model models:/asd-prototype@champion --machine valve --section 00 a.wav b.wav
    asd predict --model runs/demo/scoring dev_data/valve/test/section_00_*.wav

Prints one line per clip, ``path<TAB>score<TAB>decision<TAB>nearest_attribute`` or
``path<TAB>ERROR: reason`` (``--json``: one JSON document). Only regular files of at most
``MAX_CLIP_BYTES`` (64 MiB) are read: a FIFO, a device such as ``/dev/zero``, a folder or a larger
file is that clip's error, never a hang; a clip that is a constant signal (silence, or stereo
channels that cancel in the down-mix) is an error too, not a score. Without ``--machine``/``--section``
they are read from the DCASE file name and its folders (``<machine>/test/section_00_...wav``).
Exit status: 0 all clips scored, 1 some clip failed (the others are still printed), 2 usage
error (model not found, unknown machine/section, ...).

The files named on the command line are read here, with the user's own rights, and handed to
the model as bytes (its ``audio`` column), so the model's input root does not apply. A logged
model (registry or local MLmodel folder) is built from its artifacts only
(:meth:`~pipelines.serving.pyfunc_model.AsdPyfuncModel.from_logged_model`): neither its code file nor
a pickle in it runs here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from asd.contracts import SETTINGS_FILE, section_key
from asd.metadata import SPLIT_FOLDERS, ClipNameError, parse_clip_name
from pipelines.config import load_config
from pipelines.errors import UserError, first_line
from pipelines.serving.pyfunc_model import (AsdPyfuncModel, is_scoring_folder, normalize_section, read_clip_file,
                                             scoring_settings)
from pipelines.tracking import connect
from pipelines.tracking import tracking_uri as cfg_uri

REGISTRY_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "http://", "https://", "s3://",
                    "gs://", "file:")
CHUNK = 64  # clips read and scored together: bounds the audio bytes held at once


class UsageError(UserError):
    pass


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="score WAV files with a registered or local model",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", required=True,
                   help="models:/<name>@<alias> or models:/<name>/<version> (registry), runs:/..., "
                        "or a local folder: a logged pyfunc model (holds MLmodel) or an "
                        "`asd score` output folder (model/ + sections.pt)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, "
                                          "else the one of --config)")
    p.add_argument("--config", "-c", default=None,
                   help="config used for the default tracking URI and, for a scoring folder without "
                        "scoring.json, the embedding settings (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    p.add_argument("--machine", help="machine type of every clip (default: from the folder names)")
    p.add_argument("--section", help="section id of every clip, e.g. 00 (default: from the file name)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of TSV lines")
    p.add_argument("clips", nargs="+", metavar="WAV", help="audio files to score")
    p.set_defaults(func=main)


# ----------------------------------------------------------------------------- model loading
def _config(args):
    return load_config(args.config or "demo", args.overrides)


def load_predictor(model: str, tracking_uri: str | None = None, config=None):
    """(AsdPyfuncModel, description) for a registry URI or a local folder; UsageError if not found."""
    local = Path(model)
    if not model.startswith(REGISTRY_SCHEMES):
        if not local.exists():
            raise UsageError(f"--model {model}: no such file or folder (a registry model is "
                             "models:/<name>@<alias> or models:/<name>/<version>)")
        if (local / "MLmodel").is_file():
            return _load_logged(local), str(local)
        if is_scoring_folder(local):
            settings = None
            if not (local / SETTINGS_FILE).is_file() and config is not None:
                settings = scoring_settings(config)
            return AsdPyfuncModel.from_dir(local, settings), str(local)
        raise UsageError(f"--model {model}: neither a logged MLflow model (MLmodel) nor an "
                         "`asd score` output folder (model/meta.json + sections.pt)")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and config is not None:
        uri = cfg_uri(config)
    if uri:
        connect(uri)  # a dead server: one line now, not minutes of retries
    with tempfile.TemporaryDirectory(prefix="asd-model-") as tmp:  # loading reads it all
        return _load_logged(model, where=uri, download_to=tmp), model


def _load_logged(model: str | Path, where: str | None = None, download_to: str | None = None):
    """The :class:`AsdPyfuncModel` of a logged pyfunc: a local MLmodel folder, or a URI
    downloaded into ``download_to`` first; UsageError when it cannot be loaded."""
    try:
        local = download_artifacts(artifact_uri=model, dst_path=download_to) if download_to else model
        return AsdPyfuncModel.from_logged_model(local)
    except MlflowException as err:
        at = f" at {where}" if where else ""
        raise UsageError(f"cannot load model {model}{at}: {first_line(err)}") from err
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load model {model}: {err}") from err


# ----------------------------------------------------------------------------- clip metadata
def infer_machine_section(path: str | Path, machine: str | None = None,
                          section: str | None = None) -> tuple[str, str]:
    """Machine from ``<machine>/<split folder>/file.wav`` (or the parent folder), section from the
    DCASE file name; explicit values win. Raises ValueError when one cannot be inferred."""
    p = Path(path)
    if machine is None:
        parent = p.resolve().parent if p.parent == Path(".") else p.parent
        folder = parent.parent if parent.name in SPLIT_FOLDERS else parent  # 2021: source_test/, target_test/
        machine = folder.name or None
        if machine is None:
            raise ValueError("cannot infer the machine type from the folders; pass --machine")
    if section is None:
        try:
            section = parse_clip_name(p.name, machine).section
        except ClipNameError as err:
            raise ValueError(f"cannot infer the section ({err}); pass --section") from err
    return machine, section


# ----------------------------------------------------------------------------- main
def predict_files(predictor, clips: list[str], machine: str | None = None,
                  section: str | None = None) -> list[dict]:
    """One record per clip: path, machine, section, score, decision, nearest_attribute, error."""
    records = []
    for clip in clips:
        rec = {"path": clip, "machine": None, "section": None, "score": None, "decision": None,
               "nearest_attribute": None, "error": None}
        try:
            m, s = infer_machine_section(clip, machine, section)
            rec["machine"], rec["section"] = m, normalize_section(s)
        except ValueError as err:
            rec["error"] = str(err)
        records.append(rec)
    pending = [rec for rec in records if rec["error"] is None]
    for start in range(0, len(pending), CHUNK):
        _score(predictor, pending[start:start + CHUNK])
    return records


def _score(predictor, records: list[dict]) -> None:
    """Read the records' files and fill in their scores or errors."""
    rows = {}
    for i, rec in enumerate(records):
        try:
            audio = read_clip_file(rec["path"])
        except (OSError, ValueError) as err:  # missing, unreadable, a FIFO or device, too large
            rec["error"] = f"cannot read the file: {getattr(err, 'strerror', None) or err}"
            continue
        rows[i] = {"machine": rec["machine"], "section": rec["section"], "audio": audio}
    if not rows:
        return
    out = predictor.predict(None, pd.DataFrame.from_dict(rows, orient="index"))
    for i, row in out.iterrows():
        rec = records[int(i)]
        if row["error"] is not None and not (isinstance(row["error"], float) and math.isnan(row["error"])):
            rec["error"] = str(row["error"])
            continue
        rec["score"] = float(row["score"])
        rec["decision"] = int(row["decision"])
        rec["nearest_attribute"] = row["nearest_attribute"]


def main(args) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr readable
    try:
        config = _config(args)
    except Exception as err:  # a broken explicit --config is a usage error; the default is optional
        if args.config or args.overrides:
            print(f"asd predict: {err}", file=sys.stderr)
            return 2
        config = None
    predictor, described = load_predictor(args.model, args.tracking_uri, config)  # UsageError: exit 2 (cli)
    _check_explicit(predictor, args.machine, args.section)
    records = predict_files(predictor, args.clips, args.machine, args.section)
    failed = sum(r["error"] is not None for r in records)
    if args.json:
        print(json.dumps({"model": described, "clips": records, "failed": failed}, indent=2))
    else:
        for r in records:
            if r["error"] is not None:
                print(f"{r['path']}\tERROR: {r['error']}")
            else:
                print(f"{r['path']}\t{r['score']:.6f}\t{r['decision']}\t{r['nearest_attribute']}")
    sys.stdout.flush()
    if failed:
        print(f"asd predict: {failed} of {len(records)} clip(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _check_explicit(predictor, machine: str | None, section: str | None) -> None:
    """An explicit --machine/--section the model does not know is a usage error."""
    known = predictor.known_sections()
    if machine is not None and not any(k.startswith(f"{machine}/") for k in known):
        raise UsageError(f"the model knows no machine type {machine!r}; it knows "
                         f"{', '.join(sorted({k.split('/')[0] for k in known}))}")
    if section is not None:
        try:
            s = normalize_section(section)
        except ValueError as err:
            raise UsageError(f"--section {section!r}: {err}") from err
        if machine is not None and section_key(machine, s) not in known:
            raise UsageError(f"the model knows no section {s} of {machine}; it knows "
                             f"{', '.join(k for k in known if k.startswith(machine + '/'))}")
        if machine is None and not any(k.endswith(section_key("", s)) for k in known):  # any machine's
            raise UsageError(f"the model knows no section {s}; it knows {', '.join(known)}")
