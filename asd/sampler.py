"""Balanced sampling (paper Sec. 3.1.2) and the 64-frame crops both training stages use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

EPOCH_SEED_STRIDE = 1_000_003  # a prime: the seeds of (seed, epoch) pairs do not collide in practice


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random stream under a run seed (sampling, crops, prototypes)."""
    return seed * EPOCH_SEED_STRIDE + epoch


class BalancedBatchSampler:
    """Mini-batches of N attribute classes x K clips.

    Classes are visited in shuffled rounds, so every class appears equally often. A class
    with at least K clips gives K distinct clips; a class with fewer (the target domain has
    ~10 clips per section) gives all of them plus repeats drawn with replacement, and the
    caller takes a *different random crop* for every repeat (``random_crops``).
    One epoch is ``batches_per_epoch`` batches; by default ceil(n_clips / (N*K)), i.e. as many
    samples as one pass of random sampling over the training set.
    Deterministic in (seed, epoch); data-parallel workers pass the same seed, draw the same
    global batches and each embed a share of them (asd.training.train_epoch).
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor, n_classes: int = 10, k: int = 10,
                 batches_per_epoch: int | None = None, seed: int = 0) -> None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() == 0:
            raise ValueError("no training clips to sample from")
        self.classes = torch.unique(labels)
        self.members = {int(c): torch.nonzero(labels == c).flatten() for c in self.classes}
        self.n_classes = min(n_classes, len(self.classes))
        self.k = k
        self.batches_per_epoch = batches_per_epoch or -(-labels.numel() // (self.n_classes * k))
        self.seed = seed

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int) -> Iterator[torch.Tensor]:
        """Yield ``len(self)`` index tensors of N*K clip indices for the given epoch."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        queue: list[int] = []
        for _ in range(self.batches_per_epoch):
            chosen: list[int] = []
            deferred: list[int] = []
            while len(chosen) < self.n_classes:
                if not queue:
                    queue = self.classes[torch.randperm(len(self.classes), generator=g)].tolist()
                c = queue.pop()
                if c in chosen:
                    deferred.append(c)  # already in this batch: keep its visit for the next batch
                else:
                    chosen.append(c)
            queue.extend(reversed(deferred))  # popped first by the next batch
            yield torch.cat([self._draw(self.members[c], g) for c in chosen])

    def _draw(self, members: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if members.numel() >= self.k:
            return members[torch.randperm(members.numel(), generator=g)[: self.k]]
        extra = members[torch.randint(members.numel(), (self.k - members.numel(),), generator=g)]
        return torch.cat([members, extra])


def random_crops(features: Sequence[torch.Tensor], indices: torch.Tensor, crop_frames: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Stack one random ``crop_frames``-frame crop [n_mels, crop] of each indexed clip.

    Each index gets its own random start, so a repeated clip yields different crops.
    """
    out = []
    for i in indices.tolist():
        feat = features[i]
        span = feat.shape[-1] - crop_frames
        if span < 0:
            raise ValueError(f"clip {i} has {feat.shape[-1]} frames, fewer than the crop of {crop_frames}")
        start = int(torch.randint(span + 1, (1,), generator=generator)) if span else 0
        out.append(feat[..., start:start + crop_frames])
    return torch.stack(out)


def sliding_windows(features: torch.Tensor, window: int, hop: int | None = None) -> torch.Tensor:
    """[n_mels, T] -> [W, n_mels, window]: windows every ``hop`` frames (default: window // 2),
    the last one aligned to the end so that every frame is covered."""
    hop = hop or max(1, window // 2)
    total = features.shape[-1]
    if total < window:
        raise ValueError(f"clip has {total} frames, fewer than the window of {window}")
    starts = list(range(0, total - window + 1, hop))
    if starts[-1] != total - window:
        starts.append(total - window)
    return torch.stack([features[..., s:s + window] for s in starts])
