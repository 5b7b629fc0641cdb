"""The detectors per machine type of a synthetic dataset at several anomaly gains, beside the official
AE's score per machine type on real recordings (the paper's Table 1, DCASE 2022 development set).

For the machine types with no real recordings here, the paper's Table 1 is the one real-sound figure
per type: the official AE baseline's harmonic mean of source AUC, target AUC and pAUC on the DCASE
2022 development set. This script cuts a synthetic preset or regime to ``--machines``, sets their
``Difficulty.machine_anomaly_gain`` to each ``--gains`` value, generates the tree (the same clips a
full tree of those settings holds: every clip's RNG is keyed by its own name) and runs
``benchmarks/realism.py``'s detectors on it: the AE recipe (``--ae-epochs``, one AE per machine
type), the kNN floor and the two spectral kNNs. Official score per machine type in %.

    .venv/bin/python benchmarks/type_gain.py --dataset demo --machines ToyTrain bearing --gains 1 0.5 0.3 --data-seeds 1 2

Writes ``<out>/type_gain.{json,md}``; rows of other (dataset, machines, gain, data seed, epochs) keys
are kept, rows of another generator version left out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import realism  # noqa: E402  (benchmarks/ is on sys.path)
from common import commit_id, generate_recorded, publish, read_rows, write_rows  # noqa: E402
from pipelines.synth.generate import preset_settings  # noqa: E402

# The paper's Table 1, "AutoEncoder [3]": the official AE baseline per machine type on the real DCASE
# 2022 Task 2 development set (harmonic mean of source AUC, target AUC and pAUC, %).
PAPER_AE = {"ToyCar": 51.30, "ToyTrain": 39.77, "bearing": 60.64, "fan": 58.50, "gearbox": 63.07,
            "slider": 58.00, "valve": 50.60}
DETECTORS = ("AE recipe", "kNN floor", "spectral kNN", "spectral kNN, standardised")


def table(rows: dict[str, dict]) -> str:
    """Per (dataset, machine type, gain): each detector's mean over the data seeds measured."""
    head = ["dataset", "machine type", "gain", "data seeds", "AE epochs", *DETECTORS, "paper's AE (real, DCASE 2022)"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows.values():
        for m in r["machines"]:
            groups.setdefault((r["dataset"], m, r["gain"], r["epochs"]), []).append(r)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, m, gain, epochs), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3])):
        cells = [name, m, f"{gain:g}", ", ".join(str(r["data_seed"]) for r in sorted(rs, key=lambda r: r["data_seed"])),
                 str(epochs)]
        for d in DETECTORS:
            values = [r[d][m] for r in rs if r.get(d, {}).get(m) is not None]
            cells.append(f"{np.mean(values):.1f}" if values else "")
        cells.append(f"{PAPER_AE[m]:.1f}" if m in PAPER_AE else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="demo", help="a synthetic preset or robustness regime (default demo)")
    p.add_argument("--machines", nargs="+", required=True, help="machine types to measure, e.g. ToyTrain bearing")
    p.add_argument("--gains", type=float, nargs="+", default=[1.0])
    p.add_argument("--data-seeds", type=int, nargs="+", default=None, help="default: the dataset's own")
    p.add_argument("--ae-epochs", type=int, default=100, help="the recipe's 100; 0 skips the AE")
    p.add_argument("--seed", type=int, default=0, help="the AE's training seed")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "type-gain")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "type_gain.json"
    saved = read_rows(path)
    rows = {}
    for key, r in saved.items():
        try:
            now = preset_settings(realism.with_gain(r["dataset"], r["machines"], r["gain"], "type_gain")[0])
        except (KeyError, SystemExit):  # a dataset or machine type that no longer exists
            now = None
        if r.get("data") == now:
            rows[key] = r
        else:
            print(f"type_gain: {key} was measured on another version of the generator; left out")
    stamp = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d")}
    for gain in a.gains:
        for seed in a.data_seeds or [None]:
            preset, own_seed = realism.with_gain(a.dataset, a.machines, gain, "type_gain")
            seed = own_seed if seed is None else seed
            key = f"{a.dataset}/{'+'.join(a.machines)}/gain {gain:g}/data seed {seed}/epochs {a.ae_epochs}/seed {a.seed}"
            if key in rows:
                continue
            root = generate_recorded(preset, a.out / "work" / key.replace("/", "_").replace(" ", "-"), seed)
            m = realism.measure(root, a.ae_epochs, a.seed, untrained=False)
            rows[key] = {"dataset": a.dataset, "machines": list(a.machines), "gain": gain, "data_seed": seed,
                         "epochs": a.ae_epochs, "seed": a.seed,
                         **{d: m[f"{d} per machine type"] for d in DETECTORS if f"{d} per machine type" in m},
                         "data": preset_settings(preset), "seconds": m["seconds"], **stamp}
            print(f"type_gain: {key}: " + "; ".join(f"{d} " + ", ".join(f"{t} {v if v is None else round(v, 1)}" for t, v in rows[key][d].items())
                                                  for d in DETECTORS if d in rows[key]), flush=True)
            write_rows(path, rows)
    publish(a.out / "type_gain.md", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
