"""Tests of prototypes (asd/prototypes.py, paper Eq. 2 and MPE) and the losses (asd/losses.py,
paper Eqs. 1, 3, 4, 5, 6), in float64 against plain Python loops written from the equations."""

from __future__ import annotations

import math

import pytest
import torch

from asd.losses import (
    balanced_batch_loss,
    batch_prototypes,
    multi_prototype_loss,
    negative_prototypes,
    npe_loss,
    prototypical_loss,
)
from asd.prototypes import class_sums, mpe_membership, prototypes_from_sums, subset_sums

TAU = 0.07
TOL = dict(rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- loop helpers

def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _randz(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return _unit(torch.randn(n, d, generator=g, dtype=torch.float64))


def _dot(a, b):
    return sum(float(a[i]) * float(b[i]) for i in range(len(a)))


def _normalise_list(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _mean_prototype(vectors):
    """Eq. 2 + normalisation: mean of the vectors, then unit length (plain Python)."""
    d = len(vectors[0])
    mean = [sum(float(v[i]) for v in vectors) / len(vectors) for i in range(d)]
    return _normalise_list(mean)


def _ref_pl(z, labels, protos, tau):
    """Eq. 1 averaged over anchors."""
    total = 0.0
    for i in range(len(z)):
        logits = [_dot(z[i], p) / tau for p in protos]
        num = math.exp(logits[int(labels[i])])
        den = sum(math.exp(s) for s in logits)
        total += -math.log(num / den)
    return total / len(z)


def _labels(spec, seed=0):
    """Labels with ``spec[c]`` members of class c, shuffled."""
    lab = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(spec)])
    return lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(seed))]


# ----------------------------------------------------------------------------- Eq. 2

def test_class_sums_and_prototypes_match_loop():
    labels = _labels([3, 1, 5, 2])
    z = _randz(len(labels), 6, 1)
    sums, counts = class_sums(z, labels, 4)
    assert sums.dtype == torch.float64 and counts.dtype == torch.float64
    for c in range(4):
        members = [z[i] for i in range(len(z)) if int(labels[i]) == c]
        assert counts[c] == len(members)
        for d in range(6):
            assert float(sums[c, d]) == pytest.approx(sum(float(v[d]) for v in members), abs=1e-12)
    protos = prototypes_from_sums(sums, counts)
    for c in range(4):
        members = [z[i] for i in range(len(z)) if int(labels[i]) == c]
        torch.testing.assert_close(protos[c], torch.tensor(_mean_prototype(members), dtype=torch.float64), **TOL)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_class_sums_from_float32_are_float64_and_detached():
    z = torch.randn(5, 3, requires_grad=True)
    sums, _ = class_sums(z, torch.tensor([0, 1, 0, 1, 1]), 2)
    assert sums.dtype == torch.float64 and not sums.requires_grad


def test_missing_class_raises():
    labels = torch.tensor([0, 0, 2])
    sums, counts = class_sums(_randz(3, 4, 2), labels, 3)
    assert counts.tolist() == [2.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"\[1\]"):
        prototypes_from_sums(sums, counts)


# ----------------------------------------------------------------------------- Eq. 1

def test_prototypical_loss_matches_loop():
    labels = _labels([2, 3, 2, 1], seed=3)
    z = _randz(len(labels), 5, 4)
    protos = _randz(4, 5, 5)
    got = prototypical_loss(z, labels, protos, TAU)
    assert float(got) == pytest.approx(_ref_pl(z, labels, protos, TAU), rel=1e-9)
    got = prototypical_loss(z, labels, protos, 0.5)
    assert float(got) == pytest.approx(_ref_pl(z, labels, protos, 0.5), rel=1e-9)


def test_prototypical_loss_gradcheck():
    z = _randz(4, 3, 6).requires_grad_()
    protos = _randz(3, 3, 7).requires_grad_()
    labels = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda a, p: prototypical_loss(a, labels, p, 0.5), (z, protos))


# ----------------------------------------------------------------------------- Eq. 3

def _ref_mpe(z, labels, protos, proto_class, tau):
    total = 0.0
    for i in range(len(z)):
        logits = [_dot(z[i], p) / tau for p in protos]
        den = sum(math.exp(s) for s in logits)
        positives = [q for q in range(len(protos)) if int(proto_class[q]) == int(labels[i])]
        total += -sum(math.log(math.exp(logits[q]) / den) for q in positives) / len(positives)
    return total / len(z)


def test_multi_prototype_loss_matches_loop():
    proto_class = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 2])  # main + sub-prototypes, unordered
    protos = _randz(len(proto_class), 6, 8)
    labels = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    z = _randz(len(labels), 6, 9)
    got = multi_prototype_loss(z, labels, protos, proto_class, TAU)
    assert float(got) == pytest.approx(_ref_mpe(z, labels, protos, proto_class, TAU), rel=1e-9)


def test_multi_prototype_loss_reduces_to_eq1_with_one_prototype_per_class():
    labels = torch.tensor([0, 1, 2, 1])
    z, protos = _randz(4, 5, 10), _randz(3, 5, 11)
    torch.testing.assert_close(multi_prototype_loss(z, labels, protos, torch.arange(3), TAU),
                               prototypical_loss(z, labels, protos, TAU))


def test_multi_prototype_loss_no_positive_raises():
    with pytest.raises(ValueError):
        multi_prototype_loss(_randz(2, 3, 0), torch.tensor([0, 3]), _randz(2, 3, 1), torch.tensor([0, 1]))


def test_multi_prototype_loss_gradcheck():
    z = _randz(3, 4, 12).requires_grad_()
    protos = _randz(5, 4, 13).requires_grad_()
    proto_class = torch.tensor([0, 1, 0, 1, 1])
    labels = torch.tensor([1, 0, 1])
    assert torch.autograd.gradcheck(
        lambda a, p: multi_prototype_loss(a, labels, p, proto_class, 0.5), (z, protos))


# ----------------------------------------------------------------------------- MPE subsets

@pytest.mark.parametrize("ratio", [0.25, 0.125, 0.5, 1.0, 0.01])
def test_mpe_membership_sizes_and_classes(ratio):
    spec = [40, 10, 3, 1]
    labels = _labels(spec, seed=14)
    per_class = 3
    m, sub_class = mpe_membership(labels, len(spec), ratio, per_class, torch.Generator().manual_seed(0))
    assert m.shape == (len(spec) * per_class, len(labels)) and m.dtype == torch.float64
    assert sub_class.tolist() == [c for c in range(len(spec)) for _ in range(per_class)]
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    for s in range(m.shape[0]):
        c = int(sub_class[s])
        members = [i for i in range(len(labels)) if m[s, i] == 1.0]
        assert len(members) == max(1, round(ratio * spec[c]))
        assert all(int(labels[i]) == c for i in members)


def test_mpe_membership_reproducible_and_random():
    labels = _labels([40, 12], seed=15)
    a = mpe_membership(labels, 2, 0.25, 4, torch.Generator().manual_seed(7))[0]
    b = mpe_membership(labels, 2, 0.25, 4, torch.Generator().manual_seed(7))[0]
    c = mpe_membership(labels, 2, 0.25, 4, torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Subsets of one class differ from each other (40 choose 10 makes a repeat negligible).
    assert not torch.equal(a[0], a[1])


def test_mpe_membership_bad_ratio_and_empty_class():
    labels = torch.tensor([0, 0, 2])
    for ratio in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            mpe_membership(labels, 3, ratio, 2, torch.Generator().manual_seed(0))
    m, _ = mpe_membership(labels, 3, 0.5, 2, torch.Generator().manual_seed(0))
    assert m[2:4].sum() == 0  # class 1 has no clips: its subsets are empty


def test_subset_sums_match_loop_and_shards_add_up():
    labels = _labels([20, 7, 4], seed=16)
    n, d = len(labels), 5
    z = _randz(n, d, 17).float()  # workers hold float32 embeddings
    m, sub_class = mpe_membership(labels, 3, 0.25, 2, torch.Generator().manual_seed(1))
    sums, counts = subset_sums(z, m)
    assert sums.dtype == torch.float64
    for s in range(m.shape[0]):
        members = [i for i in range(n) if m[s, i] == 1.0]
        assert counts[s] == len(members)
        for k in range(d):
            assert float(sums[s, k]) == pytest.approx(sum(float(z[i, k]) for i in members), abs=1e-9)
    single = prototypes_from_sums(sums, counts)
    for s in range(m.shape[0]):
        members = [z[i] for i in range(n) if m[s, i] == 1.0]
        torch.testing.assert_close(single[s], torch.tensor(_mean_prototype(members), dtype=torch.float64), **TOL)
    # Two workers on disjoint (interleaved) column shards; their sums all-reduced.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    shard_a, shard_b = perm[: n // 2], perm[n // 2:]
    sa, ca = subset_sums(z[shard_a], m[:, shard_a])
    sb, cb = subset_sums(z[shard_b], m[:, shard_b])
    torch.testing.assert_close(sa + sb, sums, rtol=0, atol=1e-12)
    assert torch.equal(ca + cb, counts)
    torch.testing.assert_close(prototypes_from_sums(sa + sb, ca + cb), single, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- Eq. 4

def _ref_batch_protos(z, labels):
    classes = sorted(set(int(c) for c in labels))
    protos = [_mean_prototype([z[i] for i in range(len(z)) if int(labels[i]) == c]) for c in classes]
    return classes, protos


def _ref_balanced(z, labels, tau):
    classes, protos = _ref_batch_protos(z, labels)
    total = 0.0
    for i in range(len(z)):
        logits = [_dot(z[i], p) / tau for p in protos]
        own = classes.index(int(labels[i]))
        total += -math.log(math.exp(logits[own]) / sum(math.exp(s) for s in logits))
    return total / len(z)


def test_batch_prototypes_match_loop():
    labels = torch.tensor([7, 3, 7, 9, 3, 3])
    z = _randz(6, 4, 18)
    protos, local = batch_prototypes(z, labels)
    classes, ref = _ref_batch_protos(z, labels)
    assert [classes[int(i)] for i in local] == labels.tolist()
    torch.testing.assert_close(protos, torch.tensor(ref, dtype=torch.float64), **TOL)


def test_balanced_batch_loss_matches_loop():
    # N = 3 classes with sparse ids x K = 4 clips
    labels = torch.tensor([5] * 4 + [1] * 4 + [12] * 4)
    z = _randz(12, 6, 19)
    got = balanced_batch_loss(z, labels, TAU)
    assert float(got) == pytest.approx(_ref_balanced(z, labels, TAU), rel=1e-9)


def test_balanced_batch_loss_gradcheck():
    z = _randz(6, 3, 20).requires_grad_()
    labels = torch.tensor([0, 0, 4, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda a: balanced_batch_loss(a, labels, 0.5), (z,))


# ----------------------------------------------------------------------------- Eqs. 5, 6

def _ref_npe(z, labels, lam, tau):
    """Eq. 6 with Eq. 5 pseudo-anomalies; lam[a][j] indexes the sorted batch classes."""
    classes, protos = _ref_batch_protos(z, labels)
    total = 0.0
    for a in range(len(z)):
        c = classes.index(int(labels[a]))
        pos = math.exp(_dot(z[a], protos[c]) / tau)
        den = sum(math.exp(_dot(z[a], p) / tau) for p in protos)
        for j, p in enumerate(protos):
            if j == c:
                continue
            l = float(lam[a][j])
            zhat = _normalise_list([l * float(z[a][k]) + (1 - l) * p[k] for k in range(len(p))])
            den += math.exp(_dot(z[a], zhat) / tau)
        total += -math.log(pos / den)
    return total / len(z)


def test_negative_prototypes_match_loop():
    z, protos = _randz(3, 4, 21), _randz(2, 4, 22)
    lam = torch.rand(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = negative_prototypes(z, protos, lam)
    assert got.shape == (3, 2, 4)
    for a in range(3):
        for j in range(2):
            l = float(lam[a, j])
            ref = _normalise_list([l * float(z[a, k]) + (1 - l) * float(protos[j, k]) for k in range(4)])
            torch.testing.assert_close(got[a, j], torch.tensor(ref, dtype=torch.float64), **TOL)


def test_npe_loss_explicit_lam_matches_loop():
    labels = torch.tensor([4] * 3 + [0] * 3 + [2] * 3 + [8] * 3)
    z = _randz(12, 6, 23)
    lam = 0.25 + 0.25 * torch.rand(12, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = npe_loss(z, labels, TAU, lam=lam)
    assert float(got) == pytest.approx(_ref_npe(z, labels, lam, TAU), rel=1e-9)


def test_npe_loss_gradcheck():
    z = _randz(6, 3, 24).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 3, 3])
    lam = 0.25 + 0.25 * torch.rand(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: npe_loss(a, labels, 0.5, lam=lam), (z,))


def test_npe_loss_random_lam_within_range():
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    z = _randz(12, 5, 25)
    lo, hi = 0.25, 0.5
    full = lambda v: torch.full((12, 3), v, dtype=torch.float64)  # noqa: E731
    # z . normalise(lam z + (1-lam) p) grows with lam, so the loss is monotone in every lam:
    # a draw inside [lo, hi] must give a loss between the two constant-lam losses.
    at_lo = float(npe_loss(z, labels, TAU, lam=full(lo)))
    at_hi = float(npe_loss(z, labels, TAU, lam=full(hi)))
    assert at_lo < at_hi
    draws = []
    for seed in range(5):
        got = float(npe_loss(z, labels, TAU, lam_range=(lo, hi), generator=torch.Generator().manual_seed(seed)))
        assert at_lo - 1e-12 <= got <= at_hi + 1e-12
        draws.append(got)
    assert len(set(draws)) == 5  # lam is random, not a constant
    # Same generator seed -> same loss; a degenerate range equals the explicit lam.
    again = float(npe_loss(z, labels, TAU, lam_range=(lo, hi), generator=torch.Generator().manual_seed(0)))
    assert again == draws[0]
    deg = npe_loss(z, labels, TAU, lam_range=(0.3, 0.3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deg, npe_loss(z, labels, TAU, lam=full(0.3)))
    # Shifting the range out of [lo, hi] leaves the bracket.
    above = float(npe_loss(z, labels, TAU, lam_range=(0.6, 0.9), generator=torch.Generator().manual_seed(0)))
    assert above > at_hi


def test_npe_loss_at_least_balanced_loss():
    for seed in range(5):
        labels = torch.arange(4).repeat_interleave(3)
        z = _randz(12, 8, 100 + seed)
        bal = float(balanced_batch_loss(z, labels, TAU))
        npe = float(npe_loss(z, labels, TAU, generator=torch.Generator().manual_seed(seed)))
        assert npe > bal
    # One class in the batch: no other class, no pseudo-anomaly, loss equals Eq. 4 (= 0 here).
    z = _randz(4, 3, 5)
    one = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(npe_loss(z, one, TAU, generator=torch.Generator().manual_seed(0)),
                               balanced_batch_loss(z, one, TAU))
