"""Tests of the synthetic DCASE 2022 generator (pipelines/synth): layout, names, attribute tables,
audio format, determinism, domain attributes, anomaly signal, eval ground truth and data drops."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asd.metadata import discover_clips, read_attributes_csv
from asd.metrics import ground_truth_file_name, read_ground_truth
from pipelines.synth.generate import DEFAULT_STRENGTH, PRESETS, REAL_SOUND, _clip_attrs, add_drop, generate, next_value
from pipelines.synth.machines import (MACHINE_TYPES, MACHINES, SR, Ctx, Difficulty, background_events, keyed_rng,
                                      render_clip, resonance_change, stretch, tone_line)

TINY = PRESETS["tiny"]


def _hashes(root: Path, pattern: str = "*") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "tiny"
    summary = generate(TINY, root, seed=0, workers=2, eval_data=True)
    return root, summary


def _small(**kw):
    base = dict(machines=("valve",), dev_sections=("00",), eval_sections=("03",), seconds=1.0,
                source_train=3, target_train=2, test_per_group=1)
    return dataclasses.replace(TINY, **{**base, **kw})


# ----------------------------------------------------------------------------- presets


def test_presets_have_the_documented_sizes():
    assert set(PRESETS) >= {"tiny", "demo", "dcase2022"}
    full = PRESETS["dcase2022"]
    assert set(full.machines) == set(MACHINE_TYPES) and len(MACHINE_TYPES) == 7
    assert (full.dev_sections, full.eval_sections) == (("00", "01", "02"), ("03", "04", "05"))
    assert (full.source_train, full.target_train, full.test_per_group, full.seconds) == (990, 10, 50, 10.0)
    demo = PRESETS["demo"]
    assert (demo.source_train, demo.target_train, demo.test_per_group, demo.seconds) == (50, 5, 10, 10.0)
    assert set(demo.machines) == set(MACHINE_TYPES)
    assert (TINY.machines, TINY.dev_sections, TINY.eval_sections) == (("fan", "valve"), ("00", "01"), ("03",))
    assert (TINY.seconds, TINY.source_train, TINY.target_train, TINY.test_per_group) == (3.0, 16, 4, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.seconds = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("machine", MACHINE_TYPES)
def test_section_specs_have_disjoint_domains(machine):
    for section in ("00", "01", "02", "03", "04", "05"):
        spec = MACHINES[machine].spec(section)
        src = {tuple(a.items()) for a in spec.values("source")}
        tgt = {tuple(a.items()) for a in spec.values("target")}
        assert len(src) >= 2 and len(tgt) >= 1 and not src & tgt
        names = [x for combo in spec.source + spec.target for x in combo] + list(spec.params)
        assert all("_" not in x for x in names)  # the name's attribute string must split into pairs


# ----------------------------------------------------------------------------- layout


def test_layout_and_counts(tiny):
    root, summary = tiny
    found = discover_clips(root / "dev_data")
    assert found.unparsed == []
    counts = Counter((c.machine, c.section, c.split, c.domain, c.label) for c in found.clips)
    expected = {}
    for m in TINY.machines:
        for s in TINY.dev_sections:
            expected[(m, s, "train", "source", "normal")] = TINY.source_train
            expected[(m, s, "train", "target", "normal")] = TINY.target_train
            for d in ("source", "target"):
                for lab in ("normal", "anomaly"):
                    expected[(m, s, "test", d, lab)] = TINY.test_per_group
    assert dict(counts) == expected
    groups = defaultdict(list)
    for c in found.clips:
        groups[(c.machine, c.section, c.split, c.domain, c.label)].append(c.index)
    for key, idx in groups.items():  # indices count per (section, domain, split, label)
        assert sorted(idx) == list(range(len(idx))), key
    assert all(re.search(r"_\d{4}_", Path(c.path).name) for c in found.clips)
    n_eval = len(TINY.machines) * len(TINY.eval_sections) * (TINY.source_train + TINY.target_train
                                                              + 4 * TINY.test_per_group)
    assert summary.written == len(found.clips) + n_eval and summary.skipped == 0
    assert summary.counts["dev_data/fan/train"] == len(TINY.dev_sections) * (TINY.source_train + TINY.target_train)


def test_names_agree_with_attribute_tables(tiny):
    root, _ = tiny
    for data in ("dev_data", "eval_data"):
        found = discover_clips(root / data)
        labelled = [c for c in found.clips if c.is_labelled]
        assert labelled
        for c in labelled:
            row = found.attributes[c.path]  # every labelled clip has a row
            assert "_".join(f"{p}_{v}" for p, v in row.items()) == c.attribute
        assert set(found.attributes) == {c.path for c in labelled}  # and no row without a clip
        for csv_path in (root / data).glob("*/attributes_*.csv"):
            header = csv_path.read_text().splitlines()[0]
            assert re.fullmatch(r"file_name(,d\dp,d\dv)+", header)
            rows = read_attributes_csv(csv_path)
            section = csv_path.stem.split("_")[1]
            assert rows and all(Path(name).name.startswith(f"section_{section}_") for name in rows)


def test_audio_format_and_level(tiny):
    root, _ = tiny
    wavs = sorted(root.rglob("*.wav"))
    assert len(wavs) == 264
    for wav in wavs:
        info = sf.info(str(wav))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert info.frames == int(TINY.seconds * 16000)
        x, _ = sf.read(str(wav), dtype="int16")
        peak = int(np.abs(x.astype(np.int32)).max())
        assert 300 < peak < 32767, wav.name  # audible, never clipped
    assert not list(root.rglob("*.part"))


def test_source_and_target_attributes_never_overlap(tiny):
    root, _ = tiny
    found = discover_clips(root / "dev_data")
    values = defaultdict(lambda: defaultdict(set))
    for c in found.clips:
        values[(c.machine, c.section, c.split)][c.domain].add(c.attribute)
    for key, by_domain in values.items():
        assert not by_domain["source"] & by_domain["target"], key
        if key[2] == "train":  # enough attribute classes for a tiny model to train on
            assert len(by_domain["source"]) >= 2 and len(by_domain["target"]) >= 1, key


@pytest.mark.parametrize("section", ["00", "01", "02"])
def test_target_domain_normals_sound_different(section):
    """The attribute really changes the sound: a leave-one-out nearest neighbour on a simple
    statistic tells source from target normal clips (first value of each domain; chance 0.5)."""
    from pipelines.synth.machines import SR, keyed_rng, render_clip

    for machine in MACHINE_TYPES:
        spec = MACHINES[machine].spec(section)
        x, y = [], []
        for domain in ("source", "target"):
            for i in range(6):
                clip = render_clip(machine, section, spec.values(domain)[0], anomaly=None, strength=0.0,
                                   snr_db=6.0, rng=keyed_rng("domain-test", machine, section, domain, i), n=6 * SR)
                x.append(_band_stats(clip))
                y.append(domain)
        z = np.array(x)
        z = (z - z.mean(0)) / (z.std(0) + 0.1)
        dist = ((z[:, None] - z[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        accuracy = np.mean(np.array(y)[dist.argmin(1)] == np.array(y))
        assert accuracy >= 0.75, (machine, accuracy)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_the_workers(tiny, tmp_path):
    root, _ = tiny
    generate(TINY, tmp_path / "again", seed=0, workers=1, eval_data=True)
    assert _hashes(tmp_path / "again") == _hashes(root)


def test_different_seed_differs(tmp_path):
    a = generate(_small(), tmp_path / "a", seed=1, workers=1)
    generate(_small(), tmp_path / "b", seed=2, workers=1)
    ha, hb = _hashes(tmp_path / "a", "*.wav"), _hashes(tmp_path / "b", "*.wav")
    assert set(ha) == set(hb) and len(ha) == a.written
    assert all(ha[k] != hb[k] for k in ha)
    assert (tmp_path / "a/dev_data/valve/attributes_00.csv").read_bytes() == \
        (tmp_path / "b/dev_data/valve/attributes_00.csv").read_bytes()


def test_existing_files_are_kept(tmp_path):
    root = tmp_path / "d"
    first = generate(_small(), root, seed=3, workers=1, eval_data=True)
    before = _hashes(root)
    again = generate(_small(), root, seed=3, workers=1, eval_data=True)
    assert again.written == 0 and again.skipped == first.written and _hashes(root) == before
    victim = sorted((root / "dev_data/valve/test").glob("*.wav"))[0]
    victim.unlink()
    (root / "dev_data/valve/attributes_00.csv").unlink()
    other = sorted((root / "dev_data/valve/train").glob("*.wav"))[0]
    other.write_bytes(b"not overwritten")
    refill = generate(_small(), root, seed=3, workers=1, eval_data=True)
    assert refill.written == 1
    after = _hashes(root)
    assert after.pop(str(other.relative_to(root))) != before.pop(str(other.relative_to(root)))
    assert after == before  # the missing clip and table came back identical, nothing else changed


# ----------------------------------------------------------------------------- anomalies


def _band_stats(y: np.ndarray, n_fft: int = 512) -> np.ndarray:
    """A simple clip statistic: level, spectral shape and std over frames of 32 log band energies
    (dB), and the log modulation spectrum of the frame energy in 16 bands from 0.2 to 10 Hz (rhythm)."""
    frames = y[: len(y) // n_fft * n_fft].reshape(-1, n_fft) * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)[:, 1:]) ** 2
    bands = 10 * np.log10(power.reshape(len(power), 32, -1).mean(axis=2) + 1e-12)
    env = bands.mean(axis=1) - bands.mean()
    mod = np.abs(np.fft.rfft(env * np.hanning(len(env)), 2048)) ** 2
    f = np.fft.rfftfreq(2048, n_fft / 16000)
    edges = np.geomspace(0.2, 10, 17)
    mod_bands = [10 * np.log10(mod[(f >= lo) & (f < hi)].mean() + 1e-12) for lo, hi in zip(edges[:-1], edges[1:])]
    level = bands.mean()
    return np.concatenate([[level], bands.mean(0) - level, bands.std(0), mod_bands])


def _auc(normal, anomalous) -> float:
    n, a = np.asarray(normal), np.asarray(anomalous)
    return float(((a[:, None] > n[None, :]).sum() + 0.5 * (a[:, None] == n[None, :]).sum()) / (len(a) * len(n)))


def _band_stat_aucs(root: Path, machines) -> dict[str, float]:
    """Per machine type: AUC of a z-scored band-energy detector on the source-domain test clips."""
    found = discover_clips(root / "dev_data")
    stats = {c.path: _band_stats(sf.read(str(root / "dev_data" / c.path), dtype="float32")[0]) for c in found.clips}
    aucs = {}
    for machine in machines:
        clips = [c for c in found.clips if c.machine == machine and c.domain == "source"]
        ref = np.stack([stats[c.path] for c in clips if c.split == "train"])
        mu, sd = ref.mean(0), ref.std(0) + 0.5
        score = {c.path: float(np.mean(((stats[c.path] - mu) / sd) ** 2)) for c in clips if c.split == "test"}
        aucs[machine] = _auc([score[c.path] for c in clips if c.split == "test" and c.label == "normal"],
                             [score[c.path] for c in clips if c.split == "test" and c.label == "anomaly"])
    return aucs


def test_the_real_sound_defaults_hide_anomalies_that_the_sound_models_make_plain(tmp_path):
    """The same clips (seed, names) three ways: the old defaults (strength 0.5-2, no real-sound factors),
    the factors alone, and today's defaults (docs/synthetic-data.md, "Difficulty"). A band-energy
    detector that finds the old anomalies loses ground to the factors and most of its edge to the defaults."""
    preset = _small(machines=("fan", "gearbox"), seconds=4.0, source_train=12, target_train=0, test_per_group=12,
                    snr_db=(6.0, 12.0), anomaly_strength=DEFAULT_STRENGTH, difficulty=REAL_SOUND)
    variants = {"old": dict(anomaly_strength=(0.5, 2.0), difficulty=Difficulty()),
                "factors": dict(anomaly_strength=(0.5, 2.0)), "default": {}}
    auc = {}
    for name, change in variants.items():
        generate(dataclasses.replace(preset, **change), tmp_path / name, seed=0, workers=2)
        auc[name] = np.mean(list(_band_stat_aucs(tmp_path / name, preset.machines).values()))
    assert auc["default"] < auc["factors"] < auc["old"] and auc["default"] < auc["old"] - 0.1, auc


def test_anomaly_stretches_and_background_events():
    c = Ctx(10 * SR, keyed_rng("stretch-test"))
    for duty in (0.3, 0.6):
        env = stretch(c, (duty, duty))
        assert env.min() >= 0 and env.max() <= 1 + 1e-6
        assert np.mean(env) == pytest.approx(duty, abs=0.01)  # one stretch of that fraction, fades included
        assert np.count_nonzero(np.diff((env > 0.5).astype(int))) <= 2  # one stretch
    assert np.array_equal(stretch(c, (1.0, 1.0)), np.ones(c.n, np.float32))
    assert not background_events(Ctx(10 * SR, keyed_rng("ev")), 0.0).any()
    events = background_events(Ctx(10 * SR, keyed_rng("ev")), 1.0)
    quiet = np.mean(np.abs(events.reshape(100, -1)).max(axis=1) == 0)
    assert events.any() and 0 < quiet < 1  # sources come and go
    # the factors are deterministic for a clip's RNG, and off by default
    kw = dict(anomaly="leak", strength=1.0, snr_db=6.0, n=2 * SR)
    attrs = MACHINES["valve"].spec("00").values("source")[0]
    a = render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), difficulty=Difficulty(3, 6.0, 2.0, (0.5, 0.5), 1.0), **kw)
    b = render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), difficulty=Difficulty(3, 6.0, 2.0, (0.5, 0.5), 1.0), **kw)
    plain = render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), **kw)
    assert np.array_equal(a, b) and not np.allclose(a, plain)
    # a machine type's own offset is that clip's machine-to-background ratio lowered; other types untouched
    quiet = Difficulty(machine_snr_db=(("valve", -12.0),))
    low = render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), difficulty=quiet, **kw)
    assert np.array_equal(low, render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), **{**kw, "snr_db": -6.0}))
    fan = MACHINES["fan"].spec("01").values("source")[0]
    fan_kw = {**kw, "anomaly": "stall"}
    assert np.array_equal(render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), difficulty=quiet, **fan_kw),
                          render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), **fan_kw))
    # a machine type's anomaly gain is that type's anomaly strength scaled; normal clips and other types untouched
    weak = Difficulty(machine_anomaly_gain=(("fan", 0.4),))
    assert np.array_equal(render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), difficulty=weak, **fan_kw),
                          render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), **{**fan_kw, "strength": 0.4}))
    assert not np.allclose(render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), difficulty=weak, **fan_kw),
                           render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), **fan_kw))
    normal_kw = {**fan_kw, "anomaly": None}
    assert np.array_equal(render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), difficulty=weak, **normal_kw),
                          render_clip("fan", "01", fan, rng=keyed_rng("clip", 2), **normal_kw))
    assert np.array_equal(render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), difficulty=weak, **kw),
                          render_clip("valve", "00", attrs, rng=keyed_rng("clip", 1), **kw))


def test_obvious_anomalies_differ_from_normal_clips(tmp_path):
    """The sound models themselves (without the real-sound factors): plain anomalies are plain."""
    preset = _small(machines=("fan", "valve", "gearbox"), seconds=4.0, source_train=10, target_train=0,
                    test_per_group=8, anomaly_strength=(0.9, 1.0), snr_db=(6.0, 12.0), difficulty=Difficulty())
    root = tmp_path / "obvious"
    generate(preset, root, seed=0, workers=2)
    found = discover_clips(root / "dev_data")
    stats = {c.path: _band_stats(sf.read(str(root / "dev_data" / c.path), dtype="float32")[0]) for c in found.clips}
    for machine in preset.machines:
        clips = [c for c in found.clips if c.machine == machine and c.domain == "source"]
        ref = np.stack([stats[c.path] for c in clips if c.split == "train"])
        mu, sd = ref.mean(0), ref.std(0) + 0.5
        score = {c.path: float(np.mean(((stats[c.path] - mu) / sd) ** 2)) for c in clips if c.split == "test"}
        normal = [score[c.path] for c in clips if c.split == "test" and c.label == "normal"]
        anomalous = [score[c.path] for c in clips if c.split == "test" and c.label == "anomaly"]
        assert np.mean(anomalous) > np.mean(normal) and _auc(normal, anomalous) >= 0.75, machine


# ----------------------------------------------------------------------------- eval data


def test_eval_layout_and_ground_truth(tiny):
    root, _ = tiny
    found = discover_clips(root / "eval_data")
    assert found.unparsed == []
    for machine in TINY.machines:
        for section in TINY.eval_sections:
            test = sorted(Path(c.path).name for c in found.clips
                          if c.machine == machine and c.section == section and c.split == "test")
            assert test == [f"section_{section}_test_{i:04d}.wav" for i in range(4 * TINY.test_per_group)]
            assert all(c.label is None and c.domain is None for c in found.clips if c.split == "test")
            train = [c for c in found.clips if c.machine == machine and c.section == section and c.split == "train"]
            assert len(train) == TINY.source_train + TINY.target_train and all(c.is_labelled for c in train)
            gt = root / "ground_truth_data" / ground_truth_file_name(machine, section)
            names, y_true, y_domain = read_ground_truth(gt)
            assert names == test and y_domain is not None
            assert int(y_true.sum()) == int(y_domain.sum()) == 2 * TINY.test_per_group
            assert int((y_true & y_domain).sum()) == TINY.test_per_group
            assert 0 < y_true[: len(y_true) // 2].sum() < len(y_true) // 2  # shuffled: index reveals nothing


# ----------------------------------------------------------------------------- data drops


@pytest.fixture
def tree(tiny, tmp_path):
    root, _ = tiny
    dst = tmp_path / "tree"
    for sub in ("dev_data", "eval_data"):
        shutil.copytree(root / sub, dst / sub)
    return dst


def _drop(root: Path, kind: str, count: int, seed: int = 5):
    before = _hashes(root / "dev_data", "*.wav")
    added = add_drop(root, kind, count=count, seed=seed)
    after = _hashes(root / "dev_data", "*.wav")
    assert {k: after[k] for k in before} == before  # no existing clip changed
    new = {str(root / "dev_data" / k) for k in set(after) - set(before)}
    wavs = [p for p in added if p.endswith(".wav")]
    assert set(wavs) == new and len(wavs) == len(new)
    found = discover_clips(root / "dev_data")
    assert found.unparsed == []
    rel = {str(Path(p).relative_to(root / "dev_data")) for p in wavs}
    assert rel <= set(found.attributes)  # the new clips have attribute rows
    assert all(p.endswith(".csv") for p in set(added) - set(wavs))
    return [c for c in found.clips if c.path in rel], found


def test_drop_target(tree, tmp_path):
    new, found = _drop(tree, "target", count=2)
    assert len(new) == 2 * len(TINY.machines) * len(TINY.dev_sections)
    for c in new:
        assert (c.split, c.domain, c.label) == ("train", "target", "normal")
        assert c.index in (TINY.target_train, TINY.target_train + 1)  # indices continue
        old = {o.attribute for o in found.clips if o.machine == c.machine and o.section == c.section
               and o.domain == "target" and o.split == "train" and o not in new}
        assert c.attribute in old
    twin = tmp_path / "twin"
    shutil.copytree(tree / "eval_data", twin / "eval_data")
    shutil.copytree(tree / "dev_data", twin / "dev_data",
                    ignore=lambda d, names: [n for n in names if "_target_train_" in n and
                                             int(n.split("_")[5]) >= TINY.target_train])
    # the twin lacks the dropped clips but has the appended csv rows: the drop writes the same bytes
    add_drop(twin, "target", count=2, seed=5)
    assert _hashes(twin / "dev_data", "*.wav") == _hashes(tree / "dev_data", "*.wav")


def test_a_drop_sounds_like_the_tree_it_joins(tmp_path):
    """A tree that records its settings gets drops with its anomaly strength, machine-to-background
    ratio, target offset and difficulty: each dropped clip is the clip of that job and settings."""
    from pipelines.synth.generate import ClipJob, write_job

    made = _small(anomaly_strength=(0.6, 0.7), snr_db=(20.0, 25.0), target_snr_offset_db=-8.0,
                  difficulty=dataclasses.replace(REAL_SOUND, events_per_s=1.0))
    root = tmp_path / "d"
    generate(made, root, seed=1, workers=1)
    added = [Path(p) for p in add_drop(root, "target", count=1, seed=5) if p.endswith(".wav")]
    assert len(added) == 1
    clip = [c for c in discover_clips(root / "dev_data").clips if c.path == f"valve/train/{added[0].name}"][0]
    attrs = _clip_attrs(clip, discover_clips(root / "dev_data").attributes)
    expected = ClipJob(path=str(tmp_path / "expected.wav"), machine="valve", section="00", attrs=attrs, anomaly=None,
                       strength=(0.6, 0.7), snr_db=(12.0, 17.0), n=int(made.seconds * SR), seed=5,
                       key=("dev", "valve", "00", "train", "target", "normal", str(clip.index)),
                       difficulty=made.difficulty)
    write_job(expected)
    assert added[0].read_bytes() == Path(expected.path).read_bytes()
    defaults = dataclasses.replace(expected, path=str(tmp_path / "defaults.wav"), strength=DEFAULT_STRENGTH,
                                   snr_db=PRESETS["demo"].snr_db, difficulty=REAL_SOUND)
    write_job(defaults)
    assert added[0].read_bytes() != Path(defaults.path).read_bytes()  # what a drop wrote before the record


def test_drop_attribute(tree):
    new, found = _drop(tree, "attribute", count=3)
    assert len(new) == 3 * len(TINY.machines) * len(TINY.dev_sections)
    for c in new:
        assert (c.split, c.domain) == ("train", "target")
        existing = {o.attribute for o in found.clips if o.machine == c.machine and o.section == c.section
                    and o not in new}
        assert c.attribute not in existing


def test_drop_section(tree):
    new, _ = _drop(tree, "section", count=4)
    by_machine = defaultdict(list)
    for c in new:
        by_machine[c.machine].append(c)
    assert set(by_machine) == set(TINY.machines)
    for clips in by_machine.values():
        assert {c.section for c in clips} == {"04"}  # after dev 00, 01 and eval 03
        kinds = Counter((c.split, c.domain, c.label) for c in clips)
        assert kinds[("train", "source", "normal")] == 4 and kinds[("train", "target", "normal")] == 1
        assert all(kinds[("test", d, lab)] == 1 for d in ("source", "target") for lab in ("normal", "anomaly"))


def test_drop_rejects_bad_input(tree, tmp_path):
    with pytest.raises(ValueError):
        add_drop(tree, "bogus", count=1)
    with pytest.raises(FileNotFoundError):
        add_drop(tmp_path / "nothing", "target", count=1)


def test_next_value_continues_the_style():
    assert next_value(["28V", "31V", "37V", "40V"]) == "43V"
    assert next_value(["00", "01", "02", "03"]) == "04"
    assert next_value(["1.0", "1.5", "2.0"]) == "2.5"
    assert next_value(["L1", "L2", "L3", "L4"]) == "L5"
    assert next_value(["A", "B", "C", "D"]) == "E"
    assert next_value(["open", "closed"]) == "x1"


# ----------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    out = tmp_path / "cli"
    rc = main(["synth", "--preset", "tiny", "--out", str(out), "--machines", "valve", "--sections", "00",
               "--seconds", "1", "--source-train", "2", "--target-train", "1", "--test-per-group", "1",
               "--anomaly-strength", "0.5", "0.5", "--snr", "0", "0", "--workers", "1", "--eval"])
    assert rc == 0 and "14 clips written" in capsys.readouterr().out
    assert (out / "eval_data/valve/test/section_03_test_0003.wav").is_file()
    assert main(["synth", "--out", str(out), "--drop", "target", "--count", "1", "--workers", "1"]) == 0
    assert (out / "dev_data/valve/train/section_00_target_train_normal_0001_pat_02.wav").is_file()
    assert main(["synth", "--out", str(out), "--machines", "lathe"]) == 2


def test_a_tree_generated_with_other_settings_is_refused(tmp_path, caplog):
    """The generator keeps clips that exist: a tree made with other settings (or by a generator
    version whose settings differ) would silently mix two datasets, so it is refused."""
    from pipelines.synth.generate import GENERATION_RECORD, check_generation_record

    root = tmp_path / "d"
    generate(_small(), root, seed=3, workers=1)
    before = _hashes(root)
    assert (root / GENERATION_RECORD).is_file()
    assert generate(_small(), root, seed=3, workers=1).written == 0  # the same settings: resumed
    quieter = _small(difficulty=Difficulty(machine_snr_db=(("valve", -12.0),)))
    for preset, seed in ((quieter, 3), (_small(), 4)):
        with pytest.raises(ValueError, match="generated with other settings"):
            generate(preset, root, seed=seed, workers=1)
    assert _hashes(root) == before  # nothing written over
    (root / GENERATION_RECORD).unlink()  # a tree from before the record: kept, with a warning
    with caplog.at_level("WARNING"):
        generate(quieter, root, seed=3, workers=1)
    assert "no synth.json" in caplog.text
    assert not (root / GENERATION_RECORD).exists()  # its old clips are not blessed as the new settings'


def test_the_record_is_written_before_the_clips(tmp_path, monkeypatch):
    """An interrupted first generation leaves a record, so resuming it with other settings is refused."""
    from pipelines.synth import generate as G

    def interrupted(jobs, workers=None, desc=""):
        raise KeyboardInterrupt
    monkeypatch.setattr(G, "run_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(_small(), tmp_path / "d", seed=3, workers=1)
    monkeypatch.undo()
    assert json.loads((tmp_path / "d" / "synth.json").read_text())["seed"] == 3
    with pytest.raises(ValueError, match="generated with other settings"):
        generate(_small(), tmp_path / "d", seed=4, workers=1)
    assert generate(_small(), tmp_path / "d", seed=3, workers=1).written > 0  # the same settings resume


def test_a_record_holds_only_the_datasets_own_machine_types():
    """A per-machine-type setting of a type the dataset lacks does not change its record, and the
    record reads back as the preset it was made from."""
    from pipelines.synth.generate import preset_from_settings, preset_settings

    fan = _small(machines=("fan",))
    other = dataclasses.replace(fan, difficulty=dataclasses.replace(REAL_SOUND, machine_snr_db=(("valve", -3.0),)))
    assert preset_settings(fan) == preset_settings(other)
    assert preset_settings(fan)["difficulty"]["machine_snr_db"] == []
    valve = _small(difficulty=dataclasses.replace(REAL_SOUND, machine_snr_db=(("fan", 2.0), ("valve", -12.0))))
    assert preset_settings(valve)["difficulty"]["machine_snr_db"] == [["valve", -12.0]]
    # the anomaly gain likewise; a record without one reads as one made before the setting existed
    gained = dataclasses.replace(REAL_SOUND, machine_anomaly_gain=(("fan", 0.3), ("valve", 0.5)))
    assert preset_settings(dataclasses.replace(fan, difficulty=gained))["difficulty"]["machine_anomaly_gain"] == [["fan", 0.3]]
    assert "machine_anomaly_gain" not in preset_settings(_small(difficulty=dataclasses.replace(
        REAL_SOUND, machine_anomaly_gain=(("fan", 0.3),))))["difficulty"]
    assert preset_settings(_small(difficulty=gained))["difficulty"]["machine_anomaly_gain"] == [["valve", 0.5]]
    for gains, offset in (((), -5.0), ((("valve", 0.5),), 0.0)):  # a preset whose settings are all its own types'
        own_kinds = (("valve", ("resonance",)),)
        preset = _small(target_snr_offset_db=offset, difficulty=dataclasses.replace(
            REAL_SOUND, machine_anomaly_gain=gains, anomaly_kinds=own_kinds))
        assert preset_from_settings(json.loads(json.dumps(preset_settings(preset)))) == preset


def test_the_pipeline_refuses_a_synthetic_tree_of_other_settings(tmp_path):
    """`asd run` on a data root the generator filled with another seed (or another generator
    version's settings) stops with one line instead of scoring the wrong dataset."""
    from pipelines.config import load_config
    from pipelines.errors import UserError
    from pipelines.operations.run import ensure_data

    root = tmp_path / "data"
    cfg = load_config("tiny", [f"data.root={root}", "data.synth_seed=1"])
    assert ensure_data(cfg) == root and (root / "synth.json").is_file()  # generated, recorded
    assert ensure_data(cfg) == root  # the same settings: used as it is
    with pytest.raises(UserError, match="generated with other settings"):
        ensure_data(load_config("tiny", [f"data.root={root}", "data.synth_seed=2"]))


# ----------------------------------------------------------------------------- the generic anomalies


def _line_peaks(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Strongest frequency of ``x`` (Hz), and the spectrum's magnitudes and frequencies."""
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(f[np.argmax(mag)]), mag, f


def test_a_tone_line_is_one_steady_line_of_the_units_own():
    n = 4 * SR
    lines = {k: tone_line(Ctx(n, np.random.default_rng(k)), "fan", "00", 0.5, 0.8, -12.0) for k in range(3)}
    for x in lines.values():  # the level: db x strength against the rms given
        assert np.sqrt(np.mean(np.square(x, dtype=np.float64))) == pytest.approx(0.5 * 0.8 * 10 ** (-12 / 20), rel=1e-3)
    peaks = [_line_peaks(x)[0] for x in lines.values()]
    assert 400 <= peaks[0] <= 4000 and max(peaks) - min(peaks) < 0.01 * peaks[0]  # one frequency per unit
    other = _line_peaks(tone_line(Ctx(n, np.random.default_rng(0)), "fan", "01", 0.5, 0.8, -12.0))[0]
    assert abs(other - peaks[0]) > 5.0  # another unit, another line
    top, mag, f = _line_peaks(lines[0])
    assert mag[np.abs(f - top) > 6.0].max() < 0.05 * mag.max()  # steady and narrow: no sidebands, nothing else


def test_anomaly_kinds_replace_one_types_kinds_and_reach_the_record():
    from pipelines.synth.generate import plan_dataset, preset_from_settings, preset_settings

    d = dataclasses.replace(REAL_SOUND, anomaly_kinds=(("fan", ("tone-line",)), ("gearbox", ("wear", "tone-line"))))
    preset = _small(machines=("fan", "valve"), test_per_group=12, difficulty=d)
    kinds = defaultdict(set)
    for job in plan_dataset(preset, Path("/nonexistent"), 0, eval_data=True).jobs:  # dev and eval clips
        if job.key[5] == "anomaly":
            kinds[job.machine].add(job.anomaly)
    assert kinds["fan"] == {"tone-line"}
    assert kinds["valve"] == set(MACHINES["valve"].anomalies)
    record = preset_settings(preset)["difficulty"]
    assert record["anomaly_kinds"] == [["fan", ["tone-line"]]]  # the gearbox is not in the dataset
    back = preset_from_settings(json.loads(json.dumps(preset_settings(preset))))
    assert back.difficulty.anomaly_kinds == (("fan", ("tone-line",)),)
    assert preset_settings(back) == preset_settings(preset)
    plain = preset_settings(_small(difficulty=Difficulty()))["difficulty"]
    for key in ("anomaly_kinds", "tone_line_db", "resonance_db", "resonance_q"):
        assert key not in plain  # at Difficulty's defaults: as before the setting existed
    default = preset_settings(_small())["difficulty"]  # the real-sound default: the valve's one resonance
    assert (default["anomaly_kinds"], default["resonance_q"], default["resonance_db"]) == ([["valve", ["resonance"]]], 16, 6)
    for wrong in ((), ("hum",)):  # planning stops on kinds a type cannot draw, naming the ones it can
        bad = _small(machines=("fan",), difficulty=dataclasses.replace(REAL_SOUND, anomaly_kinds=(("fan", wrong),)))
        with pytest.raises(ValueError, match="fan cannot draw.*blade-rub.*tone-line"):
            plan_dataset(bad, Path("/nonexistent"), 0, eval_data=False)
    with pytest.raises(ValueError, match="tone-line"):
        render_clip("fan", "00", {}, anomaly="hum", strength=1.0, snr_db=6.0, rng=np.random.default_rng(0), n=SR)
    # rendered: the line stands out of the machine's spectrum at the unit's frequency; not in a normal clip
    at = _line_peaks(tone_line(Ctx(2 * SR, np.random.default_rng(0)), "fan", "00", 1.0, 1.0, 0.0))[0]
    attrs = MACHINES["fan"].spec("00").values("source")[0]
    for anomaly, stands_out in (("tone-line", True), (None, False)):
        clip = render_clip("fan", "00", attrs, anomaly=anomaly, strength=1.0, snr_db=30.0,
                           rng=np.random.default_rng(0), n=2 * SR)
        _, mag, f = _line_peaks(clip)
        local = mag[np.abs(f - at) < 3.0].max() / np.median(mag[np.abs(f - at) < 200.0])
        assert (local > 8.0) == stands_out, local  # measured: 12-17 with the line, 2.5-3.3 without


def test_a_resonance_change_is_one_peak_of_the_gain_asked_for():
    n = 2 * SR
    x = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    f = np.fft.rfftfreq(n, 1 / SR)
    centres = []
    for k in range(4):
        y = resonance_change(Ctx(n, np.random.default_rng(k)), x, 0.5, 6.0)
        ratio = np.abs(np.fft.rfft(y.astype(np.float64))) / np.abs(np.fft.rfft(x.astype(np.float64)))
        fc = float(f[np.argmax(ratio)])
        centres.append(fc)
        assert 500 <= fc <= 4000
        assert 20 * np.log10(ratio.max()) == pytest.approx(3.0, abs=0.01)  # db x strength at the centre
        # Q 2: half the peak's excess (in amplitude) fc / 2 either side of the centre
        for edge in (0.5 * fc, 1.5 * fc):
            assert ratio[np.argmin(np.abs(f - edge))] - 1 == pytest.approx((10 ** (3 / 20) - 1) / 2, rel=0.02)
    assert len({round(c) for c in centres}) == 4  # a centre per clip
    # another quality: the same centre (the same draw), half the excess fc / 8 either side
    y = resonance_change(Ctx(n, np.random.default_rng(0)), x, 0.5, 6.0, 8.0)
    ratio = np.abs(np.fft.rfft(y.astype(np.float64))) / np.abs(np.fft.rfft(x.astype(np.float64)))
    assert float(f[np.argmax(ratio)]) == pytest.approx(centres[0], abs=1.0)  # 0.5 Hz bins
    for edge in (centres[0] * (1 - 1 / 8), centres[0] * (1 + 1 / 8)):
        assert ratio[np.argmin(np.abs(f - edge))] - 1 == pytest.approx((10 ** (3 / 20) - 1) / 2, rel=0.02)
    clip = render_clip("fan", "00", MACHINES["fan"].spec("00").values("source")[0], anomaly="resonance",
                       strength=1.0, snr_db=6.0, rng=np.random.default_rng(0), n=SR)
    assert clip.dtype == np.float32 and np.isfinite(clip).all() and len(clip) == SR
