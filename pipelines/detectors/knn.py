"""The nearest-training-clip detector (``method: knn``): the floor baseline and the spectral kNN.

Nothing is trained: the "knn" stage reads the training split of the feature store and writes a
model directory holding ``meta.json`` (``"detector": "knn"``) and ``knn.pt``, the per-(machine,
section) matrix of training-clip vectors (``knn.representation``: :func:`asd.knn.clip_statistics`
or :func:`asd.knn.spectrum_shape`) with each row's path, domain and attribute class, loadable
with ``torch.load(weights_only=True)``. The scoring job (:func:`score_knn`) scores a test clip
by its cosine distance to the nearest training clip of the same section, both domains, each
distance divided by a scale to the power ``knn.power`` (:func:`asd.knn.scaled_nearest`;
``knn.normalisation``: ``none``, the floor's plain distance; ``local``, the training clip's own
distance to its nearest other clip, :func:`asd.knn.local_radii`; ``domain``, one scale per
domain, :func:`asd.knn.domain_scales`), and sets the section's decision threshold as the AE
baseline does: gamma fit (``asd.backend.fit_gamma_threshold``) to the training clips' own scores,
here leave-one-out (each against the *other* training clips). Works on any ``features.kind``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from asd.backend import decide, fit_gamma_threshold
from asd.contracts import META_FILE, section_key
from asd.knn import (REPRESENTATIONS, batch_clip_statistics, cosine_distances, domain_scales, local_radii,
                     scaled_nearest)
from pipelines.config import PipelineConfig, to_dict
from pipelines.detectors.base import Detector, TrainingStage, scored_frame
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
         "distance": "cosine", "dim": dims.pop() if len(dims) == 1 else sorted(dims),
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


def score_knn(model_dir, test, cfg: PipelineConfig) -> tuple[pd.DataFrame, dict]:
    """Scores, decisions and nearest training clip's attribute class of every test clip.

    Returns the scored test metadata (columns ``score``, ``decision``, ``nearest_attribute``)
    and an empty dict of prototype-backend sections, as the AE baseline."""
    sections, meta = load_knn(model_dir)
    if meta.get("feature_version") not in (None, cfg.features.version):
        raise ValueError(f"the kNN model in {model_dir} was built from features version "
                         f"{meta['feature_version']}, the config asks for {cfg.features.version}")
    # models written before the spectral kNN describe their clip statistics in words: the floor
    representation = meta.get("representation")
    representation = representation if representation in REPRESENTATIONS else "statistics"
    normalisation, power = meta.get("normalisation", "none"), meta.get("power", 1.0)
    scored = scored_frame(test.meta)
    if test.meta.empty:
        return scored, {}
    test_stats = batch_clip_statistics(test.features, representation)
    for (machine, section), rows in test.meta.groupby(["machine", "section"], sort=True):
        key = section_key(machine, section)
        if key not in sections:
            raise ValueError(f"test clips of {key} have no training clips to fit the scorer")
        ref = sections[key]["statistics"]
        if ref.shape[0] < 2:
            raise ValueError(f"{key}: the kNN threshold needs at least 2 training clips, got {ref.shape[0]}")
        to_train = cosine_distances(test_stats[torch.tensor(rows.index.to_numpy())], ref)
        among_train = cosine_distances(ref, ref)
        scales = _training_clip_scales(among_train, sections[key].get("domains"), normalisation)
        score, nearest = scaled_nearest(to_train, scales, power)
        loo, _ = scaled_nearest(among_train.fill_diagonal_(float("inf")), scales, power)  # each without itself
        threshold = fit_gamma_threshold(loo, cfg.score.threshold_quantile)
        attrs = sections[key]["attribute_class"]
        scored.loc[rows.index, "score"] = score.numpy()
        scored.loc[rows.index, "decision"] = decide(score, threshold).numpy()
        scored.loc[rows.index, "nearest_attribute"] = [attrs[int(i)] or None for i in nearest.tolist()]
    return scored, {}


def _training_clip_scales(among_train: torch.Tensor, domains: list[str] | None, normalisation: str) -> torch.Tensor:
    """The scale [N] that divides every distance to each training clip (``knn.normalisation``)."""
    if normalisation == "local":
        return local_radii(among_train)
    if normalisation == "domain":
        domains = domains or [""] * among_train.shape[0]
        scales = domain_scales(among_train, domains)
        return torch.tensor([scales[d] for d in domains], dtype=torch.float64)
    return torch.ones(among_train.shape[0], dtype=torch.float64)


class KnnDetector(Detector):
    name = "knn"
    weights_file = KNN_FILE
    stage_names = ("knn",)
    fits_in_scoring = True

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

    def label(self, cfg: PipelineConfig) -> str:
        return "kNN baseline"


DETECTOR = KnnDetector()
