"""benchmarks/realism.py: rows of datasets not measured in a call are kept, ``--redo`` measures only
the datasets named, every row says when and at which commit it was measured, and the per-machine-type
scores are consistent with the overall one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import realism  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.generate import PRESETS, generate  # noqa: E402

pytestmark = pytest.mark.slow
DETECTORS = ["kNN floor", "spectral kNN", "spectral kNN, standardised", "untrained network"]


def _measure(out: Path, tree: Path, names: list[str], *extra: str) -> dict:
    trees = [a for name in names for a in ("--tree", str(tree), "--name", name)]
    assert realism.main(["--out", str(out), "--no-real", "--synthetic", "--ae-epochs", "0", *trees, *extra]) == 0
    return json.loads((out / "realism.json").read_text())["rows"]


def test_rows_of_other_datasets_stay_and_redo_measures_only_the_named_ones(tmp_path):
    tree = tmp_path / "tiny"
    generate(PRESETS["tiny"], tree, seed=0, workers=1)
    out = tmp_path / "out"
    first = _measure(out, tree, ["A", "B"])
    assert set(first) == {"A", "B"}
    assert all(row["commit"] and row["date"] for row in first.values())
    # the two machine types of the tiny preset: the overall score is a harmonic mean of all
    # sections' values, so it is a weighted harmonic mean of the per-type ones and lies between them
    for name in DETECTORS:
        per_type = first["A"][f"{name} per machine type"]
        assert set(per_type) == {"fan", "valve"}
        assert min(per_type.values()) - 1e-9 <= first["A"][name] <= max(per_type.values()) + 1e-9

    first["B"]["kNN floor"] = -1.0  # a marker the next calls must not touch
    (out / "realism.json").write_text(json.dumps({**json.loads((out / "realism.json").read_text()),
                                                  "rows": first}))
    again = _measure(out, tree, ["A"])  # A already measured, nothing named for --redo: nothing changes
    assert again["A"]["kNN floor"] == first["A"]["kNN floor"] and again["B"]["kNN floor"] == -1.0
    first["A"]["kNN floor"] = -2.0
    (out / "realism.json").write_text(json.dumps({**json.loads((out / "realism.json").read_text()),
                                                  "rows": first}))
    redone = _measure(out, tree, ["A"], "--redo")
    assert redone["A"]["kNN floor"] == pytest.approx(again["A"]["kNN floor"])  # measured again (deterministic)
    assert redone["B"]["kNN floor"] == -1.0  # B was not named: kept as it was
