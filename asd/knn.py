"""Nearest-training-clip detectors: the floor baseline and the spectral kNN.

The floor represents a clip by the per-bin mean and standard deviation over time of its
(log-)Mel features, concatenated: ``[mean_0 .. mean_{F-1}, std_0 .. std_{F-1}]`` (2 * n_mels
values) (:func:`clip_statistics`). Its anomaly score is the cosine distance (1 - cosine
similarity) to the nearest training clip of its (machine, section), both domains. No training,
no network: what any learned method should beat (``method: knn`` in the pipeline).

The spectral kNN (not in the paper; docs/method.md, "Real sound") represents a clip by the
*shape* of its average power spectrum (:func:`spectrum_shape`: log of the time-averaged power
per bin, minus its mean over bins, so a gain change does not move it) and measures the distance
to each training clip in units of that clip's own neighbourhood, the distance to its nearest
other training clip (:func:`local_radii`, :func:`scaled_nearest`; the local scaling of the
local outlier factor): ten target clips lie further apart than hundreds of source clips, and
so do the rare operating conditions, and an unscaled nearest distance ranks all of their normals
above the anomalies of the dense ones. The coarser alternative, one scale per domain
(:func:`domain_scales`), was measured beside it. The distance is the cosine distance, or the
Euclidean distance with every bin in units of its spread over the section's training clips
(:func:`dimension_spread`, :func:`standardised_euclidean`; the diagonal Mahalanobis distance,
``knn.distance``): the bins that vary little between normal clips, where an anomaly stands out,
count as much as the loud, variable ones that dominate a cosine.

Pure functions, tensors in and tensors out, float64 results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batch_clip_statistics", "clip_statistics", "cosine_distances", "dimension_spread", "domain_scales",
           "local_radii", "log_mean_power", "nearest_cosine_distance", "scaled_nearest", "spectrum_shape",
           "standardised_euclidean"]


def clip_statistics(features: torch.Tensor) -> torch.Tensor:
    """Per-bin mean and standard deviation over time of one clip: [n_mels, T] -> [2 * n_mels].

    Computed in float64; the standard deviation is the population one (divided by T, not
    T - 1), so a one-frame clip gives zeros rather than NaN. The first ``n_mels`` values
    are the means, the last ``n_mels`` the standard deviations.
    """
    x = _frames_matrix(features)
    std, mean = torch.std_mean(x, dim=1, correction=0)
    return torch.cat([mean, std])


def log_mean_power(features: torch.Tensor) -> torch.Tensor:
    """The clip's average power spectrum in dB: [F, T] dB -> [F], ``10 log10(mean_t 10^(x/10))``.

    The mean is taken over power, not over dB (Welch's estimate of the power spectral density,
    up to a constant): a short loud event moves it as much as its energy, where the mean of dB
    values would dilute it. Computed in float64 with a log-sum-exp, so -100 dB floors are exact.
    """
    x = _frames_matrix(features)
    scale = torch.log(torch.tensor(10.0, dtype=torch.float64)) / 10.0  # dB -> natural log of power
    log_mean = torch.logsumexp(x * scale, dim=1) - torch.log(torch.tensor(float(x.shape[1]), dtype=torch.float64))
    return log_mean / scale


def spectrum_shape(features: torch.Tensor) -> torch.Tensor:
    """:func:`log_mean_power` minus its mean over bins: [F, T] dB -> [F].

    Invariant to the recording level (a gain adds the same dB to every bin), so the cosine
    distance between two clips compares spectral shapes, not loudness or a microphone's gain."""
    p = log_mean_power(features)
    return p - p.mean()


def _frames_matrix(features: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be [n_bins, T], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("features have no frames")
    return x.to(torch.float64)


REPRESENTATIONS = {"statistics": clip_statistics, "spectrum_shape": spectrum_shape}


def batch_clip_statistics(clips: Sequence[torch.Tensor], representation: str = "statistics") -> torch.Tensor:
    """One clip-level vector per clip of a list: [N, D] float64, by default :func:`clip_statistics`
    ([N, 2 * n_mels]); ``representation="spectrum_shape"``: :func:`spectrum_shape` ([N, n_bins]).

    Clips may have different lengths but must share their number of bins.
    """
    if len(clips) == 0:
        raise ValueError("no clips")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {sorted(REPRESENTATIONS)}, got {representation!r}")
    stats = [REPRESENTATIONS[representation](c) for c in clips]
    dims = {s.shape[0] for s in stats}
    if len(dims) != 1:
        raise ValueError(f"clips have different numbers of bins (vector sizes {sorted(dims)})")
    return torch.stack(stats)


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain non-finite values")
    norms = x.norm(dim=1, keepdim=True)
    # a zero vector stays zero: cosine similarity 0 with everything (as scikit-learn)
    return torch.where(norms > 0, x / norms.clamp_min(torch.finfo(torch.float64).tiny), x)


def cosine_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """All pairwise cosine distances ``1 - cos(q, r)``: [M, D] x [N, D] -> [M, N] float64.

    Clipped to [0, 2]; a zero vector has distance 1 to everything (as
    ``sklearn.metrics.pairwise.cosine_distances``).
    """
    q, r = _unit_rows(queries, "queries"), _unit_rows(references, "references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, references {r.shape[1]}")
    return (1.0 - q @ r.T).clamp_(0.0, 2.0)


def dimension_spread(references: torch.Tensor) -> torch.Tensor:
    """Each dimension's standard deviation over the reference rows (``N - 1`` denominator): [N, D] -> [D].

    A dimension that does not vary (or a single reference) gets 1, so that it is compared in its
    own units rather than divided by zero."""
    r = torch.as_tensor(references).to(torch.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError(f"references must be [N, D] with N >= 1, got shape {tuple(r.shape)}")
    spread = r.std(dim=0, correction=1) if r.shape[0] > 1 else torch.ones(r.shape[1], dtype=torch.float64)
    return torch.where(spread > 0, spread, torch.ones_like(spread))


def standardised_euclidean(queries: torch.Tensor, references: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """Euclidean distances with each dimension divided by its ``spread`` [D]: [M, D] x [N, D] -> [M, N].

    ``sqrt(sum_d ((q_d - r_d) / spread_d) ** 2)``: the Mahalanobis distance under a diagonal
    covariance (``scipy.spatial.distance.cdist(q, r, "seuclidean", V=spread ** 2)``), float64."""
    q, r = torch.as_tensor(queries).to(torch.float64), torch.as_tensor(references).to(torch.float64)
    s = torch.as_tensor(spread).to(torch.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or s.shape != (r.shape[1],):
        raise ValueError(f"queries [M, D], references [N, D] and spread [D] needed, got {tuple(q.shape)}, "
                         f"{tuple(r.shape)} and {tuple(s.shape)}")
    if not (s > 0).all():
        raise ValueError("spread must be positive")
    if not (torch.isfinite(q).all() and torch.isfinite(r).all()):
        raise ValueError("vectors contain non-finite values")
    # the exact difference formula: the matrix-product shortcut cdist takes above 25 rows leaves
    # duplicate clips ~1e-5 apart, where local_radii needs their distance to be exactly 0
    return torch.cdist(q / s, r / s, compute_mode="donot_use_mm_for_euclid_dist")


def nearest_cosine_distance(queries: torch.Tensor, references: torch.Tensor, exclude_self: bool = False,
                            chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance of every query to its nearest reference, and that reference's row.

    ``queries`` [M, D], ``references`` [N, D]. Returns ``(distances [M] float64, nearest [M]
    int64)``; ties go to the lowest reference row. ``exclude_self=True`` is leave-one-out:
    the queries are the references themselves (M == N, row ``i`` is reference ``i``) and
    each row's own reference is skipped, so the result is the distance to the nearest
    *other* reference (needs N >= 2). Queries are processed ``chunk_size`` rows at a time,
    so memory stays at ``chunk_size x N``.
    """
    q, r = _unit_rows(queries, "queries"), _unit_rows(references, "references")
    if r.shape[0] == 0:
        raise ValueError("no references")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, references {r.shape[1]}")
    if exclude_self:
        if q.shape[0] != r.shape[0]:
            raise ValueError(f"exclude_self needs the references as queries: got {q.shape[0]} "
                             f"queries for {r.shape[0]} references")
        if r.shape[0] < 2:
            raise ValueError("leave-one-out needs at least 2 references")
    dist = torch.empty(q.shape[0], dtype=torch.float64)
    nearest = torch.empty(q.shape[0], dtype=torch.int64)
    for start in range(0, q.shape[0], max(1, int(chunk_size))):
        block = (1.0 - q[start:start + chunk_size] @ r.T).clamp_(0.0, 2.0)
        if exclude_self:
            rows = torch.arange(block.shape[0])
            block[rows, rows + start] = float("inf")
        dist[start:start + block.shape[0]], nearest[start:start + block.shape[0]] = block.min(dim=1)
    return dist, nearest


def domain_scales(distances: torch.Tensor, domains: Sequence[str]) -> dict[str, float]:
    """Each domain's typical nearest-neighbour distance among its own training clips.

    ``distances`` [N, N]: pairwise distances of the N training clips (the diagonal is ignored),
    ``domains`` their N domain names. Returns domain -> mean over the domain's clips of the
    distance to the nearest *other* clip of the same domain. A domain with a single clip has no
    such distance and gets the mean of the other domains' scales (1.0 when no domain has two);
    a zero scale (duplicates only) becomes 1.0.
    """
    d = torch.as_tensor(distances).to(torch.float64).clone()
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] != len(domains):
        raise ValueError(f"distances must be [N, N] for {len(domains)} domain names, got {tuple(d.shape)}")
    d.fill_diagonal_(float("inf"))
    names = sorted(set(domains))
    scales = {}
    for name in names:
        idx = torch.tensor([i for i, x in enumerate(domains) if x == name])
        if len(idx) >= 2:
            scales[name] = float(d[idx][:, idx].min(dim=1).values.mean())
    fallback = sum(scales.values()) / len(scales) if scales else 1.0
    return {name: scales.get(name, fallback) or 1.0 for name in names}


def local_radii(distances: torch.Tensor) -> torch.Tensor:
    """Each training clip's neighbourhood radius: its distance to the nearest *other* clip, [N, N] -> [N].

    ``distances`` [N, N] pairwise among the N training clips (the diagonal is ignored; N >= 2).
    A radius of 0 (a duplicate clip) is replaced by the median of the positive radii (1.0 when
    there are none), so that no distance is divided by zero.
    """
    d = torch.as_tensor(distances).to(torch.float64).clone()
    if d.ndim != 2 or d.shape[0] != d.shape[1] or d.shape[0] < 2:
        raise ValueError(f"distances must be [N, N] with N >= 2, got {tuple(d.shape)}")
    r = d.fill_diagonal_(float("inf")).min(dim=1).values
    positive = r[r > 0]
    fill = positive.median() if len(positive) else torch.tensor(1.0, dtype=torch.float64)
    return torch.where(r > 0, r, fill)


def scaled_nearest(distances: torch.Tensor, scales: torch.Tensor, power: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly score ``min_j D_qj / s_j ** power`` of each query and the row ``j`` that gives it.

    ``distances`` [M, N] from M queries to N training clips; ``scales`` [N] positive, one per
    training clip: its :func:`local_radii`, or its domain's :func:`domain_scales`. ``power=0`` is
    the plain nearest distance; ``power=1`` counts every distance in units of the training clip's
    own neighbourhood (or domain), so a query as far from a sparse cluster's clip as that clip's
    neighbours are scores like one close to a dense cluster. The query's domain is never needed
    (DCASE evaluation clips do not name it). Returns ``(scores [M] float64, rows [M] int64)``.
    """
    d = torch.as_tensor(distances).to(torch.float64)
    s = torch.as_tensor(scales).to(torch.float64)
    if d.ndim != 2 or s.shape != (d.shape[1],):
        raise ValueError(f"distances [M, N] and scales [N] needed, got {tuple(d.shape)} and {tuple(s.shape)}")
    if not (s > 0).all():
        raise ValueError("scales must be positive")
    return (d / s ** power).min(dim=1)
