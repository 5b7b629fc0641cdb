"""Presets, the plan of clips, parallel generation and data drops of the synthetic dataset.

``generate(PRESETS["demo"], root)`` writes ``root/dev_data/`` (and with ``eval_data=True``
``root/eval_data/`` plus ``root/ground_truth_data/`` and ``root/ground_truth_domain/``) in the
exact DCASE 2022 Task 2 layout. Each clip's RNG is derived from the seed and a stable hash of
(dataset, machine, section, split, domain, label, index), so the files are byte-identical for a
seed whatever the number of workers. Existing files are never overwritten: a second call only
fills in what is missing. ``add_drop`` writes new clips into an existing dev_data tree.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import re
import string
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from asd.contracts import (DEV_DATA, DOMAINS, EVAL_DATA, GROUND_TRUTH_DATA, GROUND_TRUTH_DOMAIN, LABELS,
                           ground_truth_file_name, labelled_clip_name, unlabelled_clip_name)
from asd.metadata import discover_clips
from pipelines.compute_process import tune_allocator
from pipelines.synth.machines import MACHINE_TYPES, MACHINES, SR, Difficulty, keyed_rng, render_clip

log = logging.getLogger(__name__)

# Calibrated against real recordings (benchmarks/realism.py; docs/synthetic-data.md, "Difficulty"):
# anomaly strength, uniform per clip (0 = none, 1 = plainly audible), machine-to-background ratio in
# dB, uniform per clip, and the factors that make normal sound vary and anomalies hide.
DEFAULT_STRENGTH = (0.25, 1.0)
DEFAULT_SNR_DB = (3.0, 12.0)
# The valve 12 dB further under its background: the real DCASE valve clips' 10 ms levels span 5.5 dB
# (median, 95th - 5th percentile), the synthetic valve's 13.7 at the common ratio and 7.3 at -12 dB
# (benchmarks/level_range.py; the background's own range bounds it from below).
# Every type's anomaly is one changed resonance of its body or transfer path (``resonance_change``), a
# peak of Q 16 and up to 6 dB (x the clip's strength) at a random 0.5-4 kHz: on three draws of
# `demo` the detectors then rank as on the real toy car in every pair the real folder settles (11 of
# 11; with each type's own kinds 11, 9 and 10), the kNN floor and the AE within 10 points of the real
# folder's on `demo` and the four robustness regimes (benchmarks/ranking.py, resonance_trees.py and
# realism.py; BENCHMARKS.md, "The resonance adopted as every type's anomaly"). It replaces the
# per-type gains that calibrated the types' own kinds (fan 0.3, bearing 0.5, toy train 0.3:
# docs/synthetic-data.md, "Calibration"); `machine_anomaly_gain` stays the knob for a type's level.
RESONANCE_ANOMALY = tuple((m, ("resonance",)) for m in MACHINE_TYPES)
REAL_SOUND = Difficulty(hidden_states=4, state_db=6.0, clip_db=2.0, anomaly_duty=(0.3, 1.0), events_per_s=0.3,
                        event_snr_db=(0.0, 12.0), machine_snr_db=(("valve", -12.0),),
                        anomaly_kinds=RESONANCE_ANOMALY, resonance_q=16.0, resonance_db=6.0)


@dataclass(frozen=True)
class SynthPreset:
    """Size and difficulty of a synthetic dataset; override fields with ``dataclasses.replace``."""

    name: str
    machines: tuple[str, ...] = MACHINE_TYPES
    dev_sections: tuple[str, ...] = ("00", "01", "02")
    eval_sections: tuple[str, ...] = ("03", "04", "05")
    seconds: float = 10.0  # clip length
    source_train: int = 990  # source-domain training clips per section
    target_train: int = 10  # target-domain training clips per section
    test_per_group: int = 50  # test clips per (domain, label) and section
    anomaly_strength: tuple[float, float] = DEFAULT_STRENGTH
    snr_db: tuple[float, float] = DEFAULT_SNR_DB
    # added to the target domain's machine-to-background ratio: a negative value makes the domain
    # shift stronger (the target machine further under the factory noise)
    target_snr_offset_db: float = 0.0
    difficulty: Difficulty = REAL_SOUND

    def check(self) -> None:
        unknown = sorted(set(self.machines) - set(MACHINES))
        if unknown:
            raise ValueError(f"unknown machine types {unknown}; known: {list(MACHINE_TYPES)}")
        for sec in (*self.dev_sections, *self.eval_sections):
            if not re.fullmatch(r"[0-9A-Za-z]+", sec):
                raise ValueError(f"section id {sec!r} must be alphanumeric (e.g. '00')")
        lo, hi = self.anomaly_strength
        if not 0 <= lo <= hi:
            raise ValueError(f"anomaly_strength must be 0 <= lo <= hi, got {self.anomaly_strength}")
        if self.snr_db[0] > self.snr_db[1] or self.seconds <= 0:
            raise ValueError("need snr_db lo <= hi and seconds > 0")
        if min(self.source_train, self.target_train, self.test_per_group) < 0:
            raise ValueError("clip counts must be >= 0")


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset("tiny", machines=("fan", "valve"), dev_sections=("00", "01"), eval_sections=("03",),
                        seconds=3.0, source_train=16, target_train=4, test_per_group=6),
    "demo": SynthPreset("demo", source_train=50, target_train=5, test_per_group=10),
    "dcase2022": SynthPreset("dcase2022"),
}


@dataclass(frozen=True)
class ClipJob:
    """Everything a worker needs to render and write one clip."""

    path: str
    machine: str
    section: str
    attrs: tuple[tuple[str, str], ...]
    anomaly: str | None
    strength: tuple[float, float]
    snr_db: tuple[float, float]
    n: int
    seed: int
    key: tuple[str, ...]  # (dataset, machine, section, split, domain, label, index)
    difficulty: Difficulty = Difficulty()


@dataclass
class SynthSummary:
    """What a ``generate`` call did. ``counts``: planned clips per '<dataset>/<machine>/<split>'."""

    root: str
    preset: str
    written: int = 0
    skipped: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)  # csv files written or appended

    @property
    def total(self) -> int:
        return self.written + self.skipped

    @property
    def clips_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "clips_per_s": self.clips_per_s}


# ----------------------------------------------------------------------------- one clip


def attribute_string(attrs) -> str:
    return "_".join(f"{p}_{v}" for p, v in attrs)


def labelled_name(section: str, domain: str, split: str, label: str, index: int, attrs) -> str:
    return labelled_clip_name(section, domain, split, label, index, attribute_string(attrs))


def render_job(job: ClipJob) -> np.ndarray:
    """The clip as int16 samples (deterministic from ``job.seed`` and ``job.key``)."""
    rng = keyed_rng(*job.key, seed=job.seed)
    strength, snr = rng.uniform(*job.strength), rng.uniform(*job.snr_db)
    y = render_clip(job.machine, job.section, dict(job.attrs), anomaly=job.anomaly, strength=strength,
                    snr_db=snr, rng=rng, n=job.n, difficulty=job.difficulty)
    return np.round(y * 32767.0).astype(np.int16)


def write_job(job: ClipJob) -> str:
    """Render and write one WAV atomically (never leaves a truncated .wav behind)."""
    tmp = job.path + ".part"
    sf.write(tmp, render_job(job), SR, subtype="PCM_16", format="WAV")
    os.replace(tmp, job.path)
    return job.path


def run_jobs(jobs: list[ClipJob], workers: int | None = None, desc: str = "synth") -> int:
    """Write every job's clip, in a spawn-context process pool when ``workers`` > 1."""
    if not jobs:
        return 0
    for d in {os.path.dirname(j.path) for j in jobs}:
        os.makedirs(d, exist_ok=True)
    # a spawned worker costs about as much as rendering a dozen clips: small batches stay in-process
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = max(1, min(workers, -(-len(jobs) // 12)))
    with tqdm(total=len(jobs), desc=desc, unit="clip", disable=None) as bar:
        if workers == 1:
            for job in jobs:
                write_job(job)
                bar.update()
        else:
            chunk = max(1, min(16, len(jobs) // (workers * 8)))
            with mp.get_context("spawn").Pool(workers, initializer=tune_allocator) as pool:
                for _ in pool.imap_unordered(write_job, jobs, chunksize=chunk):
                    bar.update()
    return len(jobs)


# ----------------------------------------------------------------------------- tables


def write_attribute_rows(csv_path: Path, rows: list[tuple[str, tuple[tuple[str, str], ...]]]) -> bool:
    """Write ``attributes_XX.csv`` or append the rows it lacks; True when the file changed."""
    existing: set[str] = set()
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            existing = {r[0] for r in csv.reader(fh) if r}
    new = sorted((name, attrs) for name, attrs in rows if name not in existing)
    if not new:
        return False
    width = max(len(a) for _, a in new)
    if not existing:
        header = ["file_name"] + [f"d{i}{x}" for i in range(1, width + 1) for x in ("p", "v")]
        lines = [header]
    else:
        lines = []
        with open(csv_path, "rb") as fh:  # the appended rows start on a line of their own
            fh.seek(0, os.SEEK_END)
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    lines.append([])
    lines += [[name] + [x for pv in attrs for x in pv] for name, attrs in new]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        for line in lines:
            w.writerow(line) if line else fh.write("\n")
    return True


def write_if_absent(path: Path, lines: list[str]) -> bool:
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return True


# ----------------------------------------------------------------------------- plan


@dataclass
class Plan:
    jobs: list[ClipJob] = field(default_factory=list)  # clips still to write
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rows: dict[Path, list] = field(default_factory=lambda: defaultdict(list))  # attribute csv rows
    truth: dict[Path, list[str]] = field(default_factory=lambda: defaultdict(list))  # ground-truth lines

    def add(self, path: Path, job_args: dict) -> None:
        self.counts[f"{path.parent.parent.parent.name}/{path.parent.parent.name}/{path.parent.name}"] += 1
        if path.exists():
            self.skipped += 1
        else:
            self.jobs.append(ClipJob(path=str(path), **job_args))


def _kind(machine: str, label: str, i: int, n_combos: int, difficulty: Difficulty) -> str | None:
    """Anomaly kind of test clip ``i``: every attribute combination cycles through all kinds."""
    kinds = difficulty.kinds(machine)
    return kinds[(i // n_combos) % len(kinds)] if label == "anomaly" else None


def _labelled(plan: Plan, data: Path, dataset: str, machine: str, section: str, split: str, domain: str,
              label: str, indices, combos: list[dict], common: dict) -> None:
    """Plan clips ``indices`` of one (section, domain, split, label) group, attributes cycling."""
    for j, i in enumerate(indices):
        attrs = tuple(combos[j % len(combos)].items())
        name = labelled_name(section, domain, split, label, i, attrs)
        plan.add(data / machine / split / name,
                 dict(machine=machine, section=section, attrs=attrs,
                      anomaly=_kind(machine, label, j, len(combos), common["difficulty"]),
                      key=(dataset, machine, section, split, domain, label, str(i)), **common))
        plan.rows[data / machine / f"attributes_{section}.csv"].append((f"{machine}/{split}/{name}", attrs))


def domain_settings(common: dict, target_offset_db: float) -> dict[str, dict]:
    """Clip settings per domain: the target's machine-to-background ratio moved by its offset."""
    lo, hi = common["snr_db"]
    return {"source": common, "target": {**common, "snr_db": (lo + target_offset_db, hi + target_offset_db)}}


def plan_dataset(preset: SynthPreset, root: Path, seed: int, eval_data: bool) -> Plan:
    plan = Plan()
    common = dict(strength=tuple(preset.anomaly_strength), snr_db=tuple(preset.snr_db),
                  n=int(round(preset.seconds * SR)), seed=seed, difficulty=preset.difficulty)
    by_domain = domain_settings(common, preset.target_snr_offset_db)
    datasets = [("dev", preset.dev_sections)] + ([("eval", preset.eval_sections)] if eval_data else [])
    for dataset, sections in datasets:
        data = root / {"dev": DEV_DATA, "eval": EVAL_DATA}[dataset]
        for machine in preset.machines:
            for section in sections:
                spec = MACHINES[machine].spec(section)
                for domain, count in zip(DOMAINS, (preset.source_train, preset.target_train)):
                    _labelled(plan, data, dataset, machine, section, "train", domain, "normal", range(count),
                              spec.values(domain), by_domain[domain])
                if dataset == "dev":
                    for domain in DOMAINS:
                        for label in LABELS:
                            _labelled(plan, data, dataset, machine, section, "test", domain, label,
                                      range(preset.test_per_group), spec.values(domain), by_domain[domain])
                else:
                    _plan_eval_test(plan, root, machine, section, spec, preset.test_per_group, by_domain)
    return plan


def _plan_eval_test(plan: Plan, root: Path, machine: str, section: str, spec, per_group: int,
                    by_domain: dict[str, dict]) -> None:
    """Unlabelled eval test clips, shuffled so that the index reveals nothing; ground truth."""
    groups = [(d, lab, i) for d in DOMAINS for lab in LABELS for i in range(per_group)]
    order = keyed_rng("eval-order", machine, section, seed=by_domain["source"]["seed"]).permutation(len(groups))
    gt_name = ground_truth_file_name(machine, section)
    for file_index, g in zip(order, groups):
        domain, label, i = g
        combos = spec.values(domain)
        name = unlabelled_clip_name(section, int(file_index))
        plan.add(root / EVAL_DATA / machine / "test" / name,
                 dict(machine=machine, section=section, attrs=tuple(combos[i % len(combos)].items()),
                      anomaly=_kind(machine, label, i, len(combos), by_domain[domain]["difficulty"]),
                      key=("eval", machine, section, "test", domain, label, str(i)), **by_domain[domain]))
        plan.truth[root / GROUND_TRUTH_DATA / gt_name].append(f"{name},{int(label == 'anomaly')}\n")
        plan.truth[root / GROUND_TRUTH_DOMAIN / gt_name].append(f"{name},{int(domain == 'target')}\n")


def _write_tables(plan: Plan) -> list[str]:
    touched = [str(p) for p, rows in sorted(plan.rows.items()) if write_attribute_rows(p, rows)]
    touched += [str(p) for p, lines in sorted(plan.truth.items()) if write_if_absent(p, sorted(lines))]
    return touched


GENERATION_RECORD = "synth.json"


# Difficulty's (machine type, value) settings
PER_MACHINE_TYPE = ("machine_snr_db", "machine_anomaly_gain", "anomaly_kinds")
# Difficulty's settings added after trees were recorded: left out of a record at their default
ADDED_LATER = ("machine_anomaly_gain", "anomaly_kinds", "tone_line_db", "resonance_db", "resonance_q")


def preset_settings(preset: SynthPreset) -> dict:
    """What makes a preset's clips, as JSON stores it: per-machine-type settings only for the
    preset's own machine types (a valve setting does not change a valve-free dataset); a setting
    of ``ADDED_LATER`` at its default is left out, so that records made before it existed still match."""
    d = preset.difficulty
    own = {k: tuple((m, v) for m, v in getattr(d, k) if m in preset.machines) for k in PER_MACHINE_TYPE}
    settings = json.loads(json.dumps(asdict(replace(preset, difficulty=replace(d, **own)))))
    defaults = json.loads(json.dumps(asdict(Difficulty())))
    for key in ADDED_LATER:
        if settings["difficulty"][key] == defaults[key]:
            del settings["difficulty"][key]
    return settings


def preset_from_settings(settings: dict) -> SynthPreset:
    """The preset a ``preset_settings`` dict describes (JSON lists back to tuples)."""
    d = settings["difficulty"]
    difficulty = Difficulty(**{**d, "anomaly_duty": tuple(d["anomaly_duty"]), "event_snr_db": tuple(d["event_snr_db"]),
                               **{k: tuple((m, float(v)) for m, v in d.get(k, ())) for k in PER_MACHINE_TYPE[:2]},
                               "anomaly_kinds": tuple((m, tuple(v)) for m, v in d.get("anomaly_kinds", ()))})
    return SynthPreset(**{**settings, "difficulty": difficulty,
                          **{k: tuple(settings[k]) for k in ("machines", "dev_sections", "eval_sections",
                                                             "anomaly_strength", "snr_db")}})


def recorded_preset(root: Path) -> SynthPreset | None:
    """The preset a tree was generated with (its ``synth.json``), or None for a tree without one."""
    record = root / GENERATION_RECORD
    return preset_from_settings(json.loads(record.read_text())["preset"]) if record.is_file() else None


def check_generation_record(root: Path, preset: SynthPreset, seed: int) -> dict:
    """The settings a tree is generated with; a tree generated with others is refused (its clips
    would be kept and mixed with new ones: the generator skips files that exist)."""
    settings = {"preset": preset_settings(preset), "seed": seed}
    record = root / GENERATION_RECORD
    if record.is_file():
        if json.loads(record.read_text()) != settings:
            raise ValueError(f"{root} was generated with other settings or by another version of the generator "
                             f"({record}); remove {root} or generate into another folder")
    elif (root / DEV_DATA).is_dir():
        log.warning("%s holds clips but no %s: an earlier version of the generator made it, and its clips are "
                    "used as they are; remove the folder to regenerate it with this version", root, GENERATION_RECORD)
    return settings


def write_generation_record(root: Path, settings: dict) -> None:
    """Atomically, before any clip: an interrupted generation resumes only with the same settings."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{GENERATION_RECORD}.tmp"
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, root / GENERATION_RECORD)


def generate(preset: SynthPreset, root: str | os.PathLike, seed: int = 0, workers: int | None = None,
             eval_data: bool = False) -> SynthSummary:
    """Write the preset's dataset under ``root`` (``root/dev_data/...``); skip files that exist.

    ``workers=None`` uses every CPU. Returns what was written, skipped and how fast.
    """
    preset.check()
    if seed < 0:
        raise ValueError("seed must be >= 0")
    root = Path(root)
    t0 = time.perf_counter()
    settings = check_generation_record(root, preset, seed)
    if not (root / GENERATION_RECORD).is_file() and not (root / DEV_DATA).is_dir():
        write_generation_record(root, settings)
    plan = plan_dataset(preset, root, seed, eval_data)
    written = run_jobs(plan.jobs, workers, desc=f"synth {preset.name}")
    tables = _write_tables(plan)
    summary = SynthSummary(root=str(root), preset=preset.name, written=written, skipped=plan.skipped,
                           seconds=time.perf_counter() - t0, counts=dict(plan.counts), tables=tables)
    log.info("synth %s: %d clips written, %d existed, %.1f s (%.1f clips/s)", preset.name, summary.written,
             summary.skipped, summary.seconds, summary.clips_per_s)
    return summary


# ----------------------------------------------------------------------------- data drops

DROP_KINDS = ("target", "attribute", "section")


def next_value(values) -> str:
    """A value of an attribute parameter not among ``values``, in their style.

    Numbers continue past the largest by the smallest step ('28V','31V' -> '34V'; '00','01' ->
    '02'); single letters take the next free letter; anything else becomes 'x<k>'.
    """
    values = sorted(set(values))
    m = [re.fullmatch(r"([^\d]*?)(\d+(?:\.\d+)?)(\D*)", v) for v in values]
    if m and all(m) and len({(x[1], x[3]) for x in m}) == 1:
        nums = sorted(float(x[2]) for x in m)
        step = min(np.diff(nums)) if len(nums) > 1 else 1.0
        dec = max(len(x[2].split(".")[1]) if "." in x[2] else 0 for x in m)
        width = max((len(x[2]) for x in m if x[2].startswith("0") and x[2].isdigit()), default=0)  # '00'
        return m[0][1] + f"{nums[-1] + step:.{dec}f}".zfill(width) + m[0][3]
    if all(len(v) == 1 and v in string.ascii_uppercase for v in values):
        free = [ch for ch in string.ascii_uppercase if ch not in values]
        later = [ch for ch in free if ch > max(values)]
        if later or free:
            return (later or free)[0]
    k = 1
    while f"x{k}" in values:
        k += 1
    return f"x{k}"


def _dev_root(root: Path) -> Path:
    if (root / DEV_DATA).is_dir():
        return root / DEV_DATA
    if root.name == DEV_DATA and root.is_dir():
        return root
    raise FileNotFoundError(f"{root} holds no dev_data/ tree")


def _clip_attrs(meta, attributes: dict) -> tuple[tuple[str, str], ...]:
    """Attribute pairs of a clip: from the attributes csv, else from its name."""
    if meta.path in attributes:
        return tuple(attributes[meta.path].items())
    parts = (meta.attribute or "").split("_")
    return tuple(zip(parts[0::2], parts[1::2])) if len(parts) % 2 == 0 and parts[0] else ()


def add_drop(root: str | os.PathLike, kind: str, count: int, seed: int = 0, workers: int | None = 1,
             strength: tuple[float, float] | None = None, snr_db: tuple[float, float] | None = None) -> list[str]:
    """Write new clips into an existing dev_data tree; existing WAVs are never touched.

    ``kind``: "target" = ``count`` more target-domain train clips per (machine, section), with the
    section's existing target attribute values; "attribute" = ``count`` target train clips per
    section with a new target attribute value; "section" = a new section per machine (next free
    id) with ``count`` source train clips, ceil(count/10) target train clips and ceil(count/10)
    test clips per (domain, label). Machine types, sections and attribute values are read from the
    tree. Rows are appended to (or create) ``attributes_XX.csv``. Returns every WAV written plus
    the csv files touched.

    The clips sound like the tree's: anomaly strength, machine-to-background ratio (with the target
    domain's offset) and difficulty come from its ``synth.json`` when it has one, else from the
    defaults; ``strength`` / ``snr_db`` override them.
    """
    if kind not in DROP_KINDS:
        raise ValueError(f"unknown drop kind {kind!r}; one of {DROP_KINDS}")
    if count < 1 or seed < 0:
        raise ValueError("count must be >= 1 and seed >= 0")
    dev = _dev_root(Path(root))
    made = recorded_preset(dev.parent) or SynthPreset("drop")
    strength = tuple(strength or made.anomaly_strength)
    snr_db = tuple(snr_db or made.snr_db)
    found = discover_clips(dev)
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for meta in found.clips:
        if meta.is_labelled:
            groups[(meta.machine, meta.section)].append(meta)
    unknown = sorted({m for m, _ in groups} - set(MACHINES))
    if unknown:
        raise ValueError(f"cannot synthesise machine types {unknown}; known: {list(MACHINE_TYPES)}")
    plan = Plan()
    for machine in sorted({m for m, _ in groups}):
        sections = {s: groups[(m, s)] for m, s in groups if m == machine}
        info = sf.info(str(dev / sections[min(sections)][0].path))
        if info.samplerate != SR:
            raise ValueError(f"{machine}: clips are {info.samplerate} Hz; the synthesiser writes {SR} Hz")
        by_domain = domain_settings(dict(strength=strength, snr_db=snr_db, n=int(info.frames), seed=seed,
                                         difficulty=made.difficulty), made.target_snr_offset_db)
        if kind == "section":
            _drop_section(plan, dev, machine, set(sections), count, by_domain)
            continue
        for section, clips in sorted(sections.items()):
            targets = [c for c in clips if c.domain == "target"]
            start = max((c.index for c in targets if c.split == "train" and c.label == "normal"), default=-1) + 1
            if kind == "target":
                combos = sorted({_clip_attrs(c, found.attributes) for c in targets if c.split == "train"}) \
                    or sorted({_clip_attrs(c, found.attributes) for c in targets})
                if not combos:
                    log.warning("%s section %s has no target-domain clips; skipped", machine, section)
                    continue
            else:
                combos = [_new_attribute(clips, found.attributes)]
            _labelled(plan, dev, "dev", machine, section, "train", "target", "normal", range(start, start + count),
                      [dict(c) for c in combos], by_domain["target"])
    run_jobs(plan.jobs, workers, desc=f"drop {kind}")
    tables = [str(p) for p, rows in sorted(plan.rows.items()) if write_attribute_rows(p, rows)]
    return [j.path for j in plan.jobs] + tables


def _new_attribute(clips, attributes) -> tuple[tuple[str, str], ...]:
    """A target attribute combination with a new value of the parameter that shifts domains."""
    by_domain = {d: [_clip_attrs(c, attributes) for c in clips if c.domain == d] for d in DOMAINS}
    template = (by_domain["target"] or by_domain["source"])[0]
    if not template:
        raise ValueError(f"{clips[0].machine} section {clips[0].section}: clips carry no attributes")

    def values(domain, p):
        return {dict(a).get(p) for a in by_domain[domain]} - {None}
    params = [p for p, _ in template]
    shifting = [p for p in params if not values("source", p) & values("target", p)] or params
    p = shifting[0]
    new = next_value(values("source", p) | values("target", p))
    return tuple((q, new if q == p else v) for q, v in template)


def _drop_section(plan: Plan, dev: Path, machine: str, dev_sections: set[str], count: int,
                  by_domain: dict[str, dict]) -> None:
    """A new section (next free two-digit id across dev_data and eval_data) for ``machine``."""
    used = set(dev_sections)
    ev = dev.parent / EVAL_DATA / machine
    for sub in ("train", "test"):
        if (ev / sub).is_dir():
            used |= {m.group(1) for f in (ev / sub).iterdir() if (m := re.match(r"section_([0-9A-Za-z]+)_", f.name))}
    section = f"{max([int(s) for s in used if s.isdigit()], default=-1) + 1:02d}"
    spec = MACHINES[machine].spec(section)
    few = -(-count // 10)
    for domain, n_train in zip(DOMAINS, (count, few)):
        _labelled(plan, dev, "dev", machine, section, "train", domain, "normal", range(n_train),
                  spec.values(domain), by_domain[domain])
        for label in LABELS:
            _labelled(plan, dev, "dev", machine, section, "test", domain, label, range(few), spec.values(domain),
                      by_domain[domain])
