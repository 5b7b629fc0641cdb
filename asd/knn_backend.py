"""The kNN detector's scoring backend of one (machine, section), fitted once from its training clips.

:class:`KnnSection` holds what scoring a clip needs: the training clips' vectors, each clip's
scale (``knn.normalisation``: :func:`training_clip_scales`), the power of the scales, the
distance (``knn.distance``: cosine, or standardised Euclidean with each dimension's spread over
the training clips), the decision threshold and each clip's attribute class. It has the interface of
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
from asd.knn import (cosine_distances, dimension_spread, domain_scales, local_radii, scaled_nearest,
                     standardised_euclidean)

NORMALISATIONS = ("none", "local", "domain")
DISTANCES = ("cosine", "standardised_euclidean")


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
    the attribute class of each training clip ("" when unknown), the decision threshold, the
    distance and, for the standardised Euclidean one, each dimension's spread [D]."""

    vectors: torch.Tensor
    scales: torch.Tensor
    power: float
    attribute_class: list
    threshold: float = math.nan
    distance: str = "cosine"
    spread: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # a state saved by a newer version must not score as cosine without a word
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.distance == "standardised_euclidean" and (
                self.spread is None or tuple(self.spread.shape) != (self.vectors.shape[1],)):
            raise ValueError(f"the standardised Euclidean distance needs a spread of {self.vectors.shape[1]} values")

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """[M, N] distances of the queries to the training clips."""
        if self.distance == "standardised_euclidean":
            return standardised_euclidean(queries, self.vectors, self.spread)
        return cosine_distances(queries, self.vectors)

    def score(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores [M] (scaled distance to the nearest training clip) and that clip's row [M]."""
        return scaled_nearest(self.distances(queries), self.scales, self.power)

    def nearest_keys(self, nearest: torch.Tensor) -> list:
        """The attribute class of each row from :meth:`score` (None where the clip had none)."""
        return [self.attribute_class[int(i)] or None for i in nearest.reshape(-1).tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only: ``torch.load(weights_only=True)`` reads it back."""
        return {"vectors": self.vectors.detach().cpu().contiguous(), "scales": self.scales.detach().cpu(),
                "power": float(self.power), "attribute_class": list(self.attribute_class),
                "threshold": float(self.threshold), "distance": self.distance,
                **({"spread": self.spread.detach().cpu()} if self.spread is not None else {})}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "KnnSection":
        # sections saved before knn.distance existed are cosine
        spread = state.get("spread")
        return cls(vectors=torch.as_tensor(state["vectors"], dtype=torch.float64),
                   scales=torch.as_tensor(state["scales"], dtype=torch.float64), power=float(state["power"]),
                   attribute_class=list(state["attribute_class"]), threshold=float(state["threshold"]),
                   distance=str(state.get("distance", "cosine")),
                   spread=None if spread is None else torch.as_tensor(spread, dtype=torch.float64))


def fit_knn_section(vectors: torch.Tensor, domains: Sequence[str] | None, attribute_class: Sequence[str],
                    normalisation: str, power: float, quantile: float, distance: str = "cosine") -> KnnSection:
    """The section's scales, spread and threshold: gamma fit to the training clips' leave-one-out
    scores (each against the *other* clips; its own distance, 0, would make every threshold 0)."""
    vectors = torch.as_tensor(vectors).to(torch.float64)
    if vectors.shape[0] < 2:
        raise ValueError(f"the kNN threshold needs at least 2 training clips, got {vectors.shape[0]}")
    spread = dimension_spread(vectors) if distance == "standardised_euclidean" else None
    section = KnnSection(vectors, torch.ones(vectors.shape[0], dtype=torch.float64), float(power),
                         list(attribute_class), distance=distance, spread=spread)
    among_train = section.distances(vectors)
    section.scales = training_clip_scales(among_train, domains, normalisation)
    loo, _ = scaled_nearest(among_train.fill_diagonal_(float("inf")), section.scales, power)
    section.threshold = fit_gamma_threshold(loo, quantile)
    return section
