"""The interface every detector implements, and what the pipeline asks of it.

The runner (:mod:`pipelines.operations.runner`) trains a detector stage by stage
(:meth:`Detector.stages`, :meth:`Detector.fit`), the scoring job (:mod:`pipelines.stages.score`)
reads both splits of the feature store and asks the detector for scores and decisions
(:meth:`Detector.score`) and, for a servable detector, for the model that predictions and the
registry serve (:meth:`Detector.export`); which detector trained a model directory is written in
its ``meta.json`` (``"detector"``), so scoring and serving never guess from file names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from asd.backend import decide
from asd.contracts import section_key
from pipelines.config import PipelineConfig
from pipelines.store import ClipTable


@dataclass(frozen=True)
class TrainingStage:
    """One training stage of a detector as the runner sees it."""

    name: str  # model directory <run_dir>/models/<name>, MLflow stage run, Ray Train run name prefix
    sections: tuple[str, ...]  # the config sections its fingerprint covers
    init: str | None = None  # the stage whose model it starts from (None: from the data alone)


class Detector(ABC):
    """Fit on the training split of the feature store, score the test split.

    ``score`` returns the test clips' metadata with the columns ``score`` (higher = more
    anomalous), ``decision`` (1 anomalous, 0 normal, from the detector's own threshold) and
    ``nearest_attribute`` (or None), plus the per-section scoring backends (objects with
    ``score``, ``nearest_keys``, ``threshold`` and ``state_dict``: :class:`asd.backend.SectionModel`,
    :class:`asd.knn_backend.KnnSection`; empty when the detector has none).
    """

    name: ClassVar[str]
    weights_file: ClassVar[str]  # in a finished model directory, beside meta.json
    stage_names: ClassVar[tuple[str, ...]]  # every stage ``fit`` accepts
    # the scoring job exports the model (``export``) for predictions and the registry
    # (pipelines.serving, whose ENCODERS must know the detector); False: scored in the job only
    servable: ClassVar[bool] = False
    # fitting is cheap and needs no Ray: ``asd score`` fits it when no model exists yet
    fits_in_scoring: ClassVar[bool] = False
    # retraining starts its last stage from the champion's weights (else it fits from the data alone)
    retrains_from_champion: ClassVar[bool] = True

    @abstractmethod
    def stages(self, cfg: PipelineConfig) -> list[TrainingStage]:
        """The stages ``asd run`` trains for ``cfg``, in order."""

    @abstractmethod
    def fit(self, cfg: PipelineConfig, stage: str, *, store: str | Path, out_dir: str | Path,
            init_model: str | Path | None = None, mlflow_run_id: str | None = None,
            tracking_uri: str | None = None, run_name: str | None = None,
            callbacks: Sequence = ()) -> Path:
        """Train ``stage`` on the store's training clips; write the model to ``out_dir``; return it.
        A re-run with the same ``run_name`` resumes from its last epoch checkpoint."""

    @abstractmethod
    def score(self, cfg: PipelineConfig, model_dir: str | Path, train: ClipTable, test: ClipTable
              ) -> tuple[pd.DataFrame, dict]:
        """Scores and decisions of the test clips (see the class docstring)."""

    @abstractmethod
    def save(self, directory: str | Path, model, cfg: PipelineConfig, **info) -> Path:
        """Write ``model`` and its ``meta.json`` (naming this detector) into ``directory``."""

    @abstractmethod
    def load(self, directory: str | Path) -> tuple[object, dict]:
        """The model saved in ``directory`` and its meta (every tensor read with weights_only)."""

    @abstractmethod
    def label(self, cfg: PipelineConfig) -> str:
        """The row name of the paper's Table 1 this configuration reproduces."""

    def export(self, model_dir: str | Path, served_dir: str | Path) -> Path:
        """Write into ``served_dir`` what a prediction needs besides the scoring job's per-section
        backends: a ``meta.json`` naming this detector and its features, and any weights."""
        raise NotImplementedError(f"the {self.name} detector is scored in the scoring job only")

    def model_dir(self, cfg: PipelineConfig, stage: str) -> Path:
        return cfg.path(f"models/{stage}")

    def trained_model_dir(self, cfg: PipelineConfig) -> Path | None:
        """The latest finished stage's model directory under the run directory, if any."""
        for stage in reversed(self.stage_names):
            d = self.model_dir(cfg, stage)
            if (d / self.weights_file).is_file():
                return d
        return None


def scored_frame(meta: pd.DataFrame) -> pd.DataFrame:
    """The test metadata with empty ``score`` / ``decision`` / ``nearest_attribute`` columns."""
    out = meta.copy()
    out["score"], out["decision"], out["nearest_attribute"] = float("nan"), -1, None
    return out


def score_clips(test_meta: pd.DataFrame, vectors: torch.Tensor, sections: dict) -> pd.DataFrame:
    """Scores, decisions and nearest attribute of every test clip (row ``i`` of ``vectors`` is
    clip ``i``), by its section's backend; a section without one is an error."""
    out = scored_frame(test_meta)
    for (machine, section), rows in test_meta.groupby(["machine", "section"], sort=True):
        key = section_key(machine, section)
        if key not in sections:
            raise ValueError(f"test clips of {key} have no training clips to fit the scorer")
        backend = sections[key]
        scores, nearest = backend.score(vectors[torch.tensor(rows.index.to_numpy())])
        out.loc[rows.index, "score"] = scores.numpy()
        out.loc[rows.index, "decision"] = decide(scores, backend.threshold).numpy()
        out.loc[rows.index, "nearest_attribute"] = [None if k is None else str(k)
                                                    for k in backend.nearest_keys(nearest)]
    return out
