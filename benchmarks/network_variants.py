"""The paper's network on real sound, one change at a time: capacity, schedule, batch, class set, input.

Issue 21 asked why the network detects nothing on real recordings, one cause at a time. The
pipeline rows of ``benchmarks/real.py`` cover pre-training against fine-tuning from scratch (3
seeds), the backend (``real_backends.py``) and the input front end (plain against inverted log-Mel);
``attribute_accuracy.py`` shows the auxiliary task is learned. This script covers the rest, in one
process on the real folder (the pipeline's own :class:`StageTrainer` and scoring job, no Ray):
fine-tuning from scratch (config ``demo-prototype``) with one setting changed per variant, and the
official score of the scoring job on the test clips every ``--every`` epochs:

* **schedule and capacity**: 3x the epochs, width 32, lr x10 and /10, a smaller and a larger
  N x K batch; and the two that gained most together (chosen after seeing them: a bound);
* **the class set**: the attribute combination (the default: every attribute of the clip's name,
  per domain) against coarser classes, the first attribute only (the car model on ToyCar) per
  domain, and the domain alone; the classes come from the clips' attribute strings, whatever their
  keys. The scoring backend's prototypes follow the same classes;
* **input statistics**: the per-bin normalisation fitted on every training clip (the default)
  against the source clips only, and none;
* **test-time embedding**: the default's final network scored with whole-clip embeddings instead
  of the mean of 64-frame windows;
* **one network per machine type**: on a tree of several machine types, the real folder's protocol
  (a network sees one machine type) against the default's one network for every type.

    .venv/bin/python benchmarks/network_variants.py --seed 0

Writes ``<out>/variants-seed<S>.json`` (resumable: finished variants are kept), ``variants.md``
(every seed found) and ``variants.png`` (official score against epochs). Without the real folder
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asd import metrics as M
from asd.training import input_stats
from pipelines.config import load_config
from pipelines.detectors.prototype import StageTrainer, class_labels
from pipelines.store import ClipTable, load_split
from pretrain_curve import COLUMNS, evaluate, scores_of  # benchmarks/ is on sys.path when run as a script
from realism import tree_base
from common import REAL_TOYCAR as REAL

REPO = Path(__file__).resolve().parent.parent
DEFAULT = "default (fine-tune from scratch)"
PER_TYPE = "one network per machine type"
# name -> (config overrides, class set, input statistics)
VARIANTS: dict[str, tuple[list[str], str, str]] = {
    DEFAULT: ([], "attributes", "all"),
    "3x epochs": (["finetune.epochs=30", "finetune.lr_milestones=[18]", "finetune.min_steps=600"], "attributes", "all"),
    "width 32": (["model.width=32"], "attributes", "all"),
    "lr x10 (0.1)": (["finetune.lr=0.1"], "attributes", "all"),
    "lr /10 (0.001)": (["finetune.lr=0.001"], "attributes", "all"),
    "batch 5 x 5": (["finetune.n_classes=5", "finetune.k=5"], "attributes", "all"),
    "batch 20 x 10": (["finetune.n_classes=20", "finetune.k=10"], "attributes", "all"),
    # the two changes that each gained most, together (picked on the same test clips: a bound)
    "batch 20 x 10 and 3x epochs": (["finetune.n_classes=20", "finetune.k=10", "finetune.epochs=30",
                                     "finetune.lr_milestones=[18]", "finetune.min_steps=600"], "attributes", "all"),
    "classes: first attribute per domain": ([], "first", "all"),
    "classes: domain only": ([], "domain", "all"),
    "input statistics: source clips only": ([], "attributes", "source"),
    "input statistics: none": ([], "attributes", "none"),
    # the real folder's protocol on a tree of several machine types: each type's network trained on
    # that type's clips alone (the default trains one network on every type's classes at once)
    PER_TYPE: ([], "attributes", "all"),
}


def store_overrides(data: Path, store: Path, seed: int) -> list[str]:
    """Config overrides that read the DCASE-layout tree ``data`` into the feature store ``store``."""
    return [f"data.root={tree_base(data)}", f"extract.store={store}", f"train.seed={seed}", "ray.num_cpus=2"]


def extracted(cfg, refresh: bool = False) -> tuple[ClipTable, ClipTable]:
    """The training and test clips of ``cfg``'s store, extracted (by a local Ray) when it is absent,
    or with ``refresh`` brought up to date with the tree whenever it is called."""
    store = cfg.path(cfg.extract.store)
    if refresh or not (Path(store) / "features.json").exists():
        from pipelines.stages.extract import extract_from_config  # starts a local Ray: only when extracting

        extract_from_config(cfg, cfg.data.root, store)
    version = cfg.features.version
    return load_split(store, "train", feature_version=version), load_split(store, "test", feature_version=version)


def coarse_class(attribute_class: str, class_set: str) -> str:
    """``machine/section/domain/attributes`` reduced to a coarser class: ``first`` keeps the first
    key-value pair of the attribute string (``car_A1_spd_28V`` -> ``car_A1``), ``domain`` drops
    the attributes; ``attributes`` keeps the class as it is."""
    if class_set == "attributes":
        return attribute_class
    machine, section, domain, attributes = attribute_class.split("/", 3)
    kept = "_".join(attributes.split("_")[:2]) if class_set == "first" else ""
    return "/".join((machine, section, domain, kept))


def with_classes(table: ClipTable, class_set: str) -> ClipTable:
    meta = table.meta.copy()
    meta["attribute_class"] = [coarse_class(c, class_set) if isinstance(c, str) else c for c in meta["attribute_class"]]
    return ClipTable(meta=meta, features=table.features)


def fine_tuner(cfg, train: ClipTable, stats: str = "all") -> StageTrainer:
    """The pipeline's fine-tuning stage, not yet trained, on ``train``'s classes, with the input
    statistics of ``stats`` (every training clip, the source clips only, or none)."""
    keys = sorted(set(train.meta["attribute_class"]))
    trainer = StageTrainer(cfg, "finetune", train.features, class_labels(train.meta, keys), len(keys))
    if stats == "source":
        source = [f for f, d in zip(train.features, train.meta["domain"]) if d == "source"]
        trainer.core.set_input_stats(*input_stats(source))
    elif stats == "none":
        mean, std = input_stats(train.features)
        trainer.core.set_input_stats(torch.zeros_like(mean), torch.ones_like(std))
    return trainer


def run_variant(cfg, train: ClipTable, test: ClipTable, class_set: str, stats: str, every: int) -> dict:
    train = with_classes(train, class_set)
    trainer = fine_tuner(cfg, train, stats)
    t0 = time.perf_counter()
    curve = [{"epoch": 0, "loss": float("nan"), **evaluate(trainer.core, cfg, train, test)}]
    for epoch in range(cfg.finetune.epochs):
        loss = trainer.epoch(epoch)["loss"]
        if (epoch + 1) % every == 0 or epoch + 1 == cfg.finetune.epochs:
            curve.append({"epoch": epoch + 1, "loss": loss, **evaluate(trainer.core, cfg, train, test)})
            print(f"    epoch {epoch + 1}: loss {loss:.3f} " +
                  " ".join(f"{k} {100 * curve[-1][k]:.1f}" for k in COLUMNS), flush=True)
    out = {"classes": trainer.num_classes, "curve": curve, "final": curve[-1], "seconds": time.perf_counter() - t0}
    if class_set == "attributes" and stats == "all":
        whole = replace(cfg, score=replace(cfg.score, embedding="whole"))
        out["final, whole-clip test embeddings"] = evaluate(trainer.core, whole, train, test)
    return out


def of_machine(table: ClipTable, machine: str) -> ClipTable:
    keep = (table.meta["machine"] == machine).to_numpy()
    return ClipTable(meta=table.meta[keep].reset_index(drop=True),
                     features=[f for f, k in zip(table.features, keep) if k])


def per_machine_type(cfg, train: ClipTable, test: ClipTable, class_set: str, stats: str, every: int) -> dict:
    """``run_variant`` on each machine type's clips alone; the scores of the networks' sections together
    at each evaluated epoch (the same official score as one network that scored them all)."""
    runs = {}
    for machine in sorted(set(train.meta["machine"])):
        print(f"  {machine}", flush=True)
        runs[machine] = run_variant(cfg, of_machine(train, machine), of_machine(test, machine), class_set, stats, every)

    def together(points: list[dict]) -> dict:
        return scores_of([M.SectionResult(**s) for p in points for s in p["sections"]])
    curve = [{"epoch": points[0]["epoch"], "loss": float(np.mean([p["loss"] for p in points])), **together(points)}
             for points in zip(*(r["curve"] for r in runs.values()))]
    out = {"classes": sum(r["classes"] for r in runs.values()), "curve": curve, "final": curve[-1],
           "seconds": sum(r["seconds"] for r in runs.values())}
    whole = [r.get("final, whole-clip test embeddings") for r in runs.values()]
    if all(whole):
        out["final, whole-clip test embeddings"] = together(whole)
    return out


def report(out: Path) -> str:
    runs, data = [], set()
    for path in sorted(out.glob("variants-seed*.json")):
        saved = json.loads(path.read_text())
        data.add(Path(saved["data"]).name)
        for name, res in saved["variants"].items():
            runs.append({"variant": name, "seed": saved["seed"], "classes": res["classes"],
                         "peak": max(p["Overall"] for p in res["curve"][1:]), **res["final"]})
            if "final, whole-clip test embeddings" in res:
                runs.append({"variant": f"{name}, whole-clip test embeddings", "seed": saved["seed"],
                             "classes": res["classes"], "peak": float("nan"),
                             **res["final, whole-clip test embeddings"]})
    df = pd.DataFrame(runs)
    lines = [f"Fine-tuning from scratch on {', '.join(sorted(data))}, one change at a time; official score and its parts "
             "after the last epoch in %, mean ± std over the seeds run; \"best epoch\": the highest official score "
             "along the curve (chosen on the test clips: an optimistic bound, not a result).\n",
             "| variant | classes | seeds | Overall | Source AUC | Target AUC | pAUC | best epoch |",
             "|---|---|---|---|---|---|---|---|"]
    order = [v for v in VARIANTS] + [f"{v}, whole-clip test embeddings" for v in VARIANTS]
    for name in [v for v in order if v in set(df["variant"])]:
        m = df[df["variant"] == name]
        cells = [f"{100 * m[c].mean():.2f} ± {100 * (m[c].std(ddof=1) if len(m) > 1 else 0):.2f}" for c in COLUMNS]
        peak = "" if m["peak"].isna().all() else f"{100 * m['peak'].mean():.1f}"
        lines.append(f"| {name} | {int(m['classes'].iloc[0])} | {len(m)} | " + " | ".join(cells) + f" | {peak} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = json.loads((out / f"variants-seed{seed}.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, res in saved["variants"].items():
        ep = [p["epoch"] for p in res["curve"]]
        style = {"lw": 2.2, "color": "k"} if name == DEFAULT else {"lw": 1}
        axes[0].plot(ep, [100 * p["Overall"] for p in res["curve"]], marker="o", ms=3, label=name, **style)
        axes[1].plot(ep, [100 * p["Target AUC"] for p in res["curve"]], marker="o", ms=3, label=name, **style)
    for ax, title in zip(axes, ("official score (%)", "target AUC (%)")):
        ax.axhline(50, color="grey", lw=0.6)
        ax.set_title(f"{title}, seed {seed}")
        ax.set_xlabel("fine-tuning epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"variants-seed{seed}.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REAL, help="a DCASE-layout tree (default: the real ToyCar folder)")
    ap.add_argument("--config", default="demo-prototype")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "network-variants")
    ap.add_argument("--report-only", action="store_true", help="rewrite variants.md and the picture from the JSONs")
    args = ap.parse_args()
    if args.report_only:
        (args.out / "variants.md").write_text(report(args.out))
        plot(args.out, args.seed)
        return
    if not args.data.is_dir():
        print(f"{args.data}: not found (the real recordings are in ../shared/data/realtoycar); nothing measured")
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base = store_overrides(args.data, args.out / "work" / "features", args.seed)
    train, test = extracted(load_config(args.config, base))
    results_file = args.out / f"variants-seed{args.seed}.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {
        "data": str(args.data), "config": args.config, "seed": args.seed, "variants": {}}
    for name in args.variants:
        if name in saved["variants"]:
            continue
        overrides, class_set, stats = VARIANTS[name]
        print(f"{name} (seed {args.seed})", flush=True)
        cfg = load_config(args.config, base + overrides)
        run = per_machine_type if name == PER_TYPE else run_variant
        saved["variants"][name] = run(cfg, train, test, class_set, stats, args.every)
        saved["date"] = time.strftime("%Y-%m-%d")
        results_file.write_text(json.dumps(saved, indent=1))
    (args.out / "variants.md").write_text(report(args.out))
    plot(args.out, args.seed)
    print(report(args.out))


if __name__ == "__main__":
    main()
