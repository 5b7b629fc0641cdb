"""Target domain: how the scoring backend forms prototypes and covariance, on trained models.

Re-scores the models the robustness suite trained (``benchmarks/robustness.py``; every run dir
under ``<suite>/work/<regime>/runs`` that holds a prototype model) with variants of the scoring
job, embedding each clip once per test-time embedding:

* ``paper``: attribute-class prototypes of both domains, one pooled section covariance (default);
* ``within``: the covariance about each class mean instead of the section mean;
* ``target clips``: source classes keep their prototypes, every target training clip is its own
  prototype (with ~10 target clips a class mean of 5 is noisy);
* ``all clips``: every training clip is its own prototype (nearest-neighbour Mahalanobis);
* ``whole``: the paper's backend on whole-clip embeddings instead of 64-frame window means.

AUCs and pAUC only: with clips as prototypes the gamma threshold fitted to the training clips' own
scores (0 against themselves) means nothing. ``--seeds`` limits the runs (each costs two
embedding passes over the store).

Writes ``<out>/scoring_variants.json`` and ``.md`` (mean ± std over seeds per regime).

    .venv/bin/python benchmarks/scoring_variants.py --suite benchmarks/results/robustness
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch

from asd import metrics as M
from asd.backend import calibrate_threshold, fit_section
from asd.contracts import section_key
from pipelines.checkpoints import load_model
from pipelines.config import PipelineConfig, from_dict
from pipelines.detectors.prototype import embed_table, score_clips
from pipelines.stages.score import labelled_results
from pipelines.store import load_split

COLUMNS = ["Overall", "Source AUC", "Target AUC", "pAUC"]


def fit(train_meta, emb, cfg, covariance: str, clips: str | None) -> dict:
    """Per-section backends; ``clips``: which domain's training clips become prototypes of their
    own ("target", "all"; None: attribute-class prototypes only)."""
    sections = {}
    for (machine, section), rows in train_meta.groupby(["machine", "section"], sort=True):
        keys = rows["attribute_class"].astype(str).tolist()
        if clips:
            keys = [f"{k}#{i}" if clips == "all" or d == "target" else k
                    for i, (k, d) in enumerate(zip(keys, rows["domain"]))]
        names = sorted(set(keys))
        idx = torch.tensor(rows.index.to_numpy())
        cls = torch.tensor([names.index(k) for k in keys])
        if clips and covariance == "within":
            raise ValueError("target clips as prototypes have no within-class spread")
        model = fit_section(emb[idx], cls, class_keys=names, shrinkage=cfg.score.shrinkage, covariance=covariance)
        sections[section_key(machine, section)] = calibrate_threshold(model, emb[idx], cfg.score.threshold_quantile)
    return sections


REMOVED_KEYS = {"train": ("class_scope",), "retrain": ("lock_timeout_s",)}  # dead keys removed 2026-12-03


def without_removed_keys(config: dict) -> dict:
    """A config saved with an older model, without the keys the config no longer has."""
    return {section: ({k: v for k, v in values.items() if k not in REMOVED_KEYS.get(section, ())}
                      if isinstance(values, dict) else values) for section, values in config.items()}


def evaluate(run_dir: Path) -> dict[str, dict]:
    model_dir = run_dir / "models" / ("finetune" if (run_dir / "models" / "finetune" / "model.pt").is_file() else "pretrain")
    model, meta = load_model(model_dir)
    cfg = from_dict(PipelineConfig, without_removed_keys(meta["train_config"]))
    store = Path(cfg.extract.store)
    train = load_split(store, "train", feature_version=cfg.features.version)
    test = load_split(store, "test", feature_version=cfg.features.version)
    out = {}
    for embedding in ("windows", "whole"):
        c = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, embedding=embedding))
        tr, te = embed_table(model, train, c, use_ray=False), embed_table(model, test, c, use_ray=False)
        variants = ({"paper": (cfg.score.covariance, None), "within": ("within", None), "target clips": ("pooled", "target"),
                     "all clips": ("pooled", "all")} if embedding == "windows" else {"whole": ("pooled", None)})
        for name, (cov, clips) in variants.items():
            scored = score_clips(test.meta, te, fit(train.meta, tr, c, cov, clips))
            row = M.paper_row(labelled_results(scored), method=name)
            out[name] = {k: float(row[k]) for k in COLUMNS}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="benchmarks/results/robustness")
    ap.add_argument("--methods", nargs="+",
                    default=["pre-train-fine-tune", "fine-tune-from-scratch", "untrained-network"],
                    help="run-dir prefixes (slugs of the suite's method names)")
    ap.add_argument("--seeds", type=int, nargs="+", help="default: every seed the suite ran")
    ap.add_argument("--out", help="default: the suite folder")
    args = ap.parse_args()
    torch.set_num_threads(2)
    suite = Path(args.suite)
    out = Path(args.out or suite)
    rows = []
    for run_dir in sorted((suite / "work").glob("*/runs/*-seed*")):
        method, seed = run_dir.name.rsplit("-seed", 1)
        if (method not in args.methods or not (run_dir / "scoring" / "scores.csv").is_file()
                or (args.seeds and int(seed) not in args.seeds)):
            continue
        for variant, res in evaluate(run_dir).items():
            rows.append({"regime": run_dir.parent.parent.name, "method": method, "seed": int(seed),
                         "variant": variant, **res})
            print(rows[-1], flush=True)
    (out / "scoring_variants.json").write_text(json.dumps(rows, indent=2))
    df = pd.DataFrame(rows)
    lines = ["| regime | method | variant | seeds | " + " | ".join(COLUMNS) + " |", "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for (regime, method, variant), g in df.groupby(["regime", "method", "variant"], sort=False):
        cells = [f"{100 * g[c].mean():.2f} ± {100 * g[c].std(ddof=1) if len(g) > 1 else 0:.2f}" for c in COLUMNS]
        lines.append(f"| {regime} | {method} | {variant} | {len(g)} | " + " | ".join(cells) + " |")
    (out / "scoring_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
