"""Ray Data extraction into the Parquet store, on the `tiny` synthetic preset and the real clips:
row counts, schema, feature values against the library function, incremental re-runs,
quarantine, the eval layout, and the reader API."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from asd.audio import load_audio
from asd.features import FeatureConfig, log_mel
from pipelines import store as S
from pipelines.stages.extract import ExtractError, extract, pending_clips

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def _reference(path: Path, fcfg: FeatureConfig) -> torch.Tensor:
    wave, _ = load_audio(path, fcfg.sample_rate)
    return log_mel(wave, fcfg)


def _wavs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.wav"))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from pipelines.synth.generate import PRESETS, generate

    root = tmp_path_factory.mktemp("tiny") / "data"
    preset = dataclasses.replace(PRESETS["tiny"], machines=("valve",))
    generate(preset, root, seed=0, workers=2, eval_data=True)
    return root


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny tree that a test may change."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def test_rows_schema_and_values_match_the_library(data, tmp_path):
    fcfg = FeatureConfig()
    summary = extract(data, tmp_path / "store", fcfg, dtype="float32", batch_size=8)
    wavs = _wavs(data)
    assert summary.discovered == len(wavs) == summary.extracted
    assert summary.already_present == summary.quarantined == 0

    manifest = S.store_manifest(tmp_path / "store")
    assert sorted(manifest["path"]) == sorted(str(p.relative_to(data)) for p in wavs)
    for shard in S.shard_files(tmp_path / "store"):
        assert pq.read_schema(shard).remove_metadata() == S.shard_schema("float32")

    train = S.load_split(tmp_path / "store", "train")
    test = S.load_split(tmp_path / "store", "test")
    assert len(train) == len([p for p in wavs if p.parent.name == "train"])
    assert len(test) == len([p for p in wavs if p.parent.name == "test"])
    assert list(train.meta["path"]) == sorted(train.meta["path"])
    for table in (train, test):
        for i in range(0, len(table), 7):
            row = table.meta.iloc[i]
            ref = _reference(data / row["path"], fcfg)
            assert table.features[i].shape == ref.shape == (row["n_mels"], row["n_frames"])
            torch.testing.assert_close(table.features[i], ref, rtol=0, atol=1e-6)
    # labels and attribute classes come from the names
    row = train.meta.iloc[0]
    name = Path(row["path"]).name
    assert name.startswith(f"section_{row['section']}_{row['domain']}_train_normal_")
    assert row["attribute_class"] == f"valve/{row['section']}/{row['domain']}/{row['attribute']}"
    ids = train.meta.groupby("attribute_class")["attribute_class_id"].unique()
    assert sorted(int(v[0]) for v in ids) == list(range(len(ids)))


def test_float16_store_rounds_like_numpy(data, tmp_path):
    fcfg = FeatureConfig()
    extract(data, tmp_path / "store", fcfg, dtype="float16", batch_size=64)
    table = S.load_split(tmp_path / "store", "test", datasets=("dev_data",))
    ref = _reference(data / table.meta["path"][0], fcfg).numpy()
    np.testing.assert_array_equal(table.features[0].numpy(), ref.astype(np.float16).astype(np.float32))


def test_rerun_adds_nothing_and_changes_nothing(data, tmp_path):
    store = tmp_path / "store"
    first = extract(data, store, batch_size=16)
    before = _tree_digest(store / f"v-{first.feature_version}")
    again = extract(data, store, batch_size=16)
    assert (again.extracted, again.already_present, again.quarantined) == (0, first.discovered, 0)
    assert _tree_digest(store / f"v-{first.feature_version}") == before
    assert pending_clips(data, store) == []


def test_added_changed_and_deleted_files(data, tmp_path):
    store = tmp_path / "store"
    first = extract(data, store, batch_size=16)
    src = sorted((data / "dev_data" / "valve" / "train").glob("*source*.wav"))
    added = src[0].with_name(src[0].name.replace("_normal_", "_normal_9"))
    shutil.copy(src[0], added)
    assert pending_clips(data, store) == [str(added.relative_to(data))]
    one = extract(data, store, batch_size=16)
    assert (one.extracted, one.already_present) == (1, first.discovered)
    assert len(S.store_manifest(store)) == first.discovered + 1

    # changed content -> the old row is replaced, never duplicated; deleted file -> row removed
    x, sr = sf.read(src[1], dtype="float32")
    sf.write(src[1], 0.5 * x, sr, subtype="PCM_16")
    src[2].unlink()
    two = extract(data, store, batch_size=16)
    assert (two.extracted, two.removed) == (1, 2)
    manifest = S.store_manifest(store)
    assert len(manifest) == first.discovered and manifest["path"].is_unique
    train = S.load_split(store, "train")
    assert train.meta["path"].is_unique
    assert len(train) == len([p for p in _wavs(data) if p.parent.name == "train"])
    i = train.meta.index[train.meta["path"] == str(src[1].relative_to(data))][0]
    torch.testing.assert_close(train.features[i], _reference(src[1], FeatureConfig()).half().float())
    # every shard file on disk is one the manifest names (stale shards were rewritten, not left)
    vdir = store / f"v-{first.feature_version}"
    on_disk = {p.relative_to(vdir).as_posix() for p in vdir.rglob("part-*.parquet")}
    assert on_disk == set(manifest["shard"])


def test_feature_config_change_reextracts(data, tmp_path):
    store = tmp_path / "store"
    first = extract(data, store, FeatureConfig())
    other = FeatureConfig(n_mels=64)
    second = extract(data, store, other)
    assert second.extracted == first.discovered and second.feature_version != first.feature_version
    assert S.load_split(store, "test").features[0].shape[0] == 64
    assert S.load_split(store, "test", feature_version=first.feature_version).features[0].shape[0] == 128


def test_bad_clips_are_quarantined_and_counted(data, tmp_path, write_wav):
    folder = data / "dev_data" / "valve" / "test"
    (folder / "section_00_source_test_normal_0900_x_1.wav").write_bytes(b"not a wav at all")
    noise = np.random.default_rng(0).integers(-1000, 1000, 16000).astype(np.int16)
    write_wav(folder / "section_00_source_test_normal_0901_x_1.wav", noise)  # 1 s
    write_wav(folder / "recording_0001.wav", np.zeros(48000, np.int16))  # name does not parse
    nan = np.zeros(48000, np.float32)
    nan[10] = np.nan
    write_wav(folder / "section_00_source_test_normal_0902_x_1.wav", nan)
    store = tmp_path / "store"
    summary = extract(data, store, batch_size=16)
    assert summary.quarantined == 4
    assert summary.discovered == summary.extracted + summary.quarantined == len(_wavs(data))
    reasons = dict(summary.quarantine)
    assert "cannot decode" in reasons["dev_data/valve/test/section_00_source_test_normal_0900_x_1.wav"]
    assert "too short" in reasons["dev_data/valve/test/section_00_source_test_normal_0901_x_1.wav"]
    assert "cannot parse" in reasons["dev_data/valve/test/recording_0001.wav"]
    assert "NaN" in reasons["dev_data/valve/test/section_00_source_test_normal_0902_x_1.wav"]
    q = S.store_quarantine(store)
    assert sorted(q["path"]) == sorted(reasons)
    again = extract(data, store, batch_size=16)  # not retried, still reported
    assert (again.extracted, again.quarantined, again.already_present) == (0, 4, summary.extracted)


def test_nothing_usable_is_an_error(tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "bad" / "dev_data" / "fan" / "train"
    bad.mkdir(parents=True)
    (bad / "section_00_source_train_normal_0000_a_1.wav").write_bytes(b"RIFF....")
    with pytest.raises(ExtractError, match="none of the 1 clips"):
        extract(tmp_path / "bad", tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtractError, match="no .wav clips"):
        extract(tmp_path / "empty", tmp_path / "store2")
    rc = main(["extract", "--data", str(tmp_path / "bad"), "--store", str(tmp_path / "store3")])
    err = capsys.readouterr().err
    # one error line, last (after the progress lines), exit 2, no traceback
    assert rc == 2 and "none of the 1 clips" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_eval_layout_extracts_without_labels(tiny_data, tmp_path):
    summary = extract(tiny_data / "eval_data", tmp_path / "store", batch_size=32)
    test = S.load_split(tmp_path / "store", "test", with_features=False)
    assert summary.extracted == len(_wavs(tiny_data / "eval_data")) and len(test) > 0
    assert test.meta["label"].isna().all() and test.meta["domain"].isna().all()
    assert test.meta["attribute_class"].isna().all() and (test.meta["attribute_class_id"] == -1).all()
    assert test.meta["path"].str.startswith("eval_data/valve/test/section_").all()


def test_split_as_ray_dataset(tiny_data, tmp_path):
    extract(tiny_data, tmp_path / "store", batch_size=32)
    ds = S.split_dataset(tmp_path / "store", "train")
    assert ds.count() == len(S.load_split(tmp_path / "store", "train", with_features=False))
    row = ds.take(1)[0]
    assert len(row["features"]) == row["n_mels"] * row["n_frames"]


def test_real_and_generated_clips_share_one_code_path(real_audio_dir, tiny_data, tmp_path):
    """The real DCASE clips (linked, never copied into the repo) and generated ones in one tree,
    through the same discovery, extraction and reader."""
    root = tmp_path / "mixed"
    shutil.copytree(tiny_data / "dev_data", root / "dev_data")
    real = root / "dev_data" / "real_valve" / "test"
    real.mkdir(parents=True)
    for wav in sorted(real_audio_dir.glob("*.wav")):
        shutil.copy(wav, real / wav.name)  # a copy under tmp: links leading outside the root are not followed
    summary = extract(root, tmp_path / "store", batch_size=16)
    assert summary.quarantined == 0 and summary.extracted == len(_wavs(root))
    test = S.load_split(tmp_path / "store", "test")
    rows = test.meta[test.meta["machine"] == "real_valve"]
    assert len(rows) == len(list(real_audio_dir.glob("*.wav")))
    assert set(rows["label"]) == {"normal", "anomaly"} and set(rows["domain"]) == {"source", "target"}
    for i in rows.index:
        ref = _reference(real_audio_dir / Path(rows.loc[i, "path"]).name, FeatureConfig())
        torch.testing.assert_close(test.features[i], ref.half().float())


def test_actor_pool_writes_the_same_store_as_tasks(tiny_data, tmp_path):
    """Large runs go to an actor pool, small ones to tasks: both give byte-identical stores."""
    fcfg = FeatureConfig()
    by_tasks = extract(tiny_data, tmp_path / "tasks", fcfg, batch_size=16, actor_pool_min_clips=None)
    by_actors = extract(tiny_data, tmp_path / "actors", fcfg, batch_size=16, actor_pool_min_clips=0)
    assert by_actors.counts() == by_tasks.counts() and by_actors.extracted > 0
    shards = lambda d: {k: v for k, v in _tree_digest(d).items() if k.endswith(".parquet") and "/" in k}
    assert shards(tmp_path / "actors") == shards(tmp_path / "tasks")
    cols = ["path", "content_hash", "n_frames", "shard"]
    pd_tasks = S.store_manifest(tmp_path / "tasks").sort_values("path")[cols].reset_index(drop=True)
    pd_actors = S.store_manifest(tmp_path / "actors").sort_values("path")[cols].reset_index(drop=True)
    assert pd_actors.equals(pd_tasks)
