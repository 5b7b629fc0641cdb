"""How hard is a dataset? The statistics that make anomalous sound detection easy or hard, for any
DCASE-layout tree, side by side for the real recordings and the synthetic presets and regimes.

Per (machine type, section), on the official baseline's log-Mel (``librosa_logmel``: 128 bins,
n_fft 1024, hop 512) and each clip's time-averaged spectrum ``v`` (dB per bin):

* the three floors, official score (hmean of source AUC, target AUC, pAUC), computed in-process
  with the library's own functions: the **kNN floor** (cosine distance of the per-bin mean and
  standard deviation to the nearest training clip, ``asd.knn``), the **AE recipe** (the official
  dense autoencoder, ``asd.baseline_ae``, one per machine type; ``--ae-epochs``), and the
  **untrained network** (random weights, batch norm at its initial statistics, the pipeline's
  scoring: windowed embeddings, minimum Mahalanobis distance to the attribute prototypes);
* with several machine types, each floor's official score per machine type as well;
* the **spectral kNN** with the cosine distance (power 0.5; the pipeline's default until the standardised
  Euclidean distance replaced it, benchmarks/spectral_variants.py), for the ranking, and with the
  standardised Euclidean distance (**spectral kNN, standardised**: the default since);
* spreads of ``v`` in dB (root mean square distances): **within** an attribute class (normal
  training clips to their class mean), **between** attribute classes (class means to the
  section's source mean), the **anomaly shift** (the excess spread of the test anomalies about
  the mean of the test normals of their domain: sqrt(E|a - m|^2 - E|n - m|^2), 0 when the
  anomalies spread no more than the normals), and the **domain shift** (source to target training
  means); reported as anomaly / within, anomaly / between and domain / anomaly;
* **frame-to-frame variation**: mean absolute difference of consecutive log-Mel frames (dB), a
  measure of (non-)stationarity; **spectral flatness** of the frames (geometric / arithmetic mean
  of the Mel power), the median over clips; **level spread**: the standard deviation of the clips'
  mean power (dB) within a section.

    .venv/bin/python benchmarks/realism.py --out benchmarks/results/realism             # real + every preset
    .venv/bin/python benchmarks/realism.py --tree /data/dcase2023 --name "my data"       # any DCASE tree
    .venv/bin/python benchmarks/realism.py --data-seeds 0 1 2 3 2026                        # the draws' spread

``--data-seeds`` generates each synthetic preset/regime once per data seed and measures the floors
that need no training (kNN floor, both spectral kNNs) and the statistics on each draw, into
``<out>/data_seeds.{json,md}``: how much of a gap to the real folder is the luck of one draw; the md
also ranks the detectors per machine type, to compare a one-type real folder like for like. With
``--ae-epochs`` given, the AE recipe is trained on each draw as well (training seed ``--seed``).
Trees are generated under ``<work>/synth/<name>-data-seed-<seed>``: one folder per draw, so seeds never mix.

Writes ``<out>/realism.json`` and ``<out>/realism.md``; resumable (datasets already measured
with the same settings are kept; ``--redo`` measures the datasets named in this call again, and
rows of other datasets stay); every row records its commit and date, and a synthetic row the
generator settings of its dataset: rows of another generator version are left out, with a line. The real folder is skipped with a message
when absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

from asd import metrics as M
from asd.backend import fit_section, score_section
from asd.baseline_ae import ADAM_EPS, AEConfig, DenseAutoencoder, clip_scores, frame_vectors, reconstruction_error
from asd.features import FeatureConfig, log_mel
from asd.knn import batch_clip_statistics, nearest_cosine_distance, spectrum_shape
from asd.knn_backend import fit_knn_section
from asd.metadata import discover_clips
from asd.model import EmbeddingNet, ModelConfig
from asd.training import embed_clips, input_stats
from common import REAL_TOYCAR as REAL, commit_id, generate_recorded  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parent.parent
LOGMEL = FeatureConfig(kind="librosa_logmel")
INVERTED = FeatureConfig(kind="inverted_logmel")
SPECTRUM = FeatureConfig(kind="spectrum")
STATS = ["anomaly/within", "anomaly/between", "domain/anomaly", "frame-to-frame dB", "flatness", "level spread dB"]
FLOORS = ["kNN floor", "AE recipe", "untrained network", "spectral kNN", "spectral kNN, standardised"]


# ----------------------------------------------------------------------------- data


FRONTS = {"logmel": LOGMEL, "inverted": INVERTED, "spectrum": SPECTRUM}


def tree_base(root: Path) -> Path:
    return root / "dev_data" if (root / "dev_data").is_dir() else root


def labelled_by_machine(root: Path) -> dict[str, list]:
    """Machine type -> the labelled dev clips' metadata (no audio read)."""
    by_machine = defaultdict(list)
    for meta in discover_clips(tree_base(root)).clips:
        if meta.is_labelled:
            by_machine[meta.machine].append(meta)
    if not by_machine:
        raise SystemExit(f"{root}: no labelled clips found")
    return dict(sorted(by_machine.items()))


def load_clips(root: Path, metas: list, fronts=("logmel", "inverted", "spectrum_shape")) -> list[dict]:
    """The clips of ``metas`` with the front ends named in ``fronts``; ``spectrum_shape`` keeps only
    the spectrum-shape vector (``asd.knn.spectrum_shape``, all the spectral kNN needs), not the
    513-bin spectrogram.

    Callers load one machine type at a time: the three front ends of a 10 s clip take about 1 MB as
    float32, 25 GB for the DCASE 2022 development set (7 types x 3 sections x 1200 clips), and
    each measurement is within a machine type."""
    clips = []
    for meta in metas:
        wave, sr = sf.read(str(tree_base(root) / meta.path), dtype="float32", always_2d=True)
        wave = torch.from_numpy(wave.mean(axis=1))
        if sr != LOGMEL.sample_rate:
            raise SystemExit(f"{meta.path}: {sr} Hz; this script reads {LOGMEL.sample_rate} Hz trees")
        clip = {"meta": meta}
        for front in fronts:
            clip[front] = spectrum_shape(log_mel(wave, SPECTRUM)) if front == "spectrum_shape" \
                else log_mel(wave, FRONTS[front])
        clips.append(clip)
    return clips


def sections(clips: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out = defaultdict(list)
    for c in clips:
        out[(c["meta"].machine, c["meta"].section)].append(c)
    return dict(sorted(out.items()))


def parts(group: list[dict]) -> tuple[list[dict], list[dict]]:
    train = [c for c in group if c["meta"].split == "train"]
    test = [c for c in group if c["meta"].split == "test"]
    return train, test


def result(machine: str, section: str, test: list[dict], scores) -> M.SectionResult:
    y = [int(c["meta"].label == "anomaly") for c in test]
    d = [int(c["meta"].domain == "target") for c in test]
    return M.section_metrics(y, d, np.asarray(scores, dtype=np.float64), machine=machine, section=section)


# ----------------------------------------------------------------------------- floors


def knn_floor(train: list[dict], test: list[dict]) -> np.ndarray:
    ref = batch_clip_statistics([c["logmel"] for c in train])
    q = batch_clip_statistics([c["logmel"] for c in test])
    return nearest_cosine_distance(q, ref)[0].numpy()


def spectral_knn(train: list[dict], test: list[dict], distance: str = "cosine") -> np.ndarray:
    ref = torch.stack([c["spectrum_shape"] for c in train])
    model = fit_knn_section(ref, [c["meta"].domain for c in train], [""] * len(train), "local", 0.5, 0.9, distance)
    return model.score(torch.stack([c["spectrum_shape"] for c in test]))[0].numpy()


def untrained_network(train: list[dict], test: list[dict], seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    net = EmbeddingNet(ModelConfig(width=16, embedding_dim=128))
    feats = [c["inverted"] for c in train] + [c["inverted"] for c in test]
    net.set_input_stats(*input_stats(feats[:len(train)]))
    emb = embed_clips(net, feats, range(len(feats)), window=64, hop=32)
    classes = sorted({c["meta"].attribute_class for c in train})
    index = torch.tensor([classes.index(c["meta"].attribute_class) for c in train])
    model = fit_section(emb[:len(train)], index)
    return score_section(model, emb[len(train):])[0].numpy()


def ae_scores(clips: list[dict], epochs: int, seed: int) -> dict[str, float]:
    """The official AE, one per machine type, trained on every 5-frame vector of its training
    clips (Adam 1e-3, batch 512; the recipe's 10 % validation hold-out is not needed here)."""
    out: dict[str, float] = {}
    cfg = AEConfig()
    by_machine = defaultdict(list)
    for i, c in enumerate(clips):
        by_machine[c["meta"].machine].append(i)
    for machine, idx in by_machine.items():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        train = [clips[i]["logmel"] for i in idx if clips[i]["meta"].split == "train"]
        vectors = torch.cat([frame_vectors(f, cfg.frames) for f in train])
        model = DenseAutoencoder(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=ADAM_EPS)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(vectors.shape[0], generator=g)
            for s in range(0, len(order) - 1, 512):
                loss = reconstruction_error(model, vectors[order[s:s + 512]]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        test = [i for i in idx if clips[i]["meta"].split == "test"]
        for i, s in zip(test, clip_scores(model, [clips[i]["logmel"] for i in test], cfg.frames).tolist()):
            out[clips[i]["meta"].path] = s
    return out


# ----------------------------------------------------------------------------- statistics


def mean_spectrum(c: dict) -> np.ndarray:
    return c["logmel"].numpy().astype(np.float64).mean(axis=1)


def rms_spread(vectors: np.ndarray, centre: np.ndarray) -> float:
    return float(np.mean(np.sum((vectors - centre) ** 2, axis=1)))


def section_statistics(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Squared spreads (summed over sections before the square root) and per-clip measures."""
    src = [c for c in train if c["meta"].domain == "source"]
    tgt = [c for c in train if c["meta"].domain == "target"]
    v_src = np.stack([mean_spectrum(c) for c in src])
    by_class = defaultdict(list)
    for c, v in zip(src, v_src):
        by_class[c["meta"].attribute].append(v)
    within = [rms_spread(np.stack(vs), np.mean(vs, axis=0)) * len(vs) for vs in by_class.values() if len(vs) > 1]
    n_within = sum(len(vs) for vs in by_class.values() if len(vs) > 1)
    centres = np.stack([np.mean(vs, axis=0) for vs in by_class.values()])
    between = rms_spread(centres, v_src.mean(axis=0))
    excess = []
    for domain in ("source", "target"):
        normal = [mean_spectrum(c) for c in test if c["meta"].domain == domain and c["meta"].label == "normal"]
        anomal = [mean_spectrum(c) for c in test if c["meta"].domain == domain and c["meta"].label == "anomaly"]
        if not normal or not anomal:
            continue
        normal, anomal = np.stack(normal), np.stack(anomal)
        m = normal.mean(axis=0)
        excess.append(rms_spread(anomal, m) - rms_spread(normal, m))
    v_tgt = np.stack([mean_spectrum(c) for c in tgt]) if tgt else v_src
    domain = float(np.sum((v_tgt.mean(axis=0) - v_src.mean(axis=0)) ** 2))
    everything = train + test
    frame_diff = np.mean([float(np.abs(np.diff(c["logmel"].numpy(), axis=1)).mean()) for c in everything])
    flat = []
    for c in everything:
        p = 10.0 ** (c["logmel"].numpy().astype(np.float64) / 10.0)
        flat.append(float(np.median(np.exp(np.log(p).mean(axis=0)) / p.mean(axis=0))))
    levels = [10 * np.log10(np.mean(10.0 ** (c["logmel"].numpy().astype(np.float64) / 10.0))) for c in everything]
    return {"within_sq": sum(within) / max(n_within, 1), "between_sq": between, "anomaly_sq": max(0.0, float(np.mean(excess))) if excess else float("nan"),
            "domain_sq": domain, "frame-to-frame dB": float(frame_diff), "flatness": float(np.median(flat)),
            "level spread dB": float(np.std(levels))}


def attribute_accuracy(train: list[dict]) -> float:
    """How far the attributes move the kNN floor's representation against the clip-to-clip spread:
    the share of source training clips whose nearest other source training clip (cosine of the
    log-Mel statistics, leave-one-out) has the same attribute string. NaN with under 2 clips."""
    src = [c for c in train if c["meta"].domain == "source"]
    if len(src) < 2:
        return float("nan")
    stats = batch_clip_statistics([c["logmel"] for c in src])
    nearest = nearest_cosine_distance(stats, stats, exclude_self=True)[1].tolist()
    return float(np.mean([src[i]["meta"].attribute == src[j]["meta"].attribute for i, j in enumerate(nearest)]))


# (name, lower group, upper group) with groups as (label, domain): the AUC of the upper group's
# scores above the lower's; a domain's AUC mixes the rows of its normals against both domains' anomalies
GROUPS = (("source normal < source anomaly", (0, 0), (1, 0)), ("target normal < target anomaly", (0, 1), (1, 1)),
          ("target normal < source anomaly", (0, 1), (1, 0)), ("source normal < target anomaly", (0, 0), (1, 1)),
          ("source normal < target normal", (0, 0), (0, 1)))


def group_aucs(sections_: list[dict], detector: str, machines: set[str] | None = None) -> dict[str, float]:
    """AUC in % of each pair of test groups of :data:`GROUPS`, mean over the sections (of the machine
    types ``machines`` only, when given)."""
    out = {}
    for name, lower, upper in GROUPS:
        values = []
        for s in sections_:
            if machines is not None and s["machine"] not in machines:
                continue
            y, d, x = (np.asarray(s["anomaly"]), np.asarray(s["target"]), np.asarray(s["scores"][detector]))
            lo, up = x[(y == lower[0]) & (d == lower[1])], x[(y == upper[0]) & (d == upper[1])]
            if lo.size and up.size:
                values.append(100 * roc_auc_score(np.r_[np.zeros(lo.size), np.ones(up.size)], np.r_[lo, up]))
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


def measure_machine(clips: list[dict], ae_epochs: int, seed: int, untrained: bool, results: dict[str, list],
                    stats: list[dict]) -> None:
    """Append each floor's section results and each section's statistics for one machine type."""
    ae = ae_scores(clips, ae_epochs, seed) if ae_epochs > 0 else None
    for (machine, section), group in sections(clips).items():
        train, test = parts(group)
        results["kNN floor"].append(result(machine, section, test, knn_floor(train, test)))
        results["spectral kNN"].append(result(machine, section, test, spectral_knn(train, test)))
        results["spectral kNN, standardised"].append(
            result(machine, section, test, spectral_knn(train, test, "standardised_euclidean")))
        if untrained:
            results["untrained network"].append(result(machine, section, test, untrained_network(train, test, seed)))
        if ae is not None:
            results["AE recipe"].append(result(machine, section, test, [ae[c["meta"].path] for c in test]))
        stats.append(section_statistics(train, test))


def measure(root: Path, ae_epochs: int, seed: int, untrained: bool = True) -> dict:
    t0 = time.perf_counter()
    results = {k: [] for k in FLOORS}
    stats = []
    n_clips = 0
    for metas in labelled_by_machine(root).values():
        n_clips += len(metas)
        # the features live in this call only: one machine type in memory at a time
        measure_machine(load_clips(root, metas), ae_epochs, seed, untrained, results, stats)
    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
    within, between = np.sqrt(mean["within_sq"]), np.sqrt(mean["between_sq"])
    anomaly, domain = np.sqrt(mean["anomaly_sq"]), np.sqrt(mean["domain_sq"])
    row = {"clips": n_clips, "sections": len(stats), "seconds": round(time.perf_counter() - t0, 1),
           "within dB": within, "between dB": between, "anomaly dB": anomaly, "domain dB": domain,
           "anomaly/within": anomaly / within, "anomaly/between": anomaly / between,
           "domain/anomaly": domain / anomaly if anomaly > 0 else float("inf"),
           **{k: mean[k] for k in ("frame-to-frame dB", "flatness", "level spread dB")}}
    for name, res in results.items():
        if res:
            paper = M.paper_row(res, method=name)
            row[name] = 100 * paper["Overall"]
            row[f"{name} (s/t/p)"] = "/".join(f"{100 * paper[k]:.1f}" for k in ("Source AUC", "Target AUC", "pAUC"))
            # which machine types carry the overall score (with one type: its name, for like-for-like tables)
            row[f"{name} per machine type"] = {m: None if v is None else 100 * v
                                               for m, v in M.machine_scores(res).items()}
    return row


# ----------------------------------------------------------------------------- datasets


def synthetic_preset(name: str, seed: int):
    """A synthetic preset (``demo``) or robustness regime by name, and its data seed: ``seed`` for a
    preset, the suite's own for a regime."""
    from robustness import DATA_SEED, REGIMES  # benchmarks/ is on sys.path

    from pipelines.synth.generate import PRESETS
    return (PRESETS[name], seed) if name in PRESETS else (REGIMES[name], DATA_SEED)


def with_gain(name: str, machines, gain: float, script: str):
    """The preset or regime ``name`` cut to ``machines``, each of their anomaly gains set to ``gain``
    (the other types' gains kept), and its data seed; ``script`` names the caller in the error."""
    preset, seed = synthetic_preset(name, 0)
    if missing := sorted(set(machines) - set(preset.machines)):
        raise SystemExit(f"{script}: {name!r} holds {list(preset.machines)}, not {', '.join(map(repr, missing))}")
    d = preset.difficulty
    gains = tuple((m, g) for m, g in d.machine_anomaly_gain if m not in machines) + tuple(
        (m, float(gain)) for m in machines)
    return replace(preset, machines=tuple(machines), difficulty=replace(d, machine_anomaly_gain=gains)), seed


def data_record(name: str) -> dict:
    """What makes a synthetic dataset's clips (the generator's settings, as its tree records them):
    each of its rows carries it, so rows measured on another version of the generator are told apart."""
    from pipelines.synth.generate import preset_settings
    return preset_settings(synthetic_preset(name.removeprefix("synthetic "), 0)[0])


def current(name: str, row: dict, where: str) -> bool:
    """Whether a saved row was measured on the dataset the code makes now (the real folder's and a
    ``--tree``'s always are); a row of another generator version is reported and left out."""
    if not name.startswith("synthetic "):
        return True
    try:
        now = data_record(name)
    except KeyError:  # a --tree named so, or a preset that no longer exists: nothing to compare
        return True
    if row.get("data") == now:
        return True
    print(f"realism: {where}: {name} was measured on another version of the generator; left out (git history keeps it)")
    return False


def synthetic_trees(work: Path, names: list[str], seed: int, data_seed: int | None = None) -> dict[str, Path]:
    """The ``demo`` preset and the robustness regimes, generated once under ``work``: a preset with
    ``seed``, a regime with the suite's data seed, both with ``data_seed`` when it is given."""
    trees = {}
    for name in names:
        preset, drawn = synthetic_preset(name, seed)
        drawn = drawn if data_seed is None else data_seed
        trees[f"synthetic {name}"] = generate_recorded(preset, work / "synth" / f"{name}-data-seed-{drawn}", drawn)
    return trees


def real_tree(work: Path) -> Path | None:
    if not (REAL / "unpack.py").is_file():
        print(f"realism: {REAL} is absent: the real column is skipped")
        return None
    root = work / "realtoycar"
    if not (root / "dev_data").is_dir():
        subprocess.run([sys.executable, str(REAL / "unpack.py"), str(root)], check=True)
    return root


def dataset_trees(work: Path, synthetic: list[str], real: bool, seed: int) -> dict[str, Path]:
    """Name -> root of the real folder (when ``real`` and present) and of each synthetic preset/regime."""
    trees: dict[str, Path] = {}
    if real and (root := real_tree(work)) is not None:
        trees["real ToyCar (DCASE 2023 dev, 609 + 100 clips)"] = root
    trees.update(synthetic_trees(work, synthetic, seed))
    return trees


def spectrogram_picture(trees: dict[str, Path], out: Path, machine: str = "ToyCar") -> Path:
    """One row per tree: a source normal, a source anomaly, a target normal and a target anomaly
    test clip of ``machine`` (the first of each, by name), log-Mel dB on one colour scale per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(trees), 4, figsize=(18, 3.2 * len(trees)), squeeze=False)
    for row, (name, root) in zip(axes, trees.items()):
        base = tree_base(root)
        test = [m for m in discover_clips(base).clips if m.machine == machine and m.split == "test" and m.is_labelled]
        cells = [next((m for m in test if (m.domain, m.label) == key), None)
                 for key in (("source", "normal"), ("source", "anomaly"), ("target", "normal"), ("target", "anomaly"))]
        mels = []
        for meta in cells:
            wave, _ = sf.read(str(base / meta.path), dtype="float32", always_2d=True) if meta else (None, None)
            mels.append(log_mel(torch.from_numpy(wave.mean(axis=1)), LOGMEL).numpy() if meta else None)
        top = max(float(np.percentile(m, 99.5)) for m in mels if m is not None)
        for ax, meta, mel in zip(row, cells, mels):
            if mel is None:
                ax.set_axis_off()
                continue
            ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=top - 70, vmax=top,
                      extent=(0, mel.shape[1] * LOGMEL.hop_length / LOGMEL.sample_rate, 0, LOGMEL.n_mels))
            ax.set_title(f"{name}: {meta.domain} {meta.label}\n{meta.attribute or ''}", fontsize=9)
        row[0].set_ylabel("Mel bin")
    for ax in axes[-1]:
        ax.set_xlabel("s")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    plt.close(fig)
    return out


SPREAD_COLUMNS = ["kNN floor", "spectral kNN", "spectral kNN, standardised", "anomaly/within", "domain/anomaly"]


def over_data_seeds(work: Path, names: list[str], seeds: list[int], ae_epochs: int = 0,
                    seed: int = 0) -> dict[str, dict[str, dict]]:
    """Name -> data seed -> the training-free floors (and the AE recipe when ``ae_epochs``, trained
    with ``seed``) and the statistics of that draw."""
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for data_seed in seeds:
        for name, root in synthetic_trees(work, names, 0, data_seed).items():
            print(f"realism: {name}, data seed {data_seed} ...", flush=True)
            rows[name][str(data_seed)] = measure(root, ae_epochs=ae_epochs, seed=seed, untrained=False)
    return dict(rows)


def spread_table(rows: dict[str, dict[str, dict]]) -> str:
    """Floors: mean (min .. max) over data seeds; ratios: median (min .. max), as a draw whose
    anomalies spread no more than its normals has an infinite domain / anomaly; the lead of the
    standardised spectral kNN over the floor on its worst draw; the AE recipe, where some draws
    have it, over those draws (named in its cell)."""
    ae = any("AE recipe" in r for by_seed in rows.values() for r in by_seed.values())
    columns = [*SPREAD_COLUMNS, *(["AE recipe"] if ae else [])]
    lines = ["| dataset | data seeds | " + " | ".join(f"{c} ({'mean' if c in FLOORS else 'median'})" for c in columns)
             + " | standardised - floor, worst draw |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for name, by_seed in rows.items():
        cells = []
        for col in columns:
            have = {seed: r[col] for seed, r in by_seed.items() if col in r}
            if not have:
                cells.append("—")
                continue
            v = np.array(list(have.values()), dtype=float)
            fmt = "{:.1f}" if col in FLOORS else "{:.2f}"
            centre = v.mean() if col in FLOORS else np.median(v)
            cell = f"{fmt.format(centre)} ({fmt.format(v.min())} .. {fmt.format(v.max())})"
            cells.append(cell if len(have) == len(by_seed) else f"{cell}, draws {', '.join(have)}")
        lead = min(r["spectral kNN, standardised"] - r["kNN floor"] for r in by_seed.values())
        lines.append(f"| {name} | {', '.join(by_seed)} | " + " | ".join(cells) + f" | {lead:+.1f} |")
    return "\n".join(lines)


def per_type_table(rows: dict[str, dict[str, dict]]) -> str:
    """Each detector's official score per machine type, mean over the draws that measured it, and
    the detectors ranked by it: a one-type real folder is compared like for like with the same
    machine type of a synthetic dataset, not with a mean over types it does not hold."""
    lines = ["| dataset | machine type | draws | " + " | ".join(FLOORS) + " | ranking |",
             "|---|---|---|" + "---|" * (len(FLOORS) + 1)]
    for name, by_seed in rows.items():
        machines = sorted({m for r in by_seed.values() for m in r.get("kNN floor per machine type", {})})
        for machine in machines:
            means = {}
            for det in FLOORS:
                v = [r[f"{det} per machine type"][machine] for r in by_seed.values()
                     if r.get(f"{det} per machine type", {}).get(machine) is not None]
                if v:
                    means[det] = (float(np.mean(v)), len(v))
            cells = [f"{means[d][0]:.1f}" + ("" if means[d][1] == len(by_seed) else f" ({means[d][1]})")
                     if d in means else "—" for d in FLOORS]
            ranking = " > ".join(d for d, _ in sorted(means.items(), key=lambda kv: -kv[1][0]))
            lines.append(f"| {name} | {machine} | {len(by_seed)} | " + " | ".join(cells) + f" | {ranking} |")
    return "\n".join(lines)


def spread_report(rows: dict[str, dict[str, dict]]) -> str:
    """``data_seeds.md``: the spread over draws, then the detectors per machine type."""
    return (spread_table(rows) + "\n\nPer machine type (mean over draws; a count in brackets: the draws that "
            "measured it):\n\n" + per_type_table(rows) + "\n")


def table(rows: dict[str, dict]) -> str:
    cols = [*FLOORS, *STATS, "within dB", "between dB", "anomaly dB", "domain dB"]
    lines = ["| dataset | clips | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, r in rows.items():
        cells = [f"{r[c]:.1f}" if c in FLOORS and c in r else (f"{r[c]:.2f}" if c in r else "—") for c in cols]
        lines.append(f"| {name} | {r['clips']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "realism")
    p.add_argument("--work", type=Path, default=None, help="where trees are generated (default <out>/work)")
    p.add_argument("--tree", type=Path, action="append", default=[], help="any DCASE-layout tree (repeatable)")
    p.add_argument("--name", action="append", default=[], help="a name for each --tree")
    p.add_argument("--synthetic", nargs="*", default=["demo", "imbalanced", "unseen", "shift", "few"],
                   help="synthetic presets / robustness regimes to measure")
    p.add_argument("--no-real", action="store_true", help="skip the real folder")
    p.add_argument("--ae-epochs", type=int, default=None,
                   help="the recipe's 100 (default); 0 skips the AE; with --data-seeds the default is 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", action="store_true",
                   help="measure the datasets named now again, even when realism.json has them (others are kept)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=None,
                   help="measure the training-free floors of each synthetic dataset over these data seeds "
                        "(writes data_seeds.{json,md}; nothing else is measured)")
    p.add_argument("--picture", type=Path, default=None,
                   help="also draw real and synthetic ToyCar spectrograms side by side into this PNG")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    work = a.work or a.out / "work"
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = {"commit": commit_id(), "date": time.strftime("%Y-%m-%d")}  # per row: a file mixes runs
    if a.data_seeds:
        spread_path = a.out / "data_seeds.json"
        saved = json.loads(spread_path.read_text()) if spread_path.is_file() else {}
        spread = {name: {seed: row for seed, row in by_seed.items()  # datasets not measured now keep their rows
                         if current(name, row, f"{spread_path.name}, data seed {seed}")}
                  for name, by_seed in saved.get("rows", {}).items()}
        for name, by_seed in over_data_seeds(work, a.synthetic, a.data_seeds, a.ae_epochs or 0, a.seed).items():
            kept = spread.get(name, {})  # draws measured before (the AE's among them) stay unless measured now
            spread[name] = {**kept, **{seed: {**row, **stamp, "data": data_record(name)} for seed, row in by_seed.items()}}
        spread = {name: by_seed for name, by_seed in spread.items() if by_seed}
        spread_path.write_text(json.dumps({"machine": platform.platform(), **stamp, "rows": spread}, indent=1))
        text = spread_report(spread)
        (a.out / "data_seeds.md").write_text(text)
        print(text)
        return 0
    a.ae_epochs = 100 if a.ae_epochs is None else a.ae_epochs
    trees = dataset_trees(work, a.synthetic, not a.no_real, a.seed)
    for i, t in enumerate(a.tree):
        trees[a.name[i] if i < len(a.name) else str(t)] = t
    if a.picture is not None:
        print(spectrogram_picture({k: v for k, v in trees.items() if not k.startswith("synthetic ")
                                   or k in ("synthetic demo",)}, a.picture))
    path = a.out / "realism.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    settings = {"ae_epochs": a.ae_epochs, "seed": a.seed}
    rows = {k: v for k, v in saved.get("rows", {}).items()
            if saved.get("settings") == settings and current(k, v, path.name)}
    generated = {f"synthetic {n}" for n in a.synthetic} - set(a.name)
    for name, root in trees.items():
        if "spectral kNN, standardised" in rows.get(name, {}) and not a.redo:  # older rows lack that column
            continue
        print(f"realism: {name} ...", flush=True)
        rows[name] = {**measure(root, a.ae_epochs, a.seed), **stamp,
                      **({"data": data_record(name)} if name in generated else {})}
        path.write_text(json.dumps({"settings": settings, "machine": platform.platform(), **stamp, "rows": rows},
                                   indent=1))
        print(table({name: rows[name]}), flush=True)
    (a.out / "realism.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
