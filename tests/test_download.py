"""`asd download` against a real HTTP server on 127.0.0.1 (never the internet): resume with HTTP
ranges, checksums, broken archives, 404s, dropped connections, the unpacked layout and the eval
ground truth; and every DCASE year's layout (2020-2025, WAV and FLAC) read by discovery and by
`asd extract`, including the real clips beside the project where present."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from asd.metadata import discover_clips
from pipelines import cli
from pipelines.datasets import download as D

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# DCASE 2023 ToyCar, FLAC (read in place or copied under tmp); .ci/run names the folders beside its checkout
REAL_TOYCAR = Path(os.environ.get("ASD_REAL_TOYCAR_DIR") or SHARED / "data" / "realtoycar")
REAL_AUDIO = Path(os.environ.get("ASD_REAL_AUDIO_DIR") or SHARED / "real_audio")  # eight real valve WAVs


# ----------------------------------------------------------------------------- helpers
def clip_bytes(seed: int, fmt: str = "WAV", seconds: float = 2.1) -> bytes:
    """A short noise clip (16 kHz mono 16 bit) as file bytes; long enough for one feature crop."""
    x = np.random.default_rng(seed).normal(0, 0.1, int(16000 * seconds)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# one archive per year's layout, as the organisers publish them (folder names, file names)
def zip_2020_dev() -> bytes:  # MIMII/ToyADMOS ids, no domains, 8-digit numbers
    return make_zip({
        "fan/train/normal_id_00_00000000.wav": clip_bytes(1),
        "fan/train/normal_id_00_00000001.wav": clip_bytes(2),
        "fan/test/normal_id_00_00000000.wav": clip_bytes(3),
        "fan/test/anomaly_id_00_00000000.wav": clip_bytes(4),
    })


def zip_2021_dev() -> bytes:  # source_test/ and target_test/ folders, test names without attributes
    return make_zip({
        "dev_data/gearbox/train/section_00_source_train_normal_0000_volt_1.0_wt_30.wav": clip_bytes(5),
        "dev_data/gearbox/train/section_00_target_train_normal_0000_volt_1.3_wt_30.wav": clip_bytes(6),
        "dev_data/gearbox/source_test/section_00_source_test_normal_0000.wav": clip_bytes(7),
        "dev_data/gearbox/source_test/section_00_source_test_anomaly_0000.wav": clip_bytes(8),
        "dev_data/gearbox/target_test/section_00_target_test_normal_0000.wav": clip_bytes(9),
        "dev_data/gearbox/target_test/section_00_target_test_anomaly_0000.wav": clip_bytes(10),
    })


def zip_2023_dev(fmt: str = "FLAC") -> bytes:  # multi-attribute names from 0001, attributes_00.csv
    ext = fmt.lower()
    names = ["train/section_00_source_train_normal_0001_car_A1_spd_28V_mic_1",
             "train/section_00_target_train_normal_0001_car_E1_spd_31V_mic_2",
             "test/section_00_source_test_normal_0001_car_A1_spd_28V_mic_1",
             "test/section_00_target_test_anomaly_0001_car_E1_spd_31V_mic_2"]
    csv_rows = ["file_name,d1p,d1v,d2p,d2v,d3p,d3v"] + [
        f"ToyCar/{n}.wav,car,{n.split('_car_')[1].split('_')[0]},spd,{n.split('_spd_')[1].split('_')[0]},mic,{n[-1]}"
        for n in names]
    members = {f"ToyCar/{n}.{ext}": clip_bytes(20 + i, fmt) for i, n in enumerate(names)}
    members["ToyCar/attributes_00.csv"] = ("\n".join(csv_rows) + "\n").encode()
    return make_zip(members)


class Server:
    """A loopback HTTP server of ``files`` (URL path -> bytes) with byte ranges, and switches
    for the failures a download meets. ``requests`` logs (path, Range header, status)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: dict[str, list[int]] = {}  # path -> byte counts after which successive responses stop
        self.ranges = True
        self.requests: list[tuple[str, str | None, int]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                data = server.files.get(path)
                if data is None:
                    server.requests.append((path, rng, 404))
                    self.send_error(404)
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        server.requests.append((path, rng, 416))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    server.requests.append((path, rng, 206))
                else:
                    self.send_response(200)
                    server.requests.append((path, rng, 200))
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.drop.get(path)
                if cut:
                    n = cut.pop(0)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return  # the connection closes with bytes missing
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _no_retry_waits(monkeypatch):
    monkeypatch.setattr(D, "RETRY_DELAYS", (0.0, 0.0, 0.0))


def catalogue(tmp_path: Path, datasets: dict) -> Path:
    path = tmp_path / "catalogue.yaml"
    path.write_text(yaml.safe_dump({"url": "https://zenodo.invalid/records/{record}/files/{file}",
                                    "datasets": datasets}))
    return path


def split_entry(record, archives: list[tuple[str, str, bytes | None]], with_md5: bool = True) -> dict:
    return {"record": record, "archives": [
        {"machine": m, "file": f, "size": len(data) if (with_md5 and data is not None) else None,
         "md5": md5(data) if (with_md5 and data is not None) else None} for m, f, data in archives]}


def error_line(capsys) -> str:
    """The one error line of a failed command: last on stderr (after any progress bars), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("asd download: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the catalogue
def test_shipped_catalogue_is_complete_and_honest():
    cat = D.load_catalogue()
    assert set(cat["datasets"]) == {f"dcase{y}" for y in range(2020, 2026)}
    for name, entry in cat["datasets"].items():
        files = set()
        for split in D.SPLITS:
            part = entry[split]
            assert part["record"] is None or isinstance(part["record"], int), (name, split)
            for a in part["archives"]:
                assert a["file"].endswith(".zip") and a["file"] not in files, a
                files.add(a["file"])
                assert set(a) == {"machine", "file", "size", "md5"}
                assert a["md5"] is None or (len(a["md5"]) == 32 and int(a["md5"], 16) >= 0)
                assert a["size"] is None or a["size"] > 0
        gt = entry["ground_truth"]
        assert gt is None or gt["url"].startswith("https://")
    # the records the project knows of (DCASE Task 2 Zenodo records)
    assert cat["datasets"]["dcase2022"]["dev"]["record"] == 6355122
    assert cat["datasets"]["dcase2023"]["eval"]["record"] == 7860847
    assert cat["datasets"]["dcase2024"]["additional"]["record"] == 11259435
    # a URL from the shipped template, and the mirror layout tests use
    a = D.plan(cat, "dcase2023", ["dev"], ["ToyCar"])[0]
    assert a.url == "https://zenodo.org/records/7882613/files/dev_ToyCar.zip?download=1"
    assert D.plan(cat, "dcase2023", ["dev"], ["ToyCar"], mirror="http://h/m/")[0].url == "http://h/m/7882613/dev_ToyCar.zip"
    # machine types as the records spell them, whatever the case typed; a split without them is skipped
    assert [a.file for a in D.plan(cat, "dcase2023", ["dev", "eval"], ["toycar"])] == ["dev_ToyCar.zip"]


def test_cli_list_and_usage_errors(capsys, tmp_path):
    assert cli.main(["download", "--list"]) == 0
    assert "dcase2025" in capsys.readouterr().out
    assert cli.main(["download", "dcase2019", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'dcase2019'" in capsys.readouterr().err
    assert cli.main(["download", "dcase2023", "--machines", "ToyDrone", "--out", str(tmp_path / "x")]) == 2
    assert "has no machine type ToyDrone" in error_line(capsys)
    assert cli.main(["download", "dcase2025", "--split", "eval", "--out", str(tmp_path / "x")]) == 2
    assert "--record" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- fetching
def test_end_to_end_resume_checksum_layout(server, tmp_path, capsys):
    """A connection dropped half-way is resumed with a range request, the md5 checked, the archive
    unpacked into dev_data/<machine>/ and recorded; a second run fetches nothing."""
    fan, toycar = zip_2020_dev(), zip_2023_dev()
    server.files = {"/100/dev_fan.zip": fan, "/100/dev_ToyCar.zip": toycar}
    server.drop["/100/dev_fan.zip"] = [len(fan) // 3]
    cat = catalogue(tmp_path, {"dcase2099": {"dev": split_entry(100, [
        ("fan", "dev_fan.zip", fan), ("ToyCar", "dev_ToyCar.zip", toycar)])}})
    out, cache = tmp_path / "data", tmp_path / "cache"
    rc = cli.main(["download", "dcase2099", "--split", "dev", "--out", str(out), "--mirror", server.url,
                   "--cache", str(cache), "--catalogue", str(cat)])
    assert rc == 0, capsys.readouterr().err
    assert server.requests[:2] == [("/100/dev_fan.zip", None, 200), ("/100/dev_fan.zip", f"bytes={len(fan) // 3}-", 206)]
    assert tree(out / "dev_data") == [
        "ToyCar/attributes_00.csv",
        "ToyCar/test/section_00_source_test_normal_0001_car_A1_spd_28V_mic_1.flac",
        "ToyCar/test/section_00_target_test_anomaly_0001_car_E1_spd_31V_mic_2.flac",
        "ToyCar/train/section_00_source_train_normal_0001_car_A1_spd_28V_mic_1.flac",
        "ToyCar/train/section_00_target_train_normal_0001_car_E1_spd_31V_mic_2.flac",
        "fan/test/anomaly_id_00_00000000.wav", "fan/test/normal_id_00_00000000.wav",
        "fan/train/normal_id_00_00000000.wav", "fan/train/normal_id_00_00000001.wav"]
    with zipfile.ZipFile(io.BytesIO(fan)) as z:  # byte-identical to the archive's members
        assert (out / "dev_data/fan/test/anomaly_id_00_00000000.wav").read_bytes() == z.read("fan/test/anomaly_id_00_00000000.wav")
    record = json.loads((out / D.RECORD_FILE).read_text())
    assert set(record) == {"dcase2099/dev/dev_fan.zip", "dcase2099/dev/dev_ToyCar.zip"}
    assert not [p for p in out.iterdir() if p.name.startswith(".asd-unpack")]
    assert tree(cache) == []  # archives removed once unpacked
    n = len(server.requests)
    (out / ".asd-unpack-killed" / "fan").mkdir(parents=True)  # what a run killed while unpacking leaves
    assert cli.main(["download", "dcase2099", "--out", str(out), "--mirror", server.url, "--cache", str(cache),
                     "--catalogue", str(cat)]) == 0
    assert len(server.requests) == n and "2 already there" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [D.RECORD_FILE, "dev_data"]


def test_resume_from_an_earlier_run_and_from_a_server_without_ranges(server, tmp_path):
    data = zip_2020_dev()
    server.files = {"/7/dev_fan.zip": data}
    cat = D.load_catalogue(catalogue(tmp_path, {"d": {"dev": split_entry(7, [("fan", "dev_fan.zip", data)])}}))
    (a,) = D.plan(cat, "d", ["dev"], mirror=server.url)
    cache = tmp_path / "cache"
    (cache / "7").mkdir(parents=True)
    (cache / "7" / "dev_fan.zip.part").write_bytes(data[:1000])  # what a stopped run left
    assert D.fetch(a, cache, show_progress=False).read_bytes() == data
    assert server.requests == [("/7/dev_fan.zip", "bytes=1000-", 206)]
    # a server that ignores ranges sends the whole file: the part is restarted, not appended to
    server.ranges, server.requests = False, []
    (cache / "7" / "dev_fan.zip").unlink()
    (cache / "7" / "dev_fan.zip.part").write_bytes(b"x" * 1000)
    assert D.fetch(a, cache, show_progress=False).read_bytes() == data
    assert server.requests == [("/7/dev_fan.zip", "bytes=1000-", 200)]
    # a part that is already whole: the server answers 416, the file is complete and verified
    server.ranges, server.requests = True, []
    (cache / "7" / "dev_fan.zip").rename(cache / "7" / "dev_fan.zip.part")
    assert D.fetch(a, cache, show_progress=False).read_bytes() == data
    assert server.requests == [("/7/dev_fan.zip", f"bytes={len(data)}-", 416)]


@pytest.mark.parametrize("with_md5", [True, False])
def test_corrupted_archive_is_refused_and_nothing_is_left(server, tmp_path, capsys, with_md5):
    data = zip_2020_dev()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte inside a clip: md5 (when published) and zip CRC catch it
    server.files = {"/5/dev_fan.zip": bytes(bad)}
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(5, [("fan", "dev_fan.zip", data)], with_md5=with_md5)}})
    out, cache = tmp_path / "data", tmp_path / "cache"
    rc = cli.main(["download", "d", "--out", str(out), "--mirror", server.url, "--cache", str(cache),
                   "--catalogue", str(cat)])
    err = error_line(capsys)
    assert rc == 2
    assert ("md5" in err and md5(bytes(bad)) in err) if with_md5 else "broken zip archive" in err
    assert not out.exists() and tree(cache) == []  # a corrupt file is not kept to be resumed


def test_corrupted_archive_in_an_existing_root_leaves_it_as_it_was(server, tmp_path):
    data, good = zip_2020_dev(), zip_2021_dev()
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    server.files = {"/5/dev_gearbox.zip": good, "/5/dev_fan.zip": bytes(bad)}
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(5, [("gearbox", "dev_gearbox.zip", good),
                                                            ("fan", "dev_fan.zip", None)])}})
    out = tmp_path / "data"
    with pytest.raises(D.DownloadError, match="broken zip archive"):
        D.download("d", out, mirror=server.url, cache=tmp_path / "cache", catalogue=cat, show_progress=False)
    # the complete archive stays (and is recorded), the broken one left nothing
    assert sorted(p.name for p in (out / "dev_data").iterdir()) == ["gearbox"]
    assert sorted(p.name for p in out.iterdir()) == [D.RECORD_FILE, "dev_data"]


def test_404_and_unreachable_network_are_one_line(server, tmp_path, capsys):
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(9, [("fan", "dev_fan.zip", None)])}})
    out = tmp_path / "data"
    assert cli.main(["download", "d", "--out", str(out), "--mirror", server.url, "--cache", str(tmp_path / "c"),
                     "--catalogue", str(cat)]) == 2
    err = error_line(capsys)
    assert "HTTP 404" in err and "record 9" in err
    port = server.httpd.server_address[1]
    server.close()  # nothing listens there any more
    assert cli.main(["download", "d", "--out", str(out), "--mirror", f"http://127.0.0.1:{port}",
                     "--cache", str(tmp_path / "c"), "--catalogue", str(cat)]) == 2
    err = error_line(capsys)
    assert f"cannot reach 127.0.0.1:{port}" in err and "refused" in err
    assert not out.exists()


def test_a_connection_that_keeps_dropping_keeps_the_part_for_the_next_run(server, tmp_path, capsys):
    data = zip_2020_dev()
    server.files = {"/3/dev_fan.zip": data}
    server.drop["/3/dev_fan.zip"] = [1000, 0, 0, 0, 0, 0]  # some bytes, then nothing more
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(3, [("fan", "dev_fan.zip", data)])}})
    out, cache = tmp_path / "data", tmp_path / "cache"
    args = ["download", "d", "--out", str(out), "--mirror", server.url, "--cache", str(cache), "--catalogue", str(cat)]
    assert cli.main(args) == 2
    err = error_line(capsys)
    assert "keeps failing" in err and "run the command again to resume" in err
    assert not out.exists() and (cache / "3" / "dev_fan.zip.part").stat().st_size == 1000
    server.drop.clear()
    assert cli.main(args) == 0  # the next run resumes from byte 1000
    assert server.requests[-1] == ("/3/dev_fan.zip", "bytes=1000-", 206)
    assert len(tree(out / "dev_data")) == 4


def test_zip_members_outside_the_folder_are_not_written(server, tmp_path):
    data = make_zip({"fan/train/normal_id_00_00000000.wav": clip_bytes(1), "../escape.txt": b"x",
                     "/abs.txt": b"y", "__MACOSX/fan/._x": b"z"})
    server.files = {"/1/a.zip": data}
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(1, [("fan", "a.zip", data)])}})
    out = tmp_path / "root" / "data"
    D.download("d", out, mirror=server.url, cache=tmp_path / "c", catalogue=cat, show_progress=False)
    assert not (tmp_path / "root" / "escape.txt").exists() and not Path("/abs.txt").exists()
    assert tree(out / "dev_data") == ["fan/train/normal_id_00_00000000.wav"]


# ----------------------------------------------------------------------------- eval data and ground truth
def test_additional_and_eval_with_ground_truth_give_eval_metrics(server, tmp_path):
    """additional (train) and eval (test) archives land in eval_data/<machine>/, attributes files
    are merged, and the evaluator's ground truth (a GitHub archive) lets scoring compute metrics;
    2021's per-domain ground-truth files are merged into the per-section ones."""
    from asd.metrics import read_ground_truth

    add = make_zip({"bandsaw/train/section_00_source_train_normal_0001_noAttribute.wav": clip_bytes(1),
                    "bandsaw/attributes_00.csv": b"file_name,d1p,d1v\nbandsaw/train/section_00_source_train_normal_0001_noAttribute.wav,noAttribute,\n"})
    test_names = [f"section_00_test_{i:04d}.wav" for i in range(1, 5)]
    ev = make_zip({**{f"bandsaw/test/{n}": clip_bytes(10 + i) for i, n in enumerate(test_names)},
                   "bandsaw/attributes_00.csv": ("file_name,d1p,d1v\n" + "".join(f"bandsaw/test/{n},,\n" for n in test_names)).encode()})
    ev21 = make_zip({"gearbox/source_test/section_03_source_test_0000.wav": clip_bytes(30),
                     "gearbox/target_test/section_03_target_test_0000.wav": clip_bytes(31)})
    gt = make_zip({
        "dcase_evaluator-main/README.md": b"evaluator",
        "dcase_evaluator-main/ground_truth_data/ground_truth_bandsaw_section_00_test.csv":
            "".join(f"{n},{i % 2}\n" for i, n in enumerate(test_names)).encode(),
        "dcase_evaluator-main/ground_truth_domain/ground_truth_bandsaw_section_00_test.csv":
            "".join(f"{n},{int(i >= 2)}\n" for i, n in enumerate(test_names)).encode(),
        "dcase_evaluator-main/ground_truth_data/ground_truth_gearbox_section_03_source_test.csv": b"section_03_source_test_0000.wav,1\n",
        "dcase_evaluator-main/ground_truth_data/ground_truth_gearbox_section_03_target_test.csv": b"section_03_target_test_0000.wav,0\n",
        "dcase_evaluator-main/ground_truth_data/ground_truth_shaker_section_00_test.csv": b"x.wav,0\n",  # not downloaded
    })
    server.files = {"/20/eval_data_bandsaw_train.zip": add, "/21/eval_data_bandsaw_test.zip": ev,
                    "/21/eval_data_gearbox_test.zip": ev21, "/github/org/evaluator/main.zip": gt}
    cat = catalogue(tmp_path, {"d": {
        "additional": split_entry(20, [("bandsaw", "eval_data_bandsaw_train.zip", add)]),
        "eval": split_entry(21, [("bandsaw", "eval_data_bandsaw_test.zip", ev),
                                 ("gearbox", "eval_data_gearbox_test.zip", ev21),
                                 ("shaker", "eval_data_shaker_test.zip", None)]),
        "ground_truth": {"record": "github/org/evaluator", "file": "main.zip", "size": None, "md5": None,
                         "url": "https://github.com/org/evaluator/archive/refs/heads/main.zip"}}})
    out = tmp_path / "data"
    s = D.download("d", out, ["additional", "eval"], ["bandsaw", "gearbox"], mirror=server.url,
                   cache=tmp_path / "c", catalogue=cat, show_progress=False)
    assert s.ground_truth_sections == 2 and len(s.unpacked) == 3
    assert tree(out / "eval_data")[:2] == ["bandsaw/attributes_00.csv",
                                           "bandsaw/test/section_00_test_0001.wav"]
    attrs = (out / "eval_data/bandsaw/attributes_00.csv").read_text().splitlines()
    assert attrs[0] == "file_name,d1p,d1v" and len(attrs) == 1 + 1 + 4  # train row kept, test rows added
    assert sorted(p.name for p in (out / "ground_truth_data").iterdir()) == [
        "ground_truth_bandsaw_section_00_test.csv", "ground_truth_gearbox_section_03_test.csv"]
    names, y, d = read_ground_truth(out / "ground_truth_data/ground_truth_gearbox_section_03_test.csv")
    assert names == ["section_03_source_test_0000.wav", "section_03_target_test_0000.wav"]
    assert y.tolist() == [1, 0] and d.tolist() == [0, 1]
    # scoring reads the truth for the discovered eval clips: metrics on eval data
    from pipelines.stages.score import labelled_results

    disc = discover_clips(out / "eval_data")
    assert not disc.unparsed
    test = [c for c in disc.clips if c.split == "test"]
    scored = pd.DataFrame({"path": [c.path for c in test], "machine": [c.machine for c in test],
                           "section": [c.section for c in test], "domain": [c.domain for c in test],
                           "label": [c.label for c in test], "score": np.arange(len(test), dtype=float),
                           "dataset": "eval_data"})
    results = labelled_results(scored, out)
    assert {(r.machine, r.section) for r in results} == {("bandsaw", "00"), ("gearbox", "03")}
    assert all(r.pauc is not None for r in results)
    # a second run fetches nothing, the ground truth included
    n = len(server.requests)
    again = D.download("d", out, ["additional", "eval"], ["bandsaw", "gearbox"], mirror=server.url,
                       cache=tmp_path / "c", catalogue=cat, show_progress=False)
    assert len(server.requests) == n and len(again.skipped) == 4 and again.ground_truth_sections == 2


# ----------------------------------------------------------------------------- every year's layout
def year_trees(root: Path) -> dict[str, str]:
    """One machine per year's layout under root/dev_data and root/eval_data; returns
    {relative path: expected "split/domain/label/section"} of every clip."""
    expected = {}

    def put(rel: str, want: str, fmt: str = "WAV") -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(clip_bytes(len(expected), fmt))
        expected[rel] = want

    # 2020: ids, no domains, 8-digit numbers; eval test 'id_XX_...'
    put("dev_data/pump/train/normal_id_00_00000000.wav", "train/source/normal/00")
    put("dev_data/pump/test/normal_id_02_00000000.wav", "test/source/normal/02")
    put("dev_data/pump/test/anomaly_id_02_00000000.wav", "test/source/anomaly/02")
    put("eval_data/pump/train/normal_id_01_00000000.wav", "train/source/normal/01")
    put("eval_data/pump/test/id_01_00000000.wav", "test/None/None/01")
    # 2021: source_test/ target_test/, test names without attributes; eval test with the domain
    put("dev_data/gearbox/train/section_00_source_train_normal_0000_volt_1.0_wt_30.wav", "train/source/normal/00")
    put("dev_data/gearbox/source_test/section_00_source_test_anomaly_0000.wav", "test/source/anomaly/00")
    put("dev_data/gearbox/target_test/section_00_target_test_normal_0000.wav", "test/target/normal/00")
    put("eval_data/gearbox/source_test/section_03_source_test_0000.wav", "test/None/None/03")
    put("eval_data/gearbox/target_test/section_03_target_test_0000.wav", "test/None/None/03")
    # 2022: attributes after the index, eval test without labels
    put("dev_data/bearing/train/section_01_target_train_normal_0000_vel_8_loc_B.wav", "train/target/normal/01")
    put("dev_data/bearing/test/section_01_source_test_anomaly_0049_vel_6_loc_A.wav", "test/source/anomaly/01")
    put("eval_data/bearing/test/section_03_test_0000.wav", "test/None/None/03")
    # 2023-2025: multi-attribute names from 0001, attributes_00.csv, FLAC as well as WAV, noAttribute
    put("dev_data/ToyCar/train/section_00_source_train_normal_0001_car_A1_spd_28V_mic_1.flac", "train/source/normal/00", "FLAC")
    put("dev_data/ToyCar/test/section_00_target_test_anomaly_0001_car_E1_spd_31V_mic_2.wav", "test/target/anomaly/00")
    put("eval_data/Vacuum/train/section_00_source_train_normal_0001_noAttribute.wav", "train/source/normal/00")
    put("eval_data/Vacuum/test/section_00_test_0001.flac", "test/None/None/00", "FLAC")
    (root / "dev_data/ToyCar/attributes_00.csv").write_text(
        "file_name,d1p,d1v,d2p,d2v,d3p,d3v\n"
        "ToyCar/train/section_00_source_train_normal_0001_car_A1_spd_28V_mic_1.wav,car,A1,spd,28V,mic,1\n"
        "ToyCar/test/section_00_target_test_anomaly_0001_car_E1_spd_31V_mic_2.wav,car,E1,spd,31V,mic,2\n")
    return expected


def _got(c) -> str:
    return f"{c.split}/{c.domain}/{c.label}/{c.section}"


def test_every_years_layout_is_discovered(tmp_path):
    expected = year_trees(tmp_path)
    got = {}
    for ds in ("dev_data", "eval_data"):
        disc = discover_clips(tmp_path / ds)
        assert disc.unparsed == []
        got.update({f"{ds}/{c.path}": _got(c) for c in disc.clips})
        if ds == "dev_data":  # the CSV names the WAV; the FLAC clip gets its attributes all the same
            assert disc.attributes["ToyCar/train/section_00_source_train_normal_0001_car_A1_spd_28V_mic_1.flac"] == {
                "car": "A1", "spd": "28V", "mic": "1"}
    assert got == expected


def test_real_toycar_flac_tree_is_discovered_whole():
    """The DCASE 2023 ToyCar FLAC folder beside the project (read in place, never copied)."""
    dev = REAL_TOYCAR / "dev_data"
    if not dev.is_dir():
        pytest.skip(f"real ToyCar FLAC clips not available at {dev}")
    disc = discover_clips(dev)
    flacs = sorted(dev.rglob("*.flac"))
    assert disc.unparsed == [] and len(disc.clips) == len(flacs) > 0
    assert all(c.path in disc.attributes for c in disc.clips)
    assert {c.domain for c in disc.clips} == {"source", "target"}
    assert min(c.index for c in disc.clips if c.split == "train") >= 1  # 2023 numbers from 0001


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_extract_reads_every_years_layout_and_downloaded_archives(server, tmp_path):
    """`asd extract` on one root holding every year's layout: trees laid out by hand, archives
    unpacked by `asd download` from the loopback server, a subset of the real ToyCar FLAC clips
    and the real valve WAVs (copied under tmp, never into the repo)."""
    from pipelines import store as S
    from pipelines.stages.extract import extract

    root = tmp_path / "data"
    expected = year_trees(root)
    fan, gear = zip_2020_dev(), zip_2021_dev()
    server.files = {"/1/dev_fan.zip": fan, "/1/dev_gearbox.zip": gear}
    cat = catalogue(tmp_path, {"d": {"dev": split_entry(1, [("fan", "dev_fan.zip", fan),
                                                            ("gearbox", "dev_gearbox.zip", gear)])}})
    shutil.rmtree(root / "dev_data" / "gearbox")  # the archive brings gearbox in the 2021 layout
    expected = {k: v for k, v in expected.items() if not k.startswith("dev_data/gearbox/")}
    D.download("d", root, mirror=server.url, cache=tmp_path / "c", catalogue=cat, show_progress=False)
    n_downloaded = len(tree(root / "dev_data" / "fan")) + len(tree(root / "dev_data" / "gearbox"))
    n_real = 0
    if REAL_AUDIO.is_dir() and any(REAL_AUDIO.glob("*.wav")):  # the eight real valve WAVs
        real = root / "dev_data" / "real_valve" / "test"
        real.mkdir(parents=True)
        for wav in sorted(REAL_AUDIO.glob("*.wav")):
            shutil.copy(wav, real / wav.name)
        n_real = len(list(real.iterdir()))
    if (REAL_TOYCAR / "dev_data" / "ToyCar").is_dir():  # a few real FLAC clips, both splits
        for split, n in (("train", 3), ("test", 3)):
            dst = root / "dev_data" / "real_ToyCar" / split
            dst.mkdir(parents=True)
            for f in sorted((REAL_TOYCAR / "dev_data" / "ToyCar" / split).glob("*.flac"))[:n]:
                shutil.copy(f, dst / f.name)
        n_real += 6
    summary = extract(root, tmp_path / "store", batch_size=16)
    assert summary.quarantined == 0, summary.quarantine
    assert summary.extracted == summary.discovered == len(expected) + n_downloaded + n_real
    meta = pd.concat([S.load_split(tmp_path / "store", s, with_features=False).meta for s in ("train", "test")])
    by_path = {r.path: f"{r.split}/{r.domain}/{r.label}/{r.section}".replace("nan", "None").replace("<NA>", "None")
               for r in meta.itertuples()}
    for rel, want in expected.items():
        assert by_path[rel] == want, rel
    assert by_path["dev_data/gearbox/target_test/section_00_target_test_anomaly_0000.wav"] == "test/target/anomaly/00"
    assert by_path["dev_data/fan/test/anomaly_id_00_00000000.wav"] == "test/source/anomaly/00"


def test_flac_decodes_to_the_samples_of_its_wav(tmp_path):
    """A FLAC clip (the real ToyCar ones where present) and the WAV written from it, as
    ../shared/data/realtoycar/unpack.py writes it, decode to the same waveform."""
    from asd.audio import load_audio

    flacs = sorted((REAL_TOYCAR / "dev_data" / "ToyCar" / "test").glob("*.flac"))[:2]
    if not flacs:
        flacs = [tmp_path / "clip.flac"]
        flacs[0].write_bytes(clip_bytes(0, "FLAC"))
    for flac in flacs:
        x, sr = sf.read(flac, dtype="int16")
        wav = tmp_path / (flac.stem + ".wav")
        sf.write(wav, x, sr, subtype="PCM_16", format="WAV")
        a, _ = load_audio(flac)
        b, _ = load_audio(wav)
        assert a.shape == b.shape and bool((a == b).all())


def test_predict_reads_the_machine_from_2021_test_folders():
    from pipelines.serving.predict import infer_machine_section

    assert infer_machine_section("d/gearbox/source_test/section_03_source_test_0000.wav") == ("gearbox", "03")
    assert infer_machine_section("d/pump/test/id_01_00000000.wav") == ("pump", "01")
