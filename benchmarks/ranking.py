"""Is a ranking of detectors a property of the data, or the luck of its test clips? A paired,
stratified bootstrap of the official score of each detector, on the real folder and on draws of a
synthetic preset, and for every pair of detectors how often the real folder's order holds.

The real folder holds 100 test clips (25 per domain and label) in one section: its official score
moves by several points with the clips drawn, and so may the order of two detectors a few points
apart. Issue 22 asks the ``demo`` preset to rank the detectors as the real folder does; this script
says which of the real folder's pairs its own test clips settle, and whether each synthetic draw
orders those pairs the same way.

Detectors (in-process, training seed ``--seed``): the standardised spectral kNN (the default), the
cosine spectral kNN, the kNN floor, the AE recipe and the untrained network (the functions of
benchmarks/realism.py), and the paper's network: the pipeline's fine-tuning from scratch (config
``demo-prototype``, its trainer and scoring job, benchmarks/network_variants.py), one network per
machine type as on the real folder, which holds one; its features come from the pipeline's Ray Data
extraction into a feature store under ``--work``.

Each resample draws, in every section, the test clips of each (domain, label) group with
replacement, as many as the group holds; the same clips for every detector (paired), so a
difference between two detectors is measured on the same resampled test set. Official score = the
harmonic mean of every section's AUC(source), AUC(target) and pAUC as ``asd.metrics`` computes them,
for all resamples at once (:func:`resampled_metrics`; tests/test_ranking.py checks it against
``asd.metrics`` resample by resample): seconds for 1,000 resamples of 21 sections, where a loop over
``asd.metrics.section_metrics`` took 20 minutes.

A domain's AUC sets that domain's normals against the anomalies of both domains; the report also
splits it, on the sections of the real folder's machine types, into the AUC of each pair of test
groups (``realism.GROUPS``: source normals against source anomalies, target normals against source
anomalies, ...), which says which of those orders makes a detector fail on a domain.

    .venv/bin/python benchmarks/ranking.py --work /tmp/realism-seeds --data-seeds 0 1 2

``--tree NAME=PATH`` ranks another tree as well (its scores cached by NAME, not checked against a
generator version): e.g. the synthetic toy car's section 00 at the real folder's size from
benchmarks/toycar_shift.py, with ``--data-seeds`` (none) and ``--out`` elsewhere.

Writes per-clip scores to ``<out>/scores/<dataset>.json`` and the network's to
``<out>/scores/<dataset>-network.json`` (kept: a later call with more draws or more resamples reuses
them; ``--redo`` scores again) and the report to ``<out>/ranking.{json,md}``.
The real folder is skipped with a message when absent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from asd import metrics as M
from common import commit_id, publish, write_rows  # benchmarks/ is on sys.path
from network_variants import extracted, fine_tuner, of_machine, store_overrides
from pipelines.config import load_config
from pretrain_curve import scored_clips
from realism import (GROUPS, ae_scores, data_record, group_aucs, knn_floor, labelled_by_machine, load_clips, parts,
                     real_tree, sections, spectral_knn, synthetic_trees, untrained_network)

REPO = Path(__file__).resolve().parent.parent
REAL_NAME = "real ToyCar"
NETWORK = "network, one per machine type"
NETWORK_CONFIG = "demo-prototype"
# the real folder's order (benchmarks/results/ranking/ranking.json, seed 0): the order every
# dataset's pairs are read in
DETECTORS = ["spectral kNN, standardised", "spectral kNN", "kNN floor", "AE recipe", NETWORK, "untrained network"]


# ----------------------------------------------------------------------------- per-clip scores


def section_scores(root: Path, ae_epochs: int, seed: int) -> list[dict]:
    """Per (machine type, section): the test clips' labels, domains and every detector's scores (the
    AE's only when ``ae_epochs`` > 0)."""
    out = []
    for metas in labelled_by_machine(root).values():
        clips = load_clips(root, metas)
        ae = ae_scores(clips, ae_epochs, seed) if ae_epochs > 0 else None
        for (machine, section), group in sections(clips).items():
            train, test = parts(group)
            scores = {"spectral kNN, standardised": spectral_knn(train, test, "standardised_euclidean"),
                      "spectral kNN": spectral_knn(train, test), "kNN floor": knn_floor(train, test),
                      "untrained network": untrained_network(train, test, seed)}
            if ae is not None:
                scores["AE recipe"] = [ae[c["meta"].path] for c in test]
            out.append({"machine": machine, "section": section,
                        "anomaly": [int(c["meta"].label == "anomaly") for c in test],
                        "target": [int(c["meta"].domain == "target") for c in test],
                        "scores": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in scores.items()}})
    return out


def clip_key(path: str) -> str:
    """``<machine>/<split>/<file>``: one clip's name in a tree and in the feature store alike."""
    return "/".join(Path(path).parts[-3:])


def test_keys(root: Path) -> list[list[str]]:
    """Each section's test clips in the order of :func:`section_scores` (no audio read)."""
    return [[clip_key(c["meta"].path) for c in parts(group)[1]]
            for metas in labelled_by_machine(root).values()
            for group in sections([{"meta": m} for m in metas]).values()]


def network_scores(root: Path, store: Path, seed: int) -> dict[str, float]:
    """Per-clip scores of the pipeline's network (config ``demo-prototype``: fine-tuning from
    scratch, scored by the scoring job's window embeddings and backend), one network per machine
    type trained with seed ``seed``; keyed by :func:`clip_key`. The feature store is brought up to
    date with the tree first (a tree generated again replaces its clips' features)."""
    cfg = load_config(NETWORK_CONFIG, store_overrides(root, store, seed))
    train, test = extracted(cfg, refresh=True)
    out = {}
    for machine in sorted(set(train.meta["machine"])):
        print(f"ranking: network, {machine}", flush=True)
        train_m, test_m = of_machine(train, machine), of_machine(test, machine)
        trainer = fine_tuner(cfg, train_m)
        for epoch in range(cfg.finetune.epochs):
            trainer.epoch(epoch)
        scored = scored_clips(trainer.core, cfg, train_m, test_m)
        out.update(zip(map(clip_key, scored["path"]), scored["score"].astype(float)))
    return out


def with_network(scored: list[dict], keys: list[list[str]], network: dict[str, float]) -> list[dict]:
    """``scored`` with the network's scores added to each section, in its test clips' order."""
    if [len(k) for k in keys] != [len(s["anomaly"]) for s in scored]:
        raise SystemExit("ranking: the saved scores do not hold this tree's test clips; run with --redo")
    out = []
    for s, section_keys in zip(scored, keys):
        if [int("_anomaly_" in k) for k in section_keys] != list(s["anomaly"]):
            raise SystemExit(f"ranking: {s['machine']} {s['section']}: saved labels differ from the tree's")
        missing = [k for k in section_keys if k not in network]
        if missing:
            raise SystemExit(f"ranking: the network scored no {missing[0]} ({len(missing)} clips missing)")
        out.append({**s, "scores": {**s["scores"], NETWORK: [network[k] for k in section_keys]}})
    return out


# ----------------------------------------------------------------------------- the bootstrap


def stratified_resample(anomaly: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one resample: each (domain, label) group drawn with replacement to its own size."""
    groups = [np.flatnonzero((anomaly == a) & (target == t)) for t in (0, 1) for a in (0, 1)]
    return np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups if g.size])


def official(sections_: list[dict], detector: str, picks: list[np.ndarray] | None = None) -> float:
    """Official score in % of ``detector`` on the test clips ``picks`` of each section (all when None)."""
    results = []
    for s, idx in zip(sections_, picks or [None] * len(sections_)):
        y, d, x = (np.asarray(s["anomaly"]), np.asarray(s["target"]), np.asarray(s["scores"][detector]))
        if idx is not None:
            y, d, x = y[idx], d[idx], x[idx]
        results.append(M.section_metrics(y, d, x, machine=s["machine"], section=s["section"]))
    return 100 * M.official_score(results)


def resampled_metrics(anomaly: np.ndarray, target: np.ndarray, rows: np.ndarray, max_fpr: float = M.MAX_FPR) -> np.ndarray:
    """``[B, 3]``: AUC(source), AUC(target) and pAUC of each row of scores ``rows`` ``[B, n]`` (one
    resample each, its clips' labels ``anomaly`` and ``target``), as ``asd.metrics.section_metrics``
    computes them (NaN where it skips one), for all rows at once.

    AUC: the share of (normal, anomaly) pairs the anomaly scores above, ties half (Mann-Whitney).
    pAUC: without a normal tied to an anomaly the ROC is a staircase, and its area up to ``max_fpr``
    is the sum over the normals, highest first, of the true positive rate above each times the
    normal's share of the false positive range ``[j / N, (j + 1) / N]`` below ``max_fpr``; then
    McClish's standardisation. A row with such a tie is handed to ``asd.metrics.partial_auc``."""
    out = np.full((rows.shape[0], 3), np.nan)
    pos, neg = rows[:, anomaly == 1], rows[:, anomaly == 0]
    if not pos.shape[1] or not neg.shape[1]:
        return out
    # per row and normal: how many anomalies score above it, and how many equal it
    above = (pos[:, None, :] > neg[:, :, None]).sum(-1)
    equal = (pos[:, None, :] == neg[:, :, None]).sum(-1)
    wins = (above + 0.5 * equal) / pos.shape[1]
    for col, domain in ((0, 0), (1, 1)):
        of_domain = target[anomaly == 0] == domain
        if of_domain.any():
            out[:, col] = wins[:, of_domain].mean(-1)
    n = neg.shape[1]
    start = np.arange(n) / n
    width = np.clip(np.minimum(start + 1 / n, max_fpr) - start, 0, None)
    tpr = np.take_along_axis(above, np.argsort(-neg, axis=1, kind="stable"), axis=1) / pos.shape[1]
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    out[:, 2] = 0.5 * (1 + (tpr @ width - min_area) / (max_area - min_area))
    labels = np.r_[np.ones(pos.shape[1]), np.zeros(n)]
    for b in np.flatnonzero(equal.any(-1)):
        out[b, 2] = M.partial_auc(labels, np.r_[pos[b], neg[b]], max_fpr)
    return out


def bootstrap(sections_: list[dict], detectors: list[str], resamples: int, seed: int) -> np.ndarray:
    """``[resamples, len(detectors)]`` official scores, every detector on the same resampled clips.

    The resamples are drawn one by one (:func:`stratified_resample`, section after section), and each
    detector's metrics computed for all of them at once (:func:`resampled_metrics`); the official
    score is ``asd.metrics.hmean_eps`` of every section's defined metrics."""
    rng = np.random.default_rng(seed)
    arrays = [{"anomaly": np.asarray(s["anomaly"]), "target": np.asarray(s["target"]),
               "scores": {k: np.asarray(s["scores"][k], dtype=np.float64) for k in detectors}} for s in sections_]
    picks = [[stratified_resample(s["anomaly"], s["target"], rng) for s in arrays] for _ in range(resamples)]
    # per section [resamples, n]: the groups come in one order, so each column has one label
    idx = [np.stack([p[j] for p in picks]) for j in range(len(arrays))]
    out = np.empty((resamples, len(detectors)))
    for i, k in enumerate(detectors):
        v = np.concatenate([resampled_metrics(s["anomaly"][ix[0]], s["target"][ix[0]], s["scores"][k][ix])
                            for s, ix in zip(arrays, idx)], axis=1)
        out[:, i] = [100 * M.hmean_eps(row[~np.isnan(row)]) for row in v]
    return out


def pair_rows(point: dict[str, float], boot: np.ndarray, detectors: list[str]) -> dict[str, dict]:
    """For each pair ``A > B`` in the order of ``detectors``: the difference, its 95 % interval, and
    the share of resamples in which A scores above B."""
    rows = {}
    for i, j in itertools.combinations(range(len(detectors)), 2):
        diff = boot[:, i] - boot[:, j]
        rows[f"{detectors[i]} > {detectors[j]}"] = {
            "difference": point[detectors[i]] - point[detectors[j]],
            "interval": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
            "share": float(np.mean(diff > 0))}
    return rows


# ----------------------------------------------------------------------------- where a domain's AUC comes from

# ----------------------------------------------------------------------------- report


def report(rows: dict[str, dict], settled: float) -> str:
    names = list(rows)
    lines = ["Official score in %, 95 % interval over resamples of the test clips:", "",
             "| detector | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in DETECTORS:
        cells = [f"{r['score'][k]:.1f} ({r['score interval'][k][0]:.1f} .. {r['score interval'][k][1]:.1f})"
                 for r in rows.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Each pair in the real folder's order: the difference of the official scores, and in brackets "
              "the share of resamples in which the first scores above the second:", "",
              "| pair | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for pair in next(iter(rows.values()))["pairs"]:
        cells = [f"{r['pairs'][pair]['difference']:+.1f} ({100 * r['pairs'][pair]['share']:.0f} %)" for r in rows.values()]
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    lines += ["", "Where each domain's AUC comes from, on the sections of the real folder's machine types (every "
              "section without it): AUC in % of each pair of test groups, the second above the first:", "",
              "| dataset | detector | " + " | ".join(name for name, _, _ in GROUPS) + " |", "|---" * (len(GROUPS) + 2) + "|"]
    for dataset, r in rows.items():
        for k in DETECTORS:
            lines.append(f"| {dataset} | {k} | " + " | ".join(f"{r['groups'][k][g]:.1f}" for g, _, _ in GROUPS) + " |")
    if REAL_NAME in rows:
        real = rows[REAL_NAME]["pairs"]
        firm = [p for p, r in real.items() if r["share"] >= settled or r["share"] <= 1 - settled]
        lines += ["", f"Pairs the real folder's test clips settle (one order in at least {100 * settled:.0f} % "
                      f"of resamples): {len(firm)} of {len(real)}."]
        for name, r in rows.items():
            if name == REAL_NAME:
                continue
            same = [p for p in firm if (r["pairs"][p]["difference"] > 0) == (real[p]["difference"] > 0)]
            whole = sum((r["pairs"][p]["difference"] > 0) == (real[p]["difference"] > 0) for p in real)
            lines.append(f"- {name}: {len(same)} of the {len(firm)} settled pairs in the real folder's order "
                         f"({whole} of all {len(real)} pairs)")
    return "\n".join(lines) + "\n"


def cached(path: Path, settings: dict, redo: bool, key: str, compute, *args):
    """``compute(*args)``, saved under ``key`` in ``path`` with its settings; read back when saved with
    the same settings (and not ``redo``)."""
    if path.is_file() and not redo:
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved[key]
        print(f"ranking: {path.name} was scored with other settings or data; scoring again")
    t0 = time.perf_counter()
    value = compute(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "commit": commit_id(), "date": time.strftime("%Y-%m-%d"),
                                "seconds": round(time.perf_counter() - t0, 1), key: value}))
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ranking")
    p.add_argument("--work", type=Path, default=Path("/tmp/realism-seeds"), help="where trees are generated")
    p.add_argument("--preset", default="demo", help="synthetic preset or robustness regime")
    p.add_argument("--data-seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--no-real", action="store_true", help="skip the real folder")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="one more DCASE-layout tree to rank, reported as NAME (e.g. one of toycar_shift.py's); repeatable")
    p.add_argument("--ae-epochs", type=int, default=100, help="the recipe's 100")
    p.add_argument("--seed", type=int, default=0, help="training seed of the AE and the networks")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--settled", type=float, default=0.95,
                   help="a pair is settled by a dataset's test clips when one order holds in this share of resamples")
    p.add_argument("--redo", action="store_true", help="score the datasets again, even when their scores are saved")
    a = p.parse_args(argv)
    extra = {}  # checked before any tree is unpacked or generated
    for named in a.tree:
        name, sep, path = named.partition("=")
        if not sep or not Path(path, "dev_data").is_dir():
            p.error(f"--tree {named!r}: expected NAME=PATH of a tree holding dev_data/")
        extra[name] = (Path(path), None)
    torch.set_num_threads(2)
    trees: dict[str, tuple[Path, dict | None]] = {}
    if not a.no_real and (root := real_tree(a.work)) is not None:
        trees[REAL_NAME] = (root, None)
    for s in a.data_seeds:
        for name, root in synthetic_trees(a.work, [a.preset], 0, s).items():
            trees[f"{name}, data seed {s}"] = (root, data_record(name))
    trees.update(extra)
    rows, compared = {}, None  # the real folder's machine types, once it is scored (it comes first)
    for name, (root, data) in trees.items():
        print(f"ranking: {name} ...", flush=True)
        stem = name.replace(" ", "_").replace(",", "")
        scored = cached(a.out / "scores" / f"{stem}.json", {"ae_epochs": a.ae_epochs, "seed": a.seed, "data": data},
                        a.redo, "sections", section_scores, root, a.ae_epochs, a.seed)
        network = cached(a.out / "scores" / f"{stem}-network.json",
                         {"config": NETWORK_CONFIG, "seed": a.seed, "data": data}, a.redo, "scores",
                         network_scores, root, a.work / "features" / stem, a.seed)
        scored = with_network(scored, test_keys(root), network)
        if name == REAL_NAME:
            compared = {s["machine"] for s in scored}
        point = {k: official(scored, k) for k in DETECTORS}
        boot = bootstrap(scored, DETECTORS, a.resamples, a.seed)
        rows[name] = {"score": point,
                      "score interval": {k: [float(np.percentile(boot[:, i], 2.5)), float(np.percentile(boot[:, i], 97.5))]
                                         for i, k in enumerate(DETECTORS)},
                      "pairs": pair_rows(point, boot, DETECTORS), "resamples": a.resamples,
                      "groups": {k: group_aucs(scored, k, compared) for k in DETECTORS},
                      "test clips": sum(len(s["anomaly"]) for s in scored), "sections": len(scored),
                      "commit": commit_id(), "date": time.strftime("%Y-%m-%d")}
    a.out.mkdir(parents=True, exist_ok=True)
    write_rows(a.out / "ranking.json", rows)
    publish(a.out / "ranking.md", report(rows, a.settled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
