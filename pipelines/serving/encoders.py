"""How each servable detector turns clips' features into the vectors its per-section backends score.

The served model (:mod:`pipelines.serving.pyfunc_model`) reads the detector's name from the
``meta.json`` of its model folder (written by ``Detector.export`` in the scoring job) and takes
the encoder and the per-section backend type from :data:`ENCODERS`:

* ``prototype`` — :class:`NetworkEncoder`: the embedding network (``model.pt``), whole-clip or
  window-mean embeddings as the scoring job embedded; backends :class:`asd.backend.SectionModel`;
* ``knn`` — :class:`KnnEncoder`: the clip vector of ``asd.knn`` named by the meta's
  ``representation``; backends :class:`asd.knn_backend.KnnSection`.

Kept here rather than in the detector modules, which import Ray and the training code that a
served model never needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asd.backend import SectionModel
from asd.knn import batch_clip_statistics
from asd.knn_backend import KnnSection
from asd.training import embed_clips
from pipelines import detectors
from pipelines.checkpoints import load_model


class NetworkEncoder:
    """Embeddings [N, D] exactly as the scoring job computes them (whole clip or window mean)."""

    section_type = SectionModel

    def __init__(self, model_dir: str | Path, meta: dict, settings: dict) -> None:
        if settings["embedding"] not in ("whole", "windows"):
            raise ValueError(f"embedding must be 'whole' or 'windows', got {settings['embedding']!r}")
        self.model, _ = load_model(model_dir)
        self.settings = settings

    def min_frames(self) -> int:
        """Windows need at least one crop; a whole clip, one frame."""
        return int(self.settings["crop_frames"]) if self.settings["embedding"] == "windows" else 1

    def encode(self, features: list[torch.Tensor]) -> torch.Tensor:
        windows = self.settings["embedding"] == "windows"
        return embed_clips(self.model, features, range(len(features)), int(self.settings["batch_size"]),
                           window=int(self.settings["crop_frames"]) if windows else None,
                           hop=int(self.settings["window_hop"]))


class KnnEncoder:
    """The kNN's clip vectors [N, D] float64 (``knn.representation``), as the scoring job made them."""

    section_type = KnnSection

    def __init__(self, model_dir: str | Path, meta: dict, settings: dict) -> None:
        self.representation = meta["representation"]

    def min_frames(self) -> int:
        return 1

    def encode(self, features: list[torch.Tensor]) -> torch.Tensor:
        return batch_clip_statistics(features, self.representation)


# detector name (meta.json) -> its encoder; a detector missing here is scored in the job only
ENCODERS = {"prototype": NetworkEncoder, "knn": KnnEncoder}


def encoder_type(meta: dict) -> type:
    """The encoder of the detector that a served model folder's ``meta.json`` names (a network
    written before meta.json named its detector is a prototype network, by its stage)."""
    name = detectors.name_in_meta(meta)
    if name not in ENCODERS:
        raise ValueError(f"the {name} detector is scored in the scoring job only: it has no served model")
    return ENCODERS[name]
