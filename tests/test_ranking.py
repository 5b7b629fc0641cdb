"""benchmarks/ranking.py: the resample keeps each (domain, label) group's size and draws within it,
the official score is the evaluator's (checked against sklearn and scipy), the bootstrap is paired
(two detectors that order every clip alike never differ), and the report counts the pairs the real
folder settles and the synthetic draws that agree."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ranking  # noqa: E402  (benchmarks/ is not a package)


def _section(rng: np.random.Generator, n: int, separation: float) -> dict:
    anomaly = np.tile([0, 0, 1, 1], n)
    target = np.tile([0, 1, 0, 1], n)
    good = anomaly * separation + rng.normal(size=anomaly.size)
    return {"machine": "m", "section": "00", "anomaly": anomaly.tolist(), "target": target.tolist(),
            "scores": {"good": good.tolist(), "shifted": (3 * good + 7).tolist(),
                       "noise": rng.normal(size=anomaly.size).tolist()}}


def test_resample_keeps_each_group_and_draws_within_it():
    rng = np.random.default_rng(0)
    anomaly = np.array([0] * 7 + [1] * 3 + [0] * 5 + [1] * 2)
    target = np.array([0] * 10 + [1] * 7)
    for _ in range(20):
        idx = ranking.stratified_resample(anomaly, target, rng)
        assert idx.size == anomaly.size
        for a in (0, 1):
            for t in (0, 1):
                group = set(np.flatnonzero((anomaly == a) & (target == t)))
                drawn = [i for i in idx if i in group]
                assert len(drawn) == len(group)


def test_official_score_is_the_evaluators():
    rng = np.random.default_rng(1)
    sections = [_section(rng, 12, 1.0), _section(rng, 9, 0.5)]
    values = []
    for s in sections:
        y, d, x = (np.asarray(s["anomaly"]), np.asarray(s["target"]), np.asarray(s["scores"]["good"]))
        # DCASE 2022: a domain's normals against the anomalies of both domains
        values += [roc_auc_score(y[(y == 1) | (d == t)], x[(y == 1) | (d == t)]) for t in (0, 1)]
        values.append(roc_auc_score(y, x, max_fpr=0.1))
    assert np.isclose(ranking.official(sections, "good"), 100 * hmean(values))
    picks = [np.arange(len(s["anomaly"]))[::-1] for s in sections]  # a permutation changes nothing
    assert np.isclose(ranking.official(sections, "good", picks), 100 * hmean(values))


def test_bootstrap_is_paired_and_pairs_are_read_in_order():
    rng = np.random.default_rng(2)
    sections = [_section(rng, 25, 3.0) for _ in range(2)]
    detectors = ["good", "shifted", "noise"]
    boot = ranking.bootstrap(sections, detectors, 200, seed=0)
    # the same ranks on every clip: equal on every resample (an unpaired bootstrap would differ)
    assert np.array_equal(boot[:, 0], boot[:, 1])
    point = {k: ranking.official(sections, k) for k in detectors}
    pairs = ranking.pair_rows(point, boot, detectors)
    assert list(pairs) == ["good > shifted", "good > noise", "shifted > noise"]
    assert pairs["good > shifted"]["share"] == 0.0 and pairs["good > shifted"]["interval"] == [0.0, 0.0]
    diff = boot[:, 0] - boot[:, 2]
    assert pairs["good > noise"]["share"] == np.mean(diff > 0) > 0.95
    assert np.allclose(pairs["good > noise"]["interval"], np.percentile(diff, [2.5, 97.5]))
    assert np.isclose(pairs["good > noise"]["difference"], point["good"] - point["noise"])


def test_report_counts_settled_pairs_and_agreeing_draws(monkeypatch):
    monkeypatch.setattr(ranking, "DETECTORS", ["a", "b", "c"])
    def row(diffs: dict[str, tuple[float, float]]) -> dict:
        return {"score": {"a": 60.0, "b": 55.0, "c": 50.0}, "score interval": {k: [0.0, 1.0] for k in "abc"},
                "pairs": {p: {"difference": d, "interval": [0, 0], "share": s} for p, (d, s) in diffs.items()},
                "groups": {k: {g: 50.0 + i for i, (g, _, _) in enumerate(ranking.GROUPS)} for k in "abc"}}
    real = row({"a > b": (5.0, 0.99), "a > c": (10.0, 0.97), "b > c": (1.0, 0.6)})
    synth = row({"a > b": (-1.0, 0.3), "a > c": (2.0, 0.8), "b > c": (-3.0, 0.1)})
    text = ranking.report({ranking.REAL_NAME: real, "synthetic x": synth}, settled=0.95)
    assert "settle (one order in at least 95 % of resamples): 2 of 3." in text
    assert "- synthetic x: 1 of the 2 settled pairs in the real folder's order (1 of all 3 pairs)" in text
    assert "| synthetic x | b | 50.0 | 51.0 | 52.0 | 53.0 | 54.0 |" in text


def _pairwise_auc(lower: list[float], upper: list[float]) -> float:
    """The share of (lower, upper) pairs ordered upper above lower, ties counted half: a loop."""
    wins = sum(1.0 if u > lo else 0.5 if u == lo else 0.0 for lo in lower for u in upper)
    return 100 * wins / (len(lower) * len(upper))


def test_group_aucs_are_pairwise_orders_of_the_groups_of_one_machine():
    rng = np.random.default_rng(3)
    sections = [_section(rng, 6, 1.5), _section(rng, 5, 0.5), {**_section(rng, 4, 9.0), "machine": "other"}]
    for s in sections:  # the target normals shifted up, and a tie across groups
        s["scores"]["good"] = [x + 0.7 * (t and not a) for x, t, a in zip(s["scores"]["good"], s["target"], s["anomaly"])]
        s["scores"]["good"][1] = s["scores"]["good"][0]
    got = ranking.group_aucs(sections, "good", {"m"})
    for name, lower, upper in ranking.GROUPS:
        per_section = []
        for s in sections[:2]:
            pick = lambda label, domain: [x for x, a, t in zip(s["scores"]["good"], s["anomaly"], s["target"])
                                          if (a, t) == (label, domain)]
            per_section.append(_pairwise_auc(pick(*lower), pick(*upper)))
        assert got[name] == pytest.approx(np.mean(per_section)), name
    assert ranking.group_aucs(sections, "good")["source normal < source anomaly"] != got["source normal < source anomaly"]


def test_network_scores_join_each_sections_test_clips_by_name(tmp_path):
    from pipelines.synth.generate import PRESETS, generate
    preset = replace(PRESETS["demo"], machines=("ToyCar", "fan"), dev_sections=("00", "01"), source_train=2,
                     target_train=1, test_per_group=2, seconds=0.5)
    generate(preset, tmp_path, seed=0, workers=1)
    keys = ranking.test_keys(tmp_path)
    # every test file once, each section's in one list (an independent listing of the tree)
    files = sorted(f"{m.parent.parent.name}/test/{m.name}" for m in tmp_path.glob("dev_data/*/test/*.wav"))
    assert sorted(k for section in keys for k in section) == files
    assert len(keys) == 4 and all(len({(k.split("/")[0], k.split("_")[1]) for k in section}) == 1 for section in keys)
    labels = [[int("_anomaly_" in k) for k in section] for section in keys]
    saved = [{"machine": "m", "section": str(i), "anomaly": y, "target": y, "scores": {"a": [0.0] * len(y)}}
             for i, y in enumerate(labels)]
    network = {k: float(i) for i, k in enumerate(reversed(files))}
    joined = ranking.with_network(saved, keys, network)
    assert [s["scores"][ranking.NETWORK] for s in joined] == [[network[k] for k in section] for section in keys]
    assert all(s["scores"]["a"] == [0.0] * len(s["anomaly"]) for s in joined)
    swapped = [{**saved[0], "anomaly": labels[0][::-1]}, *saved[1:]]
    with pytest.raises(SystemExit, match="saved labels differ"):
        ranking.with_network(swapped, keys, network)
    with pytest.raises(SystemExit, match="clips missing"):
        ranking.with_network(saved, keys, dict(list(network.items())[1:]))
    with pytest.raises(SystemExit, match="--redo"):
        ranking.with_network(saved[1:], keys, network)


@pytest.mark.parametrize("tree", ["no-equals-sign", "a name=/nonexistent/tree"])
def test_a_tree_that_is_not_name_equals_a_dcase_tree_stops_with_one_line(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        # with the real folder and a draw asked for too: the bad tree stops the run before either is made
        ranking.main(["--work", str(tmp_path / "work"), "--data-seeds", "0", "--out", str(tmp_path / "out"),
                      "--tree", tree])
    assert stop.value.code == 2
    assert f"--tree {tree!r}: expected NAME=PATH" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_bootstrap_at_once_is_the_evaluator_on_each_resample():
    """The batched metrics against ``official`` (sklearn's AUC and pAUC) on the very same resampled
    clips: scores tied across labels (the pAUC's fallback), a section without target normals (its
    AUC skipped), groups of uneven sizes."""
    rng = np.random.default_rng(4)
    tied = _section(rng, 8, 1.0)
    tied["scores"]["good"] = np.round(np.asarray(tied["scores"]["good"]), 0).tolist()  # many ties
    no_target = {**_section(rng, 6, 2.0)}
    keep = [i for i, (a, t) in enumerate(zip(no_target["anomaly"], no_target["target"])) if a or not t]
    no_target = {**no_target, "anomaly": [no_target["anomaly"][i] for i in keep],
                 "target": [no_target["target"][i] for i in keep],
                 "scores": {k: [v[i] for i in keep] for k, v in no_target["scores"].items()}}
    uneven = _section(rng, 30, 0.3)
    uneven = {**uneven, **{k: uneven[k][:97] for k in ("anomaly", "target")},
              "scores": {k: v[:97] for k, v in uneven["scores"].items()}}
    sections = [tied, no_target, uneven]
    detectors = ["good", "noise"]
    boot = ranking.bootstrap(sections, detectors, 60, seed=5)
    draws = np.random.default_rng(5)
    for b in range(60):
        picks = [ranking.stratified_resample(np.asarray(s["anomaly"]), np.asarray(s["target"]), draws) for s in sections]
        assert boot[b] == pytest.approx([ranking.official(sections, k, picks) for k in detectors], abs=1e-9), b
