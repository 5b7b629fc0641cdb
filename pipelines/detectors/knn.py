"""The nearest-training-clip detector (``method: knn``): the floor baseline and the spectral kNN.

Nothing is trained: the "knn" stage reads the training split of the feature store and writes a
model directory holding ``meta.json`` (``"detector": "knn"``) and ``knn.pt``, the per-(machine,
section) matrix of training-clip vectors (``knn.representation``: :func:`asd.knn.clip_statistics`
or :func:`asd.knn.spectrum_shape`) with each row's path, domain and attribute class, loadable
with ``torch.load(weights_only=True)``. The scoring job (:func:`score_knn`) scores a test clip
by its distance (``knn.distance``: cosine, or Euclidean in units of each dimension's spread over
the section's training clips) to the nearest training clip of the same section, both domains, each
distance divided by a scale to the power ``knn.power`` (:func:`asd.knn.scaled_nearest`;
``knn.normalisation``: ``none``, the floor's plain distance; ``local``, the training clip's own
distance to its nearest other clip, :func:`asd.knn.local_radii`; ``domain``, one scale per
domain, :func:`asd.knn.domain_scales`), and sets the section's decision threshold as the AE
baseline does: gamma fit (``asd.backend.fit_gamma_threshold``) to the training clips' own scores,
here leave-one-out (each against the *other* training clips). Works on any ``features.kind``.

Each section's vectors, scales and threshold form one :class:`asd.knn_backend.KnnSection`, the
scoring job's per-section backend; the job saves them (``sections.pt``) beside the exported
``meta.json`` (:meth:`KnnDetector.export`), which is what the served model
(:mod:`pipelines.serving.pyfunc_model`) scores with, so predictions repeat the job's scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from asd.contracts import META_FILE, section_key
from asd.knn import REPRESENTATIONS, batch_clip_statistics
from asd.knn_backend import KnnSection, fit_knn_section
from pipelines.config import PipelineConfig, to_dict
from pipelines.detectors.base import Detector, TrainingStage, score_clips, scored_frame
from pipelines.store import ClipTable, load_split

KNN_FILE = "knn.pt"


def save_knn(directory, sections: dict, cfg: PipelineConfig) -> Path:
    """Write ``sections`` (key -> {"statistics", "paths", "domains", "attribute_class"}) and meta.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sections, directory / KNN_FILE)
    dims = {int(s["statistics"].shape[1]) for s in sections.values()}
    (directory / META_FILE).write_text(json.dumps(
        {"detector": "knn", "stage": "knn", "features": asdict(cfg.features), "feature_version": cfg.features.version,
         "representation": cfg.knn.representation, "normalisation": cfg.knn.normalisation,
         "power": cfg.knn.power,
         "distance": cfg.knn.distance, "dim": dims.pop() if len(dims) == 1 else sorted(dims),
         "sections": {k: int(s["statistics"].shape[0]) for k, s in sorted(sections.items())},
         "train_config": to_dict(cfg)}, indent=2))
    return directory


def fit_knn(train, cfg: PipelineConfig, out_dir) -> Path:
    """The knn stage from an in-memory training ClipTable: statistics per section, saved."""
    if train.meta.empty:
        raise ValueError("the feature store holds no training clips for the kNN baseline")
    stats = batch_clip_statistics(train.features, cfg.knn.representation)
    sections = {}
    for (machine, section), rows in train.meta.groupby(["machine", "section"], sort=True):
        idx = rows.index.to_numpy()
        sections[section_key(machine, section)] = {
            "statistics": stats[torch.tensor(idx)].contiguous(),
            "paths": [str(p) for p in rows["path"]],
            "domains": ["" if pd.isna(d) else str(d) for d in rows["domain"]],
            "attribute_class": ["" if pd.isna(a) else str(a) for a in rows["attribute_class"]],
        }
    return save_knn(out_dir, sections, cfg)


def run_knn_stage(cfg: PipelineConfig, *, store, out_dir) -> Path:
    """The knn stage of ``asd run``: read the store's training split, write the model directory."""
    train = load_split(store, "train", feature_version=cfg.features.version)
    return fit_knn(train, cfg, out_dir)


def load_knn(directory) -> tuple[dict, dict]:
    """``(sections, meta)`` of a knn model directory (``torch.load(weights_only=True)``)."""
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("detector", meta.get("stage")) != "knn":
        raise ValueError(f"{directory} is not a kNN model directory (stage {meta.get('stage')!r})")
    return torch.load(directory / KNN_FILE, weights_only=True), meta


def representation_of(meta: dict) -> str:
    """The clip vector a kNN model directory's meta.json asks for: models written before the
    spectral kNN describe their clip statistics in words, and are the floor's statistics."""
    representation = meta.get("representation")
    return representation if representation in REPRESENTATIONS else "statistics"


def fit_sections(saved: dict, meta: dict, quantile: float) -> dict[str, KnnSection]:
    """Every section's :class:`KnnSection` (scales and leave-one-out threshold) from ``knn.pt``."""
    sections = {}
    for key, entry in sorted(saved.items()):
        try:
            sections[key] = fit_knn_section(entry["statistics"], entry.get("domains"), entry["attribute_class"],
                                            meta.get("normalisation", "none"), meta.get("power", 1.0), quantile,
                                            meta.get("distance", "cosine"))
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
    return sections


def score_knn(model_dir, test, cfg: PipelineConfig) -> tuple[pd.DataFrame, dict[str, KnnSection]]:
    """Scores, decisions and nearest training clip's attribute class of every test clip.

    Returns the scored test metadata (columns ``score``, ``decision``, ``nearest_attribute``)
    and every section's :class:`KnnSection`."""
    saved, meta = load_knn(model_dir)
    if meta.get("feature_version") not in (None, cfg.features.version):
        raise ValueError(f"the kNN model in {model_dir} was built from features version "
                         f"{meta['feature_version']}, the config asks for {cfg.features.version}")
    sections = fit_sections(saved, meta, cfg.score.threshold_quantile)
    if test.meta.empty:
        return scored_frame(test.meta), sections
    vectors = batch_clip_statistics(test.features, representation_of(meta))
    return score_clips(test.meta, vectors, sections), sections


class KnnDetector(Detector):
    name = "knn"
    weights_file = KNN_FILE
    stage_names = ("knn",)
    servable = True
    fits_in_scoring = True
    retrains_from_champion = False  # nothing is learnt: the knn stage reads every training clip again

    def stages(self, cfg: PipelineConfig) -> list[TrainingStage]:
        return [TrainingStage("knn", ("features", "knn"))]

    def fit(self, cfg, stage, *, store, out_dir, init_model=None, mlflow_run_id=None, tracking_uri=None,
            run_name=None, callbacks=()) -> Path:
        return run_knn_stage(cfg, store=store, out_dir=out_dir)

    def score(self, cfg, model_dir, train: ClipTable, test: ClipTable) -> tuple[pd.DataFrame, dict]:
        return score_knn(model_dir, test, cfg)

    def save(self, directory, model, cfg, **info) -> Path:
        return save_knn(directory, model, cfg)

    def load(self, directory) -> tuple[dict, dict]:
        return load_knn(directory)

    def export(self, model_dir, served_dir) -> Path:
        """The model's meta.json with its representation spelled out; the vectors, scales and
        thresholds are the scoring job's sections."""
        served_dir = Path(served_dir)
        served_dir.mkdir(parents=True, exist_ok=True)
        meta = json.loads((Path(model_dir) / META_FILE).read_text())
        (served_dir / META_FILE).write_text(json.dumps({**meta, "representation": representation_of(meta)}, indent=2))
        return served_dir

    def label(self, cfg: PipelineConfig) -> str:
        return "spectral kNN" if cfg.knn.representation == "spectrum_shape" else "kNN baseline"


DETECTOR = KnnDetector()
