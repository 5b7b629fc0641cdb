"""Bad input and interruptions: one test per row of docs/reliability.md's matrix (extraction part,
and the files ``asd predict`` reads).

Real WAV files written here, real symlinks, a real FIFO, a real local Ray; the kill test runs
``asd extract`` as a separate process and kills it with SIGKILL. Config, CLI and MLflow-outage
rows are in tests/test_config_validation.py; ``asd predict`` end to end with a real model in
tests/test_knn_serving.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from asd.audio import MAX_RATIO_TERM, AudioFormatError, load_audio, require_signal, resample_ratio
from asd.features import FeatureConfig
from asd.metadata import discover_clips, read_attributes_csv
from pipelines import store as S
from pipelines.serving.pyfunc_model import MAX_CLIP_BYTES, PATH_REFUSED, AsdPyfuncModel, read_clip_file
from pipelines.stages.extract import ExtractError, extract, extract_shard, featurise_clip, pending_clips
from pipelines.locks import exclusive_lock

SR = 16000
SECONDS = 2.5  # 79 frames: above the 64-frame minimum
DEV = "dev_data/fan"


def _noise(seed: int, seconds: float = SECONDS, sr: int = SR, scale: int = 3000) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, int(seconds * sr)).clip(-32768, 32767).astype(np.int16)


def _name(section: str, domain: str, split: str, label: str, index: int, attr: str = "a_1") -> str:
    return f"section_{section}_{domain}_{split}_{label}_{index:04d}_{attr}.wav"


def _cli_env() -> dict:
    """The environment of an ``asd`` command run as a separate process from this checkout."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _good_tree(root: Path, write_wav, n_train: int = 4) -> None:
    """Two sections of noise clips; attributes_00.csv with one malformed row, no attributes_01.csv."""
    rows = ["file_name,d1p,d1v"]
    for sec in ("00", "01"):
        for i in range(n_train):
            name = _name(sec, "source", "train", "normal", i)
            write_wav(root / DEV / "train" / name, _noise(100 * int(sec) + i))
            rows.append(f"fan/train/{name},a,1")
        for i, label in enumerate(("normal", "anomaly")):
            write_wav(root / DEV / "test" / _name(sec, "source", "test", label, i), _noise(1000 + 10 * int(sec) + i))
    rows = [r for r in rows if "section_01" not in r]
    rows.insert(2, "fan/train/section_00_source_train_normal_0099_a_1.wav,a")  # line 3: an odd cell
    (root / DEV / "attributes_00.csv").write_text("\n".join(rows) + "\n")


BAD = {  # relative path -> what must happen to it
    "short": "dev_data/fan/test/section_00_source_test_normal_0050_a_1.wav",
    "rate16001": "dev_data/fan/test/section_00_source_test_normal_0051_a_1.wav",
    "rate44101": "dev_data/fan/test/section_00_source_test_normal_0052_a_1.wav",
    "truncated": "dev_data/fan/test/section_00_source_test_normal_0053_a_1.wav",
    "silence": "dev_data/fan/test/section_00_source_test_normal_0054_a_1.wav",
    "clipping": "dev_data/fan/test/section_00_source_test_normal_0055_a_1.wav",
    "duplicate": "dev_data/fan/test/section_00_source_test_anomaly_0056_a_1.wav",
    "outside_link": "dev_data/fan/test/section_00_source_test_normal_0057_a_1.wav",
    "dangling_link": "dev_data/fan/test/section_00_source_test_normal_0058_a_1.wav",
    "folder": "dev_data/fan/test/section_00_source_test_normal_0059_a_1.wav",
}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, ray_session):
    """One extraction of a tree holding every bad case next to good clips, run twice."""
    from scipy.io import wavfile

    def write_wav(path, samples, sr=SR):
        path.parent.mkdir(parents=True, exist_ok=True)
        wavfile.write(str(path), sr, samples)
        return path

    base = tmp_path_factory.mktemp("bad")
    root = base / "data"
    _good_tree(root, write_wav)
    write_wav(root / BAD["short"], _noise(1, seconds=0.02))  # 320 samples
    write_wav(root / BAD["rate16001"], _noise(2, sr=16001), sr=16001)
    write_wav(root / BAD["rate44101"], _noise(3, sr=44101), sr=44101)
    full = write_wav(base / "full.wav", _noise(4, seconds=4.0)).read_bytes()
    (root / BAD["truncated"]).write_bytes(full[: int(len(full) * 0.9)])
    write_wav(root / BAD["silence"], np.zeros(int(SECONDS * SR), np.int16))
    write_wav(root / BAD["clipping"], (_noise(5).astype(np.int32) * 40).clip(-32768, 32767).astype(np.int16))
    (root / BAD["duplicate"]).write_bytes(
        (root / DEV / "train" / _name("00", "source", "train", "normal", 0)).read_bytes())
    secret = write_wav(base / "outside" / "secret.wav", _noise(6))
    os.symlink(secret, root / BAD["outside_link"])
    os.symlink(base / "nowhere.wav", root / BAD["dangling_link"])
    (root / BAD["folder"]).mkdir()
    store = base / "store"
    first = extract(root, store, batch_size=4)
    again = extract(root, store, batch_size=4)
    return root, store, first, again


def _manifest(store) -> pd.DataFrame:
    return S.store_manifest(store).set_index("path")


def _reasons(summary) -> dict[str, str]:
    return dict(summary.quarantine)


@pytest.mark.slow
def test_counts_add_up_and_every_wav_entry_is_counted(bad_run):
    root, store, first, again = bad_run
    entries = [p for p in root.rglob("*.wav")]  # files, links (dangling too) and the folder
    assert first.discovered == len(entries) == first.extracted + first.quarantined
    assert again.discovered == again.already_present + again.quarantined == len(entries)
    assert again.extracted == 0 and again.quarantined == first.quarantined
    assert sorted(S.store_quarantine(store)["path"]) == sorted(_reasons(first))


@pytest.mark.slow
def test_a_too_short_clip_is_quarantined_and_the_run_can_be_rerun(bad_run):
    _, _, first, again = bad_run
    assert "too short" in _reasons(first)[BAD["short"]]
    assert again.quarantined == first.quarantined  # re-running works and keeps the record


@pytest.mark.slow
def test_odd_sample_rates_are_resampled(bad_run):
    _, store, _, _ = bad_run
    table = S.load_split(store, "test")
    meta = table.meta.set_index("path")
    for key, rate in (("rate16001", 16001), ("rate44101", 44101)):
        row = meta.loc[BAD[key]]
        assert row["source_sample_rate"] == rate and bool(row["resampled"])
        assert abs(int(row["n_frames"]) - (1 + int(SECONDS * SR) // 512)) <= 1


@pytest.mark.slow
def test_truncated_and_clipped_files_are_extracted_and_flagged(bad_run):
    _, store, first, _ = bad_run
    m = _manifest(store)
    assert m.loc[BAD["truncated"], "flags"] == "truncated"
    assert m.loc[BAD["clipping"], "flags"] == "clipping"
    assert first.flagged["truncated"] == 1 and first.flagged["clipping"] == 1
    assert "flagged" in first.text() and "truncated" in first.text()


@pytest.mark.slow
def test_digital_silence_is_quarantined(bad_run):
    _, _, first, _ = bad_run
    assert "constant signal" in _reasons(first)[BAD["silence"]]


@pytest.mark.slow
def test_identical_content_under_two_names_is_flagged_with_labels(bad_run):
    _, store, first, _ = bad_run
    twin = f"{DEV}/train/" + _name("00", "source", "train", "normal", 0)
    m = _manifest(store)
    assert m.loc[twin, "flags"] == m.loc[BAD["duplicate"], "flags"] == "duplicate"
    assert (m["flags"] == "duplicate").sum() == 2
    assert first.duplicates == [[f"{BAD['duplicate']} (test, anomaly)", f"{twin} (train, normal)"]]


@pytest.mark.slow
def test_metadata_problems_are_warnings_and_the_rest_proceeds(bad_run):
    _, store, first, _ = bad_run
    warnings = "\n".join(first.warnings)
    assert "attributes_00.csv:3" in warnings  # the malformed row, by line number
    assert "section(s) 01" in warnings  # attributes_01.csv is missing
    train = S.load_split(store, "train").meta.set_index("path")
    listed = train.loc[f"{DEV}/train/" + _name("00", "source", "train", "normal", 1), "attributes_json"]
    assert json.loads(listed) == {"a": "1"}  # rows after the bad one were read
    assert pd.isna(train.loc[f"{DEV}/train/" + _name("01", "source", "train", "normal", 1), "attributes_json"])


@pytest.mark.slow
def test_links_outside_the_root_dangling_links_and_folders_are_quarantined(bad_run):
    _, store, first, _ = bad_run
    reasons = _reasons(first)
    assert "outside the data root" in reasons[BAD["outside_link"]]
    assert "dangling symlink" in reasons[BAD["dangling_link"]]
    assert reasons[BAD["folder"]] == "not a regular file"
    q = S.store_quarantine(store).set_index("path")
    assert pd.isna(q.loc[BAD["outside_link"], "content_hash"])  # the target was never read


# ----------------------------------------------------------------------------- no Ray needed
@pytest.mark.parametrize("rate", [16001, 44101, 7919, 96001, 383999])
def test_resampling_ratio_is_bounded_and_close(rate):
    ratio = resample_ratio(rate, SR)
    assert max(ratio.numerator, ratio.denominator) <= MAX_RATIO_TERM
    assert abs(float(ratio / Fraction(SR, rate)) - 1) < 1e-4


@pytest.mark.parametrize("rate, freq", [(44101, 3000.0), (16001, 1000.0)])
def test_odd_rate_keeps_the_tone(tmp_path, write_wav, rate, freq):
    t = np.arange(rate) / rate
    path = write_wav(tmp_path / "a.wav", (0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16), rate)
    wave, info = load_audio(path)
    assert info.resampled and abs(wave.numel() - SR) <= SR * 1e-3
    spectrum = np.abs(np.fft.rfft(wave.numpy().astype(np.float64)))
    assert abs(np.argmax(spectrum) * SR / wave.numel() - freq) <= 2.0


def test_rates_outside_the_accepted_range_are_refused(tmp_path, write_wav):
    path = write_wav(tmp_path / "a.wav", _noise(0, sr=500), 500)
    with pytest.raises(AudioFormatError, match="outside the accepted"):
        load_audio(path)


def test_an_unexpected_error_in_one_clip_quarantines_only_that_clip(tmp_path, write_wav, monkeypatch):
    import pipelines.stages.extract as E

    for i in range(2):
        write_wav(tmp_path / "data" / DEV / "train" / _name("00", "source", "train", "normal", i), _noise(i))
    real = E.featurise_clip

    def flaky(data, fcfg):
        if data == (tmp_path / "data" / DEV / "train" / _name("00", "source", "train", "normal", 0)).read_bytes():
            raise RuntimeError("boom")
        return real(data, fcfg)

    monkeypatch.setattr(E, "featurise_clip", flaky)
    clips = [{"path": f"{DEV}/train/" + _name("00", "source", "train", "normal", i), "dataset": "dev_data",
              "size": 0, "mtime_ns": 0, "attributes": None,
              "meta": {"machine": "fan", "section": "00", "domain": "source", "split": "train", "label": "normal",
                       "index": i, "attribute": "a_1", "path": ""}} for i in range(2)]
    spec = json.dumps({"partition": "p", "clips": clips})
    out = extract_shard({"shard": spec}, str(tmp_path / "data"), str(tmp_path / "v"),
                        features=FeatureConfig().__dict__, dtype="float16")
    assert [s["status"] for s in out] == ["quarantined", "extracted"]
    assert out[0]["reason"] == "RuntimeError: boom"


def test_a_second_writer_of_a_store_gets_a_clear_error(tmp_path, write_wav):
    _good_tree(tmp_path / "data", write_wav, n_train=1)
    with exclusive_lock(tmp_path / "store" / S.LOCK_FILE, "test holder"):
        with pytest.raises(ExtractError, match=f"pid {os.getpid()}"):
            extract(tmp_path / "data", tmp_path / "store")


def test_a_file_name_that_is_not_utf8_is_quarantined_and_runs_go_on(tmp_path, write_wav, ray_session):
    root = tmp_path / "data"
    _good_tree(root, write_wav, n_train=2)
    train = root / DEV / "train"
    bad = os.fsencode(train) + b"/section_00_source_train_normal_0009_\xff.wav"  # a name Linux allows
    with open(bad, "wb") as fh:
        fh.write((train / _name("00", "source", "train", "normal", 0)).read_bytes())
    shown = f"{DEV}/train/section_00_source_train_normal_0009_\\xff.wav"
    first = extract(root, tmp_path / "store", batch_size=4)
    again = extract(root, tmp_path / "store", batch_size=4)
    assert first.discovered == 9 == first.extracted + first.quarantined and first.quarantined == 1
    assert again.discovered == again.already_present + again.quarantined and again.quarantined == 1
    reason = _reasons(first)[shown]
    assert reason == "file name is not UTF-8 (shown as section_00_source_train_normal_0009_\\xff.wav): rename the file"
    quarantine = S.store_quarantine(tmp_path / "store")
    assert quarantine["path"].tolist() == [shown] and quarantine["content_hash"].notna().all()
    assert shown not in set(S.store_manifest(tmp_path / "store")["path"])
    first.text().encode("utf-8")  # what the console and the log get: UTF-8 text
    assert pending_clips(root, tmp_path / "store") == []  # the retraining's check agrees


STORE_CHECK = """
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from pipelines import store as S
store = Path(sys.argv[1])
files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
vdir = next(store.glob("v-*"))
manifest = S.read_manifest(vdir)
readable = all(pq.read_table(vdir / shard).num_rows > 0 for shard in set(manifest["shard"]))
print(json.dumps({"files": files, "rows": len(manifest), "readable": readable}))
"""


@pytest.mark.slow
def test_a_full_disk_under_the_store_is_one_line_and_a_rerun_after_freeing_space_completes(tmp_path, write_wav):
    """A real full file system, no root needed: a 160 KiB tmpfs mounted on the run directory in a
    user namespace (``unshare -rm``). ``asd extract`` into it stops with one line naming the file
    (exit 2); the store holds whole files only; after the tmpfs grows (space freed) the same
    command completes and every clip is counted."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unprivileged user namespaces (unshare -rm) are not available here")
    root, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "out"
    _good_tree(root, write_wav, n_train=8)
    run.mkdir()
    out.mkdir()
    (out / "check.py").write_text(STORE_CHECK)
    q = shlex.quote
    extract_cmd = (f"{q(sys.executable)} -m pipelines extract --config tiny --data {q(str(root))} --store "
                   f"{q(str(run / 'store'))} --set extract.batch_size=2 --set ray.num_cpus=1")
    script = "\n".join([
        f"mount -t tmpfs -o size=160k tmpfs {q(str(run))} || exit 90",
        f"{extract_cmd} > {q(str(out / 'full.out'))} 2> {q(str(out / 'full.err'))}; echo $? > {q(str(out / 'full.rc'))}",
        f"{q(sys.executable)} {q(str(out / 'check.py'))} {q(str(run / 'store'))} > {q(str(out / 'full.json'))}",
        f"mount -o remount,size=64m tmpfs {q(str(run))} || exit 91",
        f"{extract_cmd} > {q(str(out / 'freed.out'))} 2> {q(str(out / 'freed.err'))}; echo $? > {q(str(out / 'freed.rc'))}",
        f"{q(sys.executable)} {q(str(out / 'check.py'))} {q(str(run / 'store'))} > {q(str(out / 'freed.json'))}",
    ])
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env=_cli_env())
    assert proc.returncode == 0, proc.stderr
    err = (out / "full.err").read_text()
    assert (out / "full.rc").read_text().strip() == "2", err
    assert "Traceback" not in err and [line for line in err.splitlines() if "No space left" in line] == [
        err.strip().splitlines()[-1]], err  # after the progress lines: one line, the last
    assert err.strip().splitlines()[-1].startswith(f"asd extract: error: no space left on the device of {run / 'store'}/")
    full = json.loads((out / "full.json").read_text())
    assert full["readable"] and not [f for f in full["files"] if ".tmp-" in Path(f).name]
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.err").read_text()
    freed = json.loads((out / "freed.json").read_text())
    assert freed["readable"] and freed["rows"] == 20 and "journal" not in " ".join(freed["files"])
    assert "extract: 20 discovered = " in (out / "freed.out").read_text()


# ----------------------------------------------------------------------------- metadata files
def _clip_tree(root: Path) -> Path:
    """``<root>/fan/train/`` with one (never decoded) clip of section 00; returns the machine folder."""
    train = root / "fan" / "train"
    train.mkdir(parents=True)
    (train / _name("00", "source", "train", "normal", 0)).write_bytes(b"")
    return root / "fan"


def test_a_non_utf8_byte_in_attributes_csv_is_one_warning_and_every_row_is_read(tmp_path):
    machine = _clip_tree(tmp_path)
    names = [f"fan/train/{_name('00', 'source', 'train', 'normal', i)}" for i in range(3)]
    lines = [b"file_name,d1p,d1v", f"{names[0]},a,1".encode(), f"{names[1]},caf".encode() + b"\xe9\xff,2",
             f"{names[2]},a,3".encode()]
    csv_path = machine / "attributes_00.csv"
    csv_path.write_bytes(b"\n".join(lines) + b"\n")
    disc = discover_clips(tmp_path)
    undecodable = [w for w in disc.warnings if "UTF-8" in w]
    assert len(undecodable) == 1 and undecodable[0].startswith(f"{csv_path}:3: ")  # line 3 of the file
    assert disc.attributes[names[0]] == {"a": "1"} and disc.attributes[names[2]] == {"a": "3"}
    (parameter,) = disc.attributes[names[1]]
    assert parameter.startswith("caf") and "\ufffd" in parameter and disc.attributes[names[1]][parameter] == "2"
    with pytest.raises(ValueError, match=r"attributes_00\.csv:3: not UTF-8"):  # strict: one line, not a traceback
        read_attributes_csv(csv_path)


def test_an_attributes_csv_linked_outside_the_root_is_refused_unread(tmp_path):
    machine = _clip_tree(tmp_path / "data")
    outside = tmp_path / "elsewhere" / "attributes_00.csv"
    outside.parent.mkdir()
    outside.write_text("file_name,d1p,d1v\nfan/train/x.wav,SECRET-CONTENT\n")  # a malformed row would be echoed
    os.symlink(outside, machine / "attributes_00.csv")
    disc = discover_clips(tmp_path / "data")
    (refused,) = [w for w in disc.warnings if "attributes_00.csv" in w]
    assert refused.startswith(f"{machine / 'attributes_00.csv'}: ") and "outside the data root" in refused
    assert not any("SECRET-CONTENT" in w for w in disc.warnings) and disc.attributes == {}


# ----------------------------------------------------------------------------- channels
def test_stereo_channels_in_anti_phase_are_flagged_as_silence_after_the_downmix(tmp_path, write_wav):
    left = _noise(7).clip(-32767, 32767)  # -(-32768) does not fit in int16
    stereo = np.stack([left, -left], axis=1)
    assert not np.any(stereo.astype(np.int32).sum(axis=1))  # the reference: the channels sum to zero
    path = write_wav(tmp_path / "anti.wav", stereo)
    _, info = load_audio(path)
    assert info.downmixed and "constant" in info.flags
    with pytest.raises(AudioFormatError, match="constant signal after down-mixing 2 channels"):
        require_signal(info)  # what the served model and asd predict answer for it
    with pytest.raises(AudioFormatError, match="constant signal"):  # quarantined by extraction
        featurise_clip(path.read_bytes(), FeatureConfig())
    _, in_phase = load_audio(write_wav(tmp_path / "same.wav", np.stack([left, left], axis=1)))
    assert in_phase.flags == ()
    clipped = (left.astype(np.int32) * 40).clip(-32768, 32767).astype(np.int16)
    loud_left = np.stack([clipped, np.zeros_like(left)], axis=1)  # clipped on one channel: still seen
    assert load_audio(write_wav(tmp_path / "clip.wav", loud_left))[1].flags == ("clipping",)


# ----------------------------------------------------------------------------- files asd predict reads
@pytest.fixture
def odd_files(tmp_path):
    """A FIFO nobody writes to, a folder, a sparse file one byte over the limit, and /dev/zero."""
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "folder.wav").mkdir()
    with open(tmp_path / "big.wav", "wb") as fh:
        fh.truncate(MAX_CLIP_BYTES + 1)
    return {"fifo": tmp_path / "fifo.wav", "folder": tmp_path / "folder.wav", "big": tmp_path / "big.wav",
            "device": Path("/dev/zero")}


@pytest.mark.timeout(60)  # a read that blocks on the FIFO fails here instead of hanging
def test_only_regular_files_up_to_the_limit_are_read(tmp_path, odd_files, write_wav):
    for kind in ("fifo", "folder", "device"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_clip_file(odd_files[kind])
    with pytest.raises(ValueError, match=f"larger than the {MAX_CLIP_BYTES // 2**20} MiB"):
        read_clip_file(odd_files["big"])
    good = write_wav(tmp_path / "good.wav", _noise(8))
    assert read_clip_file(good) == good.read_bytes()


@pytest.mark.timeout(60)
def test_the_served_model_refuses_odd_files_under_its_input_root(tmp_path, odd_files, write_wav):
    model = AsdPyfuncModel()
    model.input_root = tmp_path.resolve()
    os.symlink("/dev/zero", tmp_path / "zero.wav")  # outside the root anyway
    for name in ("fifo.wav", "folder.wav", "big.wav", "zero.wav"):
        with pytest.raises(PermissionError, match=PATH_REFUSED):
            model.confined_bytes(name)
    good = write_wav(tmp_path / "good.wav", _noise(9))
    assert model.confined_bytes("good.wav") == good.read_bytes()


# ----------------------------------------------------------------------------- asd run
@pytest.mark.parametrize("command", ["run", "train", "score"])
def test_a_second_command_on_one_run_dir_stops_at_once_with_one_line(tmp_path, command):
    """`asd run`, `train` and `score` write the same folders of a run directory: one at a time."""
    from pipelines.locks import RUN_LOCK

    run_dir = tmp_path / "run"
    with exclusive_lock(run_dir / RUN_LOCK, "the first run"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines", command, "--config", "tiny", "--set",
                               f"run_dir={run_dir}", "--set", f"data.root={tmp_path / 'data'}"],
                              capture_output=True, text=True, timeout=120, env=_cli_env())
        seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"asd {command}: error: run directory {run_dir} is in use by another "
                                        f"command (pid {os.getpid()}, lock {run_dir / RUN_LOCK}); wait for it "
                                        "to finish"]
    # nothing started: the run directory holds the lock and the command's log only
    assert not (tmp_path / "data").exists() and {p.name for p in run_dir.iterdir()} <= {RUN_LOCK, "logs"}
    assert seconds < 60


def test_a_retrain_beside_another_command_of_its_run_dir_exits_3_with_one_line(tmp_path):
    """A scheduled retraining that finds the run directory busy skips this round (exit 3)."""
    from pipelines.locks import RUN_LOCK

    run_dir = tmp_path / "run"
    with exclusive_lock(run_dir / RUN_LOCK, "an asd run"):
        proc = subprocess.run([sys.executable, "-m", "pipelines", "retrain", "--config", "tiny", "--set",
                               f"run_dir={run_dir}", "--set", f"data.root={tmp_path / 'data'}"],
                              capture_output=True, text=True, timeout=120, env=_cli_env())
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [f"retrain: run directory {run_dir} is in use by another command "
                                        f"(pid {os.getpid()}, lock {run_dir / RUN_LOCK}); wait for it to finish; "
                                        "not starting a retraining"]


def test_a_run_dir_that_cannot_hold_its_lock_is_one_user_error(tmp_path):
    from pipelines.errors import UserError
    from pipelines.locks import run_dir_lock

    (tmp_path / "a file").write_text("")
    with pytest.raises(UserError, match="cannot create its lock .*set run_dir to a folder you can write"):
        with run_dir_lock(tmp_path / "a file" / "run"):
            pass


def test_a_stage_record_on_a_full_disk_is_one_error_naming_it_and_the_old_record_stays(tmp_path):
    """The kernel's own ENOSPC: the record's temporary name is a link to /dev/full, whose writes fail so."""
    from pipelines.operations.runner import StageBook

    book = StageBook(tmp_path)
    book.record("knn", "d1", seconds=1.0)
    record = tmp_path / "stages" / "knn.json"
    os.symlink("/dev/full", record.with_name(f".tmp-{os.getpid()}-knn.json"))
    with pytest.raises(S.DiskFull, match=f"^no space left on the device of {record} "):
        book.record("knn", "d2", seconds=2.0)
    assert book.get("knn")["digest"] == "d1" and [p.name for p in record.parent.iterdir()] == ["knn.json"]


def test_a_full_disk_under_a_file_no_writer_of_ours_names_is_still_one_line(tmp_path, capsys):
    """``asd score`` whose ``scores.csv`` is a link to /dev/full (the kernel's own ENOSPC, raised by
    pandas when it closes the file): one line and exit 2, not a traceback."""
    from asd.contracts import SCORES_FILE
    from store_writer import clip_row, write_store
    from pipelines.cli import main

    fcfg = FeatureConfig(kind="logmel", n_mels=8)
    rng = np.random.default_rng(0)
    clips = []
    for split, labels in (("train", ["normal"] * 9), ("test", ["normal", "anomaly"] * 2)):
        for i, label in enumerate(labels):
            feats = rng.normal(-50.0, 1.0 if label == "normal" else 3.0, size=(8, 70)).astype(np.float32)
            clips.append((clip_row("fan", "00", split, "source", label, i, "a1", 8, 70, fcfg.version,
                                   f"{split}{i}"), feats))
    write_store(tmp_path / "store", fcfg.version, clips)
    out = tmp_path / "scoring"
    out.mkdir()
    (out / SCORES_FILE).symlink_to("/dev/full")
    rc = main(["score", "--config", "tiny", "--no-mlflow", "--set", f"run_dir={tmp_path / 'run'}", "--set",
               "method=knn", "--set", "features.kind=logmel", "--set", "features.n_mels=8", "--set",
               "knn.representation=statistics", "--set", "knn.normalisation=none", "--set", "knn.distance=cosine",
               "--store", str(tmp_path / "store"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("asd score: error: no space left on the device (No space left on device): "
                                            "free some space and re-run the same command")


KNN_RUN = ["method=knn", "features.kind=spectrum", "knn.representation=spectrum_shape", "knn.normalisation=local"]


@pytest.mark.slow
@pytest.mark.parametrize("killed_after", ["extraction", "training"])
def test_an_mlflow_server_killed_while_asd_run_trains_loses_no_stage_and_no_result(tmp_path, ray_session, monkeypatch,
                                                                                    capsys, killed_after):
    """A real ``mlflow server`` killed (SIGKILL to its process group) the moment the extraction or
    the training stage has written its output (so the next stage starts its MLflow run against a
    dead server, or the training stage ends its own there): the run finishes its local work with
    one warning, keeps every stage record, and a re-run trains nothing again."""
    from conftest import serve_mlflow
    from pipelines import detectors
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.operations import run as run_module
    from pipelines.operations.run import run_pipeline

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded, so teardown also undoes what the pipeline sets
        monkeypatch.delenv(name)
    knn = detectors.get("knn")
    owner, name = (run_module, "extract_from_config") if killed_after == "extraction" else (knn, "fit")
    real = getattr(owner, name)

    def then_kill_the_server(*args, **kwargs):
        out = real(*args, **kwargs)
        os.killpg(int((tmp_path / "mlflow" / "server.pid").read_text()), signal.SIGKILL)
        return out

    monkeypatch.setattr(owner, name, then_kill_the_server)
    run_dir, settings = tmp_path / "run", [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", *KNN_RUN,
                                           "mlflow.experiment=asd-outage", "mlflow.registered_model=asd-outage"]
    server = serve_mlflow(tmp_path / "mlflow")
    try:
        uri = next(server)
        rc = main(["run", "--config", "tiny", *(x for o in [*settings, f"mlflow.tracking_uri={uri}"]
                                                 for x in ("--set", o))])
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err
    assert [line for line in err.splitlines() if "MLflow" in line] == [
        next(line for line in err.splitlines() if line.startswith("warning: MLflow failed while "))]
    assert "asd score --register-only --config tiny" in out and f"--out {run_dir / 'scoring'}" in out
    assert {f.stem for f in (run_dir / "stages").glob("*.json")} == {"extract", "knn", "score"}
    assert (run_dir / "models" / "knn" / knn.weights_file).is_file()
    assert (run_dir / "scoring" / "scores.csv").is_file() and (run_dir / "results.md").is_file()
    assert list((run_dir / "scoring" / "submission").rglob("anomaly_score_*.csv"))

    monkeypatch.setattr(owner, name, real)
    local = f"mlflow.tracking_uri=sqlite:///{run_dir / 'mlflow.db'}"  # MLflow back: the score stage re-runs
    again = run_pipeline(load_config("tiny", [*settings, local]))
    assert again["stages"]["knn"].get("skipped") is True and again["stages"]["score"]["version"] == 1
    assert again["mlflow_outage"] is None


@pytest.mark.slow
def test_an_mlflow_server_killed_while_asd_retrain_trains_keeps_the_retraining_for_the_next_attempt(
        tmp_path, ray_session, monkeypatch, capsys):
    """A real ``mlflow server`` killed the moment the retraining's kNN is fitted: the challenger
    cannot be registered or compared, so ``asd retrain`` stops with one line naming the failure
    and where the finished stages are kept; with the server back (same state, a new port) the
    next ``asd retrain`` resumes at the challenger and registers one version."""
    import mlflow
    from conftest import serve_mlflow
    from pipelines import detectors
    from pipelines.cli import main
    from pipelines.config import load_config
    from pipelines.operations.retrain import PENDING, retrain
    from pipelines.operations.run import run_pipeline
    from pipelines.synth.generate import add_drop

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # recorded, so teardown also undoes what the pipeline sets
        monkeypatch.delenv(name)
    run_dir, settings = tmp_path / "run", [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}", *KNN_RUN,
                                           "mlflow.experiment=asd-retrain-outage",
                                           "mlflow.registered_model=asd-retrain-outage"]
    knn = detectors.get("knn")
    real_fit = knn.fit

    def then_kill_the_server(*args, **kwargs):
        out = real_fit(*args, **kwargs)
        os.killpg(int((tmp_path / "mlflow" / "server.pid").read_text()), signal.SIGKILL)
        return out

    server = serve_mlflow(tmp_path / "mlflow")
    try:
        uri = next(server)
        run_pipeline(load_config("tiny", [*settings, f"mlflow.tracking_uri={uri}"]))
        add_drop(tmp_path / "data", "target", count=1, seed=3)
        monkeypatch.setattr(knn, "fit", then_kill_the_server)
        capsys.readouterr()
        rc = main(["retrain", "--config", "tiny", *(x for o in [*settings, f"mlflow.tracking_uri={uri}"]
                                                    for x in ("--set", o))])
    finally:
        server.close()
    out, err = capsys.readouterr()
    pending = run_dir / "retrain" / PENDING
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("asd retrain: error: MLflow failed (")
    assert f"the retraining's finished stages are kept in {pending}: run `asd retrain` again" in err
    assert {f.stem for f in (pending / "stages").glob("*.json")} == {"extract", "knn"}

    monkeypatch.setattr(knn, "fit", real_fit)
    server = serve_mlflow(tmp_path / "mlflow")  # the same backend store, on a new port
    try:
        uri = next(server)
        again = retrain(load_config("tiny", [*settings, f"mlflow.tracking_uri={uri}"]))
        versions = mlflow.MlflowClient().search_model_versions("name = 'asd-retrain-outage'")
    finally:
        server.close()
    assert again["stages"]["knn"].get("skipped") is True and again["stages"]["extract"]["extracted"] == 0
    assert again["version"] == "2" and sorted(int(v.version) for v in versions) == [1, 2]
    assert not pending.exists() and (run_dir / "retrain").is_dir()


# ----------------------------------------------------------------------------- killed mid-way
def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list) -> list:
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if running(p)]


def _extraction_stopped_midway(root: Path, store: Path, stop, stderr=subprocess.DEVNULL):
    """Start ``asd extract`` one clip per shard, wait until two shards are journalled, call
    ``stop(proc)``; returns (command, proc, journal, the Ray processes it had started)."""
    command = [sys.executable, "-m", "pipelines", "extract", "--config", "tiny", "--data", str(root), "--store",
               str(store), "--set", "extract.batch_size=1", "--set", "ray.num_cpus=1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=_cli_env())
    deadline, journal = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        journal = next(store.glob(f"v-*/{S.JOURNAL}"), None)
        if journal is not None and len(list(journal.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    ray_procs = _descendants(proc.pid)
    stop(proc)
    return command, proc, journal, ray_procs


def _assert_gone(ray_procs: list, seconds: float) -> None:
    gone_by = time.time() + seconds
    while time.time() < gone_by and _alive(ray_procs):
        time.sleep(0.2)
    assert not _alive(ray_procs), f"Ray processes outlived the stopped run: {[p.name() for p in _alive(ray_procs)]}"


@pytest.mark.slow
def test_sigterm_ends_an_extraction_in_one_line_and_the_same_command_resumes(tmp_path, write_wav):
    root, store = tmp_path / "data", tmp_path / "store"
    _good_tree(root, write_wav, n_train=30)
    command, proc, journal, ray_procs = _extraction_stopped_midway(
        root, store, lambda p: p.send_signal(signal.SIGTERM), stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert journal is not None and ray_procs, "the run ended before it could be stopped"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "asd extract: interrupted by SIGTERM; re-run the same command to resume"
    assert "Traceback" not in err and "SIGTERM received" not in err and "***" not in err, err
    _assert_gone(ray_procs, 15)
    done_before = len(list(journal.glob("*.json")))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_cli_env())
    assert again.returncode == 0, again.stderr
    assert f"resumed: {done_before} shard(s) finished by an interrupted run were kept" in again.stdout


@pytest.mark.slow
def test_sigterm_during_training_in_asd_run_is_one_line_too(tmp_path):
    """Ray Train re-raises the interruption as a plain KeyboardInterrupt: still SIGTERM's line and code."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run", "--config", "tiny", "--set", f"run_dir={run_dir}",
                             "--set", f"data.root={tmp_path / 'data'}", "--set", "pretrain.epochs=50", "--set",
                             "mlflow.experiment=asd-sigterm", "--set", "mlflow.registered_model=asd-sigterm"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_cli_env())
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not list(run_dir.glob("**/checkpoint_*")):
        time.sleep(0.2)  # until pre-training has registered a checkpoint
    ray_procs = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert ray_procs and list(run_dir.glob("**/checkpoint_*")), "the run ended before it could be stopped"
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "asd run: interrupted by SIGTERM; re-run the same command to resume"
    assert "Traceback" not in err and "SIGTERM received" not in err, err
    _assert_gone(ray_procs, 15)


@pytest.mark.slow
def test_a_killed_extraction_resumes_and_leaves_no_ray_processes(tmp_path, write_wav):
    root = tmp_path / "data"
    _good_tree(root, write_wav, n_train=30)
    store = tmp_path / "store"
    # the tiny config's front end is FeatureConfig()'s, which the resuming extract() below uses
    _, proc, journal, ray_procs = _extraction_stopped_midway(root, store, lambda p: os.kill(p.pid, signal.SIGKILL))
    proc.wait()
    assert journal is not None and ray_procs, "the run ended before it could be killed"
    done_before = len(list(journal.glob("*.json")))
    _assert_gone(ray_procs, 10)

    resumed = extract(root, store, batch_size=1)
    assert resumed.resumed_shards >= done_before and resumed.discovered == resumed.extracted + resumed.quarantined
    fresh = extract(root, tmp_path / "fresh", batch_size=1)
    assert fresh.resumed_shards == 0
    pd.testing.assert_frame_equal(_manifest(store).sort_index(), _manifest(tmp_path / "fresh").sort_index())
    vdir = S.version_dir(store, resumed.feature_version)
    fresh_vdir = S.version_dir(tmp_path / "fresh", fresh.feature_version)
    shards = sorted(p.relative_to(vdir).as_posix() for p in vdir.rglob("part-*.parquet"))
    assert shards == sorted(p.relative_to(fresh_vdir).as_posix() for p in fresh_vdir.rglob("part-*.parquet"))
    assert not list((vdir / S.JOURNAL).glob("*"))
