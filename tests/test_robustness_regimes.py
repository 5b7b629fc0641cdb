"""benchmarks/robustness.py: a regime edited after its data or rows were made is refused in one line,
never mixed with the new version (the generator keeps clips that exist)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import robustness  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.generate import SynthPreset  # noqa: E402

SMALL = SynthPreset("small", machines=("fan",), dev_sections=("00",), eval_sections=(), seconds=1.0,
                    source_train=2, target_train=1, test_per_group=1)


def _record(preset: SynthPreset) -> dict:
    # as main() records a regime: of the per-machine-type settings, those of its own machine types
    record = dataclasses.asdict(preset)
    record["difficulty"]["machine_snr_db"] = [list(p) for p in preset.difficulty.machine_snr_db if p[0] in preset.machines]
    gains = [list(p) for p in preset.difficulty.machine_anomaly_gain if p[0] in preset.machines]
    if gains:  # left out when empty, as records made before the setting existed
        record["difficulty"]["machine_anomaly_gain"] = gains
    else:
        del record["difficulty"]["machine_anomaly_gain"]
    kinds = [[m, list(k)] for m, k in preset.difficulty.anomaly_kinds if m in preset.machines]
    if kinds:  # the kinds drawn and the tone line's level: likewise left out at their defaults
        record["difficulty"]["anomaly_kinds"] = kinds
    else:
        del record["difficulty"]["anomaly_kinds"]
    if preset.difficulty.tone_line_db == -12.0:
        del record["difficulty"]["tone_line_db"]
    if preset.difficulty.resonance_db == 3.0:
        del record["difficulty"]["resonance_db"]
    if preset.difficulty.resonance_q == 2.0:
        del record["difficulty"]["resonance_q"]
    return record


def _saved(regimes: dict[str, SynthPreset], regimes_with_rows: list[str]) -> dict:
    # a robustness.json as main() writes it, built independently of regime_settings
    return json.loads(json.dumps({"regimes": {k: _record(v) for k, v in regimes.items()},
                                  "data_seed": robustness.DATA_SEED,
                                  "runs": [{"regime": r, "method": "kNN floor", "seed": 0} for r in regimes_with_rows]}))


def test_rows_of_an_edited_regime_are_stale_and_others_are_not(monkeypatch):
    monkeypatch.setattr(robustness, "REGIMES", {"a": SMALL, "b": SMALL})
    before = {"a": SMALL, "b": dataclasses.replace(SMALL, target_snr_offset_db=-9.0)}
    assert robustness.stale_regimes(_saved(before, ["a", "b"]), ["a", "b"]) == ["b"]
    assert robustness.stale_regimes(_saved(before, ["a"]), ["a", "b"]) == []  # no rows of b: nothing mixes
    assert robustness.stale_regimes(_saved(before, ["a", "b"]), ["a"]) == []  # b not run now
    other_seed = {**_saved({"a": SMALL}, ["a"]), "data_seed": robustness.DATA_SEED + 1}
    assert robustness.stale_regimes(other_seed, ["a"]) == ["a"]


def test_a_work_tree_of_another_version_of_the_regime_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(robustness, "REGIMES", {"a": SMALL})
    root = robustness.regime_data("a", tmp_path)
    wavs = sorted(p.name for p in root.rglob("*.wav"))
    assert wavs and robustness.regime_data("a", tmp_path) == root  # the same version: reused
    monkeypatch.setattr(robustness, "REGIMES", {"a": dataclasses.replace(SMALL, target_snr_offset_db=-5.0)})
    with pytest.raises(SystemExit, match="generated for another 'a' regime"):
        robustness.regime_data("a", tmp_path)
    assert sorted(p.name for p in root.rglob("*.wav")) == wavs  # nothing written over


def test_a_work_tree_without_a_generation_record_is_refused(monkeypatch, tmp_path):
    """A tree made before trees recorded their settings: the generator would keep its clips, so a
    benchmark would measure an older generator's sound under the current name."""
    monkeypatch.setattr(robustness, "REGIMES", {"a": SMALL})
    root = robustness.regime_data("a", tmp_path)
    (root / "synth.json").unlink()
    (tmp_path / "a" / "regime.json").unlink()
    wavs = {p: p.read_bytes() for p in root.rglob("*.wav")}
    with pytest.raises(SystemExit, match="no synth.json"):
        robustness.regime_data("a", tmp_path)
    assert {p: p.read_bytes() for p in root.rglob("*.wav")} == wavs  # nothing written over
    (root / "dev_data").rename(tmp_path / "moved")  # an empty folder: generated afresh, recorded
    assert robustness.regime_data("a", tmp_path) == root and (root / "synth.json").is_file()
    assert sorted(p.name for p in root.rglob("*.wav")) == sorted(p.name for p in wavs)


def test_a_regime_records_only_its_own_machine_types_settings(monkeypatch):
    """A per-machine-type generator setting (the valve's level under its background) versions the
    regimes that hold that machine type, not the others: their data does not change."""
    from pipelines.synth.machines import Difficulty

    d = Difficulty(machine_snr_db=(("valve", -12.0),))
    fan, valve = dataclasses.replace(SMALL, difficulty=d), dataclasses.replace(SMALL, machines=("valve",), difficulty=d)
    monkeypatch.setattr(robustness, "REGIMES", {"fan": fan, "valve": valve})
    assert robustness.regime_settings("fan")["difficulty"]["machine_snr_db"] == []
    assert robustness.regime_settings("valve")["difficulty"]["machine_snr_db"] == [["valve", -12.0]]
    # rows measured before the setting existed: stale only where the regime holds a valve
    plain = dataclasses.replace(SMALL, difficulty=Difficulty())
    before = {"fan": plain, "valve": dataclasses.replace(plain, machines=("valve",))}
    assert robustness.stale_regimes(_saved(before, ["fan", "valve"]), ["fan", "valve"]) == ["valve"]
    # the fan's anomaly gain likewise: rows of a fan regime from before it are stale, a valve regime's are not
    gained = Difficulty(machine_snr_db=(("valve", -12.0),), machine_anomaly_gain=(("fan", 0.3),))
    monkeypatch.setattr(robustness, "REGIMES", {"fan": dataclasses.replace(fan, difficulty=gained),
                                                "valve": dataclasses.replace(valve, difficulty=gained)})
    assert robustness.regime_settings("fan")["difficulty"]["machine_anomaly_gain"] == [["fan", 0.3]]
    assert "machine_anomaly_gain" not in robustness.regime_settings("valve")["difficulty"]
    assert robustness.stale_regimes(_saved({"fan": fan, "valve": valve}, ["fan", "valve"]), ["fan", "valve"]) == ["fan"]
