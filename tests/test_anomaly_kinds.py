"""benchmarks/anomaly_kinds.py: per-kind AUCs against a pairwise count, and a run end to end on a
small fan dataset whose rows name every anomaly kind of the fan and the gain they were made with."""

from __future__ import annotations

import json
import sys
from itertools import product
from pathlib import Path

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


@pytest.mark.slow
def test_a_run_records_every_kind_and_its_gain(tmp_path):
    out = tmp_path / "out"
    args = ["--machine", "fan", "--dataset", "tiny", "--source-train", "6", "--test-per-group", "8",
            "--epochs", "1", "--out", str(out)]
    assert anomaly_kinds.main([*args, "--gains", "1", "0.3"]) == 0
    rows = json.loads((out / "anomaly_kinds.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows.values():
        for detector in anomaly_kinds.DETECTORS:
            assert set(row[detector]) == {"all", *MACHINES["fan"].anomalies}
            assert all(0.0 <= v <= 100.0 for v in row[detector].values())
        assert row["data"]["difficulty"]["machine_anomaly_gain"] == [["fan", row["gain"]]]
        assert row["data"]["machines"] == ["fan"]
    with pytest.raises(SystemExit, match="not 'ToyCar'"):
        anomaly_kinds.main([*args, "--machine", "ToyCar"])
