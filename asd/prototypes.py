"""Class prototypes (paper Eq. 2) and multiple-prototype expansion sub-prototypes (Sec. 3.1.1).

Prototypes are built from per-class embedding *sums and counts* so that workers holding
disjoint shards can all-reduce them and every worker ends with the same global prototypes.
Sums are float64 so that the reduction order does not change the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_sums(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 numerator and denominator: per-class sums [C, D] (float64) and counts [C]."""
    sums = torch.zeros(num_classes, embeddings.shape[1], dtype=torch.float64, device=embeddings.device)
    sums.index_add_(0, labels, embeddings.detach().to(torch.float64))
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums, counts


def prototypes_from_sums(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Eq. 2: p_c = mean of the class's embeddings, then L2-normalised ("p_c also requires
    to be normalized"). Raises if a class has no member, since its prototype is undefined."""
    if bool((counts <= 0).any()):
        missing = torch.nonzero(counts <= 0).flatten().tolist()
        raise ValueError(f"classes {missing} have no embeddings; their prototypes are undefined")
    return F.normalize(sums / counts.unsqueeze(1), dim=1)


def mpe_membership(labels: torch.Tensor, num_classes: int, ratio: float, per_class: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MPE subsets (Sec. 3.1.1): for every class, ``per_class`` random subsets of ``ratio`` of
    its members (at least one member each).

    ``labels`` are the class ids of *all* training clips, in a global order every worker knows,
    and ``generator`` is seeded identically on every worker, so all workers draw the same subsets.
    Returns the membership matrix [S, N] (float64; S = num_classes * per_class, sub-prototype
    s belongs to class s // per_class) and the class of each sub-prototype [S].
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"MPE ratio must be in (0, 1], got {ratio}")
    n = labels.shape[0]
    membership = torch.zeros(num_classes * per_class, n, dtype=torch.float64)
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        size = max(1, round(ratio * members.numel()))
        for j in range(per_class):
            chosen = members[torch.randperm(members.numel(), generator=generator)[:size]]
            membership[c * per_class + j, chosen] = 1.0
    sub_class = torch.arange(num_classes).repeat_interleave(per_class)
    return membership, sub_class


def subset_sums(embeddings: torch.Tensor, membership_columns: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 over each MPE subset, for the clips one worker holds.

    ``membership_columns`` [S, n_local] are the columns of ``mpe_membership`` for the local
    clips. Returns sums [S, D] and counts [S] (float64) ready for an all-reduce.
    """
    m = membership_columns.to(device=embeddings.device, dtype=torch.float64)
    return m @ embeddings.detach().to(torch.float64), m.sum(dim=1)
