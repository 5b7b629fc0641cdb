"""What each detector sees in real normal sound: simple anomalies implanted in a tree's normal test
clips, scored within each domain.

On the real toy car the untrained network is at chance within each domain (AUC 50 / 47 at `demo`'s
size) where the kNN floor finds the anomalies (61 / 62), and on every synthetic type but the valve it sees
them about as well as the floor (``anomaly_kinds.py --domains``). This script asks which kinds of
change the detectors see on real normal clips: each normal test clip of a section gets an implanted
copy, and each detector scores the originals against the copies within a domain (AUC in %, the
section's training clips as reference, mean over sections and draws). The implants:

* ``clicks``: a click train, 8 per second with jitter, ringing a resonance at 2.5-4 kHz;
* ``tone``: one steady sinusoid at 1-2 kHz;
* ``band``: steady noise at 3-7 kHz;
* ``am``: the whole clip amplitude-modulated at 3 Hz;
* ``speed``: the whole clip played faster (every tone line moves up);
* ``resonance``: the whole clip through a peak filter at 0.5-4 kHz (Q 2): a resonance of the
  machine's body or its transfer path changed, multiplicative where the others add a sound.

Level: for the three added sounds, their RMS against the clip's in dB; for ``am`` the modulation
depth in dB (-10: 0.32); for ``speed`` the speed-up in per cent; for ``resonance`` the peak's gain
in dB. The same clips are implanted on the real folder (its training clips drawn to `demo`'s 50
source / 5 target per draw, ``--draw``) and on ``demo``'s trees, so the two columns differ by their
normal sound alone.

    .venv/bin/python benchmarks/implant.py --implants tone:-20 tone:-30 clicks:-16 am:-10

Writes ``<out>/implant.{json,md}``; rows of other (dataset, implant) keys are kept.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import realism  # noqa: E402  (benchmarks/ is on sys.path)
from common import commit_id, publish, read_rows, write_rows  # noqa: E402
from toycar_shift import training_draw  # noqa: E402

from asd.knn import spectrum_shape  # noqa: E402
from pipelines.synth.machines import SR, Ctx, peak, resonate, unit_rms  # noqa: E402

KINDS = ("clicks", "tone", "band", "am", "speed", "resonance")
DETECTORS = {"kNN floor": realism.knn_floor, "untrained network": lambda tr, te: realism.untrained_network(tr, te, 0),
             "spectral kNN, standardised": lambda tr, te: realism.spectral_knn(tr, te, "standardised_euclidean")}
DOMAINS = ("source", "target")


def implant(wave: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """``wave`` with one implanted anomaly of ``kind`` at ``level`` (see the module's docstring)."""
    n, t = len(wave), np.arange(len(wave)) / SR
    if kind == "am":
        swell = np.cos(2 * np.pi * (3 * t + rng.random()))
        return (wave * (1 + 10 ** (level / 20) * swell)).astype(np.float32)
    if kind == "speed":  # read the clip at 1 + level/100 samples per sample, wrapping at its end
        return np.interp(np.arange(n) * (1 + level / 100), np.arange(n), wave, period=n).astype(np.float32)
    if kind == "resonance":
        f = np.fft.rfftfreq(n, 1 / SR)
        return np.fft.irfft(np.fft.rfft(wave) * peak(f, float(rng.uniform(500, 4000)), 2.0, level), n).astype(np.float32)
    c = Ctx(n, rng)
    if kind == "clicks":
        starts = np.arange(0, n, SR // 8)
        added = resonate(c.impulses(starts + rng.integers(0, SR // 40, len(starts)), 1.0),
                         [(float(rng.uniform(2500, 4000)), 0.003, 1.0)])
    elif kind == "tone":
        added = np.sin(2 * np.pi * rng.uniform(1000, 2000) * t + 2 * np.pi * rng.random())
    elif kind == "band":
        added = c.noise(("band", 3000, 7000, 3))
    else:
        raise ValueError(f"unknown implant {kind!r}: one of {', '.join(KINDS)}")
    rms = np.sqrt(np.mean(np.square(wave, dtype=np.float64)))
    return (wave + unit_rms(np.asarray(added, np.float32)) * rms * 10 ** (level / 20)).astype(np.float32)


def parse_implant(text: str) -> tuple[str, float]:
    kind, _, level = text.partition(":")
    if kind not in KINDS or not level:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:LEVEL with KIND one of {', '.join(KINDS)}")
    return kind, float(level)


def fronts(wave: np.ndarray) -> dict:
    w = torch.from_numpy(wave)
    return {"logmel": realism.log_mel(w, realism.LOGMEL), "inverted": realism.log_mel(w, realism.INVERTED),
            "spectrum_shape": spectrum_shape(realism.log_mel(w, realism.SPECTRUM))}


def within_domains(test: list[dict], implanted: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Domain -> AUC (%) of that domain's original clips against its implanted copies."""
    domain = np.array([c["meta"].domain for c in test])
    return {d: 100.0 * roc_auc_score(implanted[domain == d], scores[domain == d]) for d in DOMAINS}


def measure(root: Path, machine: str, implants: list[tuple[str, float]], draw: tuple[int, int, int] | None
            ) -> dict[tuple[str, float], dict[str, dict[str, float]]]:
    """Implant -> detector -> domain -> AUC (%), mean over the sections of ``machine`` in ``root``;
    ``draw`` = (source, target, seed) draws that many training clips per section."""
    by_machine = realism.labelled_by_machine(root)
    if machine not in by_machine:
        raise SystemExit(f"implant: {root} holds no {machine!r} clips (it holds {', '.join(by_machine)})")
    metas = by_machine[machine]
    metas = [m for m in (metas if draw is None else training_draw(metas, *draw))
             if m.split == "train" or m.label == "normal"]
    base = realism.tree_base(root)
    waves = {m.path: sf.read(str(base / m.path), dtype="float32", always_2d=True)[0].mean(axis=1) for m in metas}
    clips = [{"meta": m, **fronts(waves[m.path])} for m in metas]
    found: dict = {}
    for (_, section), group in realism.sections(clips).items():
        train, normals = realism.parts(group)
        for kind, level in implants:
            rng = np.random.default_rng(zlib.crc32(repr((section, kind, level)).encode()))
            copies = [{"meta": c["meta"], **fronts(implant(waves[c["meta"].path], kind, level, rng))} for c in normals]
            implanted = np.r_[np.zeros(len(normals)), np.ones(len(copies))]
            for name, detect in DETECTORS.items():
                aucs = within_domains(normals + copies, implanted, np.asarray(detect(train, normals + copies)))
                for d, v in aucs.items():
                    found.setdefault((kind, level), {}).setdefault(name, {}).setdefault(d, []).append(v)
    return {k: {name: {d: float(np.mean(v)) for d, v in per.items()} for name, per in dets.items()}
            for k, dets in found.items()}


def table(rows: dict[str, dict]) -> str:
    """One line per implant, the datasets side by side: each detector's source / target AUC, mean
    over the draws."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows.values()))
    implants = sorted({(r["implant"], r["level"]) for r in rows.values()}, key=lambda k: (KINDS.index(k[0]), -k[1]))
    head = ["implant", "level", *(f"{ds}: {d}" for ds in datasets for d in DETECTORS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, level in implants:
        cells = [kind, f"{level:g}"]
        for ds in datasets:
            rs = [r for r in rows.values() if r["dataset"] == ds and (r["implant"], r["level"]) == (kind, level)]
            cells += [" / ".join(f"{np.mean([r['auc'][d][dom] for r in rs]):.0f}" for dom in DOMAINS) if rs else ""
                      for d in DETECTORS]
        lines.append("| " + " | ".join(cells) + " |")
    draws = {ds: sorted({r["data_seed"] for r in rows.values() if r["dataset"] == ds}) for ds in datasets}
    return ("Original normal test clips against their implanted copies, within each domain: AUC in % (source / "
            "target), mean over the sections and draws (" + "; ".join(f"{ds}: {', '.join(map(str, s))}"
                                                                      for ds, s in draws.items()) + ").\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--implants", type=parse_implant, nargs="+", required=True, metavar="KIND:LEVEL")
    p.add_argument("--machine", default="ToyCar", help="machine type (default ToyCar, the real folder's)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1],
                   help="the real folder's training draws and the demo trees' data seeds")
    p.add_argument("--draw", type=int, nargs=2, default=[50, 5], metavar=("SOURCE", "TARGET"),
                   help="training clips per section drawn from the real folder (default demo's 50 / 5)")
    p.add_argument("--no-real", action="store_true", help="the demo trees alone")
    p.add_argument("--work", type=Path, default=Path("/tmp/realism-seeds"), help="where trees are generated")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "implant")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    a.out.mkdir(parents=True, exist_ok=True)
    saved = a.out / "implant.json"
    rows = read_rows(saved)
    real = None if a.no_real else realism.real_tree(a.work)
    for seed in a.data_seeds:
        trees = {} if real is None else {"real ToyCar": (real, (*a.draw, seed))}
        trees.update({k: (root, None) for k, root in realism.synthetic_trees(a.work, ["demo"], 0, seed).items()})
        for name, (root, draw) in trees.items():
            t0 = time.time()
            for (kind, level), aucs in measure(root, a.machine, a.implants, draw).items():
                rows[f"{name}/{a.machine}/data seed {seed}/{kind} {level:g}"] = {
                    "dataset": name, "machine": a.machine, "data_seed": seed, "implant": kind, "level": level,
                    "draw": draw and list(draw[:2]), "auc": aucs, "seconds": round(time.time() - t0, 1),
                    "commit": commit_id(), "date": time.strftime("%Y-%m-%d")}
                print(f"implant: {name}, data seed {seed}, {kind} {level:g}: " + "  ".join(
                    f"{d} {v['source']:.0f}/{v['target']:.0f}" for d, v in aucs.items()), flush=True)
            write_rows(saved, rows)
    publish(a.out / "implant.md", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
