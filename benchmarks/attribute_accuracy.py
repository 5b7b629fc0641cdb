"""Does the auxiliary task learn? Attribute accuracy on held-out training clips, per stage, per epoch.

The paper's network learns to tell the attribute classes of the training clips apart (car model x
speed x microphone on ToyCar); its anomaly score is the distance to those classes' prototypes. If
the classes are not learned on clips the network has not trained on, the embedding cannot place
an unseen normal clip near its class. This script holds out a fraction of every attribute class
with enough clips (``--holdout``, classes with at least ``--min-class`` clips; the target
domain's 1-2 clips per class stay in training), trains the pipeline's own
:class:`pipelines.detectors.prototype.StageTrainer` in this process (one worker, which trains the
same network as any number of Ray Train workers: docs/method.md) on the rest, and after every
``--every`` epochs measures:

* **held-out accuracy**: each held-out clip classified by its nearest class prototype (cosine, the
  normalised mean of the training split's window-mean embeddings; Eq. 2), the fraction correct;
* **training accuracy**: the same on the clips it trains on;
* the **official score** of the scoring job (Mahalanobis backend on the training split) on the
  test clips.

References on the same split: chance (the largest held-out class's share) and the nearest
training clip by the cosine of log-Mel statistics (mean + std over time of the network's own
input, no training). Two stages: fine-tuning from scratch (the Eq. 4/6 balanced-batch loss), and
the paper's pre-training (Eq. 1/3, prototypes every epoch) followed by fine-tuning. Writes
``<out>/accuracy.json``, ``accuracy.md`` and ``accuracy.png``.

    .venv/bin/python benchmarks/attribute_accuracy.py --data ../shared/data/realtoycar --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from asd.contracts import class_ids
from asd.knn import batch_clip_statistics, nearest_cosine_distance
from asd.prototypes import class_sums, prototypes_from_sums
from pipelines.config import load_config
from pipelines.detectors.prototype import StageTrainer, embed_table
from pipelines.store import ClipTable, load_split
from pretrain_curve import evaluate  # benchmarks/ is on sys.path when run as a script
from common import REAL_TOYCAR as REAL

REPO = Path(__file__).resolve().parent.parent


def holdout_split(classes: list[str], fraction: float, min_class: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): ``round(fraction * n)`` random clips of every class with at
    least ``min_class`` clips are held out; smaller classes stay whole in training."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_class.setdefault(c, []).append(i)
    held: list[int] = []
    for rows in by_class.values():
        if len(rows) >= min_class:
            held += rng.permutation(rows)[: round(fraction * len(rows))].tolist()
    held_set = set(held)
    return [i for i in range(len(classes)) if i not in held_set], sorted(held)


def subset(table: ClipTable, rows: list[int]) -> ClipTable:
    return ClipTable(meta=table.meta.iloc[rows].reset_index(drop=True), features=[table.features[i] for i in rows])


def nearest_prototype_accuracy(fit_emb: torch.Tensor, fit_labels: torch.Tensor, query_emb: torch.Tensor,
                               query_labels: torch.Tensor, num_classes: int) -> float:
    """Fraction of queries whose nearest class prototype (cosine; Eq. 2 prototypes) is their class."""
    sums, counts = class_sums(fit_emb.to(torch.float64), fit_labels, num_classes)
    protos = prototypes_from_sums(sums, counts)
    q = torch.nn.functional.normalize(query_emb.to(torch.float64), dim=1)
    return float((torch.argmax(q @ protos.T, dim=1) == query_labels).double().mean())


def measure(model, cfg, fit: ClipTable, held: ClipTable, test: ClipTable, fit_labels, held_labels, num_classes):
    model.eval()
    fit_emb = embed_table(model, fit, cfg, use_ray=False)
    held_emb = embed_table(model, held, cfg, use_ray=False)
    return {"held-out accuracy": nearest_prototype_accuracy(fit_emb, fit_labels, held_emb, held_labels, num_classes),
            "training accuracy": nearest_prototype_accuracy(fit_emb, fit_labels, fit_emb, fit_labels, num_classes),
            **evaluate(model, cfg, fit, test)}


def train_curve(cfg, stage: str, fit, held, test, fit_labels, held_labels, num_classes, every: int,
                init_state=None, label: str = "") -> tuple[list[dict], dict]:
    trainer = StageTrainer(cfg, stage, fit.features, fit_labels, num_classes, init_state=init_state)
    epochs = (cfg.pretrain if stage == "pretrain" else cfg.finetune).epochs
    curve = [] if init_state is not None else [
        {"stage": label, "epoch": 0, "loss": float("nan"),
         **measure(trainer.core, cfg, fit, held, test, fit_labels, held_labels, num_classes)}]
    for epoch in range(epochs):
        loss = trainer.epoch(epoch)["loss"]
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            point = {"stage": label, "epoch": epoch + 1, "loss": loss,
                     **measure(trainer.core, cfg, fit, held, test, fit_labels, held_labels, num_classes)}
            curve.append(point)
            print(f"  {label} epoch {epoch + 1}: loss {loss:.3f}, held-out {100 * point['held-out accuracy']:.1f} %, "
                  f"training {100 * point['training accuracy']:.1f} %, official {100 * point['Overall']:.1f}", flush=True)
    return curve, {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}


def plot(results: dict, refs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, curve in results.items():
        pretrained = max((p["epoch"] for p in curve if p["stage"] == "pretrain"), default=0)
        x = [p["epoch"] + (pretrained if p["stage"] == "ft" else 0) for p in curve]  # epochs trained in all
        line, = axes[0].plot(x, [100 * p["held-out accuracy"] for p in curve], marker="o", label=f"{name}: held-out")
        axes[0].plot(x, [100 * p["training accuracy"] for p in curve], ls=":", color=line.get_color(),
                     label=f"{name}: training")
        axes[1].plot(x, [100 * p["Overall"] for p in curve], marker="o", color=line.get_color(), label=name)
        if pretrained:
            for ax in axes:
                ax.axvline(pretrained, color=line.get_color(), lw=0.6, ls="--")
    axes[0].axhline(100 * refs["chance"], color="grey", lw=0.8, label="chance (largest class)")
    axes[0].axhline(100 * refs["log-Mel statistics 1-NN"], color="k", ls="--", lw=0.8, label="log-Mel statistics, 1-NN")
    axes[0].set_title("attribute accuracy (%)")
    axes[1].axhline(50, color="grey", lw=0.5)
    axes[1].set_title("official score on the test clips (%)")
    for ax in axes:
        ax.set_xlabel("epochs trained (dashed: pre-training ends, fine-tuning starts)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REAL, help="a DCASE-layout tree (default: the real ToyCar folder)")
    ap.add_argument("--config", default="demo-prototype")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--min-class", type=int, default=5)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed and held-out draw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attribute-accuracy")
    ap.add_argument("--plot-only", action="store_true", help="redraw the picture of --seed from its JSON")
    args = ap.parse_args()
    if args.plot_only:
        saved = json.loads((args.out / f"accuracy-seed{args.seed}.json").read_text())
        plot(saved["curves"], saved["references"], args.out / f"accuracy-seed{args.seed}.png")
        return
    if not (args.data / "dev_data").is_dir() and not args.data.is_dir():
        raise SystemExit(f"{args.data}: not found (the real folder is ../shared/data/realtoycar)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.data / "dev_data" if (args.data / "dev_data").is_dir() else args.data
    cfg = load_config(args.config, [f"data.root={root}", f"extract.store={args.out / 'work' / 'features'}",
                                    f"train.seed={args.seed}", "ray.num_cpus=2"])
    store = cfg.path(cfg.extract.store)
    if not (Path(store) / "features.json").exists():
        from pipelines.stages.extract import extract_from_config

        extract_from_config(cfg, cfg.data.root, store)
    train, test = load_split(store, "train"), load_split(store, "test")
    fit_rows, held_rows = holdout_split(train.meta["attribute_class"].tolist(), args.holdout, args.min_class, args.seed)
    fit, held = subset(train, fit_rows), subset(train, held_rows)
    ids = class_ids(fit.meta["attribute_class"])
    fit_labels = torch.tensor([ids[c] for c in fit.meta["attribute_class"]])
    held_labels = torch.tensor([ids[c] for c in held.meta["attribute_class"]])
    stats_fit = batch_clip_statistics(fit.features)
    nearest = nearest_cosine_distance(batch_clip_statistics(held.features), stats_fit)[1]
    refs = {"classes": len(ids), "training clips": len(fit_rows), "held-out clips": len(held_rows),
            "chance": float(torch.bincount(held_labels).max()) / len(held_rows),
            "log-Mel statistics 1-NN": float((fit_labels[nearest] == held_labels).double().mean())}
    print(f"{len(ids)} classes, {len(fit_rows)} training and {len(held_rows)} held-out clips; chance "
          f"{100 * refs['chance']:.1f} %, log-Mel statistics 1-NN {100 * refs['log-Mel statistics 1-NN']:.1f} %", flush=True)
    t0 = time.perf_counter()
    args_ = (fit, held, test, fit_labels, held_labels, len(ids), args.every)
    results = {"fine-tune from scratch": train_curve(cfg, "finetune", *args_, label="ft")[0]}
    pre, state = train_curve(cfg, "pretrain", *args_, label="pretrain")
    results["pre-train + fine-tune"] = pre + train_curve(cfg, "finetune", *args_, init_state=state, label="ft")[0]
    out = {"data": str(args.data), "config": args.config, "seed": args.seed, "holdout": args.holdout,
           "min_class": args.min_class, "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - t0,
           "references": refs, "curves": results}
    (args.out / f"accuracy-seed{args.seed}.json").write_text(json.dumps(out, indent=1))
    lines = [f"{refs['classes']} attribute classes, {refs['training clips']} training + {refs['held-out clips']} "
             f"held-out clips (seed {args.seed}); chance {100 * refs['chance']:.1f} %, log-Mel statistics 1-NN "
             f"{100 * refs['log-Mel statistics 1-NN']:.1f} %.\n",
             "| variant | stage | epoch | loss | held-out accuracy | training accuracy | official score | target AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for name, curve in results.items():
        for p in curve:
            lines.append(f"| {name} | {p['stage']} | {p['epoch']} | {p['loss']:.3f} | {100 * p['held-out accuracy']:.1f} | "
                         f"{100 * p['training accuracy']:.1f} | {100 * p['Overall']:.1f} | {100 * p['Target AUC']:.1f} |")
    (args.out / f"accuracy-seed{args.seed}.md").write_text("\n".join(lines) + "\n")
    plot(results, refs, args.out / f"accuracy-seed{args.seed}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
