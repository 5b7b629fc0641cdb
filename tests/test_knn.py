"""The kNN floor baseline (``method: knn``): clip statistics and nearest cosine distances against
independent references (numpy, scikit-learn), and the scoring job on a small hand-written
feature store against a plain numpy computation of scores, thresholds and decisions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.neighbors import NearestNeighbors

from asd.features import FeatureConfig
from asd.knn import (batch_clip_statistics, clip_statistics, cosine_distances, dimension_spread, domain_scales,
                     local_radii, log_mean_power, nearest_cosine_distance, scaled_nearest, spectrum_shape,
                     standardised_euclidean)
from pipelines.config import ConfigError, PipelineConfig, load_config


# ----------------------------------------------------------------------------- asd.knn
def test_clip_statistics_are_per_bin_mean_then_population_std():
    rng = np.random.default_rng(0)
    x = rng.normal(-40.0, 7.0, size=(12, 33)).astype(np.float32)
    got = clip_statistics(torch.from_numpy(x))
    x64 = x.astype(np.float64)
    assert got.dtype == torch.float64 and got.shape == (24,)
    np.testing.assert_allclose(got.numpy(), np.concatenate([x64.mean(axis=1), x64.std(axis=1, ddof=0)]),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(clip_statistics(torch.ones(3, 1)), torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64))


def test_batch_clip_statistics_stacks_clips_of_any_length():
    rng = np.random.default_rng(1)
    clips = [torch.from_numpy(rng.normal(size=(6, t)).astype(np.float32)) for t in (64, 80, 313)]
    got = batch_clip_statistics(clips)
    assert got.shape == (3, 12)
    for row, c in zip(got, clips):
        assert torch.equal(row, clip_statistics(c))
    with pytest.raises(ValueError, match="numbers of bins"):
        batch_clip_statistics([torch.zeros(6, 70), torch.zeros(5, 70)])
    with pytest.raises(ValueError):
        batch_clip_statistics([])
    with pytest.raises(ValueError):
        clip_statistics(torch.zeros(6))


def _numpy_nearest(q: np.ndarray, r: np.ndarray, exclude_self: bool = False):
    """Plain loop: cosine distance to every reference, the smallest (first on ties)."""
    dist, idx = [], []
    for i, a in enumerate(q):
        best, arg = np.inf, -1
        for j, b in enumerate(r):
            if exclude_self and i == j:
                continue
            d = 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
            if d < best:
                best, arg = d, j
        dist.append(max(best, 0.0))
        idx.append(arg)
    return np.array(dist), np.array(idx)


def test_nearest_cosine_distance_matches_numpy_and_sklearn():
    rng = np.random.default_rng(2)
    refs, queries = rng.normal(size=(40, 16)), rng.normal(size=(25, 16))
    dist, nearest = nearest_cosine_distance(torch.from_numpy(queries), torch.from_numpy(refs), chunk_size=7)
    assert dist.dtype == torch.float64 and nearest.dtype == torch.int64
    want_d, want_i = _numpy_nearest(queries, refs)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(nearest.numpy(), want_i)
    sk_d, sk_i = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(refs).kneighbors(queries)
    np.testing.assert_allclose(dist.numpy(), sk_d[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(nearest.numpy(), sk_i[:, 0])
    np.testing.assert_allclose(cosine_distances(torch.from_numpy(queries), torch.from_numpy(refs)).min(dim=1).values,
                               want_d, rtol=1e-10, atol=1e-12)


def test_leave_one_out_skips_each_clip_itself():
    rng = np.random.default_rng(3)
    refs = rng.normal(size=(30, 10))
    refs[7] = refs[3] * 2.5  # same direction: distance 0 between 3 and 7, never to itself
    dist, nearest = nearest_cosine_distance(torch.from_numpy(refs), torch.from_numpy(refs), exclude_self=True,
                                            chunk_size=4)
    want_d, want_i = _numpy_nearest(refs, refs, exclude_self=True)
    np.testing.assert_allclose(dist.numpy(), want_d, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(nearest.numpy(), want_i)
    assert (nearest.numpy() != np.arange(30)).all()
    assert nearest[3] == 7 and nearest[7] == 3 and dist[3] == pytest.approx(0.0, abs=1e-12)
    # scikit-learn's kneighbors() without X is leave-one-out too
    sk_d, sk_i = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(refs).kneighbors()
    np.testing.assert_allclose(dist.numpy(), sk_d[:, 0], rtol=1e-9, atol=1e-12)
    # without exclusion every clip is its own nearest neighbour
    d0, i0 = nearest_cosine_distance(torch.from_numpy(refs), torch.from_numpy(refs))
    assert d0.abs().max() < 1e-12 and (i0.numpy()[[0, 1, 2, 4]] == [0, 1, 2, 4]).all()
    with pytest.raises(ValueError, match="at least 2"):
        nearest_cosine_distance(torch.ones(1, 3), torch.ones(1, 3), exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self"):
        nearest_cosine_distance(torch.ones(2, 3), torch.ones(3, 3), exclude_self=True)


def test_zero_vectors_are_at_distance_one_and_dimensions_must_match():
    d, _ = nearest_cosine_distance(torch.zeros(2, 4), torch.randn(3, 4))
    assert torch.equal(d, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dimensions"):
        nearest_cosine_distance(torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-finite"):
        nearest_cosine_distance(torch.tensor([[float("nan"), 1.0]]), torch.ones(2, 2))


# ----------------------------------------------------------------------------- spectral kNN
def test_log_mean_power_is_the_db_of_the_mean_power_and_shape_ignores_gain():
    rng = np.random.default_rng(5)
    x = rng.normal(-60.0, 12.0, size=(9, 50))
    x[2, :] = -100.0  # a floored bin stays exactly at the floor
    want = 10 * np.log10((10 ** (x / 10)).mean(axis=1))
    got = log_mean_power(torch.from_numpy(x))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-9)
    assert got[2].item() == pytest.approx(-100.0, abs=1e-9)
    shape = spectrum_shape(torch.from_numpy(x))
    np.testing.assert_allclose(shape.numpy(), want - want.mean(), atol=1e-9)
    np.testing.assert_allclose(spectrum_shape(torch.from_numpy(x + 17.5)).numpy(), shape.numpy(), atol=1e-9)
    assert batch_clip_statistics([torch.from_numpy(x)], "spectrum_shape").shape == (1, 9)
    with pytest.raises(ValueError, match="representation"):
        batch_clip_statistics([torch.from_numpy(x)], "mfcc")


def _loop_scales(dist: np.ndarray, domains: list[str], normalisation: str) -> list[float]:
    """Plain loops: each training clip's scale, its nearest other clip's distance ("local") or
    the mean of those within its domain ("domain")."""
    n = len(domains)
    radius = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    if normalisation == "local":
        positive = sorted(r for r in radius if r > 0)
        return [r if r > 0 else float(np.median(positive)) for r in radius]
    by_domain = {}
    for name in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == name]
        if len(idx) >= 2:
            by_domain[name] = np.mean([min(dist[i][j] for j in idx if j != i) for i in idx])
    fallback = np.mean(list(by_domain.values()))
    return [by_domain.get(d, fallback) for d in domains]


def _loop_score(query_dist, scales: list[float], power: float) -> float:
    return min(q / s ** power for q, s in zip(query_dist, scales))


@pytest.mark.parametrize("normalisation", ["local", "domain"])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_scaled_nearest_matches_loops(normalisation, power):
    rng = np.random.default_rng(6)
    refs = rng.normal(size=(14, 6))
    refs[10:] += 4.0  # a far, sparse target domain of 4 clips
    domains = ["source"] * 10 + ["target"] * 4
    queries = rng.normal(size=(7, 6)) + np.r_[[0.0] * 4, [4.0] * 3][:, None]
    among = cosine_distances(torch.from_numpy(refs), torch.from_numpy(refs))
    to_train = cosine_distances(torch.from_numpy(queries), torch.from_numpy(refs))
    want_scales = _loop_scales(among.numpy(), domains, normalisation)
    if normalisation == "local":
        got_scales = local_radii(among)
    else:
        by_domain = domain_scales(among, domains)
        got_scales = torch.tensor([by_domain[d] for d in domains], dtype=torch.float64)
    np.testing.assert_allclose(got_scales.numpy(), want_scales, rtol=1e-12)
    got, rows = scaled_nearest(to_train, got_scales, power)
    want = [_loop_score(q, want_scales, power) for q in to_train.numpy()]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    np.testing.assert_allclose((to_train.numpy() / np.array(want_scales) ** power)[np.arange(7), rows.numpy()], want)
    if power == 0.0:  # the floor: plain nearest distance over both domains
        np.testing.assert_allclose(got.numpy(), to_train.min(dim=1).values.numpy(), rtol=1e-12)


def test_standardised_euclidean_matches_scipy_and_constant_bins_keep_their_units():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(11)
    refs = rng.normal(size=(9, 5)) * np.array([0.1, 1.0, 5.0, 2.0, 0.5])
    queries = rng.normal(size=(4, 5))
    spread = dimension_spread(torch.from_numpy(refs))
    np.testing.assert_allclose(spread.numpy(), refs.std(axis=0, ddof=1), rtol=1e-12)
    got = standardised_euclidean(torch.from_numpy(queries), torch.from_numpy(refs), spread)
    want = cdist(queries, refs, "seuclidean", V=refs.var(axis=0, ddof=1))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    refs[:, 2] = 3.0  # a bin that never varies is compared in its own units, not divided by zero
    np.testing.assert_allclose(dimension_spread(torch.from_numpy(refs)).numpy()[2], 1.0)
    np.testing.assert_allclose(dimension_spread(torch.ones(1, 3)).numpy(), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        standardised_euclidean(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([1.0, 0.0]))
    # a duplicate clip among more than 25 (where cdist's matrix-product shortcut would take over) is at
    # distance exactly 0, so that local_radii gives it the median radius rather than a tiny one
    many = torch.from_numpy(np.random.default_rng(1).normal(size=(40, 513)))
    many[39] = many[0]
    among = standardised_euclidean(many, many, dimension_spread(many))
    assert among[0, 39] == 0.0 and among[39, 0] == 0.0
    radii = local_radii(among)
    assert radii[0] == radii[39] == torch.median(radii[(among + torch.eye(40) * 1e9).min(dim=1).values > 0])


def test_knn_section_state_round_trip_keeps_the_distance():
    """A saved standardised-Euclidean section scores the same after torch.load(weights_only=True);
    a section saved before knn.distance existed reads back as cosine."""
    import io

    from asd.knn_backend import KnnSection, fit_knn_section

    rng = np.random.default_rng(12)
    refs = torch.from_numpy(rng.normal(size=(12, 6)) * np.linspace(0.1, 3.0, 6))
    queries = torch.from_numpy(rng.normal(size=(5, 6)))
    section = fit_knn_section(refs, ["source"] * 12, [""] * 12, "local", 0.5, 0.9, "standardised_euclidean")
    buffer = io.BytesIO()
    torch.save(section.state_dict(), buffer)
    back = KnnSection.from_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    np.testing.assert_allclose(back.score(queries)[0].numpy(), section.score(queries)[0].numpy(), rtol=1e-12)
    cosine = fit_knn_section(refs, None, [""] * 12, "local", 0.5, 0.9)
    old = {k: v for k, v in cosine.state_dict().items() if k not in ("distance", "spread")}
    np.testing.assert_allclose(KnnSection.from_state_dict(old).score(queries)[0].numpy(),
                               cosine.score(queries)[0].numpy(), rtol=1e-12)
    assert not np.allclose(section.score(queries)[0].numpy(), cosine.score(queries)[0].numpy())
    with pytest.raises(ValueError, match="distance must be one of"):
        fit_knn_section(refs, None, [""] * 12, "local", 0.5, 0.9, "manhattan")


def test_scales_of_duplicates_and_single_clip_domains():
    d = torch.tensor([[0.0, 0.2, 0.9], [0.2, 0.0, 0.8], [0.9, 0.8, 0.0]], dtype=torch.float64)
    assert domain_scales(d, ["s", "s", "t"]) == {"s": pytest.approx(0.2), "t": pytest.approx(0.2)}
    assert domain_scales(d[:1, :1], ["s"]) == {"s": 1.0}
    with pytest.raises(ValueError):
        domain_scales(d, ["s", "t"])
    np.testing.assert_allclose(local_radii(d).numpy(), [0.2, 0.2, 0.8])
    dup = torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.7], [0.5, 0.7, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(local_radii(dup).numpy(), [0.5, 0.5, 0.5])  # duplicates take the median radius
    with pytest.raises(ValueError, match="positive"):
        scaled_nearest(d, torch.tensor([1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- config
def test_method_is_validated_in_one_line():
    assert load_config(None, ["method=knn"]).method == "knn"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method=kNN-cosine"])
    msg = str(err.value)
    assert "method: must be one of 'prototype', 'ae' or 'knn'" in msg and "\n" not in msg
    with pytest.raises(ValueError):  # direct construction validates too (pydantic's error)
        PipelineConfig(method="nope")


def test_knn_settings_are_part_of_the_stage_fingerprint():
    """Changing a knn setting refits the stage instead of scoring with the old model."""
    from pipelines import detectors

    base = load_config(None, ["method=knn"])
    stage = detectors.get("knn").stages(base)[0]
    for change in ("knn.normalisation=local", "knn.representation=spectrum_shape", "knn.power=0.5",
                   "knn.distance=standardised_euclidean"):
        assert load_config(None, ["method=knn", change]).digest(*stage.sections) != base.digest(*stage.sections)


# ----------------------------------------------------------------------------- the scoring job
N_MELS = 8
SECTIONS = [("fan", "00"), ("fan", "01"), ("valve", "00")]


def _write_store(store: Path, fcfg: FeatureConfig, rng: np.random.Generator) -> list[dict]:
    """A feature store written directly (no Ray): per section 9 train clips (6 source + 3 target)
    and 8 test clips (normal/anomaly x source/target), float32 features of varying length."""
    from store_writer import clip_row, write_store

    clips = []
    for machine, section in SECTIONS:
        offset = rng.normal(-50.0, 5.0, size=(N_MELS, 1))
        for split, specs in (("train", [("source", "normal")] * 6 + [("target", "normal")] * 3),
                             ("test", [(d, lab) for d in ("source", "target") for lab in ("normal", "anomaly")] * 2)):
            for i, (domain, label) in enumerate(specs):
                t = int(rng.integers(64, 90))
                scale = 3.0 if label == "anomaly" else 1.0
                feats = (offset + scale * rng.normal(size=(N_MELS, t))
                         + (2.0 * scale) * rng.normal(size=(N_MELS, 1))).astype(np.float32)
                row = clip_row(machine, section, split, domain, label, i, f"a{i % 2}", N_MELS, t, fcfg.version,
                               f"h{len(clips):06d}")
                clips.append({**row, "features": feats})
    write_store(store, fcfg.version, [(c, c["features"]) for c in clips])
    return clips


def _numpy_expected(clips: list[dict], quantile: float) -> pd.DataFrame:
    """Scores, thresholds, decisions and nearest attribute classes, computed with numpy/scipy only."""
    def stat(f):
        f = f.astype(np.float64)
        return np.concatenate([f.mean(axis=1), f.std(axis=1)])

    out = []
    for machine, section in SECTIONS:
        train = [c for c in clips if (c["machine"], c["section"], c["split"]) == (machine, section, "train")]
        test = [c for c in clips if (c["machine"], c["section"], c["split"]) == (machine, section, "test")]
        ref = np.stack([stat(c["features"]) for c in train])
        loo, _ = _numpy_nearest(ref, ref, exclude_self=True)
        threshold = stats.gamma.ppf(quantile, *stats.gamma.fit(loo))
        d, idx = _numpy_nearest(np.stack([stat(c["features"]) for c in test]), ref)
        for c, score, j in zip(test, d, idx):
            out.append({"path": c["path"], "score": score, "decision": int(score > threshold),
                        "nearest_attribute": train[j]["attribute_class"], "threshold": threshold})
    return pd.DataFrame(out).sort_values("path").reset_index(drop=True)


@pytest.fixture
def knn_store(tmp_path):
    fcfg = FeatureConfig(kind="logmel", n_mels=N_MELS)  # any kind works; the benchmark uses logmel
    cfg = PipelineConfig(name="knn-test", run_dir=str(tmp_path / "run"), method="knn", features=fcfg)
    store = tmp_path / "store"
    clips = _write_store(store, fcfg, np.random.default_rng(4))
    return cfg, store, clips


def test_knn_scoring_matches_numpy(knn_store, tmp_path):
    from pipelines.detectors.knn import KNN_FILE, run_knn_stage
    from pipelines.stages.score import method_label, run_scoring

    cfg, store, clips = knn_store
    model_dir = run_knn_stage(cfg, store=store, out_dir=tmp_path / "models" / "knn")
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["stage"] == "knn" and meta["dim"] == 2 * N_MELS
    assert meta["sections"] == {"fan/section_00": 9, "fan/section_01": 9, "valve/section_00": 9}
    saved = torch.load(model_dir / KNN_FILE, weights_only=True)
    assert saved["fan/section_01"]["statistics"].shape == (9, 2 * N_MELS)

    out = tmp_path / "scoring"
    (out / "model").mkdir(parents=True)  # left by an earlier prototype run: must not stay
    (out / "model" / "model.pt").write_bytes(b"stale")
    result = run_scoring(cfg, model_dir, store, out)
    got = result.scores.sort_values("path").reset_index(drop=True)
    want = _numpy_expected(clips, cfg.score.threshold_quantile)
    assert list(got["path"]) == list(want["path"]) and len(got) == 24
    np.testing.assert_allclose(got["score"].to_numpy(float), want["score"].to_numpy(), rtol=1e-9, atol=1e-12)
    assert (want["threshold"] > 0).all()  # leave-one-out: not a zero threshold
    # decisions flip only for a score within rounding of its threshold
    close = np.isclose(want["score"], want["threshold"], rtol=1e-9)
    np.testing.assert_array_equal(got["decision"].to_numpy(int)[~close], want["decision"].to_numpy()[~close])
    assert list(got["nearest_attribute"]) == list(want["nearest_attribute"])
    # what the job writes: submissions, scores, metrics, and the served model: the exported meta.json
    # (no network) and every section's backend, whose threshold gave the decisions
    assert not (out / "model" / "model.pt").exists()
    assert json.loads((out / "model" / "meta.json").read_text())["representation"] == "statistics"
    assert sorted(result.sections) == ["fan/section_00", "fan/section_01", "valve/section_00"]
    for (machine, section), rows in got.groupby(["machine", "section"]):
        threshold = result.sections[f"{machine}/section_{section}"].threshold
        assert rows["decision"].astype(int).tolist() == (rows["score"].astype(float) > threshold).astype(int).tolist()
    assert (out / "scores.csv").is_file() and (out / "results.md").is_file()
    assert len(list((out / "submission" / "dev_data").glob("anomaly_score_*.csv"))) == 3
    assert len(result.results) == 3 and 0.0 <= result.official_score <= 1.0
    assert method_label(cfg) == "kNN baseline"


@pytest.mark.parametrize(("normalisation", "distance"), [("local", "cosine"), ("domain", "cosine"),
                                                         ("local", "standardised_euclidean")])
def test_spectral_knn_scoring_matches_numpy(knn_store, tmp_path, normalisation, distance):
    """spectrum_shape vectors, scaled nearest distances (power 1), leave-one-out threshold: the
    job against numpy, scipy and the loop references above."""
    import dataclasses

    from scipy.spatial.distance import cdist

    from pipelines.config import KnnConfig
    from pipelines.detectors.knn import run_knn_stage
    from pipelines.stages.score import run_scoring

    cfg, store, clips = knn_store
    cfg = dataclasses.replace(cfg, knn=KnnConfig(representation="spectrum_shape", normalisation=normalisation,
                                                 distance=distance))
    model_dir = run_knn_stage(cfg, store=store, out_dir=tmp_path / "models" / "knn")
    got = run_scoring(cfg, model_dir, store, tmp_path / "scoring").scores.sort_values("path").reset_index(drop=True)

    def shape(f):
        p = 10 * np.log10((10 ** (f.astype(np.float64) / 10)).mean(axis=1))
        return p - p.mean()

    def cos(a, b):
        return 1 - (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    want = []
    for machine, section in SECTIONS:
        train = [c for c in clips if (c["machine"], c["section"], c["split"]) == (machine, section, "train")]
        test = [c for c in clips if (c["machine"], c["section"], c["split"]) == (machine, section, "test")]
        ref = [shape(c["features"]) for c in train]
        if distance == "cosine":
            def dist(a, b):
                return cos(a, b)
        else:  # scipy's standardised Euclidean, the variance of each bin over the training clips
            variance = np.var(np.array(ref), axis=0, ddof=1)

            def dist(a, b):
                return cdist(a[None], b[None], "seuclidean", V=variance)[0, 0]
        scales = _loop_scales(np.array([[dist(a, b) for b in ref] for a in ref]), [c["domain"] for c in train],
                              normalisation)
        for c in test:
            q = [dist(shape(c["features"]), r) for r in ref]
            j = int(np.argmin(np.array(q) / np.array(scales)))
            want.append({"path": c["path"], "score": _loop_score(q, scales, 1.0),
                         "nearest_attribute": train[j]["attribute_class"]})
    want = pd.DataFrame(want).sort_values("path").reset_index(drop=True)
    assert list(got["path"]) == list(want["path"])
    np.testing.assert_allclose(got["score"].to_numpy(float), want["score"].to_numpy(), rtol=1e-9)
    assert list(got["nearest_attribute"]) == list(want["nearest_attribute"])
    # the threshold is the floor's (test above): scipy's three-parameter gamma fit on 9 scores moves
    # with the last bits of its input, so here only that one threshold per section splits the scores
    for _, sec in got.groupby(["machine", "section"]):
        assert set(sec["decision"]) <= {0, 1}
        normal, anomalous = sec[sec["decision"] == 0]["score"], sec[sec["decision"] == 1]["score"]
        assert normal.max() < anomalous.min() if len(normal) and len(anomalous) else True
    meta = json.loads((model_dir / "meta.json").read_text())
    assert (meta["representation"], meta["normalisation"], meta["power"], meta["distance"]) == (
        "spectrum_shape", normalisation, 1.0, distance)


def test_asd_score_builds_the_knn_model_when_missing(knn_store, capsys):
    from pipelines.cli import main

    cfg, store, _ = knn_store
    rc = main(["score", "--config", "tiny", "--no-mlflow", "--set", f"run_dir={cfg.run_dir}",
               "--set", "method=knn", "--set", "features.kind=logmel", "--set", f"features.n_mels={N_MELS}",
               "--set", "knn.representation=statistics", "--set", "knn.normalisation=none",
               "--set", "knn.distance=cosine",
               "--store", str(store)])
    assert rc == 0
    run_dir = Path(cfg.run_dir)
    assert json.loads((run_dir / "models" / "knn" / "meta.json").read_text())["stage"] == "knn"
    assert (run_dir / "scoring" / "scores.csv").is_file()
    assert "kNN baseline" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_asd_score_keeps_its_results_when_mlflow_is_down(knn_store, dead_tracking_uri, capsys):
    """Scores, tables and printed results come before any MLflow call; the one-line error says
    how to log and register them later."""
    from pipelines.cli import main

    cfg, store, _ = knn_store
    rc = main(["score", "--config", "tiny", "--set", f"run_dir={cfg.run_dir}", "--set", "method=knn",
               "--set", "knn.representation=statistics", "--set", "knn.normalisation=none",
               "--set", "knn.distance=cosine",
               "--set", "features.kind=logmel", "--set", f"features.n_mels={N_MELS}",
               "--set", f"mlflow.tracking_uri={dead_tracking_uri}", "--store", str(store)])
    captured = capsys.readouterr()
    scoring = Path(cfg.run_dir) / "scoring"
    assert rc == 2 and "kNN baseline" in captured.out
    assert (scoring / "scores.csv").is_file() and (scoring / "results.csv").is_file()
    error = captured.err.strip().splitlines()[-1]  # after the stage's own progress lines: one line
    assert error.startswith("asd score: error:") and dead_tracking_uri in error and "Traceback" not in captured.err
    assert "asd score --register-only --config tiny" in error and str(scoring) in error


@pytest.mark.slow
def test_run_pipeline_with_the_knn_method(tmp_path, ray_session):
    """`asd run` of the spectral kNN on the tiny preset (local Ray, SQLite MLflow): a knn stage
    instead of training, the model registered as champion, a re-run skips every stage, and a
    retraining on a data drop fits the kNN again (nothing to start from the champion) and
    registers a challenger."""
    from pipelines.operations.retrain import retrain
    from pipelines.operations.run import run_pipeline
    from pipelines.serving.registry import get_alias_version
    from pipelines.synth.generate import add_drop

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", "method=knn",
                               "features.kind=spectrum", "knn.representation=spectrum_shape",
                               "knn.normalisation=local", "mlflow.experiment=asd-knn-test",
                               "mlflow.registered_model=asd-knn-test"])
    summary = run_pipeline(cfg)
    stages = summary["stages"]
    assert set(stages) == {"extract", "knn", "score"}
    assert 0.0 < stages["score"]["official_score"] <= 1.0 and stages["score"]["version"] == 1
    assert str(get_alias_version("asd-knn-test", "champion").version) == "1"
    assert "spectral kNN" in (Path(cfg.run_dir) / "results.md").read_text()
    again = run_pipeline(cfg)
    assert again["stages"]["knn"].get("skipped") is True and again["stages"]["score"].get("skipped") is True

    added = [p for p in add_drop(Path(cfg.data.root), "target", count=2, seed=5) if p.endswith(".wav")]
    out = retrain(cfg)
    assert out["new_clips"] == len(added) and out["stages"]["knn"].get("skipped") is not True
    assert not list((Path(cfg.run_dir) / "retrain").glob("*/champion"))  # no champion weights downloaded
    assert (str(out["version"]), str(out["parent_version"])) == ("2", "1")
    assert str(get_alias_version("asd-knn-test", "challenger").version) == "2"
    assert str(get_alias_version("asd-knn-test", "champion").version) == ("2" if out["status"] == "promoted" else "1")
