"""Tests of the Mahalanobis scoring backend (asd/backend.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import mahalanobis

from asd import backend


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _section(n_per_class=(40, 30, 5, 3), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = _unit(torch.randn(len(n_per_class), dim, generator=g, dtype=torch.float64))
    embs, ids = [], []
    for c, n in enumerate(n_per_class):
        embs.append(_unit(centres[c] + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)))
        ids.append(torch.full((n,), c, dtype=torch.long))
    return torch.cat(embs), torch.cat(ids)


def _random_spd(dim, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim))
    return a @ a.T + dim * np.eye(dim)


def test_mahalanobis_matches_scipy_loop():
    rng = np.random.default_rng(0)
    dim = 6
    cov = _random_spd(dim)
    vi = np.linalg.inv(cov)
    x = rng.normal(size=(25, dim))
    protos = rng.normal(size=(4, dim))
    scores, nearest = backend.mahalanobis_min(
        torch.from_numpy(x), torch.from_numpy(protos), torch.from_numpy(vi)
    )
    assert scores.dtype == torch.float64 and nearest.dtype == torch.int64
    for i in range(x.shape[0]):
        d = [mahalanobis(x[i], protos[j], vi) for j in range(protos.shape[0])]
        assert scores[i].item() == pytest.approx(min(d), rel=1e-6, abs=1e-9)
        assert abs(scores[i].item() - min(d)) < 1e-6
        assert nearest[i].item() == int(np.argmin(d))


def test_mahalanobis_min_single_prototype_and_float32_input():
    rng = np.random.default_rng(3)
    cov = _random_spd(5, seed=3)
    vi = np.linalg.inv(cov)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    p = rng.normal(size=(1, 5))
    scores, nearest = backend.mahalanobis_min(torch.from_numpy(x), torch.from_numpy(p), torch.from_numpy(vi))
    ref = [mahalanobis(x[i].astype(np.float64), p[0], vi) for i in range(7)]
    np.testing.assert_allclose(scores.numpy(), ref, rtol=1e-6)
    assert (nearest == 0).all()


def test_fit_section_prototypes_are_normalised_class_means():
    emb, ids = _section()
    model = backend.fit_section(emb, ids, class_keys=["a", "b", "c", "d"])
    assert model.class_keys == ["a", "b", "c", "d"]
    for c in range(4):
        mean = emb[ids == c].mean(0)
        torch.testing.assert_close(model.prototypes[c], mean / mean.norm())
    torch.testing.assert_close(model.prototypes.norm(dim=1), torch.ones(4, dtype=torch.float64))
    raw = backend.fit_section(emb, ids, normalize_prototypes=False)
    torch.testing.assert_close(raw.prototypes[1], emb[ids == 1].mean(0))


def test_fit_section_sparse_class_ids_and_keys():
    emb, ids = _section(n_per_class=(10, 10, 10))
    ids = torch.tensor([7, 2, 5])[ids]  # arbitrary ids
    keys = {2: "src_A", 5: "tgt_B", 7: "src_C"}
    model = backend.fit_section(emb, ids, class_keys=keys)
    assert model.class_keys == ["src_A", "tgt_B", "src_C"]
    assert model.extra["class_ids"] == [2, 5, 7]
    mean = emb[ids == 5].mean(0)
    torch.testing.assert_close(model.prototypes[1], mean / mean.norm())
    _, nearest = model.score(emb[ids == 5])
    assert set(model.nearest_keys(nearest)) <= set(keys.values())


def test_pooled_covariance_with_fixed_shrinkage_matches_numpy():
    emb, ids = _section(dim=6)
    a = 0.2
    model = backend.fit_section(emb, ids, shrinkage=a, covariance="pooled")
    x = emb.numpy()
    s = np.cov(x, rowvar=False, bias=True)  # about the global mean, divided by N
    mu = np.trace(s) / s.shape[0]
    cov = (1 - a) * s + a * mu * np.eye(s.shape[0])
    np.testing.assert_allclose(model.precision.numpy(), np.linalg.inv(cov), rtol=1e-9, atol=1e-9)
    assert model.shrinkage == pytest.approx(a)
    assert model.covariance == "pooled"


def test_within_covariance_matches_numpy():
    emb, ids = _section(dim=6)
    a = 0.1
    model = backend.fit_section(emb, ids, shrinkage=a, covariance="within")
    x, y = emb.numpy(), ids.numpy()
    r = np.concatenate([x[y == c] - x[y == c].mean(0) for c in np.unique(y)])
    s = r.T @ r / len(r)
    mu = np.trace(s) / s.shape[0]
    cov = (1 - a) * s + a * mu * np.eye(s.shape[0])
    np.testing.assert_allclose(model.precision.numpy(), np.linalg.inv(cov), rtol=1e-9, atol=1e-9)
    assert model.covariance == "within"


def test_ledoit_wolf_matches_sklearn():
    from sklearn.covariance import ledoit_wolf

    emb, ids = _section(dim=10)
    for mode in ("pooled", "within"):
        r = backend.section_covariance(emb, ids, mode=mode)
        cov, a = backend.shrink_covariance(r, "ledoit-wolf")
        ref_cov, ref_a = ledoit_wolf(r.numpy(), assume_centered=True)
        assert a == pytest.approx(ref_a, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.0, 0.05])
@pytest.mark.parametrize("covariance", ["pooled", "within"])
def test_regularised_covariance_invertible_when_fewer_clips_than_dims(shrinkage, covariance):
    # 10 target-only clips in 3 classes, 128-dim embeddings: sample covariance has rank <= 9.
    emb, ids = _section(n_per_class=(4, 3, 3), dim=128, seed=5)
    r = backend.section_covariance(emb, ids, mode=covariance)
    cov, a = backend.shrink_covariance(r, shrinkage)
    assert a > 0.0  # floored even when 0 was asked for
    eig = torch.linalg.eigvalsh(cov)
    assert eig.min().item() > 0.0
    prec = backend.precision_from_covariance(cov)
    torch.testing.assert_close(prec @ cov, torch.eye(128, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.linalg.eigvalsh(prec).min().item() > 0.0
    model = backend.fit_section(emb, ids, shrinkage=shrinkage, covariance=covariance)
    scores, _ = model.score(emb)
    assert torch.isfinite(scores).all()


def test_degenerate_section_single_clip_and_identical_embeddings():
    emb = _unit(torch.ones(1, 16, dtype=torch.float64))
    model = backend.fit_section(emb, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(model.precision, torch.eye(16, dtype=torch.float64))
    same = emb.repeat(5, 1)
    model = backend.fit_section(same, torch.tensor([0, 0, 1, 1, 1]))
    scores, _ = model.score(same)
    assert torch.isfinite(scores).all()


def test_score_is_min_over_prototypes_loop():
    emb, ids = _section(dim=12)
    model = backend.fit_section(emb, ids)
    g = torch.Generator().manual_seed(9)
    test = _unit(torch.randn(30, 12, generator=g, dtype=torch.float64))
    scores, nearest = backend.score_section(model, test)
    vi = model.precision.numpy()
    for i in range(test.shape[0]):
        d = [mahalanobis(test[i].numpy(), p, vi) for p in model.prototypes.numpy()]
        assert abs(scores[i].item() - min(d)) < 1e-6
        assert nearest[i].item() == int(np.argmin(d))
    # a training clip's own class prototype is usually its nearest one
    _, near_train = model.score(emb)
    assert (near_train == ids).double().mean() > 0.8


def test_gamma_threshold_matches_scipy():
    rng = np.random.default_rng(0)
    scores = rng.gamma(shape=3.0, scale=2.0, size=500) + 1.0
    params = stats.gamma.fit(scores)
    expected = stats.gamma.ppf(0.9, *params)
    assert backend.fit_gamma_threshold(scores) == pytest.approx(expected, rel=1e-12)
    assert backend.fit_gamma_threshold(torch.from_numpy(scores), 0.9) == pytest.approx(expected, rel=1e-12)
    exp95 = stats.gamma.ppf(0.95, *params)
    assert backend.fit_gamma_threshold(scores, quantile=0.95) == pytest.approx(exp95, rel=1e-12)


def test_gamma_threshold_degenerate_scores_fall_back():
    assert backend.fit_gamma_threshold(np.full(50, 2.5)) == 2.5
    assert backend.fit_gamma_threshold(np.array([3.0])) == 3.0
    two = np.array([1.0, 1.0, 1.0, 2.0])
    thr = backend.fit_gamma_threshold(two)
    assert math.isfinite(thr)
    with pytest.raises(ValueError):
        backend.fit_gamma_threshold(np.array([]))
    with pytest.raises(ValueError):
        backend.fit_gamma_threshold(np.array([1.0, np.nan]))


def test_gamma_threshold_fit_failure_falls_back(monkeypatch):
    scores = np.linspace(1.0, 2.0, 11)

    def boom(*a, **k):
        raise RuntimeError("fit failed")

    monkeypatch.setattr(stats.gamma, "fit", boom)
    assert backend.fit_gamma_threshold(scores, 0.9) == pytest.approx(np.quantile(scores, 0.9))


def test_calibrate_threshold_and_decide():
    emb, ids = _section(dim=8)
    model = backend.fit_section(emb, ids)
    assert math.isnan(model.threshold)
    cal = backend.calibrate_threshold(model, emb, quantile=0.9)
    train_scores, _ = model.score(emb)
    expected = stats.gamma.ppf(0.9, *stats.gamma.fit(train_scores.numpy()))
    assert cal.threshold == pytest.approx(expected, rel=1e-12)
    dec = backend.decide(train_scores, cal.threshold)
    assert dec.dtype == torch.int64
    assert torch.equal(dec, (train_scores > cal.threshold).long())
    assert 0.0 < dec.double().mean().item() < 0.5


def test_state_dict_round_trip():
    emb, ids = _section(dim=8)
    model = backend.calibrate_threshold(backend.fit_section(emb, ids, class_keys=list("wxyz")), emb)
    again = backend.SectionModel.from_state_dict(model.state_dict())
    assert again.class_keys == model.class_keys
    assert again.threshold == model.threshold
    torch.testing.assert_close(again.score(emb)[0], model.score(emb)[0])


def test_bad_arguments():
    emb, ids = _section(dim=4)
    with pytest.raises(ValueError):
        backend.fit_section(emb, ids, covariance="diagonal")
    with pytest.raises(ValueError):
        backend.fit_section(emb, ids, shrinkage=1.5)
    with pytest.raises(ValueError):
        backend.fit_section(emb, ids[:-1])
    with pytest.raises(ValueError):
        backend.precision_from_covariance(torch.zeros(3, 3, dtype=torch.float64))


def test_decide_is_strictly_greater_than_the_threshold():
    """decision = 1 only when the score is strictly above the threshold (a tie is normal)."""
    scores = np.array([0.5, 2.0, 2.0 + 1e-12, 3.0])
    assert backend.decide(scores, 2.0).tolist() == [0, 0, 1, 1]
    assert backend.decide(torch.from_numpy(scores), 3.0).tolist() == [0, 0, 0, 0]
