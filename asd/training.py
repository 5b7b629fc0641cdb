"""Training steps of both stages (paper Sec. 4.2), independent of how workers are placed.

Distribution enters only through the ``all_reduce`` callable (sum in place), so the same
functions run in one process (identity) or under DDP (torch.distributed.all_reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asd.losses import balanced_batch_loss, multi_prototype_loss, npe_loss, prototypical_loss
from asd.prototypes import class_sums, mpe_membership, prototypes_from_sums, subset_sums

AllReduce = Callable[[torch.Tensor], None]


def no_reduce(t: torch.Tensor) -> None:
    """The all-reduce of a single worker."""


def input_stats(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-Mel-bin mean and std over every frame of ``features`` ([n_mels, T] each)."""
    total = torch.zeros(features[0].shape[0], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    frames = 0
    for f in features:
        f64 = f.to(torch.float64)
        total += f64.sum(dim=1)
        total_sq += (f64 * f64).sum(dim=1)
        frames += f.shape[1]
    mean = total / frames
    std = (total_sq / frames - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


@torch.no_grad()
def embed_clips(model: nn.Module, features: Sequence[torch.Tensor], indices: Sequence[int],
                batch_size: int = 32, device: torch.device | str = "cpu",
                window: int | None = None, hop: int | None = None) -> torch.Tensor:
    """Embeddings [len(indices), D] of whole clips (``window=None``) or, with ``window``, the
    re-normalised mean embedding of the clip's sliding windows. Clips of equal length are
    batched together; the model is put in eval mode and restored afterwards."""
    from asd.sampler import sliding_windows

    was_training = model.training
    model.eval()
    indices = list(indices)
    out: list[torch.Tensor | None] = [None] * len(indices)
    by_len: dict[int, list[int]] = {}
    for pos, i in enumerate(indices):
        by_len.setdefault(int(features[i].shape[-1]), []).append(pos)
    for positions in by_len.values():
        for s in range(0, len(positions), batch_size):
            chunk = positions[s:s + batch_size]
            clips = torch.stack([features[indices[p]] for p in chunk])
            if window is None:
                z = model(clips.unsqueeze(1).to(device))
            else:
                wins = torch.stack([sliding_windows(c, window, hop) for c in clips])  # [b, W, M, w]
                b, w = wins.shape[:2]
                z = model(wins.flatten(0, 1).unsqueeze(1).to(device)).reshape(b, w, -1).mean(1)
                z = torch.nn.functional.normalize(z, dim=-1)
            for p, row in zip(chunk, z.float().cpu()):
                out[p] = row
    model.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.stack(out)  # type: ignore[arg-type]


@dataclass
class EpochPrototypes:
    """The prototypes of one pre-training epoch: class prototypes first, then MPE sub-prototypes.

    ``prototypes`` [Q, D]; ``prototype_class`` [Q] the class of each; ``num_classes`` = C.
    """

    prototypes: torch.Tensor
    prototype_class: torch.Tensor
    num_classes: int

    @property
    def class_prototypes(self) -> torch.Tensor:
        return self.prototypes[: self.num_classes]


def epoch_prototypes(model: nn.Module, features: Sequence[torch.Tensor], labels: torch.Tensor,
                     local: Sequence[int], num_classes: int, *, mpe_ratio: float | None,
                     mpe_per_class: int, generator: torch.Generator, all_reduce: AllReduce = no_reduce,
                     batch_size: int = 32, device: torch.device | str = "cpu",
                     window: int | None = None, hop: int | None = None) -> EpochPrototypes:
    """The dotted line of the paper's Fig. 1, before every pre-training epoch.

    This worker embeds its ``local`` share of all training clips, accumulates Eq. 2 sums and
    counts (and those of the MPE subsets, drawn from the *global* labels with a generator
    seeded identically on every worker), and ``all_reduce`` sums them over workers, so every
    worker ends with the same global prototypes. Every worker must call this, also when its
    share lacks some classes (their local sums are zero). ``window``/``hop``: clip embeddings
    as the window mean of :func:`embed_clips` instead of one pass over the whole clip.
    """
    local_idx = torch.as_tensor(list(local), dtype=torch.long)
    z = embed_clips(model, features, local_idx.tolist(), batch_size, device,
                    window=window, hop=hop).to(torch.float64)
    if z.numel() == 0:
        z = torch.zeros(0, _embedding_dim(model), dtype=torch.float64)
    sums, counts = class_sums(z, labels[local_idx], num_classes)
    parts_sums, parts_counts = [sums], [counts]
    sub_class = torch.zeros(0, dtype=torch.long)
    if mpe_ratio is not None:
        membership, sub_class = mpe_membership(labels, num_classes, mpe_ratio, mpe_per_class, generator)
        s_sums, s_counts = subset_sums(z, membership[:, local_idx])
        parts_sums.append(s_sums)
        parts_counts.append(s_counts)
    all_sums, all_counts = torch.cat(parts_sums), torch.cat(parts_counts)
    all_reduce(all_sums)
    all_reduce(all_counts)
    prototypes = prototypes_from_sums(all_sums, all_counts).float()
    prototype_class = torch.cat([torch.arange(num_classes), sub_class])
    return EpochPrototypes(prototypes, prototype_class, num_classes)


def _embedding_dim(model: nn.Module) -> int:
    core = getattr(model, "module", model)
    return core.cfg.embedding_dim


def pretrain_loss(z: torch.Tensor, labels: torch.Tensor, protos: EpochPrototypes, tau: float
                  ) -> torch.Tensor:
    """Eq. 3 when MPE sub-prototypes exist, else Eq. 1 (the two agree without sub-prototypes)."""
    if protos.prototypes.shape[0] > protos.num_classes:
        return multi_prototype_loss(z, labels, protos.prototypes, protos.prototype_class, tau)
    return prototypical_loss(z, labels, protos.prototypes, tau)


def finetune_loss(z: torch.Tensor, labels: torch.Tensor, tau: float,
                  npe_lambda: Sequence[float] | None, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """Eq. 6 (NPE) with lam ~ U[npe_lambda], or Eq. 4 without NPE."""
    if npe_lambda is None:
        return balanced_batch_loss(z, labels, tau)
    return npe_loss(z, labels, tau, (float(npe_lambda[0]), float(npe_lambda[1])), generator)


def prototype_drift(previous: torch.Tensor | None, current: torch.Tensor) -> float:
    """1 - mean cosine between consecutive epochs' class prototypes (0 when unchanged)."""
    if previous is None or previous.shape != current.shape:
        return float("nan")
    return float(1.0 - (previous * current).sum(dim=1).mean())
