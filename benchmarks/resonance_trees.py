"""Trees of the ``demo`` preset whose anomalies are one generic narrow resonance of another quality or
peak, and how the detectors that need no training rank on them (BENCHMARKS.md, "A changed resonance
as the anomaly").

Every machine type's anomalous clips get the generic ``resonance`` kind (a peak of ``--db`` dB at
quality ``--q`` at a random centre, ``Difficulty.resonance_q`` / ``resonance_db``); ``--keep-valve``
gives the valve its own kinds (calibrated on real valve clips) instead. Everything else is
``demo``'s: the same normal clips and domains as ``demo``'s draw of that seed. Since 2026-12-07 the
resonance at Q 16, 6 dB is the generator's default (``REAL_SOUND``), so that tree is ``demo`` itself;
before, each type drew its own kinds (this script emptied the per-type gains they had then).

    .venv/bin/python benchmarks/resonance_trees.py --data-seeds 1 --q 8 16 --db 6

writes each tree under ``--work`` (generated once; its ``synth.json`` records the settings) and, unless
``--no-score``, the official score of the standardised and the cosine spectral kNN, the kNN floor and
the untrained network (``ranking.section_scores`` without the AE; about a minute a tree) to
``<out>/resonance-trees.{json,md}`` (rows of other trees kept). The AE and the network, and the
bootstrap of settled pairs, come from ranking.py on the same tree::

    .venv/bin/python benchmarks/ranking.py --out /tmp/resonance-ranking --data-seeds \\
        --tree "resonance Q 16, 6 dB, draw 1=/tmp/resonance-trees/demo-seed-1-q16-db6"
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from itertools import product
from pathlib import Path

import torch

from common import commit_id, generate_recorded, publish, read_rows, write_rows  # benchmarks/ is on sys.path
from ranking import official, section_scores
from pipelines.synth.generate import PRESETS
from pipelines.synth.machines import MACHINE_TYPES

REPO = Path(__file__).resolve().parent.parent
FAST = ["spectral kNN, standardised", "spectral kNN", "kNN floor", "untrained network"]


def resonance_preset(q: float, db: float, keep_valve: bool):
    """``demo`` with every type's anomalies (the valve's too unless ``keep_valve``) the generic
    resonance of quality ``q`` and ``db`` dB."""
    demo = PRESETS["demo"]
    replaced = tuple(m for m in MACHINE_TYPES if not (keep_valve and m == "valve"))
    difficulty = replace(demo.difficulty, resonance_q=q, resonance_db=db,
                         anomaly_kinds=tuple((m, ("resonance",)) for m in replaced))
    return replace(demo, difficulty=difficulty)


def tree_name(seed: int, q: float, db: float, keep_valve: bool) -> str:
    return f"demo-seed-{seed}-q{q:g}-db{db:g}" + ("-valve-own" if keep_valve else "")


def fast_scores(root: Path, seed: int) -> dict:
    """Official score in % of each detector of :data:`FAST`, over the tree and per machine type."""
    scored = section_scores(root, ae_epochs=0, seed=seed)
    machines = sorted({s["machine"] for s in scored})
    return {"official": {k: official(scored, k) for k in FAST},
            "per machine": {m: {k: official([s for s in scored if s["machine"] == m], k) for k in FAST}
                            for m in machines}}


def report(rows: dict) -> str:
    lines = ["Official score in % (the detectors that need no training):", "",
             "| tree | " + " | ".join(FAST) + " |", "|---" * (len(FAST) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r['official'][k]:.1f}" for k in FAST) + " |" for name, r in rows.items()]
    lines += ["", "Per machine type, standardised spectral kNN / kNN floor / untrained network:", ""]
    machines = sorted({m for r in rows.values() for m in r["per machine"]})
    lines += ["| tree | " + " | ".join(machines) + " |", "|---" * (len(machines) + 1) + "|"]
    for name, r in rows.items():
        cells = ["/".join(f"{r['per machine'][m][k]:.0f}" for k in (FAST[0], FAST[2], FAST[3]))
                 if m in r["per machine"] else "" for m in machines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-seeds", type=int, nargs="+", default=[1])
    p.add_argument("--q", type=float, nargs="+", default=[16.0], help="the resonance's quality (default 16)")
    p.add_argument("--db", type=float, nargs="+", default=[6.0], help="the resonance's peak in dB (default 6)")
    p.add_argument("--keep-valve", action="store_true", help="the valve keeps its own anomaly kinds")
    p.add_argument("--seed", type=int, default=0, help="the untrained network's seed")
    p.add_argument("--no-score", action="store_true", help="generate the trees only")
    p.add_argument("--work", type=Path, default=Path("/tmp/resonance-trees"), help="where trees are generated")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "resonance-trees")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = read_rows(a.out / "resonance-trees.json")
    for seed, q, db in product(a.data_seeds, a.q, a.db):
        name = tree_name(seed, q, db, a.keep_valve)
        root = generate_recorded(resonance_preset(q, db, a.keep_valve), a.work / name, seed)
        print(f"resonance-trees: {root}", flush=True)
        if a.no_score:
            continue
        t0 = time.perf_counter()
        rows[name] = {**fast_scores(root, a.seed), "q": q, "db": db, "data seed": seed, "keep valve": a.keep_valve,
                      "seconds": round(time.perf_counter() - t0, 1), "commit": commit_id(),
                      "date": time.strftime("%Y-%m-%d")}
    if not a.no_score:
        a.out.mkdir(parents=True, exist_ok=True)
        write_rows(a.out / "resonance-trees.json", rows)
        publish(a.out / "resonance-trees.md", report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
