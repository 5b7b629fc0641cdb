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


def test_features_of_one_machine_type_at_a_time(tmp_path, monkeypatch):
    """A DCASE 2022 development set (25k clips) does not fit in memory as float32 features: realism and
    spectral_variants hold one machine type's at a time, and measure what they measured on the
    whole tree at once (the per-section detectors and statistics never mix machine types)."""
    import weakref

    import spectral_variants  # noqa: E402

    tree = tmp_path / "tiny"
    generate(PRESETS["tiny"], tree, seed=0, workers=1)
    per_type = {}
    for path in (tree / "dev_data").rglob("*.wav"):
        machine = path.relative_to(tree / "dev_data").parts[0]
        per_type[machine] = per_type.get(machine, 0) + 1
    assert len(per_type) == 2

    alive, peak = [], [0]
    make = realism.log_mel

    def tracked(wave, cfg):
        x = make(wave, cfg)
        alive.append(weakref.ref(x))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return x

    monkeypatch.setattr(realism, "log_mel", tracked)
    row = realism.measure(tree, ae_epochs=0, seed=0)
    # two full front ends per clip kept (the spectrum reduced to its shape vector at once), one type at a time
    assert peak[0] <= 2 * max(per_type.values()) + 1 < 2 * sum(per_type.values())
    assert row["clips"] == sum(per_type.values()) and row["sections"] == 4
    alive.clear(), peak.__setitem__(0, 0)
    variants = spectral_variants.measure(tree, resamples=2, seed=0)
    assert peak[0] <= 2 * max(per_type.values()) + 1
    assert variants["clips"] == row["clips"]
    # the default row of spectral_variants (cosine, power 0.5) is realism's "spectral kNN"
    default = variants["variants"][" | ".join(spectral_variants.DEFAULT)]["Overall"]
    assert 100 * default == pytest.approx(row["spectral kNN"], abs=1e-9)


def test_data_seeds_keep_earlier_draws_and_train_the_ae_when_asked(tmp_path):
    """``--data-seeds`` adds draws to the ones measured before (each draw in its own tree) and trains
    the AE recipe only when ``--ae-epochs`` is given; the table averages the AE over the draws that
    have it and names them."""
    out, work = tmp_path / "out", tmp_path / "work"
    base = ["--out", str(out), "--work", str(work), "--synthetic", "tiny"]
    assert realism.main([*base, "--data-seeds", "0", "--ae-epochs", "1"]) == 0
    assert realism.main([*base, "--data-seeds", "1"]) == 0
    rows = json.loads((out / "data_seeds.json").read_text())["rows"]["synthetic tiny"]
    assert set(rows) == {"0", "1"}
    assert "AE recipe" in rows["0"] and "AE recipe" not in rows["1"]
    assert sorted(p.name for p in (work / "synth").iterdir()) == ["tiny-data-seed-0", "tiny-data-seed-1"]
    line = next(x for x in (out / "data_seeds.md").read_text().splitlines() if x.startswith("| synthetic tiny"))
    assert f"{rows['0']['AE recipe']:.1f} ({rows['0']['AE recipe']:.1f} .. {rows['0']['AE recipe']:.1f}), draws 0" in line
    floors = [rows[s]["kNN floor"] for s in ("0", "1")]
    assert f"{sum(floors) / 2:.1f} ({min(floors):.1f} .. {max(floors):.1f})" in line
    # per machine type: each detector's mean over the draws that measured it, ranked
    for machine in ("fan", "valve"):
        row = next(x for x in (out / "data_seeds.md").read_text().splitlines()
                   if x.startswith(f"| synthetic tiny | {machine} |"))
        means = {d: sum(v) / len(v) for d in realism.FLOORS
                 if (v := [rows[s][f"{d} per machine type"][machine] for s in rows
                           if f"{d} per machine type" in rows[s]])}
        assert f"{means['kNN floor']:.1f}" in row and f"{means['AE recipe']:.1f} (1)" in row
        assert row.rstrip(" |").endswith(" > ".join(sorted(means, key=means.get, reverse=True)))


def test_draws_of_another_generator_version_are_left_out(tmp_path, capsys):
    """A saved draw whose generator settings differ from the code's (the fan's anomalies were weaker
    or stronger when it was measured) is left out with a line, never averaged with new draws."""
    out, work = tmp_path / "out", tmp_path / "work"
    base = ["--out", str(out), "--work", str(work), "--synthetic", "tiny"]
    assert realism.main([*base, "--data-seeds", "0", "1"]) == 0
    path = out / "data_seeds.json"
    saved = json.loads(path.read_text())
    assert saved["rows"]["synthetic tiny"]["0"]["data"] == realism.data_record("synthetic tiny")
    saved["rows"]["synthetic tiny"]["1"]["data"]["difficulty"]["machine_anomaly_gain"] = [["fan", 1.0]]
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert realism.main([*base, "--data-seeds", "2"]) == 0
    assert set(json.loads(path.read_text())["rows"]["synthetic tiny"]) == {"0", "2"}
    assert "data seed 1: synthetic tiny was measured on another version of the generator" in capsys.readouterr().out


def test_attribute_accuracy_is_the_leave_one_out_nearest_clip_by_a_loop():
    """The share of source training clips whose nearest other source clip (cosine of per-bin mean
    and std over time) shares its attribute, against a numpy loop; target clips are left out."""
    import numpy as np
    import torch

    from asd.metadata import ClipMeta

    rng = np.random.default_rng(0)
    clips = []
    for i in range(14):
        # the two target clips copy source clips 0 and 1 under another attribute: counted, they
        # would be those clips' nearest neighbours and turn their hits into misses
        domain = "target" if i >= 12 else "source"
        attribute = "car_Z" if domain == "target" else f"car_{'AB'[i % 2]}"
        logmel = clips[i - 12]["logmel"].clone() if domain == "target" else \
            torch.from_numpy(rng.normal(0.4 * (i % 2), 1.0, (8, 20)).astype(np.float32) + 5.0)
        clips.append({"meta": ClipMeta(f"ToyCar/train/{i}.wav", "ToyCar", "00", "train", domain, "normal", i, attribute),
                      "logmel": logmel})
    src = [c for c in clips if c["meta"].domain == "source"]  # the first 12
    vec = [np.concatenate([c["logmel"].numpy().mean(1), c["logmel"].numpy().std(1)]).astype(np.float64) for c in clips]

    def hits(among: int) -> int:  # source clips whose nearest other clip of the first ``among`` shares the attribute
        count = 0
        for i in range(len(src)):
            sims = [vec[i] @ w / np.linalg.norm(vec[i]) / np.linalg.norm(w) if j != i else -np.inf
                    for j, w in enumerate(vec[:among])]
            count += clips[int(np.argmax(sims))]["meta"].attribute == clips[i]["meta"].attribute
        return count

    assert 0 < hits(len(src)) < len(src)  # the classes overlap: neither all nor none of the nearest clips agree
    assert hits(len(clips)) < hits(len(src))  # counting the target clips would change the answer
    assert realism.attribute_accuracy(clips) == pytest.approx(hits(len(src)) / len(src))
    assert np.isnan(realism.attribute_accuracy(clips[12:]))
