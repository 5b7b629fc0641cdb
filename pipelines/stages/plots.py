"""Figures of a scoring run (matplotlib, Agg backend): PNG files for MLflow and reports.

* :func:`roc_curves` — per machine type, one ROC curve per (section, domain), each with the
  official evaluator's clip selection: that domain's normal clips + ALL anomalies of the section;
* :func:`score_histograms` — per machine type, a grid (row: section, column: domain) of score
  histograms, normal vs anomaly clips of that domain, with the section's decision threshold;
* :func:`hmean_bar` — per-machine harmonic mean (the paper's Table 1 columns) and the official score.

Every function takes the scored DataFrame of ``asd score`` (meta columns + ``score``) and an
output folder, and returns the paths it wrote. Unlabelled clips are left out; a machine type
without labelled clips gets no figure.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from asd import metrics as M
from asd.contracts import DOMAINS, section_key


def _plt():
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen, when a figure is drawn

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", str(name))


def _labelled(scores: pd.DataFrame) -> pd.DataFrame:
    if "label" not in scores.columns:
        return scores.iloc[0:0]
    rows = scores[scores["label"].isin(("normal", "anomaly")) & scores["score"].notna()]
    return rows


def roc_curves(scores: pd.DataFrame, out_dir: str | Path, sections: dict | None = None) -> list[Path]:
    """``roc_<machine>.png``: one curve per section and domain (domain normals + all anomalies)."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    data = _labelled(scores)
    for machine, mrows in data.groupby("machine", sort=True):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        drawn = 0
        for section, srows in mrows.groupby("section", sort=True):
            anomalies = srows[srows["label"] == "anomaly"]
            if anomalies.empty:
                continue
            for domain, style in zip(DOMAINS, ("-", "--")):
                normals = srows[(srows["label"] == "normal") & (srows["domain"] == domain)]
                if normals.empty:
                    continue
                y = np.r_[np.zeros(len(normals)), np.ones(len(anomalies))]
                s = np.r_[normals["score"].to_numpy(float), anomalies["score"].to_numpy(float)]
                fpr, tpr, _ = roc_curve(y, s)
                auc = roc_auc_score(y, s)
                ax.plot(fpr, tpr, style, label=f"section {section} {domain} (AUC {auc:.3f})")
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.axvline(0.1, color="grey", linewidth=0.6, alpha=0.6)  # pAUC range: FPR <= 0.1
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{machine}: ROC (domain normals vs all anomalies)")
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        path = out_dir / f"roc_{_safe(machine)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def score_histograms(scores: pd.DataFrame, sections: dict | None, out_dir: str | Path,
                     bins: int = 30) -> list[Path]:
    """``hist_<machine>.png``: normal vs anomaly scores per section (rows) and domain (columns),
    with the section's decision threshold (from ``sections``, keyed ``<machine>/section_<XX>``)."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = sections or {}
    written = []
    data = _labelled(scores)
    for machine, mrows in data.groupby("machine", sort=True):
        secs = sorted(mrows["section"].unique().tolist())
        fig, axes = plt.subplots(len(secs), len(DOMAINS), figsize=(9, 2.6 * len(secs)), squeeze=False)
        for i, section in enumerate(secs):
            srows = mrows[mrows["section"] == section]
            sm = sections.get(section_key(machine, section))
            threshold = getattr(sm, "threshold", None)
            values = srows["score"].to_numpy(float)
            edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
            for j, domain in enumerate(DOMAINS):
                ax = axes[i][j]
                drows = srows[srows["domain"] == domain]
                for label, color in (("normal", "tab:blue"), ("anomaly", "tab:red")):
                    v = drows.loc[drows["label"] == label, "score"].to_numpy(float)
                    if len(v):
                        ax.hist(v, bins=edges, alpha=0.55, color=color, label=f"{label} ({len(v)})")
                if threshold is not None and math.isfinite(float(threshold)):
                    ax.axvline(float(threshold), color="black", linestyle="--", linewidth=1,
                               label=f"threshold {float(threshold):.3g}")
                ax.set_title(f"{machine} section {section}, {domain}", fontsize=9)
                ax.set_xlabel("anomaly score", fontsize=8)
                ax.tick_params(labelsize=7)
                if ax.has_data():
                    ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"hist_{_safe(machine)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def machine_hmeans(scores: pd.DataFrame, results: list | None = None) -> tuple[dict, float | None]:
    """Per-machine hmean and the official score, from ``results`` or recomputed from ``scores``."""
    if results is None:
        results = []
        for (machine, section), rows in _labelled(scores).groupby(["machine", "section"], sort=True):
            y_true = (rows["label"] == "anomaly").astype(int).to_numpy()
            y_domain = ((rows["domain"] == "target").astype(int).to_numpy()
                        if rows["domain"].notna().all() else None)
            results.append(M.section_metrics(y_true, y_domain, rows["score"].to_numpy(float),
                                             machine=machine, section=section))
    return M.machine_scores(results), M.official_score(results)


def hmean_bar(scores: pd.DataFrame, out_dir: str | Path, results: list | None = None) -> list[Path]:
    """``hmean_per_machine.png``: bar per machine type (hmean of its AUCs and pAUCs, %)."""
    hmeans, official = machine_hmeans(scores, results)
    hmeans = {m: v for m, v in hmeans.items() if v is not None}
    if not hmeans:
        return []
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(hmeans)
    values = [100 * hmeans[m] for m in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 4))
    bars = ax.bar(names, values, color="tab:blue")
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    if official is not None:
        ax.axhline(100 * official, color="black", linestyle="--", linewidth=1,
                   label=f"official score {100 * official:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set(ylim=(0, 105), ylabel="hmean of AUC(source), AUC(target), pAUC [%]",
           title="Per machine type")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    path = out_dir / "hmean_per_machine.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_all(scores: pd.DataFrame, sections: dict | None, out_dir: str | Path,
             results: list | None = None) -> list[Path]:
    """Every figure above into ``out_dir``; returns the written paths."""
    return (roc_curves(scores, out_dir, sections) + score_histograms(scores, sections, out_dir)
            + hmean_bar(scores, out_dir, results))
