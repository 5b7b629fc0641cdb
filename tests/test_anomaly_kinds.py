"""benchmarks/anomaly_kinds.py: per-kind AUCs against a pairwise count, and a run end to end on a
small fan dataset whose rows name every anomaly kind of the fan and the gain they were made with."""

from __future__ import annotations

import json
import sys
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import anomaly_kinds  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.machines import MACHINES  # noqa: E402


def _pairwise_auc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    wins = [1.0 if a > n else 0.5 if a == n else 0.0 for n, a in product(normal, anomalous)]
    return 100.0 * sum(wins) / len(wins)


def test_kind_aucs_match_a_pairwise_count():
    rng = np.random.default_rng(0)
    kinds = [None] * 12 + ["a"] * 5 + ["b"] * 7
    test = [{"label": "normal" if k is None else "anomaly", "kind": k} for k in kinds]
    scores = rng.normal(size=len(test)) + np.array([0.0] * 12 + [1.0] * 5 + [0.2] * 7)
    scores[3] = scores[14]  # a tie counts a half
    got = anomaly_kinds.kind_aucs(test, scores)
    normal = scores[:12]
    assert got["all"] == pytest.approx(_pairwise_auc(normal, scores[12:]))
    assert got["a"] == pytest.approx(_pairwise_auc(normal, scores[12:17]))
    assert got["b"] == pytest.approx(_pairwise_auc(normal, scores[17:]))


def test_domain_aucs_keep_one_domains_clips_alone():
    rng = np.random.default_rng(1)
    kinds = ([None] * 10 + ["a"] * 6) * 2
    domains = ["source"] * 16 + ["target"] * 16
    test = [{"label": "normal" if k is None else "anomaly", "kind": k, "meta": SimpleNamespace(domain=d)}
            for k, d in zip(kinds, domains)]
    scores = rng.normal(size=32) + np.array(([0.0] * 10 + [0.8] * 6) * 2) + np.array([0.0] * 16 + [3.0] * 16)
    got = anomaly_kinds.domain_aucs(test, scores, anomaly_kinds.DOMAINS)
    assert got["source"]["a"] == pytest.approx(_pairwise_auc(scores[:10], scores[10:16]))
    assert got["target"]["a"] == pytest.approx(_pairwise_auc(scores[16:26], scores[26:]))
    both = _pairwise_auc(np.r_[scores[:10], scores[16:26]], np.r_[scores[10:16], scores[26:]])
    assert got["both"]["all"] == pytest.approx(both)
    assert got["both"]["all"] != pytest.approx(got["source"]["all"])  # the domains' shift shows in 'both'


@pytest.mark.slow
def test_a_run_records_every_kind_and_its_gain(tmp_path):
    out = tmp_path / "out"
    args = ["--machine", "fan", "--dataset", "tiny", "--source-train", "6", "--test-per-group", "8",
            "--epochs", "1", "--out", str(out), "--kinds", *MACHINES["fan"].anomalies]  # not the default's resonance
    assert anomaly_kinds.main([*args, "--gains", "1", "0.3", "--domains", "both", "target"]) == 0
    rows = json.loads((out / "anomaly_kinds.json").read_text())["rows"]
    assert len(rows) == 4
    assert sorted(r["domain"] for r in rows.values()) == ["both", "both", "target", "target"]
    for row in rows.values():
        for detector in anomaly_kinds.DETECTORS:
            assert set(row[detector]) == {"all", *MACHINES["fan"].anomalies}
            assert all(0.0 <= v <= 100.0 for v in row[detector].values())
        assert row["data"]["difficulty"]["machine_anomaly_gain"] == [["fan", row["gain"]]]
        assert row["data"]["machines"] == ["fan"]
    with pytest.raises(SystemExit, match="not 'ToyCar'"):
        anomaly_kinds.main([*args, "--machine", "ToyCar"])


def test_the_table_has_one_section_per_machine_type_with_its_own_kinds():
    def row(machine, kinds, gain):
        scores = {"all": 50.0, **{k: 60.0 + i for i, k in enumerate(kinds)}}
        return {"dataset": "demo", "machine": machine, "gain": gain, "data_seed": 0, "epochs": 30,
                "source_train": 100, "test_per_group": 30,
                **{d: dict(scores) for d in anomaly_kinds.DETECTORS}}
    rows = {"f1": row("fan", ["stall", "imbalance"], 1.0), "f2": row("fan", ["stall", "imbalance"], 0.3),
            "s": row("slider", ["rattle"], 1.0)}
    fan, slider = anomaly_kinds.table(rows).split("### ")[1:]
    assert fan.startswith("fan") and slider.startswith("slider")
    assert "stall" in fan and "rattle" not in fan and "rattle" in slider and "stall" not in slider
    fan_rows = [line for line in fan.splitlines() if line.startswith("| demo")]
    assert [line.split(" | ")[1] for line in fan_rows] == ["1", "0.3"]  # gains, largest first
    # dataset, gain, data seed, AE epochs, clip counts, domain, then the kinds per detector
    header = slider.splitlines()[2].split(" | ")
    assert len(header) == 6 + len(["all", "rattle"]) * len(anomaly_kinds.DETECTORS)
    assert all(line.split(" | ")[5] == "both" for line in fan_rows)  # rows without a domain: both domains
