"""Training steps of both stages (paper Sec. 4.2), independent of how workers are placed.

Distribution enters only through :class:`Workers` (rank, world size and two sums over workers),
so the same functions run in one process (identities) or under DDP (torch.distributed).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from asd.losses import balanced_batch_loss, multi_prototype_loss, npe_loss, prototypical_loss
from asd.prototypes import class_sums, mpe_membership, prototypes_from_sums, subset_sums
from asd.sampler import random_crops, sliding_windows

AllReduce = Callable[[torch.Tensor], None]
SumOverWorkers = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(t: torch.Tensor) -> None:
    """The all-reduce of a single worker."""


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Workers:
    """How this process takes part in data-parallel training; the defaults are one process.

    ``all_reduce`` sums a tensor over workers in place (prototype sums, metrics);
    ``sum_over_workers`` returns the sum and carries gradients, its backward summing the
    gradients over workers (``torch.distributed.nn.functional.all_reduce``).
    """

    rank: int = 0
    world: int = 1
    all_reduce: AllReduce = no_reduce
    sum_over_workers: SumOverWorkers = _identity

    def __post_init__(self) -> None:
        if self.world > 1 and (self.all_reduce is no_reduce or self.sum_over_workers is _identity):
            raise ValueError("several workers need their all-reduce and sum over workers")

    def shares(self, n: int) -> list[int]:
        """Rows of an n-row global batch each rank computes: contiguous, sizes differ by <= 1."""
        if n < self.world:
            raise ValueError(f"a global batch of {n} clips cannot be split over {self.world} workers")
        return [len(part) for part in torch.arange(n).tensor_split(self.world)]

    def gather_rows(self, rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's ``rows`` stacked in rank order (the global batch), with gradients."""
        if self.world == 1:
            return rows
        start = sum(sizes[: self.rank])
        total = sum(sizes)
        before = rows.new_zeros(start, *rows.shape[1:])
        after = rows.new_zeros(total - start - rows.shape[0], *rows.shape[1:])
        return self.sum_over_workers(torch.cat([before, rows, after]))

    def mean(self, value: float) -> float:
        """The mean of a per-worker number over workers."""
        t = torch.tensor([value], dtype=torch.float64)
        self.all_reduce(t)
        return float(t) / self.world


def steps_per_epoch(natural: int, epochs: int, min_steps: int | None) -> int:
    """Optimizer steps in one epoch: the natural count (one pass over the data), raised so that
    the stage takes at least ``min_steps`` steps in all (small data would otherwise give a
    handful of updates). Independent of the number of workers."""
    steps = max(1, natural)
    if min_steps:
        steps = max(steps, math.ceil(min_steps / max(1, epochs)))
    return steps


def random_sampling_batches(n_clips: int, batch_size: int, steps: int, generator: torch.Generator
                            ) -> Iterable[torch.Tensor]:
    """Pre-training batches: ``steps`` global batches of ``batch_size`` clip indices taken in
    order from shuffled passes over the data (the next permutation starts when one runs out)."""
    pending = torch.zeros(0, dtype=torch.long)
    for _ in range(steps):
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n_clips, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


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


def train_epoch(model: nn.Module, features: Sequence[torch.Tensor], labels: torch.Tensor,
                batches: Iterable[torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                optimizer: torch.optim.Optimizer, *, crop_frames: int, generator: torch.Generator,
                workers: Workers = Workers(), device: torch.device | str = "cpu",
                autocast: contextlib.AbstractContextManager | None = None,
                channels_last: bool = False) -> tuple[list[float], int]:
    """One epoch of data-parallel training on *global* batches; returns (loss of every step, clips).

    Every worker is given the same global batches and the same ``generator``, so it takes the
    same random 64-frame crops of the whole batch; it embeds its contiguous share, and the
    shares are gathered (:meth:`Workers.gather_rows`), so the loss on every worker is the loss
    of the global batch, as in one process. The backward of the gather sums the gradient of
    a share over workers (world x the one-process gradient); DDP's averaging of parameter
    gradients then leaves exactly the one-process gradient. With batch statistics synchronised
    (:class:`asd.model.SyncedBatchNorm2d`) 1, 2 or 16 workers run the same optimisation, and
    the number of steps does not depend on the number of workers.
    """
    model.train()
    losses, clips = [], 0
    for idx in batches:
        sizes = workers.shares(idx.numel())
        start = sum(sizes[: workers.rank])
        crops = random_crops(features, idx, crop_frames, generator)[start:start + sizes[workers.rank]]
        x = crops.unsqueeze(1).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast or contextlib.nullcontext():
            z_share = model(x).float()
        z = workers.gather_rows(z_share, sizes)
        loss = loss_fn(z, labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        clips += idx.numel()
    return losses, clips
