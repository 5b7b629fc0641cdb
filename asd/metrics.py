"""DCASE 2022 Task 2 metrics and submission files, as the official evaluator computes them.

Per (machine type, section), with ``y_true`` (1 anomaly, 0 normal), ``y_domain``
(0 source, 1 target) and anomaly scores (higher = more anomalous):

* AUC(source) = ROC AUC over the source-domain normal clips plus the anomalous clips of
  **both** domains; AUC(target) likewise with the target normals.
* pAUC = ``sklearn.metrics.roc_auc_score(y_true, score, max_fpr=0.1)`` over all clips of
  the section (McClish-standardised partial AUC: chance 0.5, perfect 1.0).
* Harmonic means use ``scipy.stats.hmean`` with every value floored at machine epsilon.
  Official score = hmean over the flat list of every AUC(source), AUC(target) and pAUC of
  all machine types and sections; per machine type the same over its sections.
* Paper Table 1: per machine type that hmean; "Source AUC", "Target AUC", "pAUC" = hmean of
  all values of that metric (all machines and sections); "Overall" = hmean of all values.

Undefined metrics. A metric needs both classes: AUC(domain) is **skipped** when the section
has no normal clips of that domain (e.g. a user tree without target test clips) or no
anomalies; pAUC is skipped when there are no normals or no anomalies. A skipped metric is
``None`` in :class:`SectionResult`, its reason is recorded in ``SectionResult.skipped``
(and logged as a warning), it is left out of every harmonic mean, and tables show it as
``n/a`` with the reason in their ``skipped`` column — never a crash, never a silent NaN.

Submission files (one pair per machine type and section, every test clip exactly once,
rows sorted by file name because the evaluator matches scores to labels by sorted name):
``anomaly_score_<machine>_section_<XX>_test.csv`` (``<wav basename>,<score>``, no header)
and ``decision_result_<machine>_section_<XX>_test.csv`` (``<wav basename>,<0|1>``). Scores
are written with ``repr`` (shortest string that round-trips a float64 exactly).
Ground truth (official eval layout): ``ground_truth_data/ground_truth_<machine>_section_<XX>_test.csv``
(``<wav>,<0|1>``) and ``ground_truth_domain/`` with files of the same names (``<wav>,<0|1>``,
0 source, 1 target; ``source``/``target`` also accepted).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import hmean
from sklearn.metrics import roc_auc_score

from asd.contracts import (GROUND_TRUTH_DOMAIN, decision_file_name, ground_truth_file_name,
                           score_file_name)

logger = logging.getLogger(__name__)

MAX_FPR = 0.1
EPS = float(np.finfo(float).eps)
METRICS = ("auc_source", "auc_target", "pauc")
DOMAIN_IDS = {"source": 0, "target": 1}

_SCORE_RE = re.compile(r"^anomaly_score_(?P<machine>.+)_section_(?P<section>[^_]+)_test\.csv$")
_GT_RE = re.compile(r"^ground_truth_(?P<machine>.+)_section_(?P<section>[^_]+)_test\.csv$")

__all__ = [
    "EPS",
    "MAX_FPR",
    "METRICS",
    "MetricUndefined",
    "SectionResult",
    "align_by_name",
    "decision_file_name",
    "domain_auc",
    "evaluate_submission",
    "ground_truth_file_name",
    "hmean_eps",
    "machine_scores",
    "official_score",
    "paper_row",
    "parse_score_file_name",
    "partial_auc",
    "read_decisions_csv",
    "read_ground_truth",
    "read_scores_csv",
    "results_table",
    "score_file_name",
    "section_metrics",
    "skipped_records",
    "to_markdown",
    "write_decisions_csv",
    "write_scores_csv",
    "write_submission",
    "write_table_csv",
]


# --------------------------------------------------------------------------- metrics


class MetricUndefined(ValueError):
    """A metric cannot be computed for this section (a class is missing); carries why."""


def _arrays(y_true, scores, y_domain=None):
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} entries, scores {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0 (normal) or 1 (anomaly)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain non-finite values")
    d = None
    if y_domain is not None:
        d = np.asarray(y_domain).astype(np.int64).reshape(-1)
        if d.shape != y.shape:
            raise ValueError(f"y_domain has {d.size} entries, y_true {y.size}")
        if not np.isin(d, (0, 1)).all():
            raise ValueError("y_domain must be 0 (source) or 1 (target)")
    return y, s, d


def domain_auc(y_true, y_domain, scores, domain: int | str) -> float:
    """AUC for one domain: that domain's normals vs. the anomalies of BOTH domains.

    The official DCASE 2022 evaluator's AUC(source)/AUC(target). Raises
    :class:`MetricUndefined` when that domain has no normals or there are no anomalies.
    """
    dom = DOMAIN_IDS[domain] if isinstance(domain, str) else int(domain)
    y, s, d = _arrays(y_true, scores, y_domain)
    keep = (y == 1) | ((y == 0) & (d == dom))
    name = "source" if dom == 0 else "target"
    if not np.any((y == 0) & (d == dom)):
        raise MetricUndefined(f"no {name}-domain normal clips")
    if not np.any(y == 1):
        raise MetricUndefined("no anomalous clips")
    return float(roc_auc_score(y[keep], s[keep]))


def partial_auc(y_true, scores, max_fpr: float = MAX_FPR) -> float:
    """pAUC over all clips: ``roc_auc_score(y_true, scores, max_fpr=0.1)`` (McClish-standardised).

    Raises :class:`MetricUndefined` when normals or anomalies are missing.
    """
    y, s, _ = _arrays(y_true, scores)
    if not np.any(y == 0):
        raise MetricUndefined("no normal clips")
    if not np.any(y == 1):
        raise MetricUndefined("no anomalous clips")
    return float(roc_auc_score(y, s, max_fpr=max_fpr))


@dataclass
class SectionResult:
    """Metrics of one (machine type, section); ``None`` = skipped, reason in ``skipped``."""

    machine: str
    section: str
    auc_source: float | None = None
    auc_target: float | None = None
    pauc: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    n_clips: int = 0

    def values(self) -> list[float]:
        """The defined metrics in the order AUC(source), AUC(target), pAUC."""
        return [v for v in (self.auc_source, self.auc_target, self.pauc) if v is not None]

    def to_dict(self) -> dict:
        return asdict(self)


def section_metrics(
    y_true,
    y_domain,
    scores,
    *,
    machine: str = "",
    section: str = "",
    max_fpr: float = MAX_FPR,
) -> SectionResult:
    """AUC(source), AUC(target) and pAUC of one section, skipping undefined ones.

    ``y_domain`` may be ``None`` (no domain information): both AUCs are then skipped and
    only pAUC is computed. Each skip is recorded in ``skipped`` and logged.
    """
    y, s, d = _arrays(y_true, scores, y_domain)
    res = SectionResult(machine=str(machine), section=str(section), n_clips=int(y.size))
    for key, dom in (("auc_source", 0), ("auc_target", 1)):
        if d is None:
            res.skipped[key] = "no domain labels"
            continue
        try:
            setattr(res, key, domain_auc(y, d, s, dom))
        except MetricUndefined as err:
            res.skipped[key] = str(err)
    try:
        res.pauc = partial_auc(y, s, max_fpr)
    except MetricUndefined as err:
        res.skipped["pauc"] = str(err)
    for key, why in res.skipped.items():
        logger.warning("%s section %s: %s skipped (%s)", machine, section, key, why)
    return res


def hmean_eps(values: Iterable[float]) -> float:
    """``scipy.stats.hmean`` with each value floored at machine epsilon (official evaluator).

    Raises ``ValueError`` for an empty list or NaN values.
    """
    arr = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("harmonic mean of no values")
    if np.any(np.isnan(arr)):
        raise ValueError("harmonic mean of NaN")
    return float(hmean(np.maximum(arr, EPS)))


def _hmean_or_none(values: Sequence[float]) -> float | None:
    return hmean_eps(values) if len(values) else None


def official_score(results: Iterable[SectionResult]) -> float | None:
    """Official score: hmean over every defined AUC(source), AUC(target), pAUC of all sections."""
    return _hmean_or_none([v for r in results for v in r.values()])


def _machines(results: Sequence[SectionResult]) -> list[str]:
    return sorted({r.machine for r in results})


def machine_scores(results: Iterable[SectionResult]) -> dict[str, float | None]:
    """Per machine type: hmean over its sections' [AUC_s, AUC_t, pAUC] values (sorted by name)."""
    results = list(results)
    return {
        m: _hmean_or_none([v for r in results if r.machine == m for v in r.values()])
        for m in _machines(results)
    }


def _metric_hmean(results: Sequence[SectionResult], key: str) -> float | None:
    return _hmean_or_none([getattr(r, key) for r in results if getattr(r, key) is not None])


def results_table(results: Iterable[SectionResult]) -> list[dict]:
    """Rows for reports: every section, then per machine type, then ``all``.

    Keys: ``machine, section, auc_source, auc_target, pauc, hmean, skipped`` (fractions in
    [0, 1]; ``None`` where undefined). Section rows: ``hmean`` of that section's values.
    Machine rows (``section="all"``): each metric column is the hmean of that metric over
    the machine's sections and ``hmean`` is the machine's Table 1 value. Last row
    (``machine="all"``): the "Source AUC", "Target AUC", "pAUC" columns of Table 1 and
    ``hmean`` = official score ("Overall").
    """
    results = sorted(results, key=lambda r: (r.machine, r.section))
    rows: list[dict] = []
    for m in _machines(results):
        mine = [r for r in results if r.machine == m]
        for r in mine:
            rows.append(_row(m, r.section, [r], _skip_text(r)))
        rows.append(_row(m, "all", mine, ""))
    rows.append(_row("all", "all", results, ""))
    return rows


def _row(machine: str, section: str, group: Sequence[SectionResult], skipped: str) -> dict:
    row = {"machine": machine, "section": section}
    for key in METRICS:
        row[key] = _metric_hmean(group, key)
    row["hmean"] = official_score(group)
    row["skipped"] = skipped
    return row


def _skip_text(r: SectionResult) -> str:
    return "; ".join(f"{k}: {v}" for k, v in r.skipped.items())


def skipped_records(results: Iterable[SectionResult]) -> list[dict]:
    """One ``{machine, section, metric, reason}`` record per skipped metric."""
    return [
        {"machine": r.machine, "section": r.section, "metric": k, "reason": v}
        for r in results
        for k, v in r.skipped.items()
    ]


def paper_row(results: Iterable[SectionResult], method: str = "proposed") -> dict:
    """One row in the layout of the paper's Table 1.

    ``{"method", <machine>: hmean, ..., "Source AUC", "Target AUC", "pAUC", "Overall"}``
    (fractions; machines sorted by name, taken from the results).
    """
    results = list(results)
    row: dict = {"method": method}
    row.update(machine_scores(results))
    row["Source AUC"] = _metric_hmean(results, "auc_source")
    row["Target AUC"] = _metric_hmean(results, "auc_target")
    row["pAUC"] = _metric_hmean(results, "pauc")
    row["Overall"] = official_score(results)
    return row


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def to_markdown(rows: Sequence[dict], *, percent: bool = True, digits: int = 2) -> str:
    """Markdown table of dict rows (columns in first-seen order).

    Floats are shown as percentages (``percent=True``, as the paper) with ``digits``
    decimals; ``None`` as ``n/a``.
    """
    rows = list(rows)
    cols = _columns(rows)

    def fmt(v) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{100.0 * v:.{digits}f}" if percent else f"{v:.{digits + 2}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """CSV with a header of dict rows; floats as ``repr`` fractions, ``None`` as empty."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in rows:
            w.writerow(["" if row.get(c) is None else _cell(row.get(c)) for c in cols])
    return path


def _cell(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- files


def _sorted_rows(names: Sequence[str], values: Sequence) -> list[tuple[str, object]]:
    base = [os.path.basename(str(n)) for n in names]
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    vals = np.asarray(values).reshape(-1).tolist()
    if len(base) != len(vals):
        raise ValueError(f"{len(base)} file names for {len(vals)} values")
    if len(set(base)) != len(base):
        dup = sorted({b for b in base if base.count(b) > 1})
        raise ValueError(f"duplicate file names: {dup[:5]}")
    return sorted(zip(base, vals), key=lambda t: t[0])


def write_scores_csv(path: str | os.PathLike, names: Sequence[str], scores) -> Path:
    """Write ``<wav basename>,<score>`` rows, no header, sorted by name, exact float repr."""
    rows = _sorted_rows(names, scores)
    out = []
    for name, v in rows:
        v = float(v)
        if not math.isfinite(v):
            raise ValueError(f"{name}: non-finite score {v}")
        out.append(f"{name},{v!r}\n")
    return _write_lines(path, out)


def write_decisions_csv(path: str | os.PathLike, names: Sequence[str], decisions) -> Path:
    """Write ``<wav basename>,<0|1>`` rows, no header, sorted by name."""
    out = []
    for name, v in _sorted_rows(names, decisions):
        iv = int(v)
        if iv not in (0, 1) or iv != v:
            raise ValueError(f"{name}: decision must be 0 or 1, got {v!r}")
        out.append(f"{name},{iv}\n")
    return _write_lines(path, out)


def _write_lines(path: str | os.PathLike, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        fh.writelines(lines)
    return path


def write_submission(
    out_dir: str | os.PathLike,
    machine: str,
    section: str | int,
    names: Sequence[str],
    scores,
    decisions,
) -> tuple[Path, Path]:
    """Write both evaluator files of one (machine, section) into ``out_dir``."""
    out_dir = Path(out_dir)
    sp = write_scores_csv(out_dir / score_file_name(machine, section), names, scores)
    dp = write_decisions_csv(out_dir / decision_file_name(machine, section), names, decisions)
    return sp, dp


def _read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            row = [c.strip() for c in row]
            if not row or not any(row):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: line {i + 1}: expected '<file>,<value>'")
            rows.append((row[0], row[1]))
    if rows and not _is_number(rows[0][1]) and rows[0][1].lower() not in DOMAIN_IDS:
        rows = rows[1:]  # tolerate a header row
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_scores_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an anomaly-score file: (names, float64 scores), in file order."""
    rows = _read_pairs(path)
    return [r[0] for r in rows], np.array([float(r[1]) for r in rows], dtype=np.float64)


def read_decisions_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a decision file (or a 0/1 ground-truth label file): (names, int64 values)."""
    rows = _read_pairs(path)
    vals = np.array([int(float(r[1])) for r in rows], dtype=np.int64)
    if not np.isin(vals, (0, 1)).all():
        raise ValueError(f"{path}: values must be 0 or 1")
    return [r[0] for r in rows], vals


def _read_domains(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    rows = _read_pairs(path)
    vals = [DOMAIN_IDS[v.lower()] if v.lower() in DOMAIN_IDS else int(float(v)) for _, v in rows]
    arr = np.array(vals, dtype=np.int64)
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{path}: domains must be 0/1 or source/target")
    return [r[0] for r in rows], arr


def read_ground_truth(
    label_path: str | os.PathLike, domain_path: str | os.PathLike | None = None
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Official ground truth of one section: (sorted names, y_true, y_domain or None).

    ``domain_path`` defaults to ``<label dir>/../ground_truth_domain/<same file name>`` when
    that exists. Names in the two files must agree.
    """
    names, y = read_decisions_csv(label_path)
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    names = [names[i] for i in order]
    y = y[order]
    if domain_path is None:
        cand = Path(label_path).parent.parent / GROUND_TRUTH_DOMAIN / Path(label_path).name
        domain_path = cand if cand.exists() else None
    if domain_path is None:
        return names, y, None
    dnames, d = _read_domains(domain_path)
    lookup = dict(zip(dnames, d.tolist()))
    missing = [n for n in names if n not in lookup]
    if missing or len(dnames) != len(names):
        raise ValueError(f"{domain_path}: file names differ from {label_path} (e.g. {missing[:3]})")
    return names, y, np.array([lookup[n] for n in names], dtype=np.int64)


def align_by_name(
    ref_names: Sequence[str], names: Sequence[str], values: np.ndarray, what: str = "scores"
) -> np.ndarray:
    """``values`` reordered to ``ref_names`` (matching basenames); error on any mismatch.

    Stricter than the evaluator (which pairs sorted lists): names must be the same set.
    """
    base = [os.path.basename(n) for n in names]
    lookup = dict(zip(base, np.asarray(values).tolist()))
    missing = sorted(set(ref_names) - set(lookup))
    extra = sorted(set(lookup) - set(ref_names))
    if missing or extra or len(base) != len(lookup):
        raise ValueError(
            f"{what} do not match the ground truth: missing {missing[:3]}, extra {extra[:3]}"
        )
    return np.array([lookup[n] for n in ref_names])


def evaluate_submission(
    submission_dir: str | os.PathLike,
    ground_truth_dir: str | os.PathLike,
    domain_dir: str | os.PathLike | None = None,
    *,
    require_decisions: bool = True,
    max_fpr: float = MAX_FPR,
) -> list[SectionResult]:
    """Score a submission folder against official ground-truth files.

    Every ``ground_truth_<machine>_section_<XX>_test.csv`` in ``ground_truth_dir`` needs
    its ``anomaly_score_...`` file (and, like the evaluator, its ``decision_result_...``
    file unless ``require_decisions=False``) in ``submission_dir``. Domains come from
    ``domain_dir`` (default ``<ground_truth_dir>/../ground_truth_domain``).
    """
    sub, gt = Path(submission_dir), Path(ground_truth_dir)
    dom = Path(domain_dir) if domain_dir is not None else gt.parent / GROUND_TRUTH_DOMAIN
    results = []
    for gt_file in sorted(gt.iterdir()):
        m = _GT_RE.match(gt_file.name)
        if not m:
            continue
        machine, section = m.group("machine"), m.group("section")
        dpath = dom / gt_file.name
        names, y, d = read_ground_truth(gt_file, dpath if dpath.exists() else None)
        spath = sub / score_file_name(machine, section)
        if not spath.exists():
            raise FileNotFoundError(f"missing submission file {spath}")
        s_names, s = read_scores_csv(spath)
        scores = align_by_name(names, s_names, s, f"{spath.name}")
        if require_decisions:
            dec_path = sub / decision_file_name(machine, section)
            if not dec_path.exists():
                raise FileNotFoundError(f"missing submission file {dec_path}")
            dn, dv = read_decisions_csv(dec_path)
            align_by_name(names, dn, dv, dec_path.name)
        results.append(
            section_metrics(y, d, scores, machine=machine, section=section, max_fpr=max_fpr)
        )
    if not results:
        raise FileNotFoundError(f"no ground_truth_<machine>_section_<XX>_test.csv in {gt}")
    return results


def parse_score_file_name(file_name: str) -> tuple[str, str] | None:
    """(machine, section) of an ``anomaly_score_<machine>_section_<XX>_test.csv`` name, else None."""
    m = _SCORE_RE.match(os.path.basename(file_name))
    return (m.group("machine"), m.group("section")) if m else None
