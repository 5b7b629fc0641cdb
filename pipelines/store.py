"""The Parquet feature store: layout, schema, manifest, quarantine, and the readers.

Layout (one folder per feature-config version, so a changed front end never mixes with old rows)::

    <store>/store.json                                   last extraction: feature version, settings
    <store>/v-<version>/features.json                    FeatureConfig + element dtype of this version
    <store>/v-<version>/manifest.parquet                 one row per extracted clip: the source of truth
    <store>/v-<version>/quarantine.parquet               clips that could not be used, with the reason
    <store>/v-<version>/dataset=<d>/machine=<m>/section=<s>/split=<t>/part-<digest>.parquet
    <store>/v-<version>/journal/<shard spec digest>.json  per-clip results of shards a run finished
                                                          before it was stopped (consumed by the next)
    <store>/.lock                                         held by the one command writing the store

Readers only read shards the manifest lists, so an interrupted extraction can never add rows.
Shard names are a digest of their clips (path + content hash) and the version: deterministic.
The schema is documented in docs/feature-store.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from asd.contracts import class_ids
from pipelines.errors import NO_SPACE, UserError

STORE_FILE = "store.json"
LOCK_FILE = ".lock"
JOURNAL = "journal"
MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine.parquet"
FEATURE_DTYPES = ("float16", "float32")

# Per-clip metadata columns of a shard (the features column and audio facts come after).
META_FIELDS = [
    ("path", pa.string()),  # relative to the data root: <dataset>/<machine>/<split>/<file>.wav
    ("dataset", pa.string()),  # dev_data / eval_data (or the folder name of a user tree)
    ("machine", pa.string()),
    ("section", pa.string()),
    ("domain", pa.string()),  # null for unlabelled eval test clips
    ("split", pa.string()),
    ("label", pa.string()),  # normal / anomaly; null where unknown
    ("index", pa.int32()),
    ("attribute", pa.string()),  # attribute string of the file name
    ("attribute_class", pa.string()),  # "machine/section/domain/attribute"; null when unlabelled
    ("attributes_json", pa.string()),  # parameter/value pairs of attributes_XX.csv, when listed
]
AUDIO_FIELDS = [
    ("content_hash", pa.string()),  # blake2b-128 of the WAV bytes
    ("feature_version", pa.string()),
    ("n_mels", pa.int32()),
    ("n_frames", pa.int32()),
    ("source_sample_rate", pa.int32()),
    ("source_channels", pa.int32()),
    ("resampled", pa.bool_()),
    ("downmixed", pa.bool_()),
]
MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("dataset", pa.string()), ("machine", pa.string()),
    ("section", pa.string()), ("split", pa.string()), ("domain", pa.string()), ("label", pa.string()),
    ("content_hash", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
    ("n_frames", pa.int32()), ("shard", pa.string()),
    ("flags", pa.string()),  # comma-separated warnings: truncated, clipping, duplicate (docs/reliability.md)
])
QUARANTINE_SCHEMA = pa.schema([
    ("path", pa.string()), ("content_hash", pa.string()), ("size", pa.int64()),
    ("mtime_ns", pa.int64()), ("reason", pa.string()), ("feature_version", pa.string()),
    ("recorded_at", pa.float64()),
])


def shard_schema(dtype: str) -> pa.Schema:
    """Schema of a feature shard: metadata, the flattened [n_mels * n_frames] matrix, audio facts."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(META_FIELDS + [("features", pa.list_(value))] + AUDIO_FIELDS)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def version_dir(store: str | os.PathLike, feature_version: str) -> Path:
    return Path(store) / f"v-{feature_version}"


def partition_dir(dataset: str, machine: str, section: str, split: str) -> str:
    return f"dataset={dataset}/machine={machine}/section={section}/split={split}"


def shard_name(members: list[tuple[str, str]], feature_version: str, dtype: str) -> str:
    """``part-<digest>.parquet`` from the (path, content hash) of its clips: same clips, same name."""
    blob = json.dumps([feature_version, dtype, sorted(members)]).encode()
    return f"part-{hashlib.sha256(blob).hexdigest()[:16]}.parquet"


class DiskFull(UserError):
    """A file of the store could not be written: no space left (or over quota) on its device."""


@contextlib.contextmanager
def atomic_path(path: Path):
    """``with atomic_path(path) as tmp:`` write ``tmp``; it then replaces ``path``, so that readers
    see either the old file or the whole new one. On a full disk the temporary file is removed
    (``path`` is left as it was) and the error is one :class:`DiskFull` line naming ``path``,
    instead of a traceback from wherever the write happened."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in NO_SPACE:
            raise DiskFull(f"no space left on the device of {path} ({os.strerror(err.errno)}): free some space "
                           "there and re-run the same command; every file written before is whole") from err
        raise


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet file through :func:`atomic_path`.

    Dictionary encoding only for the string columns: trying it on the feature values costs
    more than the decode and hash of a clip, for nothing (measured in benchmarks/bench_extract.py)."""
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=strings)


# ----------------------------------------------------------------------------- bookkeeping
def current_version(store: str | os.PathLike) -> str:
    f = Path(store) / STORE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{store} is not a feature store (no {STORE_FILE}): run `asd extract` first")
    return json.loads(f.read_text())["feature_version"]


def _resolve(store, feature_version: str | None) -> tuple[Path, str]:
    version = feature_version or current_version(store)
    vdir = version_dir(store, version)
    if not (vdir / MANIFEST).is_file():
        known = sorted(p.name[2:] for p in Path(store).glob("v-*")) if Path(store).is_dir() else []
        raise FileNotFoundError(f"feature store {store} holds no features of version {version} "
                                f"(versions present: {known or 'none'}); run `asd extract`")
    return vdir, version


def read_manifest(vdir: Path) -> pd.DataFrame:
    f = vdir / MANIFEST
    frame = pq.read_table(f).to_pandas() if f.is_file() else MANIFEST_SCHEMA.empty_table().to_pandas()
    for name in MANIFEST_SCHEMA.names:  # stores written before a column existed
        if name not in frame.columns:
            frame[name] = None
    return frame


def read_quarantine(vdir: Path) -> pd.DataFrame:
    f = vdir / QUARANTINE
    return pq.read_table(f).to_pandas() if f.is_file() else QUARANTINE_SCHEMA.empty_table().to_pandas()


def _write_if_changed(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    """Sorted by path, no pandas metadata, and not rewritten when the content is the same: a
    re-run that finds nothing new leaves every file of the store untouched."""
    frame = frame.sort_values("path", kind="stable")
    frame = frame.assign(**{n: None for n in schema.names if n not in frame.columns})  # optional columns
    table = pa.table({f.name: pa.array([None if pd.isna(v) else v for v in frame[f.name]], type=f.type)
                      for f in schema}, schema=schema)
    if path.is_file() and pq.read_table(path).equals(table):
        return
    write_table_atomic(table, path)


def write_manifest(vdir: Path, manifest: pd.DataFrame) -> None:
    _write_if_changed(manifest, MANIFEST_SCHEMA, vdir / MANIFEST)


def write_quarantine(vdir: Path, quarantine: pd.DataFrame) -> None:
    _write_if_changed(quarantine, QUARANTINE_SCHEMA, vdir / QUARANTINE)


def store_manifest(store: str | os.PathLike, feature_version: str | None = None) -> pd.DataFrame:
    """The manifest of the current (or given) feature version: one row per extracted clip."""
    vdir, _ = _resolve(store, feature_version)
    return read_manifest(vdir)


def store_quarantine(store: str | os.PathLike, feature_version: str | None = None) -> pd.DataFrame:
    vdir, _ = _resolve(store, feature_version)
    return read_quarantine(vdir)


def manifest_digest(store: str | os.PathLike, feature_version: str | None = None) -> str:
    """Digest of what the store holds (every clip's path and content hash, and the version):
    stages downstream re-run exactly when it changes."""
    vdir, version = _resolve(store, feature_version)
    m = read_manifest(vdir)
    blob = json.dumps([version, sorted(zip(m["path"], m["content_hash"]))]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- readers
@dataclass
class ClipTable:
    """Clips of one split in memory: ``meta`` (index 0..N-1) and ``features[i]`` [n_mels, T] float32.

    ``meta`` also carries ``attribute_class_id``: dense ids over the sorted attribute classes of
    this table (-1 where unlabelled), assigned at read time because new data can add classes.
    """

    meta: pd.DataFrame
    features: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.meta)


def shard_files(store: str | os.PathLike, split: str | None = None,
                feature_version: str | None = None, datasets: tuple[str, ...] | None = None) -> list[Path]:
    """Absolute paths of the manifest's shards holding ``split`` (all splits when None)."""
    vdir, _ = _resolve(store, feature_version)
    m = read_manifest(vdir)
    if split is not None:
        m = m[m["split"] == split]
    if datasets is not None:
        m = m[m["dataset"].isin(datasets)]
    return [vdir / s for s in sorted(m["shard"].unique())]


def _features_of(column: pa.ChunkedArray, n_mels: np.ndarray, n_frames: np.ndarray) -> list[torch.Tensor]:
    """Zero-copy view of the list column, one float32 conversion, then per-clip [n_mels, T] views."""
    flat = pa.concat_arrays([c.flatten() for c in column.chunks]) if column.num_chunks else pa.array([])
    values = torch.from_numpy(flat.to_numpy(zero_copy_only=False).astype(np.float32))  # owned, writable
    sizes = (n_mels.astype(np.int64) * n_frames.astype(np.int64)).tolist()
    return [v.view(int(m), int(t)) for v, m, t in zip(torch.split(values, sizes), n_mels, n_frames)]


def load_split(store: str | os.PathLike, split: str, feature_version: str | None = None,
               with_features: bool = True, datasets: tuple[str, ...] | None = None) -> ClipTable:
    """Every clip of ``split`` ("train"/"test") in the store, sorted by path, as a ClipTable."""
    vdir, version = _resolve(store, feature_version)
    manifest = read_manifest(vdir)
    keep = manifest[manifest["split"] == split]
    if datasets is not None:
        keep = keep[keep["dataset"].isin(datasets)]
    columns = [name for name, _ in META_FIELDS + AUDIO_FIELDS] + (["features"] if with_features else [])
    tables = [pq.read_table(vdir / s, columns=columns) for s in sorted(keep["shard"].unique())]
    schema = shard_schema("float32")
    table = (pa.concat_tables(tables, promote_options="permissive") if tables
             else pa.schema([schema.field(c) for c in columns]).empty_table())
    # the manifest decides which rows count (a shard rewritten by a later run holds only live rows)
    wanted = set(zip(keep["path"], keep["content_hash"]))
    paths, hashes = table.column("path").to_pylist(), table.column("content_hash").to_pylist()
    rows = [i for i, key in enumerate(zip(paths, hashes)) if key in wanted]
    order = sorted(rows, key=lambda i: paths[i])
    table = table.take(pa.array(order, type=pa.int64()))
    meta = table.drop_columns(["features"]).to_pandas() if with_features else table.to_pandas()
    ids = class_ids(meta["attribute_class"])
    meta["attribute_class_id"] = meta["attribute_class"].map(ids).fillna(-1).astype(int)
    feats = (_features_of(table.column("features"), meta["n_mels"].to_numpy(), meta["n_frames"].to_numpy())
             if with_features else [])
    return ClipTable(meta=meta.reset_index(drop=True), features=feats)


def split_dataset(store: str | os.PathLike, split: str, feature_version: str | None = None):
    """The split as a Ray Dataset streamed from its Parquet shards (for stores too big for memory).

    Rows carry the metadata columns and ``features`` as a flat list; reshape with
    ``n_mels`` x ``n_frames``."""
    import ray.data  # deferred: only large stores stream; config (so every command, predict) imports this module

    files = shard_files(store, split, feature_version)
    if not files:
        raise FileNotFoundError(f"feature store {store} holds no '{split}' clips")
    return ray.data.read_parquet([str(f) for f in files])


def write_journal(vdir: Path, spec_digest: str, statuses: list[dict]) -> None:
    """Record a finished shard's per-clip results (after its Parquet file is in place)."""
    write_json_if_changed(vdir / JOURNAL / f"{spec_digest}.json", {"statuses": statuses})


def read_journal(vdir: Path, spec_digest: str) -> list[dict] | None:
    """The results a stopped run recorded for this shard spec, if its shard file survived."""
    f = vdir / JOURNAL / f"{spec_digest}.json"
    if not f.is_file():
        return None
    try:
        statuses = json.loads(f.read_text())["statuses"]
    except (ValueError, KeyError):
        return None  # cut short while written: extract the shard again
    if any(s["shard"] and not (vdir / s["shard"]).is_file() for s in statuses):
        return None
    return statuses


def clear_journal(vdir: Path) -> None:
    for f in (vdir / JOURNAL).glob("*"):
        f.unlink()


def write_json_if_changed(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def record_store(store: str | os.PathLike, feature_version: str, settings: dict) -> None:
    write_json_if_changed(Path(store) / STORE_FILE, {"feature_version": feature_version, **settings})
