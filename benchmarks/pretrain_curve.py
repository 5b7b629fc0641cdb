"""Why does pre-training help or hurt? Detection quality against training epoch, per variant.

For each variant (a named list of config overrides) the pre-training stage runs in this process
with the pipeline's own :class:`pipelines.detectors.prototype.StageTrainer` (one worker, which trains the same
network as any number of Ray Train workers: docs/method.md), and the network is scored with the
scoring job's own functions (window-mean embeddings, per-section Mahalanobis backend, DCASE
metrics) before training (epoch 0) and every ``--every`` epochs. Optionally each variant's final
pre-trained network is then fine-tuned (``--finetune``), and fine-tuning from scratch is scored
as the reference. Writes ``<out>/curves.json``, ``<out>/curves.md`` and ``<out>/curves.png``.

    .venv/bin/python benchmarks/pretrain_curve.py --regime imbalanced --epochs 20 --every 4 \\
        --variant paper= --variant "lr 0.01=pretrain.lr=0.01"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asd import metrics as M
from pipelines.config import load_config
from pipelines.detectors.prototype import (StageTrainer, class_labels, embed_table, fit_sections, score_clips,
                                           training_classes)
from pipelines.stages.score import labelled_results
from pipelines.store import load_split

COLUMNS = ["Overall", "Source AUC", "Target AUC", "pAUC"]


def scored_clips(model, cfg, train, test):
    """The scoring job's per-clip scores of ``model`` (an EmbeddingNet): ``test.meta`` with a
    ``score`` column, each section's backend fitted on ``train``."""
    model.eval()
    sections = fit_sections(train.meta, embed_table(model, train, cfg, use_ray=False), cfg)
    return score_clips(test.meta, embed_table(model, test, cfg, use_ray=False), sections)


def evaluate(model, cfg, train, test) -> dict:
    """The scoring job's official score and AUCs of ``model`` on the store, and with several
    machine types each type's official score (which machines carry the overall)."""
    return scores_of(labelled_results(scored_clips(model, cfg, train, test)))


def scores_of(results: list[M.SectionResult]) -> dict:
    """The official score and AUCs of section results, each section's metrics, and with several
    machine types each type's official score."""
    row = M.paper_row(results, method="")
    out = {k: float(row[k]) for k in COLUMNS}
    out["sections"] = [r.to_dict() for r in results]
    if len({r.machine for r in results}) > 1:
        out["per machine type"] = M.machine_scores(results)
    return out


def run_variant(cfg, store: Path, epochs_every: int, finetune: bool) -> dict:
    version = cfg.features.version
    train, test = load_split(store, "train", feature_version=version), load_split(store, "test", feature_version=version)
    keys = training_classes(store, version)
    labels = class_labels(train.meta, keys)
    curve = []
    trainer = StageTrainer(cfg, "pretrain", train.features, labels, len(keys))
    curve.append({"epoch": 0, "loss": float("nan"), **evaluate(trainer.core, cfg, train, test)})
    t0 = time.perf_counter()
    for epoch in range(cfg.pretrain.epochs):
        metrics = trainer.epoch(epoch)
        if (epoch + 1) % epochs_every == 0 or epoch + 1 == cfg.pretrain.epochs:
            curve.append({"epoch": epoch + 1, "loss": metrics["loss"], **evaluate(trainer.core, cfg, train, test)})
            print(f"  epoch {epoch + 1}: loss {metrics['loss']:.3f} " +
                  " ".join(f"{k} {100 * curve[-1][k]:.1f}" for k in COLUMNS), flush=True)
    out = {"curve": curve, "pretrain_seconds": time.perf_counter() - t0}
    if finetune:
        state = {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}
        ft = StageTrainer(cfg, "finetune", train.features, labels, len(keys), init_state=state)
        for epoch in range(cfg.finetune.epochs):
            ft.epoch(epoch)
        out["finetuned"] = evaluate(ft.core, cfg, train, test)
        print("  fine-tuned: " + " ".join(f"{k} {100 * out['finetuned'][k]:.1f}" for k in COLUMNS), flush=True)
    return out


def scratch_finetune(cfg, store: Path) -> dict:
    version = cfg.features.version
    train, test = load_split(store, "train", feature_version=version), load_split(store, "test", feature_version=version)
    keys = training_classes(store, version)
    ft = StageTrainer(cfg, "finetune", train.features, class_labels(train.meta, keys), len(keys))
    for epoch in range(cfg.finetune.epochs):
        ft.epoch(epoch)
    return evaluate(ft.core, cfg, train, test)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharex=True)
    for name, res in results.items():
        if "curve" not in res:
            continue
        ep = [p["epoch"] for p in res["curve"]]
        for ax, key in zip(axes, ("Overall", "Source AUC", "Target AUC")):
            line, = ax.plot(ep, [100 * p[key] for p in res["curve"]], marker="o", label=name)
            if "finetuned" in res:
                ax.scatter([ep[-1] + 0.5], [100 * res["finetuned"][key]], marker="*", s=90, color=line.get_color())
    for ax, key in zip(axes, ("Official score (harmonic mean)", "Source AUC", "Target AUC")):
        if "fine-tune from scratch" in results:
            ax.axhline(100 * results["fine-tune from scratch"][key.split(" (")[0].replace("Official score", "Overall")],
                       color="k", ls="--", lw=0.8, label="fine-tune from scratch")
        ax.set_title(key)
        ax.set_xlabel("pre-training epoch (star: after fine-tuning)")
        ax.axhline(50, color="grey", lw=0.5)
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="demo-prototype")  # the paper's network
    ap.add_argument("--regime", help="a robustness-suite regime (benchmarks/robustness.py); default: the config's data")
    ap.add_argument("--suite-out", default="benchmarks/results/robustness", help="where the suite keeps its data")
    ap.add_argument("--variant", action="append", default=[], help="NAME=override,override,... (repeatable)")
    ap.add_argument("--epochs", type=int, help="pre-training epochs (default: the config's)")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--finetune", action="store_true", help="also fine-tune each variant's final network")
    ap.add_argument("--scratch", action="store_true", help="also score fine-tuning from scratch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="default: benchmarks/results/pretrain-curve/<regime or config>")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/pretrain-curve/{args.regime or args.config}")
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.seed={args.seed}"] + ([f"pretrain.epochs={args.epochs}"] if args.epochs else [])
    if args.regime:
        from robustness import regime_data  # benchmarks/ is on sys.path when run as a script

        base = Path(args.suite_out).resolve() / "work"
        root = regime_data(args.regime, base)
        store = base / args.regime / "features-inverted"
        common += [f"data.root={root}", f"extract.store={store}"]
    cfg0 = load_config(args.config, common)
    store = cfg0.path(cfg0.extract.store)
    if not (Path(store) / "features.json").exists():
        from pipelines.stages.extract import extract_from_config

        extract_from_config(cfg0, cfg0.data.root, store)
    results_file = out / "curves.json"
    setting = {"config": args.config, "regime": args.regime, "seed": args.seed, "epochs": args.epochs,
               "every": args.every}
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # curves of another setting (regime, seed, epoch grid) never share a table or plot
    results = {k: v for k, v in results.items() if all(v.get(f) == x for f, x in setting.items())}
    for spec in args.variant or ["paper="]:
        name, _, overrides = spec.partition("=")
        cfg = load_config(args.config, common + [o for o in overrides.split(",") if o])
        print(f"== {name}", flush=True)
        results[name] = {"overrides": overrides, **setting,
                         **run_variant(cfg, Path(store), args.every, args.finetune)}
        results_file.write_text(json.dumps(results, indent=2))
    if args.scratch:
        results["fine-tune from scratch"] = {**setting, **scratch_finetune(cfg0, Path(store))}
        print("== fine-tune from scratch: " + " ".join(f"{k} {100 * results['fine-tune from scratch'][k]:.1f}"
                                                    for k in COLUMNS))
        results_file.write_text(json.dumps(results, indent=2))
    lines = ["| variant | overrides | " + " | ".join(f"epoch {p['epoch']}" for p in next(
        r for r in results.values() if "curve" in r)["curve"]) + " | after fine-tuning |"]
    lines.append("|---|---|" + "---|" * (len(lines[0].split("|")) - 4))
    for name, res in results.items():
        if "curve" in res:
            cells = [f"{100 * p['Overall']:.1f} ({100 * p['Target AUC']:.0f})" for p in res["curve"]]
            ft = res.get("finetuned")
            lines.append(f"| {name} | `{res['overrides']}` | " + " | ".join(cells) + " | "
                         + (f"{100 * ft['Overall']:.1f} ({100 * ft['Target AUC']:.0f})" if ft else "") + " |")
    if "fine-tune from scratch" in results:
        lines.append(f"\nFine-tuning from scratch: {100 * results['fine-tune from scratch']['Overall']:.1f} "
                     f"({100 * results['fine-tune from scratch']['Target AUC']:.0f}).")
    lines.insert(0, "Official score in % (target AUC in brackets) against pre-training epoch.\n")
    (out / "curves.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "curves.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
