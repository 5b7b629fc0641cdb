"""benchmarks/toycar_shift.py: the real folder's layout of section 00 reaches the generated clips'
names (the real folder's attribute values, each in its own domain), a car run within the clip
reaches its sound, a worn gear adds one steady tone line, an eccentric gear swells the tone lines,
the car models and voltages and the tone lines' level move as set, training clips are drawn per
section and domain, and the generator's own settings are back after the block, even when it fails."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import toycar_shift  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.generate import PRESETS, generate  # noqa: E402
from pipelines.synth.machines import (  # noqa: E402
    MACHINES, SR, Ctx, blend_model, render_clip, section_unit, toy_car_model)


def _values(root: Path, domain: str, key: str) -> set[str]:
    names = [p.stem for p in root.glob(f"dev_data/ToyCar/*/section_00_{domain}_*.wav")]
    return {n.split(f"_{key}_")[1].split("_")[0] for n in names}


def test_real_layout_reaches_the_clip_names_and_is_undone(tmp_path):
    kept = MACHINES["ToyCar"].specs
    preset = replace(PRESETS["demo"], machines=("ToyCar",), dev_sections=("00",), source_train=9, target_train=4,
                     test_per_group=4, seconds=0.2)
    with toycar_shift.toy_car(toycar_shift.Variant({}, toycar_shift.REAL_LAYOUT)):
        generate(preset, tmp_path, seed=0, workers=1)
    assert MACHINES["ToyCar"].specs == kept
    assert _values(tmp_path, "source", "car") == {"B1", "C1", "D1"} and _values(tmp_path, "source", "mic") == {"1"}
    assert _values(tmp_path, "source", "spd") == {"31V", "34V", "40V"}
    assert _values(tmp_path, "target", "car") == {"A1", "E1"} and _values(tmp_path, "target", "mic") == {"2"}
    assert _values(tmp_path, "target", "spd") == {"28V", "37V"}
    with pytest.raises(RuntimeError), toycar_shift.toy_car(
            toycar_shift.Variant({}, toycar_shift.REAL_CARS, {"run": toycar_shift.REAL_RUN, "anomalies": ("worn-gear",),
                                                            "line_db": -10.0})):
        assert MACHINES["ToyCar"].specs[0] is toycar_shift.REAL_CARS
        assert MACHINES["ToyCar"].run == toycar_shift.REAL_RUN
        assert MACHINES["ToyCar"].anomalies == ("worn-gear",) and MACHINES["ToyCar"].line_db == -10.0
        raise RuntimeError
    assert MACHINES["ToyCar"].specs == kept and MACHINES["ToyCar"].run is None and MACHINES["ToyCar"].line_db == 0.0
    assert "worn-gear" not in MACHINES["ToyCar"].anomalies


def _level_db(wave: np.ndarray, lo: float, hi: float) -> float:
    part = wave[int(lo * len(wave)):int(hi * len(wave))]
    return 10 * np.log10(np.mean(part.astype(np.float64) ** 2))


def test_a_car_run_within_the_clip_is_quiet_before_it_starts_and_after_it_stops(tmp_path):
    """The first 6 % of a clip (before the earliest start, 7.5 %) and its last 12 % (after the
    latest stop plus the fall, 87.6 %) hold only the background: 13 dB under the running car here
    (20 dB machine-to-background before the microphone path, no background events). The car
    running through the clip has no such dip (within 0.4 dB)."""
    preset = replace(PRESETS["demo"], machines=("ToyCar",), dev_sections=("00",), source_train=4, target_train=1,
                     test_per_group=1, seconds=2.0, snr_db=(20.0, 20.0),
                     difficulty=replace(PRESETS["demo"].difficulty, events_per_s=0.0))
    with toycar_shift.toy_car(toycar_shift.Variant({}, car={"run": toycar_shift.REAL_RUN})):
        generate(preset, tmp_path / "run", seed=0, workers=1)
    generate(preset, tmp_path / "through", seed=0, workers=1)
    for kind, dip in (("run", True), ("through", False)):
        paths = sorted((tmp_path / kind).glob("dev_data/ToyCar/train/*.wav"))
        assert len(paths) == 5, paths  # 4 source and 1 target training clips
        for path in paths:
            wave, _ = sf.read(path, dtype="float32")
            middle = _level_db(wave, 0.45, 0.6)
            quiet = max(_level_db(wave, 0.0, 0.06), _level_db(wave, 0.88, 1.0))
            assert (middle - quiet > 10.0) == dip, (kind, path.name, middle, quiet)


def test_a_worn_gear_adds_one_steady_tone_line_and_is_not_drawn_by_default():
    """The same clip rendered normal and with a worn gear (the same random draws up to the
    squeal's phase) differs by one sine: 99 % of the difference's energy within 5 % of its peak
    frequency, which lies at 2-4 kHz (the car's nominal pitch, within the 1 % speed jitter), at the
    RMS of a 0.2 x strength sine. The generator's own toy car does not know the kind."""
    car, n, strength = MACHINES["ToyCar"], SR * 2, 0.5
    unit, attrs = section_unit("ToyCar", "00"), {"car": "A1", "spd": "28V", "mic": "1"}
    normal = car.sound(Ctx(n, np.random.default_rng(7)), unit, attrs, None, strength)
    worn = car.sound(Ctx(n, np.random.default_rng(7)), unit, attrs, "worn-gear", strength)
    diff = (worn - normal).astype(np.float64)
    power = np.abs(np.fft.rfft(diff)) ** 2
    freqs = np.fft.rfftfreq(n, 1 / SR)
    peak = freqs[np.argmax(power)]
    assert 2000 * 0.97 <= peak <= 4000 * 1.03, peak
    assert power[np.abs(freqs - peak) <= 0.05 * peak].sum() > 0.99 * power.sum()
    assert np.sqrt(np.mean(diff ** 2)) == pytest.approx(0.2 * strength / np.sqrt(2), rel=0.02)
    with pytest.raises(ValueError, match="worn-gear"):
        render_clip("ToyCar", "00", attrs, anomaly="worn-gear", strength=strength, snr_db=6.0,
                    rng=np.random.default_rng(0), n=n)


def test_attribute_effect_moves_car_models_and_voltages_toward_the_sections_own_car():
    """At effect 0 two clips of different car models at different voltages render the same sound
    as the section's own car at its own speed, with the same random draws; at 1 (the default) they
    differ; at 0.5 a voltage sounds as the one halfway from the car's own. ``blend_model`` at 0.5
    is the midpoint of every parameter of the two models, by a loop."""
    car, n = MACHINES["ToyCar"], SR // 2
    unit = section_unit("ToyCar", "00")
    a, e = {"car": "A1", "spd": "28V"}, {"car": "E1", "spd": "40V"}

    def sound(attrs):
        return car.sound(Ctx(n, np.random.default_rng(3)), unit, attrs, None, 0.0)

    assert car.attribute_effect == 1.0
    assert not np.allclose(sound(a), sound(e))
    with toycar_shift.toy_car(toycar_shift.Variant({}, car={"attribute_effect": 0.0})):
        same_a, same_e, own = sound(a), sound(e), sound({})
    assert car.attribute_effect == 1.0
    np.testing.assert_allclose(same_a, own, atol=1e-6)
    np.testing.assert_allclose(same_e, own, atol=1e-6)
    # halfway: the section's own car at 40 V sounds as it does at the voltage halfway from its own
    halfway = f"{unit['spd'] + 0.5 * (40 - unit['spd']):.10f}V"
    with toycar_shift.toy_car(toycar_shift.Variant({}, car={"attribute_effect": 0.5})):
        half = sound({"car": unit["car"], "spd": "40V"})
    np.testing.assert_allclose(half, sound({"car": unit["car"], "spd": halfway}), atol=1e-5)
    assert not np.allclose(half, sound({"car": unit["car"], "spd": "40V"}), atol=1e-3)
    ref, model = toy_car_model("ToyCar", "A1"), toy_car_model("ToyCar", "E1")
    mid = blend_model(ref, model, 0.5)
    for key in ("k", "comm", "ratio", "teeth", "roll_fc"):
        assert mid[key] == pytest.approx((ref[key] + model[key]) / 2)
    for key in ("comm_amps", "motor_amps"):
        for i in range(len(ref[key])):
            assert mid[key][i] == pytest.approx((ref[key][i] + model[key][i]) / 2)
    for r_row, m_row, got in zip(ref["body"], model["body"], mid["body"]):
        assert got == pytest.approx(tuple((x + y) / 2 for x, y in zip(r_row, m_row)))


def test_line_db_scales_the_tone_lines_alone():
    """With the same random draws, the toy car with its tone lines 10 dB lower is the car without
    them (lines 300 dB lower) plus 10^(-10/20) of what the lines add at 0 dB."""
    car, n = MACHINES["ToyCar"], SR // 2
    unit, attrs = section_unit("ToyCar", "00"), {"car": "A1", "spd": "31V"}

    def sound(db):
        with toycar_shift.toy_car(toycar_shift.Variant({}, car={"line_db": db})):
            return car.sound(Ctx(n, np.random.default_rng(5)), unit, attrs, None, 0.0).astype(np.float64)

    full, lower, none = sound(0.0), sound(-10.0), sound(-300.0)
    lines = full - none
    assert np.sqrt(np.mean(lines ** 2)) > 0.3 * np.sqrt(np.mean(none ** 2))  # the lines are a large part at 0 dB
    np.testing.assert_allclose(lower, none + 10 ** (-0.5) * lines, atol=1e-5)
    assert car.line_db == 0.0


def test_training_draw_keeps_every_test_clip_and_draws_the_training_clips_per_section_and_domain():
    from asd.metadata import ClipMeta

    metas = [ClipMeta(f"ToyCar/{split}/{sec}_{dom}_{i}.wav", "ToyCar", sec, split, dom, "normal", i, "car_A")
             for sec in ("00", "01") for split, n in (("train", 9), ("test", 3)) for dom in ("source", "target")
             for i in range(n if split == "test" or dom == "source" else 4)]
    drawn = toycar_shift.training_draw(metas, 5, 2, seed=1)
    assert [m for m in drawn if m.split == "test"] == [m for m in metas if m.split == "test"]
    for sec in ("00", "01"):
        for dom, n in (("source", 5), ("target", 2)):
            picked = [m.path for m in drawn if m.split == "train" and m.section == sec and m.domain == dom]
            assert len(picked) == len(set(picked)) == n
    assert drawn == toycar_shift.training_draw(metas, 5, 2, seed=1)
    assert drawn != toycar_shift.training_draw(metas, 5, 2, seed=2)
    with pytest.raises(SystemExit, match="4 target training clips, fewer than the 5"):
        toycar_shift.training_draw(metas, 5, 5, seed=0)


def test_an_eccentric_gear_swells_the_tone_lines_once_per_gear_revolution_and_is_not_drawn_by_default():
    """With the same random draws, a clip with an eccentric gear differs from the normal one only in
    its tone lines (the lines' part found by rendering without them, 300 dB lower): their ratio is
    a cosine of depth 0.5 x strength that changes sign twice per revolution of the intermediate
    gear (the motor's rate over the root of the gear ratio, within the 1 % speed jitter)."""
    car, n, strength = MACHINES["ToyCar"], SR * 2, 1.2
    unit, attrs = section_unit("ToyCar", "00"), {"car": "A1", "spd": "28V"}

    def sound(anomaly, db=0.0):
        with toycar_shift.toy_car(toycar_shift.Variant({}, car={"line_db": db, "anomalies": ("eccentric-gear",)})):
            return car.sound(Ctx(n, np.random.default_rng(9)), unit, attrs, anomaly, strength).astype(np.float64)

    normal, eccentric = sound(None), sound("eccentric-gear")
    lines = normal - sound(None, -300.0)
    np.testing.assert_allclose(sound("eccentric-gear", -300.0), sound(None, -300.0), atol=1e-5)
    strong = np.abs(lines) > 0.2 * np.abs(lines).max()
    ratio = (eccentric - normal)[strong] / lines[strong]
    assert ratio.max() == pytest.approx(0.5 * strength, abs=0.02)
    assert ratio.min() == pytest.approx(-0.5 * strength, abs=0.02)
    model = toy_car_model("ToyCar", "A1")
    gear_hz = model["k"] * 28 / 10 / np.sqrt(model["ratio"])
    swell = np.where(strong, (eccentric - normal) / np.where(strong, lines, 1.0), 0.0)
    smooth = np.convolve(swell, np.ones(8) / 8, "same")
    crossings = np.count_nonzero(np.diff(np.sign(smooth[strong])) != 0) / (n / SR)
    assert crossings == pytest.approx(2 * gear_hz, rel=0.05)
    assert "eccentric-gear" not in car.anomalies


def test_a_tree_made_for_other_toy_car_settings_stops_the_run(tmp_path):
    """A variant's tree records the toy car's settings; a tree made for others, or before they
    were recorded, is not measured as if it were the variant's (the generator's own record does
    not hold them)."""
    preset = replace(PRESETS["demo"], machines=("ToyCar",), dev_sections=("00",), source_train=2, target_train=1,
                     test_per_group=1, seconds=0.2)
    lower = toycar_shift.Variant({}, car={"line_db": -10.0})
    toycar_shift.generate_variant(lower, preset, tmp_path / "tree", seed=0)
    toycar_shift.generate_variant(lower, preset, tmp_path / "tree", seed=0)  # the same settings: kept
    with pytest.raises(SystemExit, match="other toy-car settings"):
        toycar_shift.generate_variant(toycar_shift.Variant({}, car={"line_db": -20.0}), preset, tmp_path / "tree", 0)
    recorded = (tmp_path / "tree" / toycar_shift.VARIANT_RECORD).read_text()
    (tmp_path / "tree" / toycar_shift.VARIANT_RECORD).unlink()
    with pytest.raises(SystemExit, match="before they were recorded"):
        toycar_shift.generate_variant(lower, preset, tmp_path / "tree", seed=0)
    # an interrupted generation (settings recorded, some clips missing) goes on where it stopped
    (tmp_path / "tree" / toycar_shift.VARIANT_RECORD).write_text(recorded)
    clips = sorted((tmp_path / "tree").rglob("*.wav"))
    kept = clips[0].read_bytes()
    clips[0].unlink()
    toycar_shift.generate_variant(lower, preset, tmp_path / "tree", seed=0)
    assert clips[0].read_bytes() == kept
    assert MACHINES["ToyCar"].line_db == 0.0


def test_the_table_shows_each_variants_means_over_its_draws_and_the_within_domain_aucs_where_measured():
    rng = np.random.default_rng(3)
    groups = (*toycar_shift.COLUMNS, *toycar_shift.WITHIN)

    def row(variant, seed, accuracy=None, within=True):
        scores = {d: {g: float(rng.uniform(40, 90)) for g in groups if within or g not in toycar_shift.WITHIN}
                  for d in toycar_shift.DETECTORS}
        sections = {"ToyCar 00": {} if accuracy is None else {"attribute accuracy": accuracy}}
        return {"variant": variant, "data_seed": seed, "scores": scores, "sections": sections}

    first, second = list(toycar_shift.VARIANTS)[:2]
    rows = {"a0": row(first, 0, 80.0), "a1": row(first, 1, 90.0), "b0": row(second, 0, within=False),
            "r": row(toycar_shift.REAL_ROW, None, 76.0)}
    main_table, within_table = toycar_shift.table(rows).split("Each domain's")
    lines = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in main_table.splitlines()[2:] if line}
    assert list(lines) == [first, second, toycar_shift.REAL_ROW]  # the variants' order, then the reference
    for i, d in enumerate(toycar_shift.DETECTORS):
        mean = {k: np.mean([rows[r]["scores"][d][k] for r in ("a0", "a1")]) for k in toycar_shift.COLUMNS}
        assert lines[first][2 + i] == (f"{mean['Overall']:.1f} ({mean['Source AUC']:.0f} / "
                                       f"{mean['Target AUC']:.0f})")
    assert lines[first][1] == "0, 1" and lines[toycar_shift.REAL_ROW][1] == ""  # the real folder has no draw
    assert lines[first][-1].rstrip(" |") == "85 %" and lines[second][-1].rstrip(" |") == "—"
    inner = [line.split(" | ") for line in within_table.splitlines() if line.startswith("| ")][1:]  # past the head
    assert [r[0].lstrip("| ") for r in inner] == [first, toycar_shift.REAL_ROW]  # the second has no within AUCs
    d = next(iter(toycar_shift.DETECTORS))
    source, target = (np.mean([rows[r]["scores"][d][g] for r in ("a0", "a1")]) for g in toycar_shift.WITHIN)
    assert inner[0][1] == f"{source:.0f} / {target:.0f}"


def test_main_measures_the_real_folders_rows_once_each_and_skips_them_when_it_is_absent(tmp_path, monkeypatch):
    """``--real``: the real folder as it is and, per data seed, with demo's number of training clips
    drawn (the draw passed to ``measure``); saved rows are kept unless ``--redo``; no folder, no rows.
    ``measure`` (minutes on the real folder) is replaced by a recorder of what it is asked."""
    asked = []

    def fake_measure(root, draw=None):
        asked.append((root, draw))
        groups = (*toycar_shift.COLUMNS, *toycar_shift.WITHIN)
        return {d: {g: 50.0 + len(asked) for g in groups} for d in toycar_shift.DETECTORS}, {"ToyCar 00": {}}

    monkeypatch.setattr(toycar_shift, "measure", fake_measure)
    real = tmp_path / "real"
    monkeypatch.setattr(toycar_shift.realism, "real_tree", lambda work: real)
    args = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--variants", "--real", "--data-seeds", "3", "4"]
    demo = PRESETS["demo"]
    assert toycar_shift.main(args) == 0
    assert asked == [(real, None), (real, (demo.source_train, demo.target_train, 3)),
                     (real, (demo.source_train, demo.target_train, 4))]
    rows = toycar_shift.read_rows(tmp_path / "out" / "toycar_shift.json")
    assert set(rows) == {toycar_shift.REAL_ROW, *(f"{toycar_shift.REAL_AT_DEMO_SIZE}, data seed {s}" for s in (3, 4))}
    assert rows[f"{toycar_shift.REAL_AT_DEMO_SIZE}, data seed 4"]["data_seed"] == 4
    assert toycar_shift.REAL_AT_DEMO_SIZE in (tmp_path / "out" / "toycar_shift.md").read_text()
    toycar_shift.main(args)  # saved: not measured again
    assert len(asked) == 3
    toycar_shift.main([*args, "--redo"])
    assert len(asked) == 6
    monkeypatch.setattr(toycar_shift.realism, "real_tree", lambda work: None)  # the folder absent
    toycar_shift.main([*args[:-3], "--data-seeds", "5"])
    assert len(asked) == 6 and f"{toycar_shift.REAL_AT_DEMO_SIZE}, data seed 5" not in \
        toycar_shift.read_rows(tmp_path / "out" / "toycar_shift.json")
