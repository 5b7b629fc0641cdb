"""Tests of DCASE clip-name parsing and tree discovery (asd/metadata.py)."""

from __future__ import annotations

import random

import pytest

from asd.metadata import (
    ClipMeta,
    ClipNameError,
    attribute_class_ids,
    discover_clips,
    parse_clip_name,
    read_attributes_csv,
)


def _split_name(name: str) -> dict:
    """Independent reference: split a labelled DCASE name on '_' as the task description says
    (6 fields, then everything else is the attribute string)."""
    stem = name[: -len(".wav")]
    parts = stem.split("_")
    assert parts[0] == "section"
    return {"section": parts[1], "domain": parts[2], "split": parts[3], "label": parts[4],
            "index": int(parts[5]), "attribute": "_".join(parts[6:])}


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("name", [
    "section_00_source_train_normal_0000_m-n_W.wav",
    "section_01_target_train_normal_0009_vel_8_loc_B.wav",
    "section_02_source_test_anomaly_0049_car_A1_spd_28V_mic_1_noise_1.wav",
    "section_00_target_test_normal_0003_pat_03.wav",
    "section_00_source_train_normal_0123_noAttribute.wav",
])
def test_parse_labelled_names_match_field_split(name):
    ref = _split_name(name)
    meta = parse_clip_name(name, "fan", ref["split"])
    assert meta.section == ref["section"]
    assert meta.domain == ref["domain"]
    assert meta.split == ref["split"]
    assert meta.label == ref["label"]
    assert meta.index == ref["index"]
    assert meta.attribute == ref["attribute"]
    assert meta.machine == "fan"
    assert meta.path == f"fan/{ref['split']}/{name}"
    assert meta.is_labelled
    assert meta.attribute_class == ("fan", ref["section"], ref["domain"], ref["attribute"])


def test_parse_without_split_dir_uses_name():
    meta = parse_clip_name("section_00_source_test_anomaly_0007_a_b.wav", "valve")
    assert meta.split == "test" and meta.path == "valve/test/section_00_source_test_anomaly_0007_a_b.wav"


def test_attribute_with_many_underscores_is_kept_whole():
    meta = parse_clip_name("section_00_source_train_normal_0000_a_1_b_2_c_3_d.wav", "ToyCar", "train")
    assert meta.attribute == "a_1_b_2_c_3_d"


@pytest.mark.parametrize("name", [
    "section_00_source_train_normal_0000.wav",
    "section_00_source_train_normal_0000_.wav",
])
def test_empty_attribute(name):
    meta = parse_clip_name(name, "gearbox", "train")
    assert meta.attribute == ""
    assert meta.attribute_class == ("gearbox", "00", "source", "")
    assert meta.index == 0


def test_eval_test_name_has_no_labels():
    meta = parse_clip_name("section_03_test_0000.wav", "bearing", "test")
    assert meta == ClipMeta(path="bearing/test/section_03_test_0000.wav", machine="bearing",
                            section="03", split="test", domain=None, label=None, index=0,
                            attribute=None)
    assert not meta.is_labelled
    assert meta.attribute_class is None
    meta = parse_clip_name("section_05_test_0199.wav", "bearing")
    assert (meta.section, meta.index, meta.split) == ("05", 199, "test")


def test_to_dict_round_trip():
    meta = parse_clip_name("section_00_source_train_normal_0004_x_1.wav", "fan", "train")
    assert ClipMeta(**meta.to_dict()) == meta


@pytest.mark.parametrize("name", [
    "section_00_source_train_normal_0000_a.mp3",         # not a WAV or FLAC clip
    "sec_00_source_train_normal_0000_a.wav",             # wrong prefix
    "section_00_sauce_train_normal_0000_a.wav",          # unknown domain
    "section_00_source_valid_normal_0000_a.wav",         # unknown split
    "section_00_source_train_weird_0000_a.wav",          # unknown label
    "section_00_source_train_normal_abcd_a.wav",         # non-numeric index
    "section_00_source_train_normal.wav",                # too few fields
    "section_03_test.wav",                               # eval name without index
    "section_03_test_0000_extra.wav",                    # eval name with extra fields
    "noise.wav",
])
def test_unparseable_names_raise_naming_the_file(name):
    with pytest.raises(ClipNameError) as err:
        parse_clip_name(name, "fan")
    assert name in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name, folder", [
    ("section_00_source_train_normal_0000_a.wav", "test"),
    ("section_00_source_test_normal_0000_a.wav", "train"),
    ("section_03_test_0000.wav", "train"),
])
def test_name_and_folder_split_mismatch_raises(name, folder):
    with pytest.raises(ClipNameError) as err:
        parse_clip_name(name, "fan", folder)
    assert name in str(err.value)


# ----------------------------------------------------------------------------- attributes csv

def test_read_attributes_csv_pairs(tmp_path):
    path = tmp_path / "attributes_00.csv"
    path.write_text(
        "file_name,d1p,d1v,d2p,d2v\n"
        "fan/train/section_00_source_train_normal_0000_m-n_W.wav,m-n,W,,\n"
        "fan/test/section_00_source_test_anomaly_0001_m-n_X_p_1.wav,m-n,X,p,1\n"
        "\n"
        "fan/train/section_00_target_train_normal_0000_noAttribute.wav\n"
    )
    got = read_attributes_csv(path)
    assert got == {
        "fan/train/section_00_source_train_normal_0000_m-n_W.wav": {"m-n": "W"},
        "fan/test/section_00_source_test_anomaly_0001_m-n_X_p_1.wav": {"m-n": "X", "p": "1"},
        "fan/train/section_00_target_train_normal_0000_noAttribute.wav": {},
    }


def test_read_attributes_csv_odd_cells_raise(tmp_path):
    path = tmp_path / "attributes_01.csv"
    path.write_text("file_name,d1p,d1v\nfan/train/x.wav,m-n,W,extra\n")
    with pytest.raises(ValueError) as err:
        read_attributes_csv(path)
    assert str(path) in str(err.value)
    assert ":2" in str(err.value)


@pytest.mark.parametrize("text", ["", "name,d1p,d1v\na.wav,p,v\n", "\n"])
def test_read_attributes_csv_bad_header_raises(tmp_path, text):
    path = tmp_path / "attributes_02.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        read_attributes_csv(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- discovery

def _build_tree(root, rng):
    """A small dev-style tree with a few broken names; returns the expected parse of every wav."""
    good, bad = [], []
    for machine in ("valve", "ToyCar", "fan"):
        for sec in ("00", "01"):
            for i in range(3):
                good.append(f"{machine}/train/section_{sec}_source_train_normal_{i:04d}_v_{i % 2}_x.wav")
            good.append(f"{machine}/train/section_{sec}_target_train_normal_0000_v_9.wav")
            for label in ("normal", "anomaly"):
                good.append(f"{machine}/test/section_{sec}_target_test_{label}_0001_v_9.wav")
        bad.append(f"{machine}/train/garbage_{machine}.wav")
        bad.append(f"{machine}/test/section_00_source_train_normal_0099_v_0.wav")  # wrong folder
    good.append("fan/test/section_03_test_0000.wav")
    names = good + bad
    rng.shuffle(names)  # creation order must not matter
    for rel in names:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"RIFF")  # discovery never decodes
    # Things that are not clips at all.
    (root / "fan" / "train" / "notes.txt").write_text("x")
    (root / "fan" / "train" / "subdir.wav").mkdir()
    (root / "README.md").write_text("x")
    (root / "fan" / "attributes_00.csv").write_text(
        "file_name,d1p,d1v\nfan/train/section_00_source_train_normal_0000_v_0_x.wav,v,0\n")
    (root / "valve" / "attributes_01.csv").write_text(
        "file_name,d1p,d1v\nvalve/train/section_01_target_train_normal_0000_v_9.wav,v,9\n")
    return good, bad


def test_discover_clips_counts_order_and_attributes(tmp_path):
    good, bad = _build_tree(tmp_path, random.Random(0))
    all_wavs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.wav"))  # the folder too
    disc = discover_clips(tmp_path)
    assert len(disc.clips) + len(disc.unparsed) == len(all_wavs) == len(good) + len(bad) + 1
    assert sorted(c.path for c in disc.clips) == sorted(good)
    assert sorted(rel for rel, _ in disc.unparsed) == sorted(bad + ["fan/train/subdir.wav"])
    for rel, reason in disc.unparsed:
        assert (rel.split("/")[-1] in reason) != (reason == "not a regular file")
    # Sections with clips but no attributes_XX.csv are named, one warning per machine.
    missing = {w.split(": no attributes")[0].split("/")[-1]: w.split("section(s) ")[1].split(":")[0]
               for w in disc.warnings}
    assert missing == {"ToyCar": "00, 01", "fan": "01, 03", "valve": "00"}
    # Deterministic order: sorted by (machine, split, file name); independent of creation order.
    split_rank = {"train": 0, "test": 1}
    expected_order = sorted(good, key=lambda r: (r.split("/")[0], split_rank[r.split("/")[1]], r.split("/")[2]))
    assert [c.path for c in disc.clips] == expected_order
    # Every clip's fields agree with the independent split.
    for c in disc.clips:
        name = c.path.split("/")[-1]
        if c.is_labelled:
            ref = _split_name(name)
            assert (c.section, c.domain, c.split, c.label, c.index, c.attribute) == (
                ref["section"], ref["domain"], ref["split"], ref["label"], ref["index"], ref["attribute"])
        assert c.machine == c.path.split("/")[0]
    assert disc.attributes == {
        "fan/train/section_00_source_train_normal_0000_v_0_x.wav": {"v": "0"},
        "valve/train/section_01_target_train_normal_0000_v_9.wav": {"v": "9"},
    }
    # The csv keys are the clips' relative paths.
    paths = {c.path for c in disc.clips}
    assert set(disc.attributes) <= paths


def test_discover_clips_is_deterministic_across_trees(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _build_tree(a, random.Random(1))
    _build_tree(b, random.Random(2))
    da, db = discover_clips(a), discover_clips(b)
    assert da.clips == db.clips
    assert da.unparsed == db.unparsed


def test_discover_clips_split_filter_and_missing_root(tmp_path):
    good, _ = _build_tree(tmp_path, random.Random(0))
    disc = discover_clips(tmp_path, splits=("train",))
    assert {c.split for c in disc.clips} == {"train"}
    assert sorted(c.path for c in disc.clips) == sorted(g for g in good if "/train/" in g)
    with pytest.raises(FileNotFoundError):
        discover_clips(tmp_path / "nope")


def test_attribute_class_ids_dense_sorted():
    names = [
        ("fan", "section_01_source_train_normal_0000_b.wav"),
        ("fan", "section_00_target_train_normal_0000_a.wav"),
        ("fan", "section_00_source_train_normal_0000_a.wav"),
        ("fan", "section_00_source_train_normal_0001_a.wav"),
        ("ToyCar", "section_00_source_train_normal_0000.wav"),
        ("fan", "section_03_test_0000.wav"),  # unlabelled: no class
    ]
    clips = [parse_clip_name(n, m) for m, n in names]
    ids = attribute_class_ids(clips)
    expected_keys = [("ToyCar", "00", "source", ""), ("fan", "00", "source", "a"),
                     ("fan", "00", "target", "a"), ("fan", "01", "source", "b")]
    assert list(ids) == expected_keys
    assert list(ids.values()) == list(range(4))
    assert attribute_class_ids(list(reversed(clips))) == ids
    assert attribute_class_ids([]) == {}


# ----------------------------------------------------------------------------- real clips

def test_real_dcase_clips_parse(real_audio_dir):
    wavs = sorted(p.name for p in real_audio_dir.glob("*.wav"))
    assert len(wavs) == 8
    expected_attr = {"source": {"pat_00", "pat_01"}, "target": {"pat_02", "pat_03"}}
    seen = set()
    for name in wavs:
        meta = parse_clip_name(name, "valve", "test")
        ref = _split_name(name)
        assert meta.section == "00" and meta.split == "test"
        assert meta.domain == ref["domain"] and meta.label == ref["label"]
        assert meta.attribute in expected_attr[meta.domain]
        seen.add((meta.domain, meta.label, meta.attribute))
    # one clip for each (domain, label, attribute) pair
    assert seen == {(d, lab, a) for d in expected_attr for lab in ("normal", "anomaly") for a in expected_attr[d]}


# ----------------------------------------------------------------------------- every year's naming
@pytest.mark.parametrize("name, folder, want", [
    # 2020: machine ids as sections, no split in the name, no domains (source), 8-digit numbers
    ("normal_id_00_00000000.wav", "train", ("train", "00", "source", "normal", 0, "")),
    ("anomaly_id_04_00000123.wav", "test", ("test", "04", "source", "anomaly", 123, "")),
    ("id_01_00000007.wav", "test", ("test", "01", None, None, 7, None)),
    # 2021: test clips in source_test/ and target_test/, test names without attributes
    ("section_00_source_test_normal_0000.wav", "source_test", ("test", "00", "source", "normal", 0, "")),
    ("section_02_target_test_anomaly_0099.wav", "target_test", ("test", "02", "target", "anomaly", 99, "")),
    ("section_03_source_test_0000.wav", "source_test", ("test", "03", None, None, 0, None)),
    # 2023-2025: multi-attribute names from 0001, FLAC as well as WAV
    ("section_00_source_train_normal_0001_car_A1_spd_28V_mic_1.flac", "train",
     ("train", "00", "source", "normal", 1, "car_A1_spd_28V_mic_1")),
    ("section_00_test_0001.FLAC", "test", ("test", "00", None, None, 1, None)),
])
def test_every_years_names_parse(name, folder, want):
    meta = parse_clip_name(name, "m", folder)
    assert (meta.split, meta.section, meta.domain, meta.label, meta.index, meta.attribute) == want
    assert meta.path == f"m/{folder}/{name}"


@pytest.mark.parametrize("name, folder", [
    ("section_00_target_test_normal_0000.wav", "source_test"),  # domain disagrees with the 2021 folder
    ("section_03_source_test_0000.wav", "target_test"),
    ("section_00_source_train_normal_0000.wav", "source_test"),  # a train clip in a test folder
    ("normal_id_00_00000000.wav", "valid"),                      # not a split folder
])
def test_folder_disagreements_raise(name, folder):
    with pytest.raises(ClipNameError, match=name):
        parse_clip_name(name, "m", folder)
