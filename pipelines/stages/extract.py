"""``asd extract``: decode WAV clips and compute their features on Ray Data, into the Parquet store.

1. Discover every ``.wav`` and ``.flac`` under ``<root>/{dev_data,eval_data}/<machine>/{train,test}/``
   (2021: ``source_test/``, ``target_test/``; or a single ``<dataset>/<machine>/<split>`` tree) and parse
   its name, any DCASE year's (:mod:`asd.metadata`); names that do not parse go to the quarantine table.
2. Diff against the manifest of the current feature version: a clip whose path, size and mtime
   match is already present; a clip whose stat changed is re-hashed, and re-extracted only if its
   content changed. New clips are hashed while they are extracted.
3. The pending clips, grouped by (dataset, machine, section, split) into shards of
   ``batch_size`` clips, are one Ray Data row each; a worker (one per CPU: an actor of a pool
   for large runs, a task for small ones) decodes, computes the features
   (:func:`asd.features.log_mel`) and writes the shard file itself, so feature matrices never
   travel through the driver. It returns one small status row per clip.
   Any exception while reading, decoding or featurising one clip quarantines that clip (with
   the exception) and never the run; a full disk under the store stops the run with one line
   naming the file (``store.DiskFull``), every file written before it whole. A finished shard is
   recorded in the version's journal, so that a run stopped half-way (killed, node lost) resumes
   with the shards it had not finished.
4. The driver updates the manifest and quarantine tables, rewrites shards that hold stale rows
   (changed or deleted files), flags identical content under several names, and removes files
   no manifest row points at.

Every discovered ``*.wav`` entry (files, links, folders) ends up extracted, already present, or
quarantined (with the reason), and the summary says so: discovered = extracted + already present
+ quarantined; flagged clips (docs/reliability.md) are counted beside. One command writes a store
at a time (``<store>/.lock``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from asd.audio import AudioFormatError, load_audio
from asd.contracts import DEV_DATA, EVAL_DATA, attribute_class
from asd.features import FeatureConfig, log_mel
from asd.metadata import ClipMeta, discover_clips, entry_problem
from pipelines import console
from pipelines import store as S
from pipelines.compute_process import prepare_compute_process
from pipelines.config import add_config_arguments, load_config
from pipelines.errors import UserError
from pipelines.locks import LockBusy, exclusive_lock
from pipelines import ray_runtime

log = logging.getLogger(__name__)
DATASETS = (DEV_DATA, EVAL_DATA)
# The status of a clip whose shard could not be written (a full disk): returned, not raised, because
# Ray Data prints a task's exception with its whole stack before the driver can say it in one line
NOT_WRITTEN = "not_written"


class ExtractError(UserError):
    """Nothing to extract from, or nothing usable: the run cannot produce a feature store."""


@dataclass
class ExtractSummary:
    discovered: int = 0
    extracted: int = 0
    already_present: int = 0
    quarantined: int = 0
    removed: int = 0  # stale rows dropped: files deleted or changed since the last run
    seconds: float = 0.0
    feature_version: str = ""
    store: str = ""
    resumed_shards: int = 0  # finished by an interrupted run, taken from its journal
    quarantine: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run's new ones
    flagged: dict[str, int] = field(default_factory=dict)  # flag -> clips of the store carrying it
    duplicates: list[list[str]] = field(default_factory=list)  # "path (split, label)" per identical content
    warnings: list[str] = field(default_factory=list)  # metadata problems: missing or malformed CSVs

    @property
    def clips_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict[str, int]:
        return {"discovered": self.discovered, "extracted": self.extracted,
                "already_present": self.already_present, "quarantined": self.quarantined,
                "removed": self.removed}

    def text(self, max_items: int = 5) -> str:
        lines = [f"extract: {self.discovered} discovered = {self.extracted} extracted + "
                 f"{self.already_present} already present + {self.quarantined} quarantined"
                 f" ({self.removed} stale rows removed); {self.seconds:.1f} s, "
                 f"{self.clips_per_s:.1f} clips/s; store {self.store} (features v-{self.feature_version})"]
        if self.resumed_shards:
            lines.append(f"  resumed: {self.resumed_shards} shard(s) finished by an interrupted run were kept")
        if self.flagged:
            lines.append("  flagged (extracted, check them): " + ", ".join(
                f"{n} {flag}" for flag, n in sorted(self.flagged.items())))
        for group in self.duplicates[:max_items]:
            lines.append("  identical content: " + " = ".join(group))
        if len(self.duplicates) > max_items:
            lines.append(f"  ... {len(self.duplicates) - max_items} more groups of identical content")
        for w in self.warnings[:max_items]:
            lines.append(f"  warning: {w}")
        if len(self.warnings) > max_items:
            lines.append(f"  ... {len(self.warnings) - max_items} more warnings")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- discovery
@dataclass
class Found:
    """One discovered file: its parsed metadata (None when the name does not parse) and stat."""

    path: str  # relative to the data root
    dataset: str
    meta: ClipMeta | None
    reason: str | None
    attributes: dict | None
    size: int
    mtime_ns: int
    entry: str | None = None  # the real relative path, where ``path`` shows a name that is not UTF-8


def utf8_text(text: str) -> str:
    """``text`` with every byte of a file name that is not UTF-8 (a surrogate escape, as Python
    decodes such names on Linux) shown as ``\\xNN``: Parquet, the summary and the log hold UTF-8
    text only, and one such name failed the whole extraction on every run."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8(ds: Path, rel: str, size: int, mtime_ns: int) -> Found:
    """The quarantined entry of a file whose name is not UTF-8, under its shown name (its key in
    the quarantine table from run to run)."""
    shown = utf8_text(rel)
    return Found(f"{ds.name}/{shown}", ds.name, None,
                 f"file name is not UTF-8 (shown as {Path(shown).name}): rename the file", None, size,
                 mtime_ns, entry=f"{ds.name}/{rel}")


def dataset_dirs(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(data root, dataset folders): ``root/dev_data`` and ``root/eval_data`` when present; a root
    that is itself a dataset folder (``.../dev_data`` or any ``<name>/<machine>/<split>`` tree)
    counts as one dataset under its parent."""
    root = Path(root)
    if not root.is_dir():
        raise ExtractError(f"data root {root} does not exist or is not a directory")
    found = [root / d for d in DATASETS if (root / d).is_dir()]
    return (root, found) if found else (root.parent, [root])


def discover(root: str | os.PathLike) -> tuple[Path, list[Found], list[str]]:
    """(data root, every ``*.wav`` entry found, metadata warnings). Nothing that resolves outside
    the data root is read."""
    data_root, datasets = dataset_dirs(root)
    out: list[Found] = []
    warnings: list[str] = []
    for ds in datasets:
        disc = discover_clips(ds, confine_to=data_root)
        warnings += [utf8_text(w) for w in disc.warnings]
        for c in disc.clips:
            st = (ds / c.path).stat()
            if utf8_text(c.path) != c.path:
                out.append(_not_utf8(ds, c.path, st.st_size, st.st_mtime_ns))
                continue
            out.append(Found(f"{ds.name}/{c.path}", ds.name, c, None, disc.attributes.get(c.path),
                             st.st_size, st.st_mtime_ns))
        for rel, reason in disc.unparsed:
            st = os.lstat(ds / rel)  # the entry itself: a link may dangle or lead outside
            if utf8_text(rel) != rel:
                out.append(_not_utf8(ds, rel, st.st_size, st.st_mtime_ns))
                continue
            out.append(Found(f"{ds.name}/{rel}", ds.name, None, utf8_text(reason), None, st.st_size,
                             st.st_mtime_ns))
    out.sort(key=lambda f: f.path)
    return data_root, out, warnings


# ----------------------------------------------------------------------------- the Ray Data task
def _row_meta(clip: dict) -> dict:
    m = clip["meta"]
    return {"path": clip["path"], "dataset": clip["dataset"], "machine": m["machine"],
            "section": m["section"], "domain": m["domain"], "split": m["split"], "label": m["label"],
            "index": m["index"], "attribute": m["attribute"], "attribute_class": attribute_class(m["machine"], m["section"], m["domain"], m["attribute"]),
            "attributes_json": json.dumps(clip["attributes"]) if clip["attributes"] else None}


class ShardExtractor:
    """Ray Data actor for ``flat_map``: :func:`extract_shard` with the settings of this run."""

    def __init__(self, data_root: str, vdir: str, features: dict, dtype: str) -> None:
        prepare_compute_process(1)  # parallelism comes from the number of actors
        self.kwargs = {"data_root": data_root, "vdir": vdir, "features": features, "dtype": dtype}

    def __call__(self, row: dict) -> list[dict]:
        return extract_shard(row, **self.kwargs)


def extract_shard_task(row: dict, **settings) -> list[dict]:
    """Ray Data task for ``flat_map``: :func:`extract_shard` in a process set up for it."""
    prepare_compute_process(1)  # parallelism comes from the number of tasks
    return extract_shard(row, **settings)


def spec_digest(spec: str) -> str:
    """Journal key of a shard spec (its clips with their size and mtime)."""
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def quarantine_reason(err: Exception) -> str:
    """The reason recorded for a clip: our own audio errors say it all; anything else keeps its
    exception class, so that an unexpected failure is recognisable in the quarantine table."""
    text = str(err).replace("<bytes>: ", "")
    return text if isinstance(err, AudioFormatError) else f"{type(err).__name__}: {text}"


def featurise_clip(data: bytes, fcfg: FeatureConfig):
    """(features [n_mels, T], AudioInfo) of one WAV file's bytes; ``AudioFormatError`` for a
    clip the store must not hold (constant signal, too short: checked before the features)."""
    wave, info = load_audio(data, fcfg.sample_rate, resample=fcfg.resample, channels=fcfg.channels)
    if "constant" in info.flags:
        raise AudioFormatError("constant signal (digital silence or DC offset): nothing to analyse")
    frames = fcfg.num_frames(wave.numel())
    if frames < fcfg.min_frames:
        raise AudioFormatError(f"too short: {frames} frames ({wave.numel() / fcfg.sample_rate:.2f} s), "
                               f"need {fcfg.min_frames}")
    return log_mel(wave, fcfg), info


def extract_shard(row: dict, data_root: str, vdir: str, features: dict, dtype: str) -> list[dict]:
    """One shard of clips in, one status row per clip out.

    Reads each file once (hash + decode from the same bytes), computes features, writes the
    shard's Parquet file (only the usable clips) atomically under its deterministic name, then
    its journal entry."""
    fcfg = FeatureConfig(**features)
    spec = json.loads(row["shard"])
    np_dtype = np.float16 if dtype == "float16" else np.float32
    statuses, rows, flat = [], [], []
    for clip in spec["clips"]:
        status = {"path": clip["path"], "size": clip["size"], "mtime_ns": clip["mtime_ns"],
                  "content_hash": None, "status": "quarantined", "reason": None, "n_frames": -1,
                  "shard": None, "flags": None, "recorded_at": None}
        statuses.append(status)
        try:
            data = Path(data_root, clip["path"]).read_bytes()
            status["content_hash"] = S.content_hash(data)
            feats, info = featurise_clip(data, fcfg)
        except Exception as err:  # noqa: BLE001 - one bad clip is quarantined, never the run
            status.update(reason=quarantine_reason(err), recorded_at=time.time())
            continue
        status.update(status="extracted", n_frames=int(feats.shape[-1]), flags=",".join(info.flags) or None)
        rows.append({**_row_meta(clip), "content_hash": status["content_hash"],
                     "feature_version": fcfg.version, "n_mels": int(feats.shape[0]),
                     "n_frames": int(feats.shape[-1]), "source_sample_rate": info.sample_rate,
                     "source_channels": info.channels, "resampled": info.resampled,
                     "downmixed": info.downmixed})
        flat.append(feats.numpy().astype(np_dtype).reshape(-1))
    try:
        if rows:
            name = S.shard_name([(r["path"], r["content_hash"]) for r in rows], fcfg.version, dtype)
            rel = f"{spec['partition']}/{name}"
            write_shard(Path(vdir) / rel, rows, flat, dtype)
            for st in statuses:
                if st["status"] == "extracted":
                    st["shard"] = rel
        S.write_journal(Path(vdir), spec_digest(row["shard"]), statuses)
    except S.DiskFull as err:  # the store's disk, not these clips: the driver stops the run with it
        return [{**st, "status": NOT_WRITTEN, "reason": str(err)} for st in statuses]
    return statuses


def write_shard(path: Path, rows: list[dict], flat: list, dtype: str) -> None:
    schema = S.shard_schema(dtype)
    cols = {name: pa.array([r[name] for r in rows], type=schema.field(name).type)
            for name in schema.names if name != "features"}
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
    values = pa.array(np.concatenate(flat)) if flat else pa.array([], type=schema.field("features").type.value_type)
    cols["features"] = pa.ListArray.from_arrays(pa.array(offsets), values)
    S.write_table_atomic(pa.table([cols[n] for n in schema.names], schema=schema), path)


# ----------------------------------------------------------------------------- the driver
def _clip_payload(f: Found) -> dict:
    return {"path": f.path, "dataset": f.dataset, "size": f.size, "mtime_ns": f.mtime_ns,
            "attributes": f.attributes, "meta": f.meta.to_dict()}


def _shards(pending: list[Found], batch_size: int) -> list[str]:
    groups: dict[str, list[Found]] = {}
    for f in pending:
        m = f.meta
        groups.setdefault(S.partition_dir(f.dataset, m.machine, m.section, m.split), []).append(f)
    specs = []
    for partition, clips in sorted(groups.items()):
        for i in range(0, len(clips), batch_size):
            specs.append(json.dumps({"partition": partition,
                                     "clips": [_clip_payload(c) for c in clips[i:i + batch_size]]}))
    return specs


def _run_shards(specs: list[str], data_root: Path, vdir: Path, fcfg: FeatureConfig, dtype: str,
                concurrency: int | None, actors: bool, ray_address: str | None, ray_num_cpus: int | None
                ) -> list[dict]:
    ray_runtime.init_ray(ray_address, ray_num_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below counts clips
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"shard": s} for s in specs], override_num_blocks=len(specs))
    workers = min(concurrency or cpus, len(specs))
    settings = {"data_root": str(data_root.resolve()), "vdir": str(vdir.resolve()),
                "features": asdict(fcfg), "dtype": dtype}
    if actors:
        # One single-threaded actor per CPU, each with a second shard queued, so that it starts the
        # next shard at once: Ray Data's task pool leaves 0.15-0.2 s between a task's end and the
        # next start on a worker (on 2 CPUs, 64-clip tasks ran 1.1 at a time on average), but
        # actors take seconds longer to start (measurements: docs/feature-store.md).
        ds = ds.flat_map(ShardExtractor, num_cpus=1, fn_constructor_kwargs=settings,
                         compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2))
    else:
        # At most one task per CPU (the pool size); the 0.5 CPU request only gets past Ray Data's
        # resource budget, which on a 2-CPU node runs 1-CPU tasks one at a time.
        ds = ds.flat_map(extract_shard_task, num_cpus=0.5, fn_kwargs=settings,
                         compute=ray.data.TaskPoolStrategy(size=workers))
    statuses = []
    # a clear error, not a progress bar stuck at 0 %, when the workers die at start
    with console.progress(sum(len(json.loads(s)["clips"]) for s in specs), "extract", "clip") as bar, \
            ray_runtime.worker_start_watch("extract") as progressed:
        for status in ds.iter_rows():
            progressed()
            if status["status"] == NOT_WRITTEN:
                raise S.DiskFull(status["reason"])
            statuses.append(status)
            bar.update(1)
    return statuses


def _hash_file(path: Path) -> str:
    return S.content_hash(path.read_bytes())


def extract_from_config(cfg, root: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
                        ray_address: str | None = None) -> ExtractSummary:
    """:func:`extract` with a :class:`pipelines.config.PipelineConfig`'s settings (data root,
    store, features, extraction and Ray settings), each overridable."""
    e = cfg.extract
    return extract(root or cfg.data.root, store or cfg.path(e.store), cfg.features, dtype=e.dtype,
                   batch_size=e.batch_size, concurrency=e.concurrency, actor_pool_min_clips=e.actor_pool_min_clips,
                   ray_address=ray_address or cfg.ray.address, ray_num_cpus=cfg.ray.num_cpus)


def extract(root: str | os.PathLike, store: str | os.PathLike, features: FeatureConfig | None = None, *,
            dtype: str = "float16", batch_size: int = 64, concurrency: int | None = None,
            actor_pool_min_clips: int | None = 4000, ray_address: str | None = None,
            ray_num_cpus: int | None = None) -> ExtractSummary:
    """Bring the store up to date with the data tree under ``root``; see the module docstring."""
    if dtype not in S.FEATURE_DTYPES:
        raise ValueError(f"extract dtype must be one of {S.FEATURE_DTYPES}, got {dtype!r}")
    store = Path(store)
    try:
        with exclusive_lock(store / S.LOCK_FILE, f"feature store {store}"):
            return _extract_locked(root, store, features or FeatureConfig(), dtype, batch_size, concurrency,
                                   actor_pool_min_clips, ray_address, ray_num_cpus)
    except LockBusy as err:
        raise ExtractError(str(err)) from err


def _quarantine_record(path: str, content_hash: str | None, size: int, mtime_ns: int, reason: str,
                       version: str, recorded_at: float | None = None) -> dict:
    return {"path": path, "content_hash": content_hash, "size": size, "mtime_ns": mtime_ns, "reason": reason,
            "feature_version": version, "recorded_at": recorded_at or time.time()}


@dataclass
class Triage:
    """What the data tree means for the store: clips to extract, quarantine records to keep,
    clips whose file changed stat but not content, and store rows whose file is gone or changed."""

    pending: list[Found] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    refreshed: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns)
    stale: set[str] = field(default_factory=set)


def _extract_locked(root, store: Path, fcfg: FeatureConfig, dtype: str, batch_size: int,
                    concurrency: int | None, actor_pool_min_clips: int | None, ray_address: str | None,
                    ray_num_cpus: int | None) -> ExtractSummary:
    t0 = time.perf_counter()
    version = fcfg.version
    vdir = S.version_dir(store, version)
    settings = _prepare_version_dir(vdir, fcfg, dtype)
    data_root, found, warnings = discover(root)
    summary = ExtractSummary(discovered=len(found), feature_version=version, store=utf8_text(str(store)),
                             warnings=warnings)
    if not found:
        raise ExtractError(f"no .wav clips (nor .flac) under {root}: expected <root>/dev_data/<machine>/{{train,test}}/"
                           "*.wav (DCASE layout) or <dataset>/<machine>/<split>/*.wav")
    manifest = S.read_manifest(vdir).set_index("path", drop=False)
    triage = _triage(found, manifest, S.read_quarantine(vdir), data_root, version, summary)
    new_rows = []
    if triage.pending:
        statuses = _extract_pending(triage.pending, summary, data_root, vdir, fcfg, dtype, batch_size, concurrency,
                                    actor_pool_min_clips, ray_address, ray_num_cpus)
        new_rows = _fold_statuses(statuses, triage, summary, version)
    manifest = _updated_manifest(manifest, triage, new_rows, vdir, version, dtype, summary)
    S.write_manifest(vdir, manifest)
    S.write_quarantine(vdir, pd.DataFrame(triage.quarantine, columns=S.QUARANTINE_SCHEMA.names))
    _remove_orphans(vdir, set(manifest["shard"]))
    S.clear_journal(vdir)  # everything it held is in the manifest now
    S.record_store(store, version, settings)
    summary.seconds = time.perf_counter() - t0
    total = summary.extracted + summary.already_present + summary.quarantined
    assert total == summary.discovered, f"clip accounting broke: {summary.counts()}"
    if summary.extracted + summary.already_present == 0:
        raise ExtractError(f"none of the {summary.discovered} clips under {root} is usable; reasons are in "
                           f"{vdir / S.QUARANTINE}, e.g. {summary.quarantine[:1] or triage.quarantine[:1]}")
    return summary


def _prepare_version_dir(vdir: Path, fcfg: FeatureConfig, dtype: str) -> dict:
    """The feature version's folder with its settings file; a changed element type starts it over."""
    settings = {"features": asdict(fcfg), "dtype": dtype}
    settings_file = vdir / "features.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()).get("dtype") != dtype:
        log.warning("element type changed to %s: re-extracting every clip of version %s", dtype, fcfg.version)
        shutil.rmtree(vdir)
    S.write_json_if_changed(settings_file, settings)
    return settings


def _triage(found: list[Found], manifest: pd.DataFrame, quarantine: pd.DataFrame, data_root: Path,
            version: str, summary: ExtractSummary) -> Triage:
    """Sort every discovered clip: already in the store (same stat, or same content), kept in
    quarantine (same stat), quarantined now (a name that does not parse), or pending."""
    # plain dicts for the per-clip lookups (a pandas .loc per clip costs seconds at 25k clips)
    known = {p: (s, m, h) for p, s, m, h in zip(manifest["path"], manifest["size"], manifest["mtime_ns"],
                                                  manifest["content_hash"])}
    quarantined = {r["path"]: r for r in quarantine.to_dict("records")}
    triage = Triage(stale=set(known) - {f.path for f in found})  # deleted files
    for f in found:
        if f.path in known:
            size, mtime, digest = known[f.path]
            if (size, mtime) == (f.size, f.mtime_ns):
                summary.already_present += 1
                continue
            if _hash_file(data_root / f.path) == digest:
                triage.refreshed[f.path] = (f.size, f.mtime_ns)
                summary.already_present += 1
                continue
            triage.stale.add(f.path)
        elif f.path in quarantined:
            q = quarantined[f.path]
            if (q["size"], q["mtime_ns"]) == (f.size, f.mtime_ns):
                triage.quarantine.append(q)
                summary.quarantined += 1
                continue
        if f.meta is None:
            entry = data_root / (f.entry or f.path)
            readable = entry_problem(entry, data_root) is None  # never read a link's target
            triage.quarantine.append(_quarantine_record(f.path, _hash_file(entry) if readable else None,
                                                        f.size, f.mtime_ns, f.reason, version))
            summary.quarantine.append((f.path, f.reason))
            summary.quarantined += 1
            continue
        triage.pending.append(f)
    return triage


def _fold_statuses(statuses: list[dict], triage: Triage, summary: ExtractSummary, version: str) -> list[dict]:
    """The extracted clips' rows; every other status becomes a quarantine record."""
    new_rows = []
    for st in statuses:
        if st["status"] == "extracted":
            new_rows.append(st)
            summary.extracted += 1
        else:
            triage.quarantine.append(_quarantine_record(st["path"], st["content_hash"], st["size"], st["mtime_ns"],
                                                        st["reason"], version, st.get("recorded_at")))
            summary.quarantine.append((st["path"], st["reason"]))
            summary.quarantined += 1
    return new_rows


def _updated_manifest(manifest: pd.DataFrame, triage: Triage, new_rows: list[dict], vdir: Path, version: str,
                      dtype: str, summary: ExtractSummary) -> pd.DataFrame:
    """The manifest without stale rows, with refreshed stats, the new clips and duplicate flags."""
    manifest = _drop_stale(manifest, triage.stale, vdir, version, dtype)
    summary.removed = len(triage.stale)
    for path, (size, mtime) in triage.refreshed.items():
        manifest.loc[path, ["size", "mtime_ns"]] = [size, mtime]
    if new_rows:
        by_path = {f.path: f for f in triage.pending}
        added = pd.DataFrame([{
            "path": r["path"], "dataset": by_path[r["path"]].dataset, "machine": by_path[r["path"]].meta.machine,
            "section": by_path[r["path"]].meta.section, "split": by_path[r["path"]].meta.split,
            "domain": by_path[r["path"]].meta.domain, "label": by_path[r["path"]].meta.label,
            "content_hash": r["content_hash"], "size": r["size"], "mtime_ns": r["mtime_ns"],
            "n_frames": r["n_frames"], "shard": r["shard"], "flags": r.get("flags")} for r in new_rows])
        manifest = pd.concat([manifest.reset_index(drop=True), added], ignore_index=True)
    return _flag_duplicates(manifest.reset_index(drop=True), summary)


def _extract_pending(pending: list[Found], summary: ExtractSummary, data_root: Path, vdir: Path,
                     fcfg: FeatureConfig, dtype: str, batch_size: int, concurrency: int | None,
                     actor_pool_min_clips: int | None, ray_address: str | None, ray_num_cpus: int | None
                     ) -> list[dict]:
    """Per-clip statuses of the pending clips: from the journal for shards an interrupted run
    finished (the same pending clips give the same shard specs), from Ray Data for the rest."""
    specs = _shards(pending, max(1, batch_size))
    statuses, todo = [], []
    for spec in specs:
        done = S.read_journal(vdir, spec_digest(spec))
        if done is None:
            todo.append(spec)
        else:
            statuses += done
            summary.resumed_shards += 1
    if todo:
        n_todo = sum(len(json.loads(s)["clips"]) for s in todo)
        actors = actor_pool_min_clips is not None and n_todo >= actor_pool_min_clips
        log.info("extracting %d clips in %d shards on Ray Data %s (%d already present, %d shards resumed)",
                 n_todo, len(todo), "actors" if actors else "tasks", summary.already_present,
                 summary.resumed_shards)
        statuses += _run_shards(todo, data_root, vdir, fcfg, dtype, concurrency, actors, ray_address, ray_num_cpus)
    return statuses


def _flag_duplicates(manifest: pd.DataFrame, summary: ExtractSummary) -> pd.DataFrame:
    """Add ``duplicate`` to the flags of clips whose content another clip of the store shares
    (warn only: the same recording under two names, worst when their labels differ), and count
    every flag in the summary."""
    def own(flags) -> list[str]:
        text = flags if isinstance(flags, str) else ""  # None, or NaN after a pandas concat
        return [f for f in text.split(",") if f and f != "duplicate"]

    copies = Counter(manifest["content_hash"])
    flags = [own(fl) + (["duplicate"] if copies[h] > 1 else []) for fl, h in
             zip(manifest["flags"], manifest["content_hash"])]
    manifest = manifest.assign(flags=[",".join(f) or None for f in flags])
    summary.flagged = dict(Counter(f for fl in flags for f in fl))
    dup = manifest[manifest["content_hash"].map(copies) > 1].sort_values("path")
    for _, group in dup.groupby("content_hash", sort=False):
        summary.duplicates.append([f"{p} ({s}, {lab or 'unlabelled'})"
                                   for p, s, lab in zip(group["path"], group["split"], group["label"])])
    summary.duplicates.sort()
    return manifest


def _drop_stale(manifest: pd.DataFrame, stale: set[str], vdir: Path, version: str, dtype: str) -> pd.DataFrame:
    """Remove rows of deleted or changed files: rewrite their shards without them (new names)."""
    if not stale:
        return manifest
    gone = manifest.loc[sorted(stale & set(manifest.index))]
    for shard in sorted(gone["shard"].unique()):
        table = pq.read_table(vdir / shard)
        live = pa.array([p not in stale for p in table.column("path").to_pylist()])
        table = table.filter(live)
        moved = manifest["shard"] == shard
        if table.num_rows:
            members = list(zip(table.column("path").to_pylist(), table.column("content_hash").to_pylist()))
            rel = f"{Path(shard).parent.as_posix()}/{S.shard_name(members, version, dtype)}"
            S.write_table_atomic(table, vdir / rel)
            manifest.loc[moved, "shard"] = rel
    return manifest.drop(index=sorted(stale & set(manifest.index)))


def _remove_orphans(vdir: Path, live: set[str]) -> None:
    """Shard files no manifest row points at (interrupted runs, rewritten shards) and temp files."""
    for f in vdir.rglob("*.parquet"):
        rel = f.relative_to(vdir).as_posix()
        if f.parent != vdir and rel not in live:
            f.unlink()
    for f in vdir.rglob(".tmp-*"):
        f.unlink()


def pending_clips(root: str | os.PathLike, store: str | os.PathLike, features: FeatureConfig | None = None
                  ) -> list[str]:
    """Relative paths of discovered clips the store has not seen with their current size and mtime:
    the cheap check (no hashing, no Ray) that tells a scheduled retrain whether to start."""
    fcfg = features or FeatureConfig()
    vdir = S.version_dir(store, fcfg.version)
    _, found, _ = discover(root)
    seen = {}
    for table in (S.read_manifest(vdir), S.read_quarantine(vdir)):
        seen.update({p: (s, m) for p, s, m in zip(table["path"], table["size"], table["mtime_ns"])})
    return [f.path for f in found if seen.get(f.path) != (f.size, f.mtime_ns)]


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="extract features into the Parquet feature store (Ray Data)",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--data", help="data root holding dev_data/ and/or eval_data/, or one such folder "
                                  "(default: data.root of the config)")
    p.add_argument("--store", help="feature store folder (default: extract.store of the config); "
                                   "the log goes to logs/ beside it")
    p.add_argument("--address", help="Ray cluster to join ('auto', ray://...); default: ray.address or a local Ray")
    p.add_argument("--show-quarantine", action="store_true", help="print every quarantined clip and why")
    p.set_defaults(func=main)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    store = Path(args.store) if args.store else cfg.path(cfg.extract.store)
    # beside the store it writes (by default <run_dir>/features: <run_dir>/logs, as for every command)
    console.log_to_file(store.parent / "logs", "extract")
    summary = extract_from_config(cfg, args.data, store, args.address)  # ExtractError: one line, exit 2
    print(summary.text())
    if args.show_quarantine:
        q = S.store_quarantine(store, cfg.features.version)
        for path, reason in zip(q["path"], q["reason"]):
            print(f"quarantined\t{path}\t{reason}")
    elif summary.quarantined:
        print(f"{summary.quarantined} clip(s) quarantined; list them with --show-quarantine")
    return 0
