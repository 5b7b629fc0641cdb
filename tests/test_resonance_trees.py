"""benchmarks/resonance_trees.py: the trees it ranks are ``demo`` with one change, every anomaly a
generic resonance of the asked quality and peak (the valve's own kinds kept when asked)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from pipelines.synth.generate import PRESETS, plan_dataset
from pipelines.synth.machines import MACHINE_TYPES, MACHINES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import resonance_trees  # noqa: E402  (benchmarks/ is not a package)


def _anomaly_kinds(preset) -> dict[str, set[str]]:
    """Per machine type, the kinds the generator's plan gives its test anomalies."""
    small = replace(preset, dev_sections=("00",), source_train=1, target_train=1, test_per_group=6)
    kinds: dict[str, set[str]] = {}
    for job in plan_dataset(small, Path("/nonexistent"), 0, eval_data=False).jobs:
        if job.anomaly is not None:
            kinds.setdefault(job.machine, set()).add(job.anomaly)
    return kinds


def test_every_anomaly_is_the_generic_resonance_and_nothing_else_changes():
    demo = PRESETS["demo"]
    preset = resonance_trees.resonance_preset(16, 6, keep_valve=False)
    assert _anomaly_kinds(preset) == {m: {"resonance"} for m in demo.machines}
    assert preset == demo  # the default since 2026-12-07: `demo` is the Q 16, 6 dB tree
    other = resonance_trees.resonance_preset(8, 3, keep_valve=False)
    assert _anomaly_kinds(other) == {m: {"resonance"} for m in demo.machines}
    assert (other.difficulty.resonance_q, other.difficulty.resonance_db) == (8, 3)
    assert replace(other.difficulty, resonance_q=16, resonance_db=6) == demo.difficulty
    assert replace(other, difficulty=demo.difficulty) == demo


def test_the_valve_keeps_its_own_kinds_when_asked():
    kept = _anomaly_kinds(resonance_trees.resonance_preset(8, 3, keep_valve=True))
    assert kept["valve"] == set(MACHINES["valve"].anomalies) and "resonance" not in kept["valve"]
    assert all(kept[m] == {"resonance"} for m in MACHINE_TYPES if m != "valve")
    assert resonance_trees.tree_name(1, 16, 6, True) == "demo-seed-1-q16-db6-valve-own"
