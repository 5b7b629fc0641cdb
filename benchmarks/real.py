"""Real-data benchmark: every detector variant through the whole pipeline on real recordings.

The recordings are the DCASE 2023 Task 2 ToyCar development clips in ``../shared/data/realtoycar``
(599 source + 10 target training clips, 100 labelled test clips, FLAC; never copied into the
repository). They are unpacked once as WAV into ``<out>/work/data`` with the folder's own
``unpack.py``; each variant is then a full ``run_pipeline`` (Ray Data extraction into Parquet,
Ray Train where the detector trains, the scoring job, MLflow) with ``data.root`` swapped, as a
user would run it. Trained variants run three seeds; the nearest-neighbour variants train
nothing and are deterministic, so one run stands for every seed.

    .venv/bin/python benchmarks/real.py --seeds 0 1 2 --out benchmarks/results/real

Writes ``<out>/real.json`` (every run, with its commit), ``<out>/real.md`` (the table) and
``<out>/score_distributions.png`` (the default detector's scores, normal vs anomalous, per domain).
Resumable: finished (method, seed) rows are kept. Without the recordings it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from robustness import KNN_FLOOR, LOGMEL, PROTOTYPE, SPECTRAL_KNN, run_method, slug  # benchmarks/ is on sys.path
from common import REAL_TOYCAR as DEFAULT_DATA, commit_id  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
# every variant spelled out, whatever the config's defaults are
METHODS: dict[str, list[str]] = {
    "spectral kNN": SPECTRAL_KNN,
    "spectral kNN, power 0.5": [*SPECTRAL_KNN, "knn.power=0.5"],
    "spectral kNN, standardised Euclidean, power 0.5": [*SPECTRAL_KNN, "knn.power=0.5",
                                                        "knn.distance=standardised_euclidean"],
    "spectral kNN, per-domain scale": [*SPECTRAL_KNN, "knn.normalisation=domain"],
    "spectral kNN, per-domain scale, power 0.5": [*SPECTRAL_KNN, "knn.normalisation=domain", "knn.power=0.5"],
    "spectral kNN, no normalisation": [*SPECTRAL_KNN, "knn.normalisation=none"],
    "kNN floor": KNN_FLOOR,
    "kNN floor, local scale": [*KNN_FLOOR, "knn.normalisation=local"],
    "kNN floor, per-domain scale": [*KNN_FLOOR, "knn.normalisation=domain"],
    "kNN on spectrum statistics": [*SPECTRAL_KNN, "knn.representation=statistics"],
    "AE baseline": ["method=ae", *LOGMEL],
    "fine-tune from scratch": [*PROTOTYPE, "pretrain.enabled=false", "finetune.enabled=true"],
    "pre-train + fine-tune": [*PROTOTYPE, "pretrain.enabled=true", "finetune.enabled=true",
                              "finetune.from_scratch=false"],
    "untrained network": [*PROTOTYPE, "pretrain.enabled=true", "pretrain.epochs=0", "finetune.enabled=false"],
    # candidate causes of the network's failure, one at a time (docs/method.md, "Real sound")
    "fine-tune from scratch, plain log-Mel": ["method=prototype", "features.kind=logmel", "pretrain.enabled=false",
                                              "finetune.enabled=true"],
    "fine-tune from scratch, 3x epochs": [*PROTOTYPE, "pretrain.enabled=false", "finetune.enabled=true",
                                          "finetune.epochs=30", "finetune.lr_milestones=[18]", "finetune.min_steps=600"],
}
DETERMINISTIC = {m for m, o in METHODS.items() if "method=knn" in o}
DEFAULT = "spectral kNN, standardised Euclidean, power 0.5"  # configs/demo.yaml
COLUMNS = ["Overall", "Source AUC", "Target AUC", "pAUC"]


def unpack(data: Path, work: Path) -> Path:
    """The recordings as WAV in the DCASE layout under ``work/data`` (idempotent)."""
    root = work / "data"
    subprocess.run([sys.executable, str(data / "unpack.py"), str(root)], check=True)
    return root


def report(rows: list[dict]) -> str:
    df = pd.DataFrame(rows)
    lines = ["| method | runs | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for method in [m for m in METHODS if m in set(df["method"])]:
        m = df[df["method"] == method]
        cells = [f"{100 * m[c].mean():.2f} ± {100 * (m[c].std(ddof=1) if len(m) > 1 else 0):.2f}" for c in COLUMNS]
        note = " (deterministic)" if method in DETERMINISTIC else ""
        lines.append(f"| {method} | {len(m)}{note} | " + " | ".join(cells) + " |")
    means = df.groupby("method")["Overall"].mean()
    if DEFAULT in means:
        for other in ("kNN floor", "AE baseline", "fine-tune from scratch", "pre-train + fine-tune"):
            if other in means:
                lines.append(f"- {DEFAULT} - {other}: {100 * (means[DEFAULT] - means[other]):+.2f} points (means)")
    return "\n".join(lines) + "\n"


def plot_distributions(scores_csv: Path, out: Path, title: str) -> Path:
    """Histograms of the anomaly scores, normal vs anomalous, one panel per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = pd.read_csv(scores_csv, dtype={"section": str})
    s = s[s["label"].isin(["normal", "anomaly"])]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    bins = np.histogram_bin_edges(s["score"], bins=30)
    for ax, domain in zip(axes, ("source", "target")):
        for label, colour in (("normal", "tab:blue"), ("anomaly", "tab:red")):
            v = s[(s["domain"] == domain) & (s["label"] == label)]["score"]
            ax.hist(v, bins=bins, alpha=0.6, color=colour, label=f"{label} ({len(v)})")
        ax.set_title(f"{domain} domain test clips")
        ax.set_xlabel("anomaly score")
        ax.legend()
    axes[0].set_ylabel("clips")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("ASD_REAL_DATA", DEFAULT_DATA)),
                    help="the real recordings' folder (with unpack.py); default ../shared/data/realtoycar")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()

    if not (args.data / "unpack.py").is_file():
        print(f"real-data benchmark skipped: no recordings at {args.data} (set --data or ASD_REAL_DATA)")
        return
    out = args.out.resolve()
    work = out / "work"
    results = out / "real.json"
    rows = json.loads(results.read_text())["runs"] if results.is_file() else []
    rows = [r for r in rows if r.get("config") == args.config]
    done = {(r["method"], r["seed"]) for r in rows}
    commit = commit_id()
    if not args.report_only:
        unpack(args.data, work)
        for seed in args.seeds:  # every method at one seed before the next seed
            for method in args.methods:
                if (method, seed) in done or (method in DETERMINISTIC and seed != args.seeds[0]):
                    continue
                print(f"== {method} / seed {seed}", flush=True)
                rows.append({**run_method(args.config, work, "real", method, METHODS[method], seed, []),
                             "config": args.config, "commit": commit})
                results.write_text(json.dumps({"data": str(args.data), "machine": platform.node(),
                                               "runs": rows}, indent=2, default=str))
    text = f"# Real recordings (DCASE 2023 ToyCar dev, section 00): config `{args.config}`\n\n" + report(rows)
    (out / "real.md").write_text(text)
    default_scores = work / "runs" / f"{slug(DEFAULT)}-seed{args.seeds[0]}" / "scoring" / "scores.csv"
    if default_scores.is_file():
        plot_distributions(default_scores, out / "score_distributions.png", f"{DEFAULT} on real ToyCar")
    print(text)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
