"""Scoring backend: attribute prototypes + Mahalanobis distance + gamma threshold.

Paper, Sec. 4.2: "During testing, attribute prototypes from both domains are utilized
together to calculate the anomaly score. For each test sound clip, the Mahalanobis
distance is found between the test embedding and the prototypes of all attributes in the
corresponding section. The minimum distance is the anomaly score. Following [12], the
covariance matrix is calculated from all section embeddings without distinguishing domains."

One :class:`SectionModel` per (machine type, section):

* **Prototypes** — mean training embedding of each attribute class (source and target
  classes alike), then L2-normalised. The embeddings are unit length and Eq. 2 says
  "p_c also requires to be normalized", so the scoring prototypes are the same vectors the
  prototypical loss uses (``normalize_prototypes=False`` keeps the raw means).
* **Covariance** — ONE matrix per section from all its training embeddings, both domains
  pooled (:func:`section_covariance`), shrunk towards a scaled identity so it is always
  invertible (:func:`shrink_covariance`), inverted in float64 with ``torch.linalg``.
* **Score** — minimum Mahalanobis distance (not squared) over the section's prototypes;
  the argmin is the nearest attribute class (:func:`mahalanobis_min`).
* **Threshold** — the official baselines' rule: fit a gamma distribution to the training
  clips' anomaly scores and take its 0.9 quantile (:func:`fit_gamma_threshold`); a clip is
  anomalous (decision 1) when its score is strictly greater (:func:`decide`).

Everything is batched over clips; computations run in float64 on the device of the
input tensors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

COVARIANCE_MODES = ("pooled", "within")
DEFAULT_SHRINKAGE = "ledoit-wolf"
DEFAULT_QUANTILE = 0.9
MIN_SHRINKAGE = 1e-6

__all__ = [
    "COVARIANCE_MODES",
    "DEFAULT_QUANTILE",
    "DEFAULT_SHRINKAGE",
    "SectionModel",
    "attribute_prototypes",
    "calibrate_threshold",
    "decide",
    "fit_gamma_threshold",
    "fit_section",
    "ledoit_wolf_shrinkage",
    "mahalanobis_min",
    "precision_from_covariance",
    "score_section",
    "section_covariance",
    "shrink_covariance",
]


@dataclass
class SectionModel:
    """Everything needed to score one (machine, section).

    ``prototypes`` [P, D] float64, one row per attribute class present in training;
    ``class_keys[i]`` names the class of row ``i``; ``precision`` [D, D] float64 is the
    inverse of the regularised section covariance; ``threshold`` is the decision
    threshold on the anomaly score (NaN until :func:`calibrate_threshold`).
    ``covariance`` and ``shrinkage`` record how the precision was made.
    """

    prototypes: torch.Tensor
    class_keys: list
    precision: torch.Tensor
    threshold: float = math.nan
    covariance: str = "pooled"
    shrinkage: float = math.nan
    extra: dict = field(default_factory=dict)

    def score(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly scores [M] (float64) and nearest prototype row [M] (int64)."""
        return mahalanobis_min(emb, self.prototypes, self.precision)

    def nearest_keys(self, nearest: torch.Tensor) -> list:
        """Map prototype row indices (from :meth:`score`) to their class keys."""
        return [self.class_keys[int(i)] for i in nearest.reshape(-1).tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (tensors on CPU) for ``torch.save``; inverse of :meth:`from_state_dict`."""
        return {
            "prototypes": self.prototypes.detach().cpu(),
            "class_keys": list(self.class_keys),
            "precision": self.precision.detach().cpu(),
            "threshold": float(self.threshold),
            "covariance": self.covariance,
            "shrinkage": float(self.shrinkage),
            "extra": dict(self.extra),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "SectionModel":
        """Rebuild a model saved with :meth:`state_dict`."""
        return cls(
            prototypes=torch.as_tensor(state["prototypes"], dtype=torch.float64),
            class_keys=list(state["class_keys"]),
            precision=torch.as_tensor(state["precision"], dtype=torch.float64),
            threshold=float(state.get("threshold", math.nan)),
            covariance=str(state.get("covariance", "pooled")),
            shrinkage=float(state.get("shrinkage", math.nan)),
            extra=dict(state.get("extra", {})),
        )


def _as_f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _check_embeddings(emb: torch.Tensor, name: str = "embeddings") -> None:
    if emb.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(emb.shape)}")
    if emb.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(emb).all():
        raise ValueError(f"{name} contain non-finite values")


def attribute_prototypes(
    emb: torch.Tensor, class_index: torch.Tensor, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean embedding per attribute class (paper Eq. 2), optionally L2-normalised.

    Returns ``(prototypes [P, D] float64, class_ids [P] int64, inverse [N] int64)`` where
    ``class_ids`` are the sorted distinct values of ``class_index`` (row ``i`` of the
    prototypes belongs to ``class_ids[i]``) and ``inverse[n]`` is the prototype row of
    clip ``n``. A class mean of (numerically) zero length is left un-normalised.
    """
    emb = _as_f64(emb)
    _check_embeddings(emb)
    class_index = torch.as_tensor(class_index, device=emb.device).reshape(-1).long()
    if class_index.shape[0] != emb.shape[0]:
        raise ValueError(
            f"class_index has {class_index.shape[0]} entries for {emb.shape[0]} embeddings"
        )
    class_ids, inverse = torch.unique(class_index, sorted=True, return_inverse=True)
    n_classes = class_ids.shape[0]
    sums = torch.zeros(n_classes, emb.shape[1], dtype=torch.float64, device=emb.device)
    sums.index_add_(0, inverse, emb)
    counts = torch.bincount(inverse, minlength=n_classes).to(torch.float64)
    means = sums / counts[:, None]
    if normalize:
        norms = means.norm(dim=1, keepdim=True)
        means = torch.where(norms > 1e-12, means / norms.clamp_min(1e-12), means)
    return means, class_ids, inverse


def section_covariance(
    emb: torch.Tensor, class_index: torch.Tensor | None = None, *, mode: str = "pooled"
) -> torch.Tensor:
    """Centred residuals [N, D] (float64) whose scatter is the section covariance.

    ``mode="pooled"`` (default): residuals about the global section mean, i.e. the sample
    covariance of *all* the section's training embeddings, domains and attribute classes
    pooled. This is the literal reading of the paper ("the covariance matrix is calculated
    from all section embeddings without distinguishing domains", following [12]); it keeps
    the between-attribute spread inside the covariance, so directions along which normal
    attributes (including the few-shot target ones) differ are down-weighted, and it does
    not depend on tiny target classes having their own reliable means.

    ``mode="within"``: residuals about each clip's own (un-normalised) class mean — the
    shared within-class covariance of a Gaussian class-conditional model (as in
    Mahalanobis OOD detection). Needs ``class_index``.

    The caller turns residuals ``R`` into a covariance ``R.T @ R / N`` (maximum-likelihood
    normalisation by N, as ``sklearn.covariance``) in :func:`shrink_covariance`.
    """
    emb = _as_f64(emb)
    _check_embeddings(emb)
    if mode in ("pooled", "global"):
        return emb - emb.mean(dim=0, keepdim=True)
    if mode == "within":
        if class_index is None:
            raise ValueError("covariance mode 'within' needs class_index")
        means, _, inverse = attribute_prototypes(emb, class_index, normalize=False)
        return emb - means[inverse]
    raise ValueError(f"covariance must be one of {COVARIANCE_MODES}, got {mode!r}")


def ledoit_wolf_shrinkage(residuals: torch.Tensor) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage intensity for already-centred residuals [N, D].

    Same estimator as ``sklearn.covariance.ledoit_wolf(X, assume_centered=True)``:
    with ``S = R.T R / N`` and ``mu = tr(S) / D``,
    ``delta = ||S - mu I||_F^2 / D``, ``beta = (mean_n ||r_n||^4 - ||S||_F^2) / (D N)``,
    shrinkage ``= min(beta, delta) / delta`` (0 when ``delta`` is 0).
    """
    r = _as_f64(residuals)
    n, d = r.shape
    s = r.T @ r / n
    mu = torch.trace(s) / d
    eye = torch.eye(d, dtype=torch.float64, device=r.device)
    delta = ((s - mu * eye) ** 2).sum() / d
    beta = ((r**2).sum(dim=1) ** 2).mean() - (s**2).sum()
    beta = beta / (d * n)
    delta_f, beta_f = float(delta), float(beta)
    if delta_f <= 0.0:
        return 0.0
    return float(min(max(beta_f, 0.0), delta_f) / delta_f)


def shrink_covariance(
    residuals: torch.Tensor,
    shrinkage: float | str = DEFAULT_SHRINKAGE,
    *,
    min_shrinkage: float = MIN_SHRINKAGE,
) -> tuple[torch.Tensor, float]:
    """Regularised covariance ``(1 - a) S + a * (tr(S)/D) * I`` and the ``a`` used.

    ``S = R.T R / N`` from centred residuals ``R`` [N, D] (float64). ``shrinkage``:

    * ``"ledoit-wolf"`` (default): data-driven ``a`` (:func:`ledoit_wolf_shrinkage`) — large
      for tiny sections (N < D, e.g. target-only trees), small for the usual ~1000 clips;
    * a float in [0, 1]: fixed ratio.

    The result is floored at ``a >= min_shrinkage`` (default 1e-6) so the matrix is
    positive definite even when N <= D or the embeddings span a subspace: every
    eigenvalue is then at least ``a * tr(S)/D > 0``. If ``tr(S) == 0`` (all embeddings
    identical, or a single clip) the target is the plain identity with ``a = 1``, i.e.
    the Mahalanobis distance degenerates to the Euclidean one.
    """
    r = _as_f64(residuals)
    n, d = r.shape
    s = r.T @ r / n
    s = 0.5 * (s + s.T)
    mu = float(torch.trace(s)) / d
    eye = torch.eye(d, dtype=torch.float64, device=r.device)
    if not mu > 0.0:
        return eye.clone(), 1.0
    if isinstance(shrinkage, str):
        if shrinkage.replace("_", "-").lower() not in ("ledoit-wolf", "lw"):
            raise ValueError(f"unknown shrinkage {shrinkage!r}; use 'ledoit-wolf' or a float")
        a = ledoit_wolf_shrinkage(r)
    else:
        a = float(shrinkage)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {a}")
    a = min(1.0, max(a, float(min_shrinkage)))
    return (1.0 - a) * s + a * mu * eye, a


def precision_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive-definite covariance via Cholesky (float64).

    ``torch.linalg.cholesky`` then ``torch.cholesky_inverse``: the result is symmetric
    by construction. Raises ``ValueError`` if the matrix is not positive definite.
    """
    cov = _as_f64(cov)
    chol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
    if int(info) != 0:
        raise ValueError("covariance is not positive definite; use shrinkage > 0")
    prec = torch.cholesky_inverse(chol)
    return 0.5 * (prec + prec.T)


def fit_section(
    train_emb: torch.Tensor,
    class_index: torch.Tensor,
    *,
    class_keys: Sequence | None = None,
    shrinkage: float | str = DEFAULT_SHRINKAGE,
    covariance: str = "pooled",
    normalize_prototypes: bool = True,
    min_shrinkage: float = MIN_SHRINKAGE,
) -> SectionModel:
    """Fit prototypes and the regularised precision of one section (threshold left NaN).

    ``train_emb`` [N, D]: all training embeddings of the section, both domains.
    ``class_index`` [N]: integer attribute-class id per clip (any ints). ``class_keys``,
    if given, maps a class id to a printable key (``class_keys[id]``); the model's
    ``class_keys`` then lists the keys of its prototype rows (otherwise the ids).
    ``covariance``: ``"pooled"`` (default, see :func:`section_covariance`) or ``"within"``.
    ``shrinkage``: see :func:`shrink_covariance`. Fill the threshold with
    :func:`calibrate_threshold`.
    """
    emb = _as_f64(train_emb)
    prototypes, class_ids, _ = attribute_prototypes(
        emb, class_index, normalize=normalize_prototypes
    )
    mode = "pooled" if covariance == "global" else covariance
    residuals = section_covariance(emb, class_index, mode=mode)
    cov, used = shrink_covariance(residuals, shrinkage, min_shrinkage=min_shrinkage)
    precision = precision_from_covariance(cov)
    ids = [int(i) for i in class_ids.tolist()]
    keys = [class_keys[i] for i in ids] if class_keys is not None else ids
    return SectionModel(
        prototypes=prototypes,
        class_keys=keys,
        precision=precision,
        covariance=mode,
        shrinkage=used,
        extra={"n_train": int(emb.shape[0]), "class_ids": ids},
    )


def mahalanobis_min(
    emb: torch.Tensor, prototypes: torch.Tensor, precision: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum Mahalanobis distance of each embedding to the prototypes, and its argmin.

    ``d(x, p) = sqrt((x - p)^T Σ^{-1} (x - p))`` (as ``scipy.spatial.distance.mahalanobis``
    with ``VI = precision``). Batched: with ``precision = W W^T`` (Cholesky), the distance
    is the Euclidean distance between ``x W`` and ``p W``. Returns ``(scores [M] float64,
    nearest [M] int64)``, on the device of ``emb``; ties go to the lowest prototype row.
    """
    x = _as_f64(emb)
    if x.ndim == 1:
        x = x[None, :]
    _check_embeddings(x, "test embeddings")
    p = _as_f64(prototypes).to(x.device)
    prec = _as_f64(precision).to(x.device)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != x.shape[1]:
        raise ValueError(f"prototypes {tuple(p.shape)} do not match embeddings {tuple(x.shape)}")
    w, info = torch.linalg.cholesky_ex(0.5 * (prec + prec.T))
    if int(info) != 0:
        raise ValueError("precision matrix is not positive definite")
    dist = torch.cdist(x @ w, p @ w, compute_mode="donot_use_mm_for_euclid_dist")
    scores, nearest = dist.min(dim=1)
    return scores, nearest


def score_section(model: SectionModel, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly scores and nearest prototype rows of ``emb`` under ``model``."""
    return mahalanobis_min(emb, model.prototypes, model.precision)


def fit_gamma_threshold(scores: np.ndarray | torch.Tensor, quantile: float = DEFAULT_QUANTILE) -> float:
    """Decision threshold: ``quantile`` of a gamma distribution fitted to ``scores``.

    As the official DCASE 2022 baselines: ``scipy.stats.gamma.ppf(quantile,
    *scipy.stats.gamma.fit(scores))`` (shape, loc and scale all fitted). Fallback to the
    empirical quantile ``np.quantile(scores, quantile)`` when the scores are degenerate
    (fewer than 2 distinct values or a zero spread), when the fit raises, or when the fit
    or its quantile is not finite. Non-finite or empty scores raise ``ValueError``.
    """
    from scipy import stats  # deferred: ~1 s to import; training workers never fit a threshold

    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no scores to fit a threshold to")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain non-finite values")
    empirical = float(np.quantile(s, quantile))
    if np.unique(s).size < 2 or not np.std(s) > 0.0:
        return empirical
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params = stats.gamma.fit(s)
            thr = float(stats.gamma.ppf(quantile, *params))
    except Exception:  # noqa: BLE001 - any fitting failure falls back to the empirical quantile
        return empirical
    if not (np.all(np.isfinite(params)) and math.isfinite(thr)):
        return empirical
    return thr


def calibrate_threshold(
    model: SectionModel, train_emb: torch.Tensor, quantile: float = DEFAULT_QUANTILE
) -> SectionModel:
    """Copy of ``model`` with ``threshold`` fitted on the training clips' own scores."""
    scores, _ = model.score(train_emb)
    thr = fit_gamma_threshold(scores, quantile)
    extra = dict(model.extra, threshold_quantile=float(quantile))
    return dataclasses.replace(model, threshold=thr, extra=extra)


def decide(scores: torch.Tensor | np.ndarray, threshold: float) -> torch.Tensor:
    """Decision per clip: 1 (anomaly) if score > threshold, else 0 (int64), as the baselines."""
    return (torch.as_tensor(scores) > float(threshold)).to(torch.int64)
