"""The kNN detector's scoring backend of one (machine, section), fitted once from its training clips.

:class:`KnnSection` holds what scoring a clip needs: the training clips' vectors, each clip's
scale (``knn.normalisation``: :func:`training_clip_scales`), the power of the scales, the
decision threshold and each clip's attribute class. It has the interface of
:class:`asd.backend.SectionModel` (``score``, ``nearest_keys``, ``threshold``, ``state_dict``),
so that the scoring job, its plots and the served model treat the two detectors' sections alike,
and a served prediction repeats the scoring job's arithmetic on the same tensors.

Pure PyTorch; the distances are :mod:`asd.knn`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asd.backend import fit_gamma_threshold
from asd.knn import cosine_distances, domain_scales, local_radii, scaled_nearest

NORMALISATIONS = ("none", "local", "domain")


def training_clip_scales(among_train: torch.Tensor, domains: Sequence[str] | None,
                         normalisation: str) -> torch.Tensor:
    """The scale [N] that divides every distance to each training clip: ``local``, the clip's own
    distance to its nearest other clip; ``domain``, its domain's; ``none``, 1."""
    if normalisation == "local":
        return local_radii(among_train)
    if normalisation == "domain":
        domains = list(domains or [""] * among_train.shape[0])
        scales = domain_scales(among_train, domains)
        return torch.tensor([scales[d] for d in domains], dtype=torch.float64)
    if normalisation == "none":
        return torch.ones(among_train.shape[0], dtype=torch.float64)
    raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")


@dataclass
class KnnSection:
    """One section's training vectors [N, D] float64, their scales [N], the power of the scales,
    the attribute class of each training clip ("" when unknown) and the decision threshold."""

    vectors: torch.Tensor
    scales: torch.Tensor
    power: float
    attribute_class: list
    threshold: float = math.nan

    def score(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores [M] (scaled cosine distance to the nearest training clip) and that clip's row [M]."""
        return scaled_nearest(cosine_distances(queries, self.vectors), self.scales, self.power)

    def nearest_keys(self, nearest: torch.Tensor) -> list:
        """The attribute class of each row from :meth:`score` (None where the clip had none)."""
        return [self.attribute_class[int(i)] or None for i in nearest.reshape(-1).tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only: ``torch.load(weights_only=True)`` reads it back."""
        return {"vectors": self.vectors.detach().cpu().contiguous(), "scales": self.scales.detach().cpu(),
                "power": float(self.power), "attribute_class": list(self.attribute_class),
                "threshold": float(self.threshold)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "KnnSection":
        return cls(vectors=torch.as_tensor(state["vectors"], dtype=torch.float64),
                   scales=torch.as_tensor(state["scales"], dtype=torch.float64), power=float(state["power"]),
                   attribute_class=list(state["attribute_class"]), threshold=float(state["threshold"]))


def fit_knn_section(vectors: torch.Tensor, domains: Sequence[str] | None, attribute_class: Sequence[str],
                    normalisation: str, power: float, quantile: float) -> KnnSection:
    """The section's scales and its threshold: gamma fit to the training clips' leave-one-out
    scores (each against the *other* clips; its own distance, 0, would make every threshold 0)."""
    vectors = torch.as_tensor(vectors).to(torch.float64)
    if vectors.shape[0] < 2:
        raise ValueError(f"the kNN threshold needs at least 2 training clips, got {vectors.shape[0]}")
    among_train = cosine_distances(vectors, vectors)
    scales = training_clip_scales(among_train, domains, normalisation)
    loo, _ = scaled_nearest(among_train.fill_diagonal_(float("inf")), scales, power)
    return KnnSection(vectors, scales, float(power), list(attribute_class), fit_gamma_threshold(loo, quantile))
