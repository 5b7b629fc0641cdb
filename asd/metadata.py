"""Clip metadata of DCASE-style trees: every year's naming of DCASE Task 2 (2020-2025) and user trees.

File names (WAV or FLAC), split on ``_``::

    section_<id>_<domain>_<split>_<label>_<index>[_<attribute string>].wav   (2021-2025 dev train/test, eval train)
    section_<id>_test_<index>.wav                                            (2022-2025 eval test: no labels)
    section_<id>_<domain>_test_<index>.wav                                   (2021 eval test: no labels)
    <normal|anomaly>_id_<id>_<index>.wav                                     (2020 dev train/test, eval train)
    id_<id>_<index>.wav                                                      (2020 eval test: no labels)

The attribute string is everything after the sixth field; it may be empty (2021 test names have
none; 2023-2025 use ``noAttribute`` for machines without one). 2020 names have a machine id instead of
a section: it is read as the section (``id_02`` -> section ``02``), and 2020 has no domain shift, so
its labelled clips are source-domain clips. Test clips lie in ``test/``, or in 2021's ``source_test/``
and ``target_test/`` (:data:`SPLIT_FOLDERS`). Machine types, section ids and attribute strings are
read from the tree, never from a fixed list.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asd.contracts import DOMAINS, LABELS, SPLITS

_LABELLED = re.compile(
    rf"^section_(?P<section>[0-9A-Za-z]+)_(?P<domain>{'|'.join(DOMAINS)})_(?P<split>{'|'.join(SPLITS)})_"
    rf"(?P<label>{'|'.join(LABELS)})_(?P<index>\d+)(?:_(?P<attribute>.*))?$"
)
_UNLABELLED = re.compile(
    rf"^section_(?P<section>[0-9A-Za-z]+)_(?:(?P<domain>{'|'.join(DOMAINS)})_)?test_(?P<index>\d+)$")
_ID_LABELLED = re.compile(rf"^(?P<label>{'|'.join(LABELS)})_id_(?P<section>[0-9A-Za-z]+)_(?P<index>\d+)$")  # 2020
_ID_UNLABELLED = re.compile(r"^id_(?P<section>[0-9A-Za-z]+)_(?P<index>\d+)$")  # 2020 eval test

# audio containers a clip may come in (soundfile decodes both; DCASE publishes WAV)
AUDIO_SUFFIXES = (".wav", ".flac")
# folder under <machine>/ -> (split, domain its clips must have or None): 2021 put test clips in
# source_test/ and target_test/, every other year in test/
SPLIT_FOLDERS = {"train": ("train", None), "test": ("test", None),
                 "source_test": ("test", "source"), "target_test": ("test", "target")}


class ClipNameError(ValueError):
    """A file name that does not follow the DCASE naming scheme."""


@dataclass(frozen=True)
class ClipMeta:
    """Everything the file name (and the tree it sits in) says about one clip.

    ``domain``, ``label`` and ``attribute`` are ``None`` for unlabelled eval test clips.
    ``path`` is relative to the data root (``<machine>/<split>/<file>.wav``).
    """

    path: str
    machine: str
    section: str
    split: str
    domain: str | None
    label: str | None
    index: int
    attribute: str | None

    @property
    def is_labelled(self) -> bool:
        return self.label is not None

    @property
    def attribute_class(self) -> tuple[str, str, str, str] | None:
        """(machine, section, domain, attribute string): the class the method learns."""
        if self.domain is None:
            return None
        return (self.machine, self.section, self.domain, self.attribute or "")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_clip_name(file_name: str, machine: str, split_dir: str | None = None) -> ClipMeta:
    """Parse one DCASE file name (any year's scheme, WAV or FLAC). ``split_dir`` is the folder it
    sits in (train/test, or 2021's source_test/target_test), if known.

    Raises ``ClipNameError`` naming the file when the name does not parse or disagrees
    with the folder it was found in.
    """
    base = os.path.basename(file_name)
    suffix = next((x for x in AUDIO_SUFFIXES if base.lower().endswith(x)), None)
    if suffix is None:
        raise ClipNameError(f"{file_name}: not an audio clip ({' or '.join(AUDIO_SUFFIXES)})")
    stem = base[: -len(suffix)]
    if split_dir is not None and split_dir not in SPLIT_FOLDERS:
        raise ClipNameError(f"{file_name}: lies in '{split_dir}/', not one of {', '.join(SPLIT_FOLDERS)}")
    folder_split, folder_domain = SPLIT_FOLDERS.get(split_dir, (None, None))

    def meta(split: str, section: str, domain, label, index: str, attribute) -> ClipMeta:
        return ClipMeta(path=f"{machine}/{split_dir or split}/{base}", machine=machine, section=section,
                        split=split, domain=domain, label=label, index=int(index), attribute=attribute)

    name_domain = None  # the domain the name states, checked against a source_test/target_test folder
    if m := _LABELLED.match(stem):
        out = meta(m["split"], m["section"], m["domain"], m["label"], m["index"], m["attribute"] or "")
        name_domain = m["domain"]
    elif m := _UNLABELLED.match(stem):
        out = meta("test", m["section"], None, None, m["index"], None)
        name_domain = m["domain"]
    elif m := _ID_LABELLED.match(stem):  # 2020: no split in the name, no domains (all source)
        out = meta(folder_split or "test", m["section"], "source", m["label"], m["index"], "")
    elif m := _ID_UNLABELLED.match(stem):
        out = meta("test", m["section"], None, None, m["index"], None)
    else:
        raise ClipNameError(
            f"{file_name}: cannot parse the DCASE clip name; expected "
            "'section_XX_<source|target>_<train|test>_<normal|anomaly>_NNNN[_attributes].wav', "
            "'section_XX[_<source|target>]_test_NNNN.wav' or (2020) '[<normal|anomaly>_]id_XX_NNNNNNNN.wav'"
        )
    if folder_split is not None and folder_split != out.split:
        raise ClipNameError(f"{file_name}: name says split '{out.split}' but it lies in '{split_dir}/'")
    if folder_domain is not None and name_domain is not None and folder_domain != name_domain:
        raise ClipNameError(f"{file_name}: name says domain '{name_domain}' but it lies in '{split_dir}/'")
    return out


def decode_utf8(raw: bytes, path: str | os.PathLike) -> tuple[str, str | None]:
    """``raw`` as UTF-8 text with undecodable bytes replaced by U+FFFD, and one problem line naming
    the file and the line of the first such byte (None when clean): a hand-edited metadata file
    saved in Latin-1 must not stop a whole discovery with a UnicodeDecodeError."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return raw.decode("utf-8", errors="replace"), (
            f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x}); undecodable bytes read as U+FFFD")


def read_attributes_csv(path: str | os.PathLike, problems: list[str] | None = None
                        ) -> dict[str, dict[str, str]]:
    """Read ``attributes_XX.csv`` (``file_name,d1p,d1v[,d2p,d2v,...]``).

    Returns ``{relative file name: {parameter: value}}``. A missing header, a row with an odd
    number of parameter/value cells or a byte that is not UTF-8 raises ``ValueError`` naming the
    file and line; with a ``problems`` list, each is appended there instead (a bad header skips
    the file, a bad row only itself, bad bytes are read as U+FFFD) and the rest is read.
    """
    def bad(message: str) -> None:
        if problems is None:
            raise ValueError(message)
        problems.append(message)

    out: dict[str, dict[str, str]] = {}
    text, problem = decode_utf8(Path(path).read_bytes(), path)
    if problem:
        bad(problem)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or not rows[0] or rows[0][0] != "file_name":
        bad(f"{path}: expected a header starting with 'file_name'")
        return out
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not row[0]:
            continue
        cells = [c for c in row[1:]]
        while cells and cells[-1] == "":
            cells.pop()
        if len(cells) % 2:
            bad(f"{path}:{lineno}: parameter/value cells do not pair up: {row}")
            continue
        out[row[0]] = {cells[i]: cells[i + 1] for i in range(0, len(cells), 2)}
    return out


@dataclass
class Discovery:
    """Result of walking a data root: parsed clips plus the entries that cannot be used."""

    clips: list[ClipMeta]
    unparsed: list[tuple[str, str]]  # (relative path, reason): bad names, links, folders
    attributes: dict[str, dict[str, str]]  # from every attributes_XX.csv, keyed by relative name
    warnings: list[str] = field(default_factory=list)  # missing, refused or malformed attribute files


def entry_problem(entry: Path, confine_to: Path) -> str | None:
    """Why a directory entry of the data tree (a ``*.wav`` clip, an ``attributes_XX.csv``) must not
    be read, or None: a dangling symlink, a path that resolves outside ``confine_to`` (never
    followed, so a link cannot pull another file's contents into the logs), or not a regular file."""
    if entry.is_symlink() and not entry.exists():
        return f"dangling symlink to {os.readlink(entry)}"
    real = entry.resolve()
    if not real.is_relative_to(confine_to.resolve()):
        return f"resolves outside the data root (to {real}): not followed"
    if not real.is_file():
        return "not a regular file"
    return None


def discover_clips(root: str | os.PathLike, splits: tuple[str, ...] = SPLITS,
                   confine_to: str | os.PathLike | None = None) -> Discovery:
    """Walk ``<root>/<machine>/<split folder>/*.{wav,flac}`` of a dev_data or eval_data tree (split
    folders: :data:`SPLIT_FOLDERS`).

    Every ``*.wav``/``*.flac`` entry found (files, links, folders) is either in ``clips`` or in
    ``unparsed`` with the reason, so that counts always add up; entries (clips and
    ``attributes_XX.csv``) that resolve outside ``confine_to`` (default ``root``) are never read:
    a refused attributes file is a warning naming it. Sorted by path for determinism.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    confine = Path(confine_to) if confine_to is not None else root
    clips: list[ClipMeta] = []
    unparsed: list[tuple[str, str]] = []
    attributes: dict[str, dict[str, str]] = {}
    warnings: list[str] = []
    for machine_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        csv_sections = set()
        for csv_path in sorted(machine_dir.glob("attributes_*.csv")):
            csv_sections.add(csv_path.stem[len("attributes_"):])
            problem = entry_problem(csv_path, confine)
            if problem:
                warnings.append(f"{csv_path}: {problem}; its attributes are not read")
                continue
            attributes.update(read_attributes_csv(csv_path, warnings))
        sections = set()
        for folder in (f for f, (split, _) in SPLIT_FOLDERS.items() if split in splits):
            split_dir = machine_dir / folder
            if not split_dir.is_dir():
                continue
            for wav in sorted(split_dir.iterdir()):
                if wav.suffix.lower() not in AUDIO_SUFFIXES:
                    continue
                rel = f"{machine_dir.name}/{folder}/{wav.name}"
                problem = entry_problem(wav, confine)
                if problem:
                    unparsed.append((rel, problem))
                    continue
                try:
                    clips.append(parse_clip_name(wav.name, machine_dir.name, folder))
                    sections.add(clips[-1].section)
                    wav_key = f"{rel[: -len(wav.suffix)]}.wav"  # attributes CSVs name the WAV of a FLAC clip
                    if rel not in attributes and wav_key in attributes:
                        attributes[rel] = attributes[wav_key]
                except ClipNameError as err:
                    unparsed.append((rel, str(err)))
        missing = sorted(sections - csv_sections)
        if missing:
            warnings.append(f"{machine_dir}: no attributes_XX.csv for section(s) {', '.join(missing)}: "
                            "their clips have no attribute parameters")
    return Discovery(clips=clips, unparsed=unparsed, attributes=attributes, warnings=warnings)


def attribute_class_ids(clips: list[ClipMeta]) -> dict[tuple[str, str, str, str], int]:
    """Dense, deterministic ids for the attribute classes present in ``clips`` (sorted)."""
    classes = sorted({c.attribute_class for c in clips if c.attribute_class is not None})
    return {cls: i for i, cls in enumerate(classes)}
