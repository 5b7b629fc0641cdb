"""``asd download``: the DCASE Task 2 archives of 2020-2025, fetched, verified and unpacked into the
layout the pipeline reads (``<out>/dev_data/<machine>/...``, ``<out>/eval_data/<machine>/...``).

    asd download dcase2023 --split dev --machines ToyCar fan --out data/dcase2023
    asd download dcase2023 --split additional eval --out data/dcase2023     (+ the eval ground truth)
    asd download --list

Record ids, file names, sizes and md5 checksums come from ``dcase_task2.yaml`` beside this module
(unknown ones are null there: a null md5 is not checked, a null record needs ``--record``).

1. Each archive is streamed (progress bar) into a download cache *outside* the data root
   (``--cache``, ``$ASD_DOWNLOAD_CACHE``, default ``~/.cache/asd/downloads``) as ``<file>.part``;
   a dropped connection is resumed with an HTTP range request (and so is the next run after a
   stopped one); a server that ignores ranges restarts the file.
2. The complete file is checked: its size and md5 where the catalogue knows them; a mismatch
   deletes it (it cannot be resumed into a right one).
3. It is unpacked into a staging folder inside ``--out`` (zip CRCs checked, no member outside the
   folder), every ``<machine>/{train,test,source_test,target_test}`` folder found in it is moved
   to ``<out>/<dev_data|eval_data>/<machine>/`` (``attributes_XX.csv`` files merged row-wise), and
   the archive is recorded in ``<out>/.asd-download.json``: a second run skips it. A failure at
   any step leaves no staging folder and no half-moved machine in ``--out``.
4. For ``--split eval``, the organisers' ground truth (where published) is written to
   ``<out>/ground_truth_data/`` and ``ground_truth_domain/`` as ``asd score`` reads it; 2021's
   per-domain files are merged into the per-section files.

File names are kept as published: :mod:`asd.metadata` reads every year's naming.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from asd.contracts import DEV_DATA, EVAL_DATA, GROUND_TRUTH_DATA, GROUND_TRUTH_DOMAIN
from asd.metadata import SPLIT_FOLDERS
from pipelines.errors import UserError

CATALOGUE = Path(__file__).with_name("dcase_task2.yaml")
SPLITS = ("dev", "additional", "eval")
DATASET_FOLDER = {"dev": DEV_DATA, "additional": EVAL_DATA, "eval": EVAL_DATA}
MIRROR_ENV = "ASD_DOWNLOAD_MIRROR"
CACHE_ENV = "ASD_DOWNLOAD_CACHE"
RECORD_FILE = ".asd-download.json"  # archives unpacked into this data root
STAGE_PREFIX = ".asd-unpack-"  # staging folders inside the data root, removed after each archive
CHUNK = 1 << 20
# waits (s) before the retries of one transfer that stopped half-way or got a 5xx; a transfer that
# makes progress starts the count again. Tests set them to zero.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_GROUND_TRUTH = re.compile(
    r"^ground_truth_(?P<machine>.+)_section_(?P<section>[0-9A-Za-z]+)_(?:(?P<domain>source|target)_)?test\.csv$")


class DownloadError(UserError):
    """The network, the record or the archive failed: one line, naming the file and the fix."""


@dataclass(frozen=True)
class Archive:
    dataset: str
    split: str  # dev | additional | eval | ground_truth
    machine: str | None
    record: str
    file: str
    url: str
    size: int | None
    md5: str | None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.split}/{self.file}"


# ----------------------------------------------------------------------------- the catalogue
def load_catalogue(path: str | os.PathLike | None = None) -> dict:
    import yaml  # deferred: `asd --help` imports nothing heavy

    path = Path(path) if path else CATALOGUE
    try:
        cat = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DownloadError(f"cannot read the dataset catalogue {path}: {err}") from err
    if not isinstance(cat, dict) or not isinstance(cat.get("datasets"), dict):
        raise DownloadError(f"{path}: expected a mapping with 'datasets:'")
    return cat


def dataset_name(cat: dict, name: str) -> str:
    """``dcase2023``; ``2023`` and ``DCASE2023`` are accepted too."""
    for cand in (name, name.lower(), f"dcase{name}"):
        if cand in cat["datasets"]:
            return cand
    raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(cat['datasets'])} (asd download --list)")


def _url(cat: dict, record: str, file: str, mirror: str | None, url: str | None = None) -> str:
    if mirror:
        return f"{mirror.rstrip('/')}/{quote(str(record))}/{quote(file)}"
    return url or cat["url"].format(record=quote(str(record)), file=quote(file))


def plan(cat: dict, dataset: str, splits: list[str], machines: list[str] | None = None,
         mirror: str | None = None, record: str | None = None) -> list[Archive]:
    """The archives of ``dataset``'s ``splits`` for ``machines`` (all when None), in that order."""
    entry = cat["datasets"][dataset]
    out: list[Archive] = []
    seen_machines: set[str] = set()
    if machines:  # as the catalogue spells them: `toycar` is ToyCar
        spelling = {a["machine"].lower(): a["machine"] for s in splits if entry.get(s) for a in entry[s]["archives"]}
        machines = [spelling.get(m.lower(), m) for m in machines]
    for split in splits:
        part = entry.get(split)
        if not part:
            raise DownloadError(f"{dataset} has no '{split}' split in the catalogue")
        rec = record or part.get("record")
        if rec is None:
            raise DownloadError(f"the catalogue does not know the Zenodo record of {dataset} {split}: "
                                "pass --record ID (from the challenge's page)")
        for a in part["archives"]:
            if machines and a["machine"] not in machines:
                continue
            seen_machines.add(a["machine"])
            out.append(Archive(dataset, split, a["machine"], str(rec), a["file"],
                               _url(cat, rec, a["file"], mirror), a.get("size"), a.get("md5")))
    missing = sorted(set(machines or ()) - seen_machines)
    if missing:
        known = sorted({a["machine"] for s in splits for a in entry[s]["archives"]})
        raise DownloadError(f"{dataset} {'/'.join(splits)} has no machine type {', '.join(missing)}; "
                            f"its machine types: {', '.join(known)}")
    return out


def ground_truth_archive(cat: dict, dataset: str, mirror: str | None = None) -> Archive | None:
    gt = cat["datasets"][dataset].get("ground_truth")
    if not gt:
        return None
    return Archive(dataset, "ground_truth", None, str(gt["record"]), gt["file"],
                   _url(cat, gt["record"], gt["file"], mirror, gt.get("url")), gt.get("size"), gt.get("md5"))


def catalogue_text(cat: dict) -> str:
    lines = []
    for name, entry in cat["datasets"].items():
        lines.append(f"{name}: {entry.get('title', '')}")
        for split in SPLITS:
            part = entry.get(split)
            if not part:
                continue
            known = sum(1 for a in part["archives"] if a.get("md5"))
            lines.append(f"  {split:<10} record {part.get('record') or 'unknown (--record)'}: "
                         f"{' '.join(a['machine'] for a in part['archives'])}"
                         f"  [md5 known for {known}/{len(part['archives'])}]")
        gt = entry.get("ground_truth")
        lines.append(f"  {'eval truth':<10} {gt['url'] if gt else 'not published in the catalogue'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fetching
def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _progress(total: int | None, initial: int, desc: str, show: bool):
    if not show:
        return None
    from tqdm import tqdm  # deferred, as pipelines.console.progress

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, mininterval=0.5, dynamic_ncols=True, leave=True)


def fetch(archive: Archive, cache: Path, *, timeout: float = 60.0, show_progress: bool = True) -> Path:
    """The archive's file in ``cache``, downloaded (resumed from a ``.part`` left by an earlier try)
    and verified (size and md5 where known). Raises :class:`DownloadError` with one line."""
    folder = cache / re.sub(r"[^0-9A-Za-z._-]+", "_", archive.record)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / archive.file
    part = folder / (archive.file + ".part")
    if dest.is_file():
        verify(dest, archive)
        return dest
    host = urlsplit(archive.url).netloc or archive.url
    failures = 0
    state = {"connected": False}  # set once a response arrived: later failures are drops, retried
    while True:
        have = part.stat().st_size if part.is_file() else 0
        if archive.size is not None and have > archive.size:
            part.unlink()
            have = 0
        headers = {"User-Agent": "asd-download/1", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            done = _transfer(urllib.request.Request(archive.url, headers=headers), part, have, archive,
                             timeout, show_progress, state)
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing after what we have: complete if the total says so
                m = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") or "")
                if m and int(m[1]) == have:
                    break
                part.unlink()  # the server's file is shorter than our part: start again
                failures += 1
                if failures > len(RETRY_DELAYS):
                    raise DownloadError(f"{archive.file}: the server refuses every range of it ({archive.url})")
                continue
            if err.code in (404, 410):
                raise DownloadError(
                    f"{archive.file}: not found at {archive.url} (HTTP {err.code}): the record {archive.record} "
                    "is not reachable or has no such file; check the record id (--record) or --mirror") from None
            if err.code in (408, 429) or err.code >= 500:
                failures += 1
                if failures > len(RETRY_DELAYS):
                    raise DownloadError(f"{archive.file}: HTTP {err.code} from {host} after {failures} tries; "
                                        "run the command again later to resume") from None
                time.sleep(RETRY_DELAYS[failures - 1])
                continue
            raise DownloadError(f"{archive.file}: HTTP {err.code} {err.reason} from {archive.url}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, socket.timeout) as err:
            now = part.stat().st_size if part.is_file() else 0
            if isinstance(err, urllib.error.URLError) and not state["connected"]:
                # refused, no route, no DNS before any response: the network or the host is not there
                raise DownloadError(f"cannot reach {host} for {archive.file}: {_reason(err)} "
                                    "(check the network, or use --mirror)") from None
            failures = 0 if now > have else failures + 1  # progress resets the count
            if failures > len(RETRY_DELAYS):
                raise DownloadError(
                    f"{archive.file}: the connection to {host} keeps failing ({_reason(err)}); "
                    f"{now} bytes kept in {part}: run the command again to resume") from None
            time.sleep(RETRY_DELAYS[max(failures - 1, 0)])
            continue
        if done:
            break
    os.replace(part, dest)
    verify(dest, archive)
    return dest


def _transfer(req: urllib.request.Request, part: Path, have: int, archive: Archive, timeout: float,
              show_progress: bool, state: dict) -> bool:
    """One HTTP request appended to ``part``; True when the file is complete. Raises on a dropped
    connection (after keeping what arrived)."""
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError:
        state["connected"] = True
        raise
    state["connected"] = True
    with resp:
        total = None
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != have:  # not the range we asked for: start again
                have = 0
                part.unlink(missing_ok=True)
                raise http.client.HTTPException(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m[3]) if m[3] != "*" else None
        else:  # 200: the whole file (a server without ranges): start from zero
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if archive.size is not None and total is not None and total != archive.size:
            raise DownloadError(f"{archive.file}: the server offers {total} bytes, the catalogue says "
                                f"{archive.size}: the record changed or the mirror serves another file")
        bar = _progress(total, have, archive.file, show_progress)
        got = have
        try:
            with open(part, "ab" if have else "wb") as out:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if total is not None and got < total:
            raise http.client.IncompleteRead(b"", total - got)
        return True


def file_md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, archive: Archive) -> None:
    """Size and md5 where the catalogue knows them; a file that fails is deleted."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        path.unlink()
        raise DownloadError(f"{archive.file}: {size} bytes, the catalogue says {archive.size}: "
                            "deleted; run the command again")
    if archive.md5:
        got = file_md5(path)
        if got != archive.md5.lower():
            path.unlink()
            raise DownloadError(f"{archive.file}: md5 {got} does not match the published {archive.md5}: "
                                "the download was corrupted and is deleted; run the command again")


# ----------------------------------------------------------------------------- unpacking
def _safe_extract(zpath: Path, archive: Archive, stage: Path, members=None, show_progress: bool = True) -> None:
    """Extract (all, or the members ``members(name)`` accepts) into ``stage``: no absolute
    paths, no ``..``, no links; CRCs checked. A broken archive is deleted from the cache."""
    try:
        with zipfile.ZipFile(zpath) as z:
            infos = [i for i in z.infolist() if not i.is_dir() and (members is None or members(i.filename))]
            bar = _progress(sum(i.file_size for i in infos), 0, f"unpack {archive.file}", show_progress)
            try:
                for info in infos:
                    name = info.filename.replace("\\", "/")
                    parts = [p for p in name.split("/") if p not in ("", ".")]
                    if name.startswith("/") or ".." in parts or not parts or parts[0] == "__MACOSX":
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink member
                        continue
                    target = stage.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    if bar is not None:
                        bar.update(info.file_size)
            finally:
                if bar is not None:
                    bar.close()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        zpath.unlink(missing_ok=True)
        raise DownloadError(f"{archive.file}: broken zip archive ({_reason(err)}): deleted; "
                            "run the command again") from None


def machine_dirs(stage: Path) -> list[Path]:
    """Folders that hold a split folder (train/, test/, source_test/, target_test/), outermost first."""
    found = []
    for dirpath, dirnames, _ in os.walk(stage):
        if any(d in SPLIT_FOLDERS for d in dirnames):
            found.append(Path(dirpath))
            dirnames[:] = []  # a machine's folders hold no other machine
        else:
            dirnames.sort()
    return sorted(found)


def merge_attributes_csv(new: Path, old: Path) -> None:
    """``old`` := the rows of both (by file_name; ``new`` wins), the wider header."""
    def rows(p: Path) -> tuple[list[str], dict[str, list[str]]]:
        table = list(csv.reader(io.StringIO(p.read_bytes().decode("utf-8", errors="replace"), newline="")))
        if not table:
            return [], {}
        return table[0], {r[0]: r for r in table[1:] if r and r[0]}

    head_old, rows_old = rows(old)
    head_new, rows_new = rows(new)
    header = max(head_old, head_new, key=len)
    merged = {**rows_old, **rows_new}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for name in sorted(merged):
        w.writerow(merged[name])
    tmp = old.with_name(old.name + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, old)


def _move_machine(src: Path, dst: Path) -> None:
    """Move one unpacked machine folder to its place; into an existing one file by file."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # one rename: the machine appears whole
        return
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and re.fullmatch(r"attributes_.*\.csv", path.name):
            merge_attributes_csv(path, target)
        else:
            os.replace(path, target)


def unpack(zpath: Path, archive: Archive, out: Path, show_progress: bool = True) -> list[str]:
    """Unpack one machine archive into ``out/<dev_data|eval_data>/<machine>/``; the machine names."""
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))
    try:
        _safe_extract(zpath, archive, stage, show_progress=show_progress)
        found = machine_dirs(stage)
        if not found:
            raise DownloadError(f"{archive.file}: no <machine>/train or <machine>/test folder inside; "
                                "is it a DCASE Task 2 archive?")
        dataset = out / DATASET_FOLDER[archive.split]
        names = []
        for mdir in found:
            name = archive.machine if mdir == stage else mdir.name
            _move_machine(mdir, dataset / name)
            names.append(name)
        return names
    except OSError as err:  # disk full, permissions: one line, not a traceback
        raise DownloadError(f"{archive.file}: cannot unpack into {out}: {_reason(err)}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def apply_ground_truth(zpath: Path, archive: Archive, out: Path, machines: set[str] | None,
                       show_progress: bool = True) -> int:
    """Write the ground-truth CSVs of ``machines`` (all when None) as ``asd score`` reads them
    (``ground_truth_<machine>_section_<XX>_test.csv`` in ground_truth_data/ and ground_truth_domain/);
    per-domain files (2021: ``..._section_XX_source_test.csv``) are merged, their domain written.
    Returns the number of sections written."""
    stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))

    def wanted(name: str) -> bool:
        parts = name.replace("\\", "/").split("/")
        return len(parts) >= 2 and parts[-2] in (GROUND_TRUTH_DATA, GROUND_TRUTH_DOMAIN) and parts[-1].endswith(".csv")

    try:
        _safe_extract(zpath, archive, stage, members=wanted, show_progress=show_progress)
        plain: dict[tuple[str, str], Path] = {}
        split_domain: dict[tuple[str, str], dict[str, Path]] = {}
        for path in sorted(stage.rglob("*.csv")):
            m = _GROUND_TRUTH.match(path.name)
            if not m or (machines is not None and m["machine"] not in machines):
                continue
            if path.parent.name == GROUND_TRUTH_DOMAIN:
                plain[(GROUND_TRUTH_DOMAIN, path.name)] = path
            elif m["domain"]:
                split_domain.setdefault((m["machine"], m["section"]), {})[m["domain"]] = path
            else:
                plain[(GROUND_TRUTH_DATA, path.name)] = path
        written: dict[tuple[str, str], str] = {}
        for (folder, name), path in plain.items():
            written[(folder, name)] = path.read_text()
        for (machine, section), by_domain in split_domain.items():
            name = f"ground_truth_{machine}_section_{section}_test.csv"
            labels, domains = [], []
            for dom, path in sorted(by_domain.items()):
                for row in csv.reader(io.StringIO(path.read_text(), newline="")):
                    if len(row) >= 2 and row[0].strip():
                        labels.append(f"{row[0].strip()},{row[1].strip()}")
                        domains.append(f"{row[0].strip()},{0 if dom == 'source' else 1}")
            written[(GROUND_TRUTH_DATA, name)] = "\n".join(labels) + "\n"
            written[(GROUND_TRUTH_DOMAIN, name)] = "\n".join(domains) + "\n"
        for (folder, name), text in written.items():
            (out / folder).mkdir(parents=True, exist_ok=True)
            tmp = out / folder / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out / folder / name)
        return sum(1 for folder, _ in written if folder == GROUND_TRUTH_DATA)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- the command
def _read_record(out: Path) -> dict:
    try:
        return json.loads((out / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(out: Path, record: dict) -> None:
    tmp = out / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / RECORD_FILE)


def default_cache() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asd" / "downloads"


@dataclass
class DownloadSummary:
    unpacked: list[str]  # archive keys unpacked by this call
    skipped: list[str]  # already unpacked by an earlier call
    ground_truth_sections: int
    notes: list[str]


def download(dataset: str, out: str | os.PathLike, splits: list[str] | tuple[str, ...] = ("dev",),
             machines: list[str] | None = None, *, mirror: str | None = None, cache: str | os.PathLike | None = None,
             record: str | None = None, catalogue: str | os.PathLike | None = None, keep_archives: bool = False,
             ground_truth: bool = True, timeout: float = 60.0, show_progress: bool = True) -> DownloadSummary:
    """Fetch, verify and unpack; see the module docstring."""
    cat = load_catalogue(catalogue)
    dataset = dataset_name(cat, dataset)
    splits = list(dict.fromkeys(splits))
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DownloadError(f"unknown split {', '.join(bad)}; one of {', '.join(SPLITS)}")
    if record is not None and len(splits) != 1:
        raise DownloadError("--record names the record of one split: pass exactly one --split with it")
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    archives = plan(cat, dataset, splits, machines, mirror, record)
    cache = Path(cache) if cache else default_cache()
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(STAGE_PREFIX + "*"):  # left by a run that was killed while unpacking
        shutil.rmtree(stale, ignore_errors=True)
    done = _read_record(out)
    summary = DownloadSummary([], [], 0, [])
    try:
        for a in archives:
            if a.key in done and all((out / DATASET_FOLDER[a.split] / m).is_dir() for m in done[a.key]["machines"]):
                summary.skipped.append(a.key)
                continue
            path = fetch(a, cache, timeout=timeout, show_progress=show_progress)
            names = unpack(path, a, out, show_progress=show_progress)
            done[a.key] = {"machines": names, "md5": a.md5, "url": a.url, "unpacked_at": time.time()}
            _write_record(out, done)
            summary.unpacked.append(a.key)
            if not keep_archives:
                path.unlink(missing_ok=True)
        if ground_truth and any(a.split == "eval" for a in archives):
            gt = ground_truth_archive(cat, dataset, mirror)
            if gt is None:
                summary.notes.append(f"{dataset}: no published ground truth in the catalogue: eval clips are "
                                     "scored, without metrics")
            else:
                eval_machines = sorted({m for a in archives if a.split == "eval"
                                        for m in done.get(a.key, {}).get("machines", ())})
                have = done.get(gt.key, {})
                if have.get("machines") == eval_machines and (out / GROUND_TRUTH_DATA).is_dir():
                    summary.skipped.append(gt.key)
                    summary.ground_truth_sections = have.get("sections", 0)
                else:
                    path = fetch(gt, cache, timeout=timeout, show_progress=show_progress)
                    summary.ground_truth_sections = apply_ground_truth(path, gt, out, set(eval_machines),
                                                                       show_progress)
                    done[gt.key] = {"machines": eval_machines, "sections": summary.ground_truth_sections,
                                    "url": gt.url, "unpacked_at": time.time()}
                    _write_record(out, done)
                    if not keep_archives:
                        path.unlink(missing_ok=True)
                if not summary.ground_truth_sections:
                    summary.notes.append(f"{gt.file}: no ground truth of {', '.join(sorted(eval_machines))} in it")
    except BaseException:
        if created and not done:  # nothing of ours finished: leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return summary


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "download", help="download DCASE Task 2 data (2020-2025) into the layout the pipeline reads",
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", help="dcase2020 ... dcase2025 (see --list)")
    p.add_argument("--split", nargs="+", default=["dev"], choices=SPLITS, metavar="SPLIT",
                   help="dev (default), additional (eval machines' training clips), eval (their test clips "
                        "and the ground truth); several at once allowed")
    p.add_argument("--machines", nargs="+", metavar="TYPE", help="machine types (default: all of the split)")
    p.add_argument("--out", help="data root to fill (what data.root points at)")
    p.add_argument("--mirror", default=None,
                   help=f"fetch <mirror>/<record>/<file> instead of Zenodo/GitHub (also ${MIRROR_ENV})")
    p.add_argument("--record", help="Zenodo record id of the one --split, where the catalogue has none")
    p.add_argument("--cache", help=f"download cache, outside --out (default ${CACHE_ENV} or ~/.cache/asd/downloads)")
    p.add_argument("--catalogue", help="another catalogue file (default: pipelines/datasets/dcase_task2.yaml)")
    p.add_argument("--keep-archives", action="store_true", help="keep the archives in the cache after unpacking")
    p.add_argument("--no-ground-truth", dest="ground_truth", action="store_false",
                   help="with --split eval: do not fetch the ground truth")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry (default 60)")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.set_defaults(func=main)


def main(args) -> int:
    if args.list:
        print(catalogue_text(load_catalogue(args.catalogue)))
        return 0
    if not args.dataset or not args.out:
        raise DownloadError("name a dataset and --out DIR, e.g. `asd download dcase2023 --split dev --out data/dcase2023`")
    t0 = time.perf_counter()
    s = download(args.dataset, args.out, args.split, args.machines, mirror=args.mirror, cache=args.cache,
                 record=args.record, catalogue=args.catalogue, keep_archives=args.keep_archives,
                 ground_truth=args.ground_truth, timeout=args.timeout, show_progress=True)
    print(f"download: {len(s.unpacked)} archive(s) unpacked, {len(s.skipped)} already there"
          + (f", ground truth of {s.ground_truth_sections} section(s)" if s.ground_truth_sections else "")
          + f"; {time.perf_counter() - t0:.1f} s; data root {args.out}")
    for note in s.notes:
        print(f"  note: {note}")
    print(f"next: asd run --config dcase2022 --set data.root={args.out}")
    return 0
