"""The paper's Tables 1-3 on the synthetic benchmark, through the real pipeline.

Every variant is a full ``run_pipeline`` (Ray Data extraction, Ray Train, scoring, MLflow run and
registry) on one shared data tree and feature store, for several training seeds:

* Table 1: AE baseline, pre-train only, fine-tune without pre-train, fine-tune with pre-train;
* Table 2: MPE ratio m in {none, 50%, 25%, 12.5%}, pre-training only;
* Table 3: NPE lambda range in {none, [0,.25], [.25,.5], [.5,.75], [.75,1]}, pre-train + fine-tune
  (the pre-trained model of each seed is shared by the Table 3 variants, as in the paper);
* Table 3 with fine-tuning from scratch (``table3_scratch``), and fine-tuning's learning rate from
  the pre-trained model (``finetune_lr``);
* test-time embedding: whole clip against the mean over 64-frame windows, same trained model;
* pre-training prototypes: from whole-clip embeddings against 64-frame window means
  (``pretrain.prototype_embedding``), pre-training only and pre-train + fine-tune.

Prints the tables (mean ± std over seeds, in %), says which differences to the reference row
exceed the spread, and writes ``<out>/quality.json``, ``<out>/quality.md`` and a bar chart per table.

    .venv/bin/python benchmarks/quality.py --config demo-prototype --seeds 0 1 2 --out benchmarks/results/quality-demo
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from asd import metrics as M
from pipelines.config import load_config

NPE_RANGES = [("w/o NPE", "null"), ("[0, 0.25]", "[0.0,0.25]"), ("[0.25, 0.5]", "[0.25,0.5]"),
              ("[0.5, 0.75]", "[0.5,0.75]"), ("[0.75, 1]", "[0.75,1.0]")]
TABLES = {
    "table1": [
        ("AE baseline", ["method=ae", "features.kind=logmel"]),
        ("Pre-train only", ["finetune.enabled=false"]),
        ("Fine-tune (w/o pre-train)", ["pretrain.enabled=false"]),
        ("Fine-tune (w/ pre-train)", []),
    ],
    "table2": [
        ("w/o MPE", ["finetune.enabled=false", "pretrain.mpe_ratio=null"]),
        ("m = 50%", ["finetune.enabled=false", "pretrain.mpe_ratio=0.5"]),
        ("m = 25%", ["finetune.enabled=false", "pretrain.mpe_ratio=0.25"]),
        ("m = 12.5%", ["finetune.enabled=false", "pretrain.mpe_ratio=0.125"]),
    ],
    "table3": [(name, [f"finetune.npe_lambda={value}"]) for name, value in NPE_RANGES],
    # Table 3 again, fine-tuning from scratch: on `demo` fine-tuning barely moves the pre-trained
    # model (BENCHMARKS.md), so NPE is also measured where fine-tuning does the learning
    "table3_scratch": [(name, ["pretrain.enabled=false", f"finetune.npe_lambda={value}"])
                       for name, value in NPE_RANGES],
    # fine-tuning's learning rate from the pre-trained model (the paper: 0.01, then 0.001)
    "finetune_lr": [
        ("lr 0.01", ["finetune.lr=0.01"]),
        ("lr 0.1", ["finetune.lr=0.1"]),
    ],
    "embedding": [
        ("whole clip", ["score.embedding=whole"]),
        ("64-frame windows", ["score.embedding=windows"]),
    ],
    "prototypes": [
        ("pre-train only, whole clips", ["finetune.enabled=false", "pretrain.prototype_embedding=whole"]),
        ("pre-train only, windows", ["finetune.enabled=false", "pretrain.prototype_embedding=windows"]),
        ("pre-train + fine-tune, whole clips", ["pretrain.prototype_embedding=whole"]),
        ("pre-train + fine-tune, windows", ["pretrain.prototype_embedding=windows"]),
    ],
}
# The row each variant is compared with: one per table, or per variant where pairs differ in one setting
REFERENCE = {"table1": "AE baseline", "table2": "w/o MPE", "table3": "w/o NPE", "table3_scratch": "w/o NPE",
             "finetune_lr": "lr 0.01", "embedding": "whole clip",
             "prototypes": {"pre-train only, windows": "pre-train only, whole clips",
                            "pre-train + fine-tune, windows": "pre-train + fine-tune, whole clips"}}
# Stages a table takes from the seed's full-method run of Table 1 instead of training them again
# (same digests, so run_pipeline skips them): Table 3 varies only fine-tuning, the embedding
# comparison only scoring.
REUSE = {"table3": ("pretrain",), "finetune_lr": ("pretrain",), "embedding": ("pretrain", "finetune"), "prototypes": ("pretrain",)}
DONOR = ("table1", "Fine-tune (w/ pre-train)")
# Variants whose donor is another variant (the pre-train-only run with the same prototypes)
VARIANT_DONOR = {("prototypes", f"pre-train + fine-tune, {kind}"): ("prototypes", f"pre-train only, {kind}")
                 for kind in ("whole clips", "windows")}


def run_name(table: str, variant: str, seed: int) -> str:
    slug = re.sub(r"[^0-9a-z]+", "-", variant.lower()).strip("-")
    return f"{table}-{slug}-seed{seed}"


def reuse_stages(donor: Path, run_dir: Path, stages) -> None:
    """Copy ``stages``' models and stage records from the donor run, so that ``run_pipeline``
    skips them (same digests) instead of training them again."""
    for stage in stages:
        for part in (f"models/{stage}", f"stages/{stage}.json"):
            src, dst = donor / part, run_dir / part
            if src.exists() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)


def run_variant(config: str, base: Path, table: str, name: str, overrides: list[str], seed: int,
                common: list[str]) -> dict:
    from pipelines.operations.run import run_pipeline
    from pipelines.stages.score import labelled_results

    run_dir = base / "runs" / run_name(table, name, seed)
    cfg = load_config(config, [*common, f"run_dir={run_dir}", f"train.seed={seed}",
                               f"mlflow.registered_model=quality-{run_dir.name[:-len(f'-seed{seed}')]}",
                               *overrides])
    donor = base / "runs" / run_name(*VARIANT_DONOR.get((table, name), DONOR), seed)
    reuse_stages(donor, run_dir, REUSE.get(table, ()))
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    scores = pd.read_csv(run_dir / "scoring" / "scores.csv", dtype={"section": str})
    row = M.paper_row(labelled_results(scores), method=name)
    return {"table": table, "variant": name, "seed": seed, "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d"), "mlflow_run_id": summary["parent_run_id"], **row}


def aggregate(rows: list[dict], table: str) -> tuple[str, list[str]]:
    df = pd.DataFrame([r for r in rows if r["table"] == table])
    cols = [c for c in df.columns if c not in ("table", "variant", "seed", "seconds", "date", "mlflow_run_id", "method")]
    order = [n for n, _ in TABLES[table] if n in set(df["variant"])]
    mean = df.groupby("variant")[cols].mean().loc[order]
    std = df.groupby("variant")[cols].std(ddof=1).loc[order].fillna(0.0)
    n_seeds = df.groupby("variant")["seed"].nunique().loc[order]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v in order:
        cells = [f"{100 * mean.loc[v, c]:.2f} ± {100 * std.loc[v, c]:.2f}" for c in cols]
        lines.append(f"| {v} | {n_seeds.loc[v]} | " + " | ".join(cells) + " |")
    notes = []
    refs = REFERENCE[table] if isinstance(REFERENCE[table], dict) else {v: REFERENCE[table] for v in order}
    for v in order:
        ref = refs.get(v)
        if ref is not None and ref != v and ref in mean.index:
            diff = mean.loc[v, "Overall"] - mean.loc[ref, "Overall"]
            if min(n_seeds.loc[v], n_seeds.loc[ref]) < 2:
                notes.append(f"{v} vs {ref}: Overall {100 * diff:+.2f} points (one seed: no spread to compare)")
                continue
            spread = std.loc[v, "Overall"] + std.loc[ref, "Overall"]
            verdict = "larger than" if abs(diff) > spread else "within"
            # same seed = same data order (and, in Tables 3 and "embedding", the same shared model):
            # the per-seed difference removes the seed's own noise
            by_seed = df.pivot_table(index="seed", columns="variant", values="Overall")[[v, ref]].dropna()
            paired = 100 * (by_seed[v] - by_seed[ref])
            agree = "same sign in every seed" if (paired > 0).all() or (paired < 0).all() else "signs differ"
            notes.append(f"{v} vs {ref}: Overall {100 * diff:+.2f} points, {verdict} the spread "
                         f"(sum of the two std {100 * spread:.2f}); per seed {', '.join(f'{x:+.2f}' for x in paired)}"
                         f" ({agree})")
    return "\n".join(lines), notes


def bar_chart(rows: list[dict], table: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame([r for r in rows if r["table"] == table])
    machines = [c for c in df.columns if c not in ("table", "variant", "seed", "seconds", "date", "mlflow_run_id",
                                                   "method", "Source AUC", "Target AUC", "pAUC")]
    order = [n for n, _ in TABLES[table] if n in set(df["variant"])]
    mean = df.groupby("variant")[machines].mean().loc[order]
    std = df.groupby("variant")[machines].std(ddof=1).loc[order].fillna(0.0)
    x = np.arange(len(machines))
    width = 0.8 / max(1, len(order))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(machines)), 4))
    for i, v in enumerate(order):
        ax.bar(x + i * width, 100 * mean.loc[v], width, yerr=100 * std.loc[v], label=v, capsize=2)
    ax.set_xticks(x + width * (len(order) - 1) / 2, machines, rotation=20)
    ax.set_ylabel("harmonic mean (%)")
    ax.set_ylim(40, 100)
    ax.axhline(50, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(f"{table}: per machine type (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo-prototype")  # the paper's network
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tables", nargs="+", default=list(TABLES), choices=list(TABLES))
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override applied to every variant (e.g. data.root=...)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the tables from the runs recorded so far, run nothing")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "work"
    cfg = load_config(args.config, args.overrides)
    data_root = Path(cfg.data.root).resolve()
    common = [*args.overrides, f"data.root={data_root}", f"extract.store={base / 'features'}",
              f"mlflow.tracking_uri=sqlite:///{base / 'mlflow.db'}", "mlflow.experiment=asd-quality"]
    results_file = out / "quality.json"
    rows = json.loads(results_file.read_text())["runs"] if results_file.is_file() else []
    done = {(r["table"], r["variant"], r["seed"]) for r in rows}
    order = ("table1", "embedding", "table3", "table3_scratch", "finetune_lr", "table2", "prototypes")  # table1 first: the others reuse its models
    for table in sorted(args.tables, key=order.index) if not args.report_only else ():
        for seed in args.seeds:
            for name, overrides in TABLES[table]:
                if (table, name, seed) in done:
                    continue  # resumable: finished variants are kept
                print(f"== {table} / {name} / seed {seed}", flush=True)
                rows.append(run_variant(args.config, base, table, name, overrides, seed, common))
                results_file.write_text(json.dumps({
                    "config": args.config, "overrides": args.overrides, "machine": platform.node(),
                    "date": time.strftime("%Y-%m-%d"), "runs": rows}, indent=2, default=str))
    report = [f"# Quality benchmark: config `{args.config}`, seeds {args.seeds}\n"]
    for table in [t for t in args.tables if any(r["table"] == t for r in rows)]:
        text, notes = aggregate(rows, table)
        bar_chart(rows, table, out / f"{table}.png")
        dates = sorted({r.get("date", "unrecorded") for r in rows if r["table"] == table})
        report += [f"## {table}\n", f"Measured {', '.join(dates)}.\n", text, ""] + [f"- {n}" for n in notes]
        report += [f"\n![{table}]({table}.png)\n"]
    (out / "quality.md").write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
