"""Tests of the DCASE 2022 Task 2 metrics and submission files (asd/metrics.py)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from asd import metrics as M

EPS = np.finfo(float).eps


def _pair_auc(normals, anomalies):
    """AUC by counting pairs: anomaly above normal = 1, tie = 0.5."""
    total = 0.0
    for a in anomalies:
        for n in normals:
            total += 1.0 if a > n else 0.5 if a == n else 0.0
    return total / (len(normals) * len(anomalies))


def _mcclish_pauc(y, s, max_fpr=0.1):
    """Independent McClish-standardised partial AUC (numpy only)."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=float)
    n_pos, n_neg = (y == 1).sum(), (y == 0).sum()
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(s)[::-1]:  # thresholds from high to low, ties handled together
        fpr.append(((s >= t) & (y == 0)).sum() / n_neg)
        tpr.append(((s >= t) & (y == 1)).sum() / n_pos)
    fpr, tpr = np.array(fpr), np.array(tpr)
    area = 0.0
    for i in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], tpr[i - 1], tpr[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # interpolate the segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    lo, hi = max_fpr**2 / 2, max_fpr
    return 0.5 * (1 + (area - lo) / (hi - lo))


# --------------------------------------------------------------------------- AUC


def test_auc_hand_counted_with_tie():
    # 3 normals, 3 anomalies; pairs: 0.8 beats all 3 (3), 0.4 beats 0.1 and 0.35 and
    # ties 0.4 (2.5), 0.2 beats 0.1 only (1) -> 6.5 / 9.
    normals, anomalies = [0.1, 0.4, 0.35], [0.8, 0.4, 0.2]
    y = [0, 0, 0, 1, 1, 1]
    d = [0, 0, 0, 0, 0, 0]
    s = normals + anomalies
    assert _pair_auc(normals, anomalies) == pytest.approx(6.5 / 9)
    assert M.domain_auc(y, d, s, "source") == pytest.approx(6.5 / 9)
    res = M.section_metrics(y, d, s, machine="fan", section="00")
    assert res.auc_source == pytest.approx(6.5 / 9)
    assert res.auc_target is None
    assert "no target-domain normal clips" in res.skipped["auc_target"]


def test_domain_auc_pools_anomalies_of_both_domains():
    # source normals .1 .2, target normals .5 .6, source anomaly .3, target anomaly .7
    y = [0, 0, 0, 0, 1, 1]
    d = [0, 0, 1, 1, 0, 1]
    s = [0.1, 0.2, 0.5, 0.6, 0.3, 0.7]
    # target AUC: normals {.5, .6} vs anomalies of BOTH domains {.3, .7}: .3 wins 0, .7 wins 2 -> 2/4
    assert M.domain_auc(y, d, s, "target") == pytest.approx(0.5)
    # per-domain anomalies (target anomaly .7 only) would give 1.0 -> the rule matters here
    assert _pair_auc([0.5, 0.6], [0.7]) == 1.0
    # source AUC: normals {.1, .2} vs {.3, .7}: 4/4
    assert M.domain_auc(y, d, s, 0) == pytest.approx(1.0)
    res = M.section_metrics(y, d, s)
    assert (res.auc_source, res.auc_target) == (pytest.approx(1.0), pytest.approx(0.5))
    assert res.skipped == {}


def test_domain_auc_random_matches_pair_count():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 0, 1, 1], 50)
    d = np.tile(np.repeat([0, 1], 50), 2)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    for dom in (0, 1):
        normals = s[(y == 0) & (d == dom)]
        anomalies = s[y == 1]
        assert M.domain_auc(y, d, s, dom) == pytest.approx(_pair_auc(normals, anomalies), abs=1e-12)


# --------------------------------------------------------------------------- pAUC


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pauc_matches_independent_mcclish(seed):
    rng = np.random.default_rng(seed)
    y = np.array([0] * 100 + [1] * 100)
    d = np.tile([0, 1], 100)
    s = np.round(rng.normal(size=200) + 1.2 * y, 1)
    expected = _mcclish_pauc(y, s)
    assert M.partial_auc(y, s) == pytest.approx(expected, abs=1e-12)
    res = M.section_metrics(y, d, s)
    assert res.pauc == pytest.approx(expected, abs=1e-12)
    assert res.pauc == pytest.approx(roc_auc_score(y, s, max_fpr=0.1), abs=1e-15)


def test_pauc_interpolates_inside_a_segment_and_uses_all_clips():
    # 7 normals: FPR steps of 1/7 > 0.1, so 0.1 falls inside the first horizontal step.
    y = [0] * 7 + [1] * 3
    s = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95, 0.85, 0.05]
    # ROC: (0,0) -> (0,1/3) [.95] -> (1/7,1/3) [.9] ... ; area to 0.1 = 0.1*1/3
    area = 0.1 / 3
    expected = 0.5 * (1 + (area - 0.005) / (0.1 - 0.005))
    assert _mcclish_pauc(y, s) == pytest.approx(expected)
    assert M.partial_auc(y, s) == pytest.approx(expected)


def test_perfect_and_chance():
    y = [0, 0, 1, 1]
    assert M.partial_auc(y, [0, 1, 2, 3]) == pytest.approx(1.0)
    assert M.partial_auc(y, [1, 1, 1, 1]) == pytest.approx(0.5)


# --------------------------------------------------------------------------- means


def test_hmean_eps_floor():
    assert M.hmean_eps([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    assert M.hmean_eps([0.0, 0.5]) == pytest.approx(2 / (1 / EPS + 1 / 0.5))
    assert M.hmean_eps([-1.0, 1.0]) == pytest.approx(2 / (1 / EPS + 1.0))
    assert M.hmean_eps([0.0]) == EPS
    with pytest.raises(ValueError):
        M.hmean_eps([])
    with pytest.raises(ValueError):
        M.hmean_eps([np.nan, 0.5])


def _two_by_two():
    vals = {
        ("ToyCar", "00"): (0.9, 0.6, 0.55),
        ("ToyCar", "01"): (0.8, 0.7, 0.6),
        ("myPump", "00"): (0.5, 0.4, 0.52),
        ("myPump", "01"): (1.0, 0.75, 0.9),
    }
    res = [M.SectionResult(m, s, *v) for (m, s), v in vals.items()]
    return vals, res


def test_official_score_two_machines_two_sections_by_hand():
    vals, res = _two_by_two()
    flat = [v for t in vals.values() for v in t]
    assert M.official_score(res) == pytest.approx(12 / sum(1 / v for v in flat))
    ms = M.machine_scores(res)
    assert list(ms) == ["ToyCar", "myPump"]  # names from the data, sorted
    toy = list(vals[("ToyCar", "00")]) + list(vals[("ToyCar", "01")])
    assert ms["ToyCar"] == pytest.approx(6 / sum(1 / v for v in toy))
    row = M.paper_row(res, method="ours")
    src = [t[0] for t in vals.values()]
    tgt = [t[1] for t in vals.values()]
    pa = [t[2] for t in vals.values()]
    assert row["Source AUC"] == pytest.approx(4 / sum(1 / v for v in src))
    assert row["Target AUC"] == pytest.approx(4 / sum(1 / v for v in tgt))
    assert row["pAUC"] == pytest.approx(4 / sum(1 / v for v in pa))
    assert row["Overall"] == pytest.approx(M.official_score(res))
    assert list(row) == ["method", "ToyCar", "myPump", "Source AUC", "Target AUC", "pAUC", "Overall"]


def test_official_score_from_labels():
    rng = np.random.default_rng(7)
    res, flat = [], []
    for m in ("bearing", "valve"):
        for sec in ("00", "01"):
            y = np.repeat([0, 0, 1, 1], 5)
            d = np.tile(np.repeat([0, 1], 5), 2)
            s = rng.normal(size=20) + y
            r = M.section_metrics(y, d, s, machine=m, section=sec)
            res.append(r)
            flat += [
                roc_auc_score(y[(y == 1) | (d == 0)], s[(y == 1) | (d == 0)]),
                roc_auc_score(y[(y == 1) | (d == 1)], s[(y == 1) | (d == 1)]),
                roc_auc_score(y, s, max_fpr=0.1),
            ]
    assert M.official_score(res) == pytest.approx(len(flat) / sum(1 / v for v in flat))


# --------------------------------------------------------------------------- skipping


def test_skipped_metrics_are_recorded_not_nan(caplog):
    y = [0, 0, 1, 1]
    d = [0, 0, 0, 0]  # no target clips at all
    with caplog.at_level("WARNING"):
        r1 = M.section_metrics(y, d, [0.1, 0.2, 0.3, 0.4], machine="fan", section="02")
    assert r1.auc_target is None and r1.auc_source == 1.0 and r1.pauc == 1.0
    assert "auc_target" in caplog.text
    r2 = M.section_metrics([0, 0], [0, 1], [0.1, 0.2], machine="fan", section="03")
    assert r2.values() == []
    assert set(r2.skipped) == {"auc_source", "auc_target", "pauc"}
    assert r2.skipped["pauc"] == "no anomalous clips"
    r3 = M.section_metrics(y, None, [0.1, 0.2, 0.3, 0.4], machine="gearbox", section="00")
    assert r3.skipped["auc_source"] == "no domain labels" and r3.pauc == 1.0
    res = [r1, r2, r3]
    assert M.official_score(res) == pytest.approx(1.0)
    assert M.machine_scores([r2]) == {"fan": None}
    recs = M.skipped_records(res)
    assert {"machine": "fan", "section": "02", "metric": "auc_target",
            "reason": "no target-domain normal clips"} in recs
    rows = M.results_table(res)
    for row in rows:
        for k in M.METRICS + ("hmean",):
            assert row[k] is None or not math.isnan(row[k])
    sec03 = [r for r in rows if r["section"] == "03"][0]
    assert sec03["hmean"] is None and "pauc: no anomalous clips" in sec03["skipped"]
    md = M.to_markdown(rows)
    assert "n/a" in md


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        M.section_metrics([0, 1], [0, 0], [0.1, np.nan])
    with pytest.raises(ValueError):
        M.section_metrics([0, 2], [0, 0], [0.1, 0.2])
    with pytest.raises(ValueError):
        M.section_metrics([0, 1], [0], [0.1, 0.2])


# --------------------------------------------------------------------------- tables


def test_results_table_markdown_and_csv(tmp_path):
    vals, res = _two_by_two()
    rows = M.results_table(res)
    assert [(r["machine"], r["section"]) for r in rows] == [
        ("ToyCar", "00"), ("ToyCar", "01"), ("ToyCar", "all"),
        ("myPump", "00"), ("myPump", "01"), ("myPump", "all"), ("all", "all"),
    ]
    assert rows[-1]["hmean"] == pytest.approx(M.official_score(res))
    assert rows[2]["hmean"] == pytest.approx(M.machine_scores(res)["ToyCar"])
    assert rows[0]["hmean"] == pytest.approx(3 / sum(1 / v for v in vals[("ToyCar", "00")]))
    md = M.to_markdown(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| machine | section | auc_source | auc_target | pauc | hmean | skipped |"
    assert "| ToyCar | 00 | 90.00 | 60.00 | 55.00 |" in md
    assert len(lines) == 2 + len(rows)
    paper_md = M.to_markdown([M.paper_row(res, "ours")])
    assert "| method | ToyCar | myPump | Source AUC | Target AUC | pAUC | Overall |" in paper_md
    path = M.write_table_csv(rows, tmp_path / "t" / "results.csv")
    with open(path) as fh:
        back = list(csv.DictReader(fh))
    assert len(back) == len(rows)
    assert float(back[-1]["hmean"]) == rows[-1]["hmean"]


# --------------------------------------------------------------------------- files


def test_file_names():
    assert M.score_file_name("ToyCar", 0) == "anomaly_score_ToyCar_section_00_test.csv"
    assert M.score_file_name("my_pump", "03") == "anomaly_score_my_pump_section_03_test.csv"
    assert M.decision_file_name("fan", 5) == "decision_result_fan_section_05_test.csv"
    assert M.ground_truth_file_name("valve", "04") == "ground_truth_valve_section_04_test.csv"
    assert M.parse_score_file_name("x/anomaly_score_my_pump_section_03_test.csv") == ("my_pump", "03")
    assert M.parse_score_file_name("decision_result_fan_section_05_test.csv") is None


def test_scores_csv_round_trip_exact_and_sorted(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"/data/fan/test/section_00_test_{i:04d}.wav" for i in rng.permutation(20)]
    scores = rng.normal(size=20) * 10.0 ** rng.integers(-300, 300, size=20)
    scores[0], scores[1] = 1 / 3, 12345.678901234567
    path = M.write_scores_csv(tmp_path / M.score_file_name("fan", 0), names, scores)
    text = path.read_text().splitlines()
    assert text[0].startswith("section_00_test_0000.wav,")  # basename, sorted, no header
    assert [t.split(",")[0] for t in text] == sorted(n.rsplit("/", 1)[1] for n in names)
    back_names, back = M.read_scores_csv(path)
    lookup = dict(zip([n.rsplit("/", 1)[1] for n in names], scores))
    for n, v in zip(back_names, back):
        assert v == lookup[n]  # bit-exact (repr round-trips float64)


def test_decisions_csv_and_validation(tmp_path):
    names = ["b.wav", "a.wav", "c.wav"]
    p = M.write_decisions_csv(tmp_path / "d.csv", names, np.array([1, 0, 1]))
    assert p.read_text() == "a.wav,0\nb.wav,1\nc.wav,1\n"
    n, v = M.read_decisions_csv(p)
    assert n == ["a.wav", "b.wav", "c.wav"] and v.tolist() == [0, 1, 1]
    with pytest.raises(ValueError):
        M.write_decisions_csv(tmp_path / "x.csv", names, [0, 2, 1])
    with pytest.raises(ValueError):
        M.write_scores_csv(tmp_path / "x.csv", ["a.wav", "a.wav"], [0.1, 0.2])
    with pytest.raises(ValueError):
        M.write_scores_csv(tmp_path / "x.csv", ["a.wav"], [float("inf")])


def _make_eval_tree(tmp_path, rng):
    gt = tmp_path / "ground_truth_data"
    dom = tmp_path / "ground_truth_domain"
    sub = tmp_path / "teams" / "me"
    gt.mkdir()
    dom.mkdir()
    expected = []
    for machine in ("ToyTrain", "my_machine"):
        for sec in ("03", "04"):
            names = [f"section_{sec}_test_{i:04d}.wav" for i in range(40)]
            y = rng.integers(0, 2, size=40)
            d = rng.integers(0, 2, size=40)
            s = rng.normal(size=40) + y
            order = rng.permutation(40)  # ground truth not necessarily sorted
            with open(gt / M.ground_truth_file_name(machine, sec), "w") as fh:
                fh.writelines(f"{names[i]},{y[i]}\n" for i in order)
            with open(dom / M.ground_truth_file_name(machine, sec), "w") as fh:
                fh.writelines(f"{names[i]},{d[i]}\n" for i in order)
            M.write_submission(sub, machine, sec, names, s, (s > 0.5).astype(int))
            expected.append(M.section_metrics(y, d, s, machine=machine, section=sec))
    return gt, sub, expected


def test_ground_truth_reader_and_evaluate_submission(tmp_path):
    rng = np.random.default_rng(3)
    gt, sub, expected = _make_eval_tree(tmp_path, rng)
    names, y, d = M.read_ground_truth(gt / M.ground_truth_file_name("ToyTrain", "03"))
    assert names == sorted(names) and d is not None and len(y) == 40
    got = M.evaluate_submission(sub, gt)
    key = lambda r: (r.machine, r.section)  # noqa: E731
    got, expected = sorted(got, key=key), sorted(expected, key=key)
    assert [key(r) for r in got] == [key(r) for r in expected]
    for g, e in zip(got, expected):
        assert (g.auc_source, g.auc_target, g.pauc) == (e.auc_source, e.auc_target, e.pauc)
    assert M.official_score(got) == M.official_score(expected)
    (sub / M.decision_file_name("ToyTrain", "04")).unlink()
    with pytest.raises(FileNotFoundError):
        M.evaluate_submission(sub, gt)
    assert len(M.evaluate_submission(sub, gt, require_decisions=False)) == 4


def test_submission_with_wrong_names_is_rejected(tmp_path):
    rng = np.random.default_rng(4)
    gt, sub, _ = _make_eval_tree(tmp_path, rng)
    path = sub / M.score_file_name("ToyTrain", "03")
    lines = path.read_text().splitlines()[:-1]  # drop one clip
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="missing"):
        M.evaluate_submission(sub, gt)


def test_domain_file_with_words(tmp_path):
    (tmp_path / "ground_truth_data").mkdir()
    (tmp_path / "ground_truth_domain").mkdir()
    (tmp_path / "ground_truth_data" / "ground_truth_fan_section_00_test.csv").write_text("b.wav,1\na.wav,0\n")
    (tmp_path / "ground_truth_domain" / "ground_truth_fan_section_00_test.csv").write_text(
        "a.wav,target\nb.wav,source\n"
    )
    names, y, d = M.read_ground_truth(tmp_path / "ground_truth_data" / "ground_truth_fan_section_00_test.csv")
    assert names == ["a.wav", "b.wav"] and y.tolist() == [0, 1] and d.tolist() == [1, 0]
