"""The prototype scoring job (pipelines/detectors/prototype.py: fit_sections, score_clips; pipelines/stages/score.py: run_scoring) against an
independent numpy/scipy/sklearn fit of every (machine, section), written from the definition in
asd/backend.py's docstring: prototypes = L2-normalised mean training embedding of each attribute
class (both domains), one covariance per section from all its training clips (pooled about the
section mean, / N) shrunk towards tr(S)/D * I (Ledoit-Wolf or a fixed ratio, floored at 1e-6),
score = minimum Mahalanobis distance (not squared), threshold = 0.9 quantile of a gamma fitted
(shape, loc, scale) to the section's own training-clip scores, decision = score > threshold."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import ledoit_wolf_shrinkage

from pipelines.config import load_config

SECTIONS = [("fan", "00"), ("fan", "01"), ("valve", "00")]
DIM = 6


# ----------------------------------------------------------------------------- the reference
@dataclasses.dataclass
class RefSection:
    keys: list
    prototypes: np.ndarray
    precision: np.ndarray
    threshold: float

    def score(self, x: np.ndarray) -> tuple[np.ndarray, list]:
        d = np.array([[mahalanobis(row, p, self.precision) for p in self.prototypes] for row in x])
        return d.min(axis=1), [self.keys[j] for j in d.argmin(axis=1)]


def _ref_section(x: np.ndarray, classes: np.ndarray, shrinkage, quantile: float) -> RefSection:
    keys = sorted(set(classes))
    means = np.stack([x[classes == k].mean(axis=0) for k in keys])
    prototypes = means / np.linalg.norm(means, axis=1, keepdims=True)
    r = x - x.mean(axis=0)
    s = r.T @ r / len(x)
    a = ledoit_wolf_shrinkage(r, assume_centered=True) if shrinkage == "ledoit-wolf" else shrinkage
    a = max(a, 1e-6)
    cov = (1 - a) * s + a * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
    ref = RefSection(keys, prototypes, np.linalg.inv(cov), np.nan)
    train_scores, _ = ref.score(x)
    ref.threshold = float(stats.gamma.ppf(quantile, *stats.gamma.fit(train_scores)))
    return ref


def _ref_scores(train_meta, train_emb, test_meta, test_emb, shrinkage, quantile):
    """{section key: RefSection} and a frame of test scores/decisions/nearest attributes."""
    refs, rows = {}, []
    for (machine, section), tr in train_meta.groupby(["machine", "section"]):
        key = f"{machine}/section_{section}"
        refs[key] = ref = _ref_section(np.asarray(train_emb, np.float64)[tr.index],
                                       tr["attribute_class"].to_numpy(), shrinkage, quantile)
        te = test_meta[(test_meta["machine"] == machine) & (test_meta["section"] == section)]
        scores, nearest = ref.score(np.asarray(test_emb, np.float64)[te.index])
        rows += [{"path": p, "score": s, "decision": int(s > ref.threshold), "nearest_attribute": n,
                  "threshold": ref.threshold} for p, s, n in zip(te["path"], scores, nearest)]
    return refs, pd.DataFrame(rows).sort_values("path").reset_index(drop=True)


# ----------------------------------------------------------------------------- synthetic embeddings
def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(seed=0):
    """Per section: 2 source classes x 10 clips, 2 target classes x 3 clips (train); 8 normal
    clips of those classes and 4 anomalies (test). Sections have their own class centres."""
    rng = np.random.default_rng(seed)
    meta = {"train": [], "test": []}
    emb = {"train": [], "test": []}
    for machine, section in SECTIONS:
        centres = _unit(rng.normal(size=(4, DIM)))
        classes = [("source", "a0", 10), ("source", "a1", 10), ("target", "t0", 3), ("target", "t1", 3)]
        for c, (domain, attr, n) in enumerate(classes):
            for split, count, label in (("train", n, "normal"), ("test", 2, "normal")):
                for i in range(count):
                    emb[split].append(_unit(centres[c] + 0.25 * rng.normal(size=DIM)))
                    meta[split].append({"machine": machine, "section": section, "domain": domain,
                                        "label": label, "attribute_class": f"{machine}/{section}/{domain}/{attr}",
                                        "path": f"{machine}/{split}/section_{section}_{domain}_{attr}_{i}.wav"})
        for i in range(4):
            emb["test"].append(_unit(rng.normal(size=DIM)))
            meta["test"].append({"machine": machine, "section": section, "domain": "source",
                                 "label": "anomaly", "attribute_class": None,
                                 "path": f"{machine}/test/section_{section}_anomaly_{i}.wav"})
    return ({s: pd.DataFrame(meta[s]) for s in meta},
            {s: torch.tensor(np.stack(emb[s]), dtype=torch.float32) for s in emb})


def _cfg(*overrides):
    return load_config("tiny", list(overrides))


def _assert_matches(got: pd.DataFrame, want: pd.DataFrame):
    got = got.sort_values("path").reset_index(drop=True)
    assert list(got["path"]) == list(want["path"])
    np.testing.assert_allclose(got["score"].to_numpy(float), want["score"], rtol=1e-7, atol=1e-9)
    assert list(got["nearest_attribute"].astype(str)) == list(want["nearest_attribute"])
    close = np.isclose(want["score"], want["threshold"], rtol=1e-6)  # gamma.fit is an optimiser
    np.testing.assert_array_equal(got["decision"].to_numpy(int)[~close], want["decision"].to_numpy()[~close])


# ----------------------------------------------------------------------------- fit_sections / score_clips
@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", 0.3])
def test_scoring_matches_an_independent_per_section_fit(shrinkage):
    """Per section: prototypes of both domains, pooled shrunk covariance, min Mahalanobis score,
    gamma threshold of the section's own training scores, nearest attribute, decision."""
    from pipelines.detectors.prototype import fit_sections, score_clips

    meta, emb = _embeddings()
    cfg = _cfg(f"score.shrinkage={shrinkage}")
    sections = fit_sections(meta["train"], emb["train"], cfg)
    refs, want = _ref_scores(meta["train"], emb["train"], meta["test"], emb["test"], shrinkage,
                             cfg.score.threshold_quantile)
    assert sorted(sections) == sorted(refs) == ["fan/section_00", "fan/section_01", "valve/section_00"]
    for key, ref in refs.items():
        assert sections[key].class_keys == ref.keys  # target classes included
        np.testing.assert_allclose(sections[key].prototypes.numpy(), ref.prototypes, rtol=1e-6, atol=1e-7)
        assert sections[key].threshold == pytest.approx(ref.threshold, rel=1e-5)
    _assert_matches(score_clips(meta["test"], emb["test"], sections), want)
    # the check has teeth: target attributes are nearest for some clips, decisions are mixed
    assert want["nearest_attribute"].str.contains("/target/").any()
    assert 0 < want["decision"].sum() < len(want)


def test_score_equal_to_the_threshold_is_normal():
    """decision = score > threshold, strictly: a clip scoring exactly the threshold is normal."""
    from pipelines.detectors.prototype import fit_sections, score_clips

    meta, emb = _embeddings()
    sections = fit_sections(meta["train"], emb["train"], _cfg())
    first = score_clips(meta["test"], emb["test"], sections)
    key = "fan/section_00"
    rows = first[(first["machine"] == "fan") & (first["section"] == "00")]
    at = rows["score"].sort_values().index[len(rows) // 2]  # a middle score becomes the threshold
    sections[key] = dataclasses.replace(sections[key], threshold=float(first.loc[at, "score"]))
    again = score_clips(meta["test"], emb["test"], sections)
    assert again.loc[at, "score"] == sections[key].threshold
    assert again.loc[at, "decision"] == 0
    expected = (rows["score"] > sections[key].threshold).astype(int)
    assert list(again.loc[rows.index, "decision"]) == list(expected) and expected.sum() > 0


# ----------------------------------------------------------------------------- run_scoring end to end
N_MELS = 16


def _write_store(store, fcfg, rng) -> None:
    """A feature store written directly (no Ray): per section 6 source + 3 target training clips
    over 4 attribute classes, 6 test clips; float32 features."""
    from store_writer import clip_row, write_store

    clips = []
    for machine, section in SECTIONS[:2]:
        for split, specs in (("train", [("source", f"a{i % 2}") for i in range(6)]
                              + [("target", f"t{i % 2}") for i in range(3)]),
                             ("test", [(d, "a0") for d in ("source", "target")] * 3)):
            for i, (domain, attr) in enumerate(specs):
                t = int(rng.integers(64, 100))
                label = "anomaly" if split == "test" and i % 3 == 0 else "normal"
                feats = (rng.normal(-40.0, 5.0, size=(N_MELS, 1)) + rng.normal(size=(N_MELS, t))).astype(np.float32)
                clips.append((clip_row(machine, section, split, domain, label, i, attr, N_MELS, t, fcfg.version,
                                       f"h{len(clips):06d}"), feats))
    write_store(store, fcfg.version, clips)


def test_run_scoring_matches_the_reference_on_the_jobs_embeddings(tmp_path):
    """run_scoring's scores.csv (untrained 0-epoch model, no Ray) equals the independent fit on
    the embeddings of the same network (pipelines.detectors.prototype.embed_table)."""
    from pipelines.checkpoints import load_model
    from pipelines.detectors.prototype import embed_table, run_training
    from pipelines.stages.score import run_scoring
    from pipelines.store import load_split

    cfg = _cfg(f"run_dir={tmp_path / 'run'}", f"features.n_mels={N_MELS}", f"model.n_mels={N_MELS}",
               "features.kind=logmel", "pretrain.epochs=0", "pretrain.lr_milestones=[]")
    store = tmp_path / "store"
    _write_store(store, cfg.features, np.random.default_rng(0))
    model_dir = run_training(cfg, "pretrain", store=store, out_dir=tmp_path / "model")
    run_scoring(cfg, model_dir, store, tmp_path / "scoring")
    got = pd.read_csv(tmp_path / "scoring" / "scores.csv", dtype={"section": str})

    model, _ = load_model(model_dir)
    train, test = load_split(store, "train"), load_split(store, "test")
    _, want = _ref_scores(train.meta, embed_table(model, train, cfg, use_ray=False), test.meta,
                          embed_table(model, test, cfg, use_ray=False), cfg.score.shrinkage,
                          cfg.score.threshold_quantile)
    assert len(got) == len(want) == 12
    _assert_matches(got, want)
