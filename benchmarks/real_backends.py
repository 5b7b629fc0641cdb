"""Scoring backends on real recordings: the same embeddings, scored by Mahalanobis or by kNN.

Reads the runs that ``benchmarks/real.py`` left in ``<out>/work/runs`` (trained networks and the
feature stores) and scores every network's clip embeddings with the nearest-training-clip
backend of the spectral kNN (cosine distance divided by no scale, the domain's scale or the
training clip's local scale: ``asd.knn.scaled_nearest``), beside the pipeline's own Mahalanobis
score from the run's ``scores.csv``; then the sum of the network's and the spectral kNN's
scaled scores (an ensemble of the embedding and the spectrum). No training.

    .venv/bin/python benchmarks/real_backends.py --out benchmarks/results/real

Writes ``<out>/backends.md`` and ``<out>/backends.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asd import metrics as M
from asd.knn import batch_clip_statistics, cosine_distances, domain_scales, local_radii, scaled_nearest
from pipelines.config import load_config
from pipelines.detectors.prototype import DETECTOR, embed_table
from pipelines.stages.score import labelled_results
from pipelines.store import load_split
from real import METHODS, REPO  # benchmarks/ is on sys.path when run as a script
from robustness import slug

NETWORKS = {"fine-tune from scratch": "finetune", "pre-train + fine-tune": "finetune",
            "untrained network": "pretrain"}
NORMALISATIONS = ("none", "domain", "local")


def knn_scores(train: torch.Tensor, train_domains: list[str], test: torch.Tensor, normalisation: str) -> np.ndarray:
    """Nearest-training-clip scores of ``test`` (asd.knn, power 1), in units of the source domain's
    spread (so that two detectors' scores can be added)."""
    among = cosine_distances(train, train)
    by_domain = domain_scales(among, train_domains)
    scales = {"none": torch.ones(len(train_domains), dtype=torch.float64),
              "domain": torch.tensor([by_domain[d] for d in train_domains], dtype=torch.float64),
              "local": local_radii(among)}[normalisation]
    scores, _ = scaled_nearest(cosine_distances(test, train), scales, 1.0)
    return scores.numpy() / (by_domain["source"] if normalisation == "none" else 1.0)


def paper_row(meta: pd.DataFrame, scores: np.ndarray) -> dict:
    scored = meta.assign(score=scores)
    row = M.paper_row(labelled_results(scored))
    return {k: row[k] for k in ("Overall", "Source AUC", "Target AUC", "pAUC")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "real")
    ap.add_argument("--config", default="demo")
    args = ap.parse_args()
    work = args.out.resolve() / "work"
    spectral_cfg = load_config(args.config, METHODS["spectral kNN"])
    strain = load_split(work / "features-spectrum", "train", feature_version=spectral_cfg.features.version)
    stest = load_split(work / "features-spectrum", "test", feature_version=spectral_cfg.features.version)
    spectral = {p: knn_scores(batch_clip_statistics(strain.features, "spectrum_shape"), list(strain.meta["domain"]),
                              batch_clip_statistics(stest.features, "spectrum_shape"), p) for p in NORMALISATIONS}
    rows = []
    for method, stage in NETWORKS.items():
        for run_dir in sorted((work / "runs").glob(f"{slug(method)}-seed*")):
            seed = int(run_dir.name.rsplit("seed", 1)[1])
            scores_csv = run_dir / "scoring" / "scores.csv"
            if not scores_csv.is_file():
                continue
            cfg = load_config(args.config, [*METHODS[method], f"run_dir={run_dir}"])
            store = work / "features-inverted"
            train = load_split(store, "train", feature_version=cfg.features.version)
            test = load_split(store, "test", feature_version=cfg.features.version)
            model, _ = DETECTOR.load(run_dir / "models" / stage)
            e_train, e_test = embed_table(model, train, cfg, use_ray=False), embed_table(model, test, cfg, use_ray=False)
            pipeline = pd.read_csv(scores_csv, dtype={"section": str}).set_index("path").loc[test.meta["path"]]
            rows.append({"method": method, "seed": seed, "backend": "Mahalanobis (the pipeline's)",
                         **paper_row(test.meta, pipeline["score"].to_numpy())})
            if list(stest.meta["path"]) != list(test.meta["path"]):
                raise ValueError("the spectrum and inverted log-Mel stores list the test clips differently")
            for p in NORMALISATIONS:
                net = knn_scores(e_train, list(train.meta["domain"]), e_test, p)
                rows.append({"method": method, "seed": seed, "backend": f"kNN, {p} scale",
                             **paper_row(test.meta, net)})
                both = net + spectral[p]  # each in units of its own source-domain spread
                rows.append({"method": method, "seed": seed, "backend": f"kNN + spectral kNN, {p} scale",
                             **paper_row(test.meta, both)})
    df = pd.DataFrame(rows)
    lines = ["| network | backend | runs | Overall | Source AUC | Target AUC | pAUC |", "|---|---|---|---|---|---|---|"]
    for (method, backend), g in df.groupby(["method", "backend"], sort=False):
        cells = [f"{100 * g[c].mean():.2f} ± {100 * (g[c].std(ddof=1) if len(g) > 1 else 0):.2f}"
                 for c in ("Overall", "Source AUC", "Target AUC", "pAUC")]
        lines.append(f"| {method} | {backend} | {len(g)} | " + " | ".join(cells) + " |")
    for p in NORMALISATIONS:
        r = paper_row(stest.meta, spectral[p])
        lines.append(f"| (none) | spectral kNN, {p} scale | 1 | " + " | ".join(
            f"{100 * r[c]:.2f}" for c in ("Overall", "Source AUC", "Target AUC", "pAUC")) + " |")
    text = "# Scoring backends on the real ToyCar folder\n\n" + "\n".join(lines) + "\n"
    (args.out / "backends.md").write_text(text)
    (args.out / "backends.json").write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
