"""A cheap floor baseline: nearest training clip by cosine distance of clip statistics.

A clip is represented by the per-Mel-bin mean and standard deviation over time of its
(log-)Mel features, concatenated: ``[mean_0 .. mean_{F-1}, std_0 .. std_{F-1}]`` (2 * n_mels
values). Its anomaly score is the cosine distance (1 - cosine similarity) to the nearest
training clip of its (machine, section), both domains. No training, no network: what any
learned method should beat (``method: knn`` in the pipeline, docs/method.md).

Pure functions, tensors in and tensors out, float64 results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["batch_clip_statistics", "clip_statistics", "cosine_distances", "nearest_cosine_distance"]


def clip_statistics(features: torch.Tensor) -> torch.Tensor:
    """Per-bin mean and standard deviation over time of one clip: [n_mels, T] -> [2 * n_mels].

    Computed in float64; the standard deviation is the population one (divided by T, not
    T - 1), so a one-frame clip gives zeros rather than NaN. The first ``n_mels`` values
    are the means, the last ``n_mels`` the standard deviations.
    """
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise ValueError(f"features must be [n_mels, T], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("features have no frames")
    x = x.to(torch.float64)
    std, mean = torch.std_mean(x, dim=1, correction=0)
    return torch.cat([mean, std])


def batch_clip_statistics(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`clip_statistics` of every clip of a list: [N, 2 * n_mels] float64.

    Clips may have different lengths but must share ``n_mels``.
    """
    if len(clips) == 0:
        raise ValueError("no clips")
    stats = [clip_statistics(c) for c in clips]
    dims = {s.shape[0] for s in stats}
    if len(dims) != 1:
        raise ValueError(f"clips have different numbers of Mel bins: {sorted(d // 2 for d in dims)}")
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
