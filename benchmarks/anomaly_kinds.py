"""How easy is each kind of synthetic anomaly? The kNN floor, the AE recipe and the untrained network,
per anomaly kind, for one machine type of a synthetic preset or robustness regime, at several anomaly
gains, over both domains' test clips or within one.

The generator knows which anomaly each test clip holds (the files do not say), so this script renders
the clips in memory (``plan_dataset`` + ``render_job``: the same clips a tree of those settings holds)
and scores them with ``benchmarks/realism.py``'s detectors: the kNN floor (log-Mel mean + std, cosine
distance to the nearest training clip), the official AE (``--epochs``; 30 here, the recipe's 100 in
realism.py) and the untrained network (the pipeline's embedding network at its initial weights with
the pipeline's Mahalanobis scoring). AUC in % of the normal test clips against the anomalies of one
kind, and against all of them, mean over the sections; ``--domains source target`` keeps each
domain's test clips alone (on the real toy car the untrained network is at chance within each domain
where the floor is not: which synthetic kinds it sees that log-Mel statistics do not). It calibrates
``Difficulty.machine_anomaly_gain``: the synthetic fan's gain was picked with it
(docs/synthetic-data.md, "Calibration").

    .venv/bin/python benchmarks/anomaly_kinds.py --machine fan --dataset imbalanced --gains 1 0.5 0.3 0.2

Every gain replaces the machine type's entry of the dataset's own ``machine_anomaly_gain`` (1 = the
sound models' plain strength; default: the dataset's own gain for the type). ``--source-train`` /
``--test-per-group`` override the dataset's counts (default 100 / 30: enough test anomalies per kind
to read an AUC); ``--kinds`` draws other kinds than the dataset's (``Difficulty.anomaly_kinds``; since
2026-12-07 every type draws the generic ``resonance`` by default, so a type's own kinds are named
here, e.g. ``--kinds imbalance blade-rub stall bearing`` for the fan). Writes
``<out>/anomaly_kinds.{json,md}``; rows of other (dataset, machine, gain, data seed) keys are kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import realism  # noqa: E402  (benchmarks/ is on sys.path)
from common import commit_id, publish, read_rows, write_rows  # noqa: E402
from pipelines.synth.generate import attribute_string, plan_dataset, preset_settings, render_job  # noqa: E402

DETECTORS = ("kNN floor", "AE recipe", "untrained network")
DOMAINS = ("both", "source", "target")


def dataset(name: str, machine: str, gain: float, source_train: int, test_per_group: int, kinds=None):
    """The preset or regime ``name`` cut to ``machine``, with that type's anomaly gain set to ``gain``
    (and its anomalies drawn from ``kinds`` when given: ``Difficulty.anomaly_kinds``)."""
    preset, seed = realism.with_gain(name, [machine], gain, "anomaly_kinds")
    if kinds:
        preset = replace(preset, difficulty=replace(preset.difficulty, anomaly_kinds=((machine, tuple(kinds)),)))
    return replace(preset, source_train=source_train, test_per_group=test_per_group), seed


def render_sections(preset, seed: int) -> dict[str, list[dict]]:
    """Section -> its clips, rendered in memory, each with its split, domain, attribute class, label,
    anomaly kind, log-Mel and inverted log-Mel (the network's input)."""
    out: dict[str, list[dict]] = {}
    for job in plan_dataset(preset, Path("/nonexistent"), seed, eval_data=False).jobs:
        wave = torch.from_numpy(render_job(job).astype(np.float32) / 32767.0)
        split, domain, label = job.key[3], job.key[4], job.key[5]
        meta = SimpleNamespace(machine=job.machine, split=split, domain=domain, path=job.path,
                               attribute_class=(job.machine, job.section, domain, attribute_string(job.attrs)))
        out.setdefault(job.section, []).append(
            dict(meta=meta, label=label, kind=job.anomaly, logmel=realism.log_mel(wave, realism.LOGMEL),
                 inverted=realism.log_mel(wave, realism.INVERTED)))
    return out


def kind_aucs(test: list[dict], scores: np.ndarray) -> dict[str, float]:
    """AUC (%) of the normal clips against all anomalies ('all') and against each kind's."""
    y = np.array([c["label"] == "anomaly" for c in test])
    out = {"all": 100.0 * roc_auc_score(y, scores)}
    for kind in sorted({c["kind"] for c in test if c["kind"]}):
        keep = np.array([c["kind"] == kind or c["label"] == "normal" for c in test])
        out[kind] = 100.0 * roc_auc_score(y[keep], scores[keep])
    return out


def domain_aucs(test: list[dict], scores: np.ndarray, domains) -> dict[str, dict[str, float]]:
    """Domain -> :func:`kind_aucs` on that domain's test clips alone ('both': on all of them)."""
    out = {}
    for domain in domains:
        keep = np.array([domain in ("both", c["meta"].domain) for c in test])
        out[domain] = kind_aucs([c for c, k in zip(test, keep) if k], scores[keep])
    return out


def measure(preset, seed: int, epochs: int, domains=("both",), train_seed: int = 0) -> dict[str, dict]:
    """Domain -> detector -> 'all' or anomaly kind -> AUC (%), mean over the sections of data seed
    ``seed``, on the test clips of that domain ('both': all of them). Each detector scores a section's
    test clips once; the domains are read from the same scores."""
    per_section = {(domain, d): [] for domain in domains for d in DETECTORS}
    for clips in render_sections(preset, seed).values():
        train = [c for c in clips if c["meta"].split == "train"]
        test = [c for c in clips if c["meta"].split == "test"]
        ae = realism.ae_scores(train + test, epochs, train_seed)
        scores = {"kNN floor": realism.knn_floor(train, test),
                  "AE recipe": np.array([ae[c["meta"].path] for c in test]),
                  "untrained network": realism.untrained_network(train, test, train_seed)}
        for d in DETECTORS:
            for domain, aucs in domain_aucs(test, scores[d], domains).items():
                per_section[domain, d].append(aucs)
    # a kind absent from a section's test clips (few clips per group) is averaged over the others
    out: dict[str, dict] = {domain: {} for domain in domains}
    for (domain, d), rows in per_section.items():
        kinds = sorted({k for s in rows for k in s})
        out[domain][d] = {k: float(np.mean([s[k] for s in rows if k in s])) for k in kinds}
    return out


def current(key: str, row: dict) -> bool:
    """Whether a saved row was measured on the clips the code makes now for its settings; a row of
    another generator version is reported and left out."""
    try:
        now = preset_settings(dataset(row["dataset"], row["machine"], row["gain"], row["source_train"],
                                      row["test_per_group"], row.get("kinds"))[0])
    except (KeyError, SystemExit):  # an older row's layout, or a dataset that no longer exists
        now = None
    if row.get("data") == now:
        return True
    print(f"anomaly_kinds: {key} was measured on another version of the generator; left out")
    return False


def table(rows: dict[str, dict]) -> str:
    """One markdown table per machine type, with that type's anomaly kinds as columns; a detector a
    row was not measured with (rows from before the untrained network was added) has empty cells."""
    parts = []
    for machine in sorted({r["machine"] for r in rows.values()}):
        mine = [r for r in rows.values() if r["machine"] == machine]
        kinds = ["all", *sorted({k for r in mine for d in DETECTORS for k in r.get(d, {}) if k != "all"})]
        head = ["dataset", "gain", "data seed", "AE epochs", "source train / test per group", "test clips of"] + [
            f"{d}: {k}" for d in DETECTORS for k in kinds]
        lines = [f"### {machine}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = {d: i for i, d in enumerate(DOMAINS)}
        for r in sorted(mine, key=lambda r: (r["dataset"], r["epochs"], -r["gain"], -r["source_train"],
                                             r["data_seed"], order[r.get("domain", "both")])):
            drawn = f" ({', '.join(r['kinds'])} drawn)" if r.get("kinds") else ""
            cells = [r["dataset"] + drawn, f"{r['gain']:g}", str(r["data_seed"]), str(r["epochs"]),
                     f"{r['source_train']} / {r['test_per_group']}", r.get("domain", "both")]
            cells += [f"{r[d][k]:.1f}" if k in r.get(d, {}) else "" for d in DETECTORS for k in kinds]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--machine", required=True, help="machine type, e.g. fan")
    p.add_argument("--dataset", default="demo", help="a synthetic preset or robustness regime (default demo)")
    p.add_argument("--gains", type=float, nargs="+", default=None,
                   help="anomaly gains of the machine type (default: the dataset's own for it)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=None, help="default: the dataset's own")
    p.add_argument("--epochs", type=int, default=30, help="AE epochs (the recipe's 100 in realism.py)")
    p.add_argument("--source-train", type=int, default=100)
    p.add_argument("--test-per-group", type=int, default=30)
    p.add_argument("--kinds", nargs="+", default=None,
                   help="anomaly kinds to draw instead of the dataset's (the type's own or generic: tone-line, resonance)")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=["both"],
                   help="whose test clips: both domains' (default), or one domain's alone")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anomaly-kinds")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "anomaly_kinds.json"
    rows = {k: r for k, r in read_rows(path).items() if current(k, r)}
    stamp = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d")}
    own = dict(realism.synthetic_preset(a.dataset, 0)[0].difficulty.machine_anomaly_gain).get(a.machine, 1.0)
    for gain, seed in product(a.gains or [own], a.data_seeds or [None]):
        preset, own_seed = dataset(a.dataset, a.machine, gain, a.source_train, a.test_per_group, a.kinds)
        seed = own_seed if seed is None else seed
        t0 = time.time()
        found = measure(preset, seed, a.epochs, a.domains)
        for domain, aucs in found.items():
            key = (f"{a.dataset}/{a.machine}/gain {gain:g}/data seed {seed}/epochs {a.epochs}"
                   f"/clips {a.source_train} {a.test_per_group}" + ("" if domain == "both" else f"/{domain}")
                   + (f"/kinds {' '.join(a.kinds)}" if a.kinds else ""))
            rows[key] = {"dataset": a.dataset, "machine": a.machine, "gain": gain, "data_seed": seed,
                         "epochs": a.epochs, "source_train": a.source_train, "test_per_group": a.test_per_group,
                         "domain": domain, "kinds": a.kinds, **aucs, "data": preset_settings(preset),
                         "seconds": round(time.time() - t0, 1), **stamp}
            print(f"anomaly_kinds: {key}: " + ", ".join(f"{d} {aucs[d]['all']:.1f}" for d in DETECTORS), flush=True)
        write_rows(path, rows)
    publish(a.out / "anomaly_kinds.md", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
