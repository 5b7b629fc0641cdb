"""Tests of balanced N x K sampling and the frame crops (asd/sampler.py)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from asd.sampler import BalancedBatchSampler, random_crops, sliding_windows


def _labels(spec):
    """Class c has spec[c] clips; clips of different classes interleaved (not contiguous)."""
    out, left = [], list(spec)
    while any(left):
        for c in range(len(spec)):
            if left[c]:
                out.append(c)
                left[c] -= 1
    return out


def _batch_classes(batch, labels, n, k):
    """Split a batch into its N blocks of K and return each block's class (asserting purity)."""
    assert batch.shape == (n * k,)
    classes = []
    for b in range(n):
        block = [labels[i] for i in batch[b * k:(b + 1) * k].tolist()]
        assert len(set(block)) == 1, block
        classes.append(block[0])
    return classes


def test_every_batch_has_n_distinct_classes_of_k_clips():
    spec = [30, 12, 10, 3, 1, 25, 8]
    labels = _labels(spec)
    n, k = 4, 5
    sampler = BalancedBatchSampler(labels, n_classes=n, k=k, batches_per_epoch=40, seed=3)
    batches = list(sampler.epoch(0))
    assert len(batches) == 40
    for batch in batches:
        classes = _batch_classes(batch, labels, n, k)
        assert len(set(classes)) == n
        for b, c in enumerate(classes):
            block = batch[b * k:(b + 1) * k].tolist()
            assert all(0 <= i < len(labels) for i in block)
            if spec[c] >= k:
                assert len(set(block)) == k  # K distinct clips
            else:
                # all the class's clips, plus repeats of them
                assert set(block) == {i for i, lab in enumerate(labels) if lab == c}


def test_n_larger_than_class_count_is_capped():
    labels = _labels([5, 5, 5])
    sampler = BalancedBatchSampler(labels, n_classes=10, k=2, seed=0)
    assert sampler.n_classes == 3
    for batch in sampler.epoch(0):
        assert sorted(_batch_classes(batch, labels, 3, 2)) == [0, 1, 2]


def test_same_seed_and_epoch_reproduce_batches():
    labels = _labels([20, 15, 9, 4, 2])
    make = lambda seed: BalancedBatchSampler(labels, n_classes=3, k=4, batches_per_epoch=12, seed=seed)  # noqa: E731
    a = [b.tolist() for b in make(7).epoch(2)]
    b = [b.tolist() for b in make(7).epoch(2)]
    assert a == b
    sampler = make(7)
    assert [x.tolist() for x in sampler.epoch(2)] == [x.tolist() for x in sampler.epoch(2)]
    assert [x.tolist() for x in make(8).epoch(2)] != a
    assert [x.tolist() for x in make(7).epoch(3)] != a


@pytest.mark.parametrize("spec, n, k", [([10, 10, 10], 2, 5), ([7, 3, 1, 50], 3, 4), ([100], 10, 10),
                                        ([4] * 25, 10, 10)])
def test_default_length_is_ceil_clips_over_batch(spec, n, k):
    labels = _labels(spec)
    sampler = BalancedBatchSampler(labels, n_classes=n, k=k)
    n_eff = min(n, len(spec))
    assert len(sampler) == math.ceil(len(labels) / (n_eff * k))
    assert len(list(sampler.epoch(0))) == len(sampler)
    assert len(BalancedBatchSampler(labels, n_classes=n, k=k, batches_per_epoch=5)) == 5


def test_empty_labels_raise():
    with pytest.raises(ValueError):
        BalancedBatchSampler([], n_classes=2, k=2)


@pytest.mark.parametrize("n_classes_total, n", [(5, 2), (7, 3), (12, 10), (20, 10), (11, 10), (4, 4)])
def test_class_visits_balanced_at_every_batch(n_classes_total, n):
    """Classes are visited in shuffled rounds: after any number of batches, visit counts of all
    classes differ by at most one, whatever the class sizes."""
    spec = [1 + (7 * c) % 23 for c in range(n_classes_total)]
    labels = _labels(spec)
    k = 3
    sampler = BalancedBatchSampler(labels, n_classes=n, k=k, batches_per_epoch=150, seed=1)
    visits = Counter({c: 0 for c in range(n_classes_total)})
    for batch in sampler.epoch(0):
        for c in _batch_classes(batch, labels, n, k):
            visits[c] += 1
        assert max(visits.values()) - min(visits.values()) <= 1, dict(visits)
    total = 150 * n
    assert sum(visits.values()) == total
    assert min(visits.values()) == total // n_classes_total


def test_small_classes_oversampled_relative_to_random_sampling():
    spec = [200, 200, 5, 5]
    labels = _labels(spec)
    sampler = BalancedBatchSampler(labels, n_classes=2, k=10, seed=0)
    clip_counts = Counter(labels[i] for b in sampler.epoch(0) for i in b.tolist())
    # 21 batches x 2 classes = 42 visits of 10 clips: each class gets 10 or 11 visits, so the two
    # 5-clip classes (1.2 % of the clips) get about a quarter of the samples.
    assert sum(clip_counts.values()) == len(sampler) * 20 == 420
    assert set(clip_counts.values()) <= {100, 110}


# ----------------------------------------------------------------------------- crops

def _features(n_clips, n_mels=3, frames=(100, 80, 64, 70)):
    """Clip i: every frame t holds the value 1000 i + t, so a crop reveals its start."""
    feats = []
    for i in range(n_clips):
        t = frames[i % len(frames)]
        feats.append((1000 * i + torch.arange(t, dtype=torch.float32)).expand(n_mels, t).clone())
    return feats


def test_random_crops_are_slices_of_the_source():
    feats = _features(4)
    idx = torch.tensor([0, 1, 2, 3, 0])
    crops = random_crops(feats, idx, 64, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 64)
    for row, i in enumerate(idx.tolist()):
        start = int(crops[row, 0, 0]) - 1000 * i
        assert 0 <= start <= feats[i].shape[-1] - 64
        assert torch.equal(crops[row], feats[i][:, start:start + 64])
    # A clip exactly as long as the crop is returned whole.
    assert torch.equal(crops[2], feats[2])


def test_repeated_indices_get_different_crops():
    feats = _features(1, frames=(313,))
    idx = torch.zeros(10, dtype=torch.long)
    crops = random_crops(feats, idx, 64, generator=torch.Generator().manual_seed(1))
    starts = [int(c[0, 0]) for c in crops]
    assert len(set(starts)) > 5
    again = random_crops(feats, idx, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(crops, again)
    starts_all = Counter(int(c[0, 0]) for c in random_crops(
        feats, torch.zeros(4000, dtype=torch.long), 64, generator=torch.Generator().manual_seed(2)))
    assert min(starts_all) == 0 and max(starts_all) == 313 - 64  # both ends reachable


def test_random_crops_short_clip_raises():
    with pytest.raises(ValueError, match="clip 1"):
        random_crops(_features(2, frames=(100, 30)), torch.tensor([0, 1]), 64)


@pytest.mark.parametrize("total, window, hop", [(313, 64, None), (313, 64, 16), (64, 64, None),
                                                (65, 64, 32), (200, 64, 64), (100, 7, 3)])
def test_sliding_windows_cover_every_frame(total, window, hop):
    feats = _features(1, n_mels=2, frames=(total,))[0]
    wins = sliding_windows(feats, window, hop)
    step = hop or window // 2
    # Reference starts: every `step` frames, plus one window aligned to the end if needed.
    ref_starts = []
    s = 0
    while s + window <= total:
        ref_starts.append(s)
        s += step
    if ref_starts[-1] + window < total:
        ref_starts.append(total - window)
    assert wins.shape == (len(ref_starts), 2, window)
    covered = set()
    for w, s in zip(wins, ref_starts):
        assert torch.equal(w, feats[:, s:s + window])
        covered.update(range(s, s + window))
    assert covered == set(range(total))
    assert int(wins[-1, 0, -1]) == total - 1  # last window ends at the last frame


def test_sliding_windows_short_clip_raises():
    with pytest.raises(ValueError):
        sliding_windows(torch.zeros(4, 63), 64)


def test_random_sampling_batches_are_shuffled_passes():
    """Pre-training batches: consecutive batches read one permutation after another, so every clip
    appears once per pass, and a batch that straddles two passes takes the rest from the next."""
    from asd.training import random_sampling_batches, steps_per_epoch

    n, batch, steps = 10, 4, 7
    got = list(random_sampling_batches(n, batch, steps, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    stream = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-batch * steps // n))])
    assert [b.tolist() for b in got] == [stream[s * batch:(s + 1) * batch].tolist() for s in range(steps)]
    for p in range(batch * steps // n):
        assert sorted(torch.cat(got).tolist()[p * n:(p + 1) * n]) == list(range(n))
    assert steps_per_epoch(3, epochs=10, min_steps=None) == 3
    assert steps_per_epoch(3, epochs=10, min_steps=95) == 10  # ceil(95 / 10)
    assert steps_per_epoch(30, epochs=10, min_steps=95) == 30  # one pass already gives enough
    assert steps_per_epoch(0, epochs=10, min_steps=None) == 1
