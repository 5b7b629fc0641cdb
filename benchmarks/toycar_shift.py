"""Which change to the synthetic toy car gives its target domain the real folder's pattern?

On the real DCASE 2023 ToyCar folder the log-Mel statistics see through the domain shift (kNN floor
target AUC 53.6) and only the untrained network fails there (33.8); on the synthetic toy car of
``demo`` the floor fails there too (benchmarks/ranking.py, BENCHMARKS.md "Which pairs the real
folder settles"). This script generates the ``demo`` toy car alone under a few variants and runs the
training-free detectors of benchmarks/realism.py on each draw: official score, source and target AUC.

Variants: ``demo`` as it is; DCASE's 10 target training clips per section; 200 source clips as
well (the real folder has 599); and section 00 laid out as the real folder (source car models B, C
and D at 31, 34 and 40 V and microphone 1, target car models A and E at 28 and 37 V and microphone 2,
10 target clips), with and without the microphone change; the car started and stopped within
each clip as the real folder's clips are (``ToyCar.run``), also with the target domain 3 dB further
under the factory noise (the real target clips' level varies less over the clip); the hidden operating states of
``REAL_SOUND`` weaker or off; the anomalies sounding through the whole clip, not over a stretch
of it; anomalies of strength 0, a control (the test clips labelled anomalous carry no anomaly:
what the metric gives under the domain shift alone); and a worn gear's steady tone line
(``ToyCar``'s ``worn-gear``) as the only anomaly, as a tone line marks the real folder's source
anomaly in docs/realism_spectrograms.png, at ``demo``'s strengths and 10 dB louder, with the car
started and stopped within the clip and with section 00 laid out as the real folder; each of the
four kinds the generator draws as the only one; and section 00 alone at the real folder's size
(600 source and 10 target training clips, 25 test clips per group), with ``demo``'s layout, with
the real folder's 18 source and 8 target attribute classes, and with those and the loud worn gear;
the car models and voltages moving the sound less (``ToyCar.attribute_effect``), and the tone
lines 10 dB lower (``ToyCar.line_db``; the anomalies then stand that much further out of the
quieter car), at ``demo``'s size and the tone lines at the real folder's as well; the worn gear's
tone line at 300-800 Hz and 1-2 kHz (``ToyCar.worn_gear_hz``) and louder; an eccentric gear
(``eccentric-gear``: every tone line swelling once per gear revolution) at ``demo``'s strengths
and at full depth; and the eccentric gear with the 1-2 kHz tone line (``GEAR_WEAR``) at ``demo``'s
size and the real folder's. A variant that changes the toy car's layout or settings is generated in
this process (the worker processes would not see it), every variant under its own folder name,
once (``generate_variant``). Besides the detectors, each section's attribute accuracy
(``realism.attribute_accuracy``: how far the attributes move the floor's log-Mel statistics
against the clip-to-clip spread) and each detector's AUCs within a domain (a domain's normals
against its own anomalies; a second table). ``--real`` measures the real folder the same way, as
the reference rows: as it is, and with ``demo``'s number of training clips (50 source and 5
target) drawn from it once per data seed, the real sound at the synthetic preset's size.

    .venv/bin/python benchmarks/toycar_shift.py --data-seeds 0 1 2 3 4 --real

Writes ``<out>/toycar_shift.{json,md}``; the rows are written after every draw, and a draw already
saved is not measured again (``--redo`` measures it again).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import realism  # noqa: E402  (benchmarks/ is on sys.path)
from asd import metrics as M  # noqa: E402
from common import commit_id, publish, read_rows, write_rows  # noqa: E402
from pipelines.synth.generate import PRESETS, REAL_SOUND, generate  # noqa: E402
from pipelines.synth.machines import MACHINES, _spec  # noqa: E402

# section 00 as the real folder lays it out (../shared/data/realtoycar: its attribute strings)
REAL_LAYOUT = _spec("car model and microphone", ("car", "spd", "mic"), [["B1", "C1", "D1"], ["31V", "34V", "40V"], ["1"]],
                    [["A1", "E1"], ["28V", "37V"], ["2"]])
# the same with each car model's two variants (B1 and B2, ...): the real folder's 18 source and 8
# target attribute classes
REAL_CLASSES = _spec("car model and microphone", ("car", "spd", "mic"),
                     [["B1", "B2", "C1", "C2", "D1", "D2"], ["31V", "34V", "40V"], ["1"]],
                     [["A1", "A2", "E1", "E2"], ["28V", "37V"], ["2"]])
# section 00 alone at the real folder's size: 600 source and 10 target training clips, 25 test clips per group
REAL_SIZE = {"source_train": 600, "target_train": 10, "test_per_group": 25, "dev_sections": ("00",)}
REAL_CARS = _spec("car model", ("car", "spd"), [["B1", "C1", "D1"], ["31V", "34V", "40V"]], [["A1", "E1"], ["28V", "37V"]])
# the real folder's clips: the car starts 0.5-1.5 s into 12 s, reaches full speed about 3 s later,
# slows from about 8.7 s and stops 1.5 s later (the clips' level over time), as fractions of a clip
REAL_RUN = (0.15, 0.25, 0.72, 0.12)
WORN_GEAR = {"anomalies": ("worn-gear",)}  # the worn gear's tone line the only anomaly
# the worn gear's tone line at 300-800 Hz or 1-2 kHz, the only anomaly
WORN_GEAR_LOW = {**WORN_GEAR, "worn_gear_hz": (300.0, 800.0)}
WORN_GEAR_1_2K = {**WORN_GEAR, "worn_gear_hz": (1000.0, 2000.0)}
# an eccentric gear's swelling tone lines and a worn gear's tone line at 1-2 kHz, the two kinds
GEAR_WEAR = {**WORN_GEAR_1_2K, "anomalies": ("eccentric-gear", "worn-gear")}


class Variant(NamedTuple):
    """Preset overrides, the toy car's section 00 layout (None: the generator's own) and the toy
    car's own settings (``ToyCar``'s class attributes: ``run``, ``anomalies``, ``attribute_effect``,
    ``line_db``, ``worn_gear_hz``)."""

    overrides: dict
    layout: tuple | None = None
    car: dict | None = None


VARIANTS = {
    "demo as it is": Variant({}),
    "10 target clips": Variant({"target_train": 10}),
    "200 source and 10 target clips": Variant({"source_train": 200, "target_train": 10}),
    "section 00 laid out as the real folder": Variant({"target_train": 10, "dev_sections": ("00",)}, REAL_LAYOUT),
    "the same, one microphone": Variant({"target_train": 10, "dev_sections": ("00",)}, REAL_CARS),
    "started and stopped within the clip": Variant({}, car={"run": REAL_RUN}),
    "the same, the target domain 3 dB further under the noise": Variant({"target_snr_offset_db": -3.0}, car={"run": REAL_RUN}),
    "hidden states colouring 3 dB, clips 1 dB": Variant({"difficulty": replace(REAL_SOUND, state_db=3.0, clip_db=1.0)}),
    "no hidden states or clip colouring": Variant({"difficulty": replace(REAL_SOUND, hidden_states=0, clip_db=0.0)}),
    "anomalies through the whole clip": Variant({"difficulty": replace(REAL_SOUND, anomaly_duty=(1.0, 1.0))}),
    "anomalies of strength 0 (a control)": Variant({"anomaly_strength": (0.0, 0.0)}),
    "the same, through the whole clip": Variant({"anomaly_strength": (0.0, 0.0),
                                                "difficulty": replace(REAL_SOUND, anomaly_duty=(1.0, 1.0))}),
    "a worn gear's tone line the only anomaly": Variant({}, car=WORN_GEAR),
    "the same, started and stopped within the clip": Variant({}, car={"run": REAL_RUN, **WORN_GEAR}),
    "a worn gear's tone line 10 dB louder": Variant({"anomaly_strength": (0.79, 3.16)}, car=WORN_GEAR),
    "the loud worn gear, section 00 laid out as the real folder": Variant(
        {"anomaly_strength": (0.79, 3.16), "target_train": 10, "dev_sections": ("00",)}, REAL_LAYOUT, WORN_GEAR),
    "the same, started and stopped within the clip as well": Variant(
        {"anomaly_strength": (0.79, 3.16), "target_train": 10, "dev_sections": ("00",)}, REAL_LAYOUT,
        {"run": REAL_RUN, **WORN_GEAR}),
    **{f"{kind} the only anomaly": Variant({}, car={"anomalies": (kind,)})
       for kind in ("flat-tire", "gear-chip", "bent-shaft", "brush-spark")},
    "section 00 at the real folder's size": Variant(REAL_SIZE),
    "section 00 laid out as the real folder, its 26 attribute classes and its size": Variant(REAL_SIZE, REAL_CLASSES),
    "the same, with the loud worn gear": Variant({**REAL_SIZE, "anomaly_strength": (0.79, 3.16)}, REAL_CLASSES, WORN_GEAR),
    "car models and voltages at 0.3 of their effect": Variant({}, car={"attribute_effect": 0.3}),
    "the tone lines 10 dB lower": Variant({}, car={"line_db": -10.0}),
    "section 00 laid out as the real folder, its 26 attribute classes and its size, the tone lines 10 dB lower":
        Variant(REAL_SIZE, REAL_CLASSES, {"line_db": -10.0}),
    "a worn gear's tone line at 300-800 Hz the only anomaly": Variant({}, car=WORN_GEAR_LOW),
    "the same, 10 dB louder": Variant({"anomaly_strength": (0.79, 3.16)}, car=WORN_GEAR_LOW),
    "a worn gear's tone line at 1-2 kHz, 10 dB louder": Variant({"anomaly_strength": (0.79, 3.16)},
                                                                car=WORN_GEAR_1_2K),
    "the same, 20 dB louder": Variant({"anomaly_strength": (2.5, 10.0)}, car=WORN_GEAR_1_2K),
    "an eccentric gear's sidebands the only anomaly": Variant({}, car={"anomalies": ("eccentric-gear",)}),
    "the eccentric gear at full depth": Variant({"anomaly_strength": (2.0, 2.0)}, car={"anomalies": ("eccentric-gear",)}),
    "the eccentric gear and the 1-2 kHz tone line, 10 dB louder": Variant({"anomaly_strength": (0.79, 3.16)}, car=GEAR_WEAR),
    "the same, section 00 laid out as the real folder, its 26 attribute classes and its size": Variant(
        {**REAL_SIZE, "anomaly_strength": (0.79, 3.16)}, REAL_CLASSES, GEAR_WEAR),
}
DETECTORS = {"kNN floor": realism.knn_floor, "spectral kNN": realism.spectral_knn,
             "spectral kNN, standardised": lambda tr, te: realism.spectral_knn(tr, te, "standardised_euclidean"),
             "untrained network": lambda tr, te: realism.untrained_network(tr, te, 0)}
COLUMNS = ("Overall", "Source AUC", "Target AUC")
# each domain's normals against its own anomalies (realism.GROUPS): what a domain's AUC
# holds besides the domain shift
WITHIN = ("source normal < source anomaly", "target normal < target anomaly")
VARIANT_RECORD = "toycar_variant.txt"  # the toy car's settings a variant's tree was generated with
REAL_ROW = "real ToyCar (the real folder, for reference)"
# the real folder with demo's training clips per section (50 source, 5 target), drawn per data seed
REAL_AT_DEMO_SIZE = "real ToyCar, demo's number of training clips drawn from it"


@contextmanager
def toy_car(v: Variant):
    """The toy car's section 00 laid out and its settings as ``v`` says while the block runs."""
    car = MACHINES["ToyCar"]
    settings = {"specs": (v.layout, *car.specs[1:])} if v.layout is not None else {}
    settings.update(v.car or {})
    kept = {name: getattr(car, name) for name in settings}
    for name, value in settings.items():
        setattr(car, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(car, name, value)


def training_draw(metas: list, source: int, target: int, seed: int) -> list:
    """``metas`` with, in every section, ``source`` source and ``target`` target training clips
    drawn without replacement (seeded); every test clip kept."""
    rng = np.random.default_rng(seed)
    kept = [m for m in metas if m.split == "test"]
    for section in sorted({m.section for m in metas}):
        for domain, n in (("source", source), ("target", target)):
            pool = [m for m in metas if m.split == "train" and m.section == section and m.domain == domain]
            if len(pool) < n:
                raise SystemExit(f"section {section}: {len(pool)} {domain} training clips, fewer than the {n} drawn")
            kept += [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
    return kept


def generate_variant(v: Variant, preset, root: Path, seed: int) -> None:
    """The tree of ``v`` under ``root``, generated once. The toy car's settings are not in the
    generator's own record (``synth.json``), so ``VARIANT_RECORD`` keeps them: a tree made for other
    settings, or before they were recorded, stops the run with one line."""
    record, settings = root / VARIANT_RECORD, repr((v.layout, sorted((v.car or {}).items())))
    if (root / "dev_data").is_dir():
        if not record.is_file() or record.read_text() != settings:
            raise SystemExit(f"{root} was generated for other toy-car settings (or before they were recorded); "
                             "remove the folder to generate it again")
    else:  # recorded first: an interrupted generation goes on where it stopped on the next run
        root.mkdir(parents=True, exist_ok=True)
        record.write_text(settings)
    try:
        with toy_car(v):  # generated in this process: worker processes would not see the settings
            generate(preset, root, seed=seed, workers=1 if v.layout is not None or v.car else None)
    except ValueError as err:  # a tree of another seed or preset
        raise SystemExit(str(err)) from None


def measure(root: Path, draw: tuple[int, int, int] | None = None
            ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Each detector's official score and AUCs, and per section the source-to-target distance of
    the mean log-Mel spectra (realism.py's domain shift, dB), the kNN floor's target AUC and the
    attribute accuracy. ``draw`` = (source, target, seed): only that many training clips
    (``training_draw``)."""
    results = {k: [] for k in DETECTORS}
    per_section, scored = {}, []
    for metas in realism.labelled_by_machine(root).values():
        clips = realism.load_clips(root, metas if draw is None else training_draw(metas, *draw))
        for (machine, section), group in realism.sections(clips).items():
            train, test = realism.parts(group)
            scored.append({"machine": machine, "section": section, "scores": {},
                           "anomaly": [int(c["meta"].label == "anomaly") for c in test],
                           "target": [int(c["meta"].domain == "target") for c in test]})
            for name, detect in DETECTORS.items():
                scored[-1]["scores"][name] = np.asarray(detect(train, test), dtype=np.float64)
                results[name].append(realism.result(machine, section, test, scored[-1]["scores"][name]))
            per_section[section] = {"domain dB": float(np.sqrt(realism.section_statistics(train, test)["domain_sq"])),
                                    "kNN floor target AUC": 100 * results["kNN floor"][-1].auc_target,
                                    "attribute accuracy": 100 * realism.attribute_accuracy(train)}
    scores = {name: {**{k: 100 * float(M.paper_row(r, method=name)[k]) for k in COLUMNS},
                     **{g: v for g, v in realism.group_aucs(scored, name).items() if g in WITHIN}}
              for name, r in results.items()}
    return scores, per_section


def table(rows: dict[str, dict]) -> str:
    """Per variant: each detector's mean over the draws, official (source / target AUC), and the
    attribute accuracy of the sections' source clips (``realism.attribute_accuracy``; "—" for
    rows measured before it was); then each detector's AUCs within a domain (rows that have them)."""
    head = ["variant", "data seeds", *DETECTORS, "attribute accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    inner = ["| " + " | ".join(["variant", *DETECTORS]) + " |", "|" + "---|" * (len(DETECTORS) + 1)]
    for variant in [*VARIANTS, REAL_ROW, REAL_AT_DEMO_SIZE]:
        rs = [r for r in rows.values() if r["variant"] == variant]
        if not rs:
            continue
        cells = [variant, ", ".join(str(r["data_seed"]) for r in rs if r["data_seed"] is not None)]
        for d in DETECTORS:
            mean = {k: np.mean([r["scores"][d][k] for r in rs]) for k in COLUMNS}
            cells.append(f"{mean['Overall']:.1f} ({mean['Source AUC']:.0f} / {mean['Target AUC']:.0f})")
        accuracy = [s["attribute accuracy"] for r in rs for s in r.get("sections", {}).values()
                    if "attribute accuracy" in s]
        cells.append(f"{np.mean(accuracy):.0f} %" if accuracy else "—")
        lines.append("| " + " | ".join(cells) + " |")
        if all(WITHIN[0] in r["scores"][d] for r in rs for d in DETECTORS):  # rows measured before it have none
            inner.append("| " + " | ".join([variant, *(" / ".join(
                f"{np.mean([r['scores'][d][g] for r in rs]):.0f}" for g in WITHIN) for d in DETECTORS)]) + " |")
    return "\n".join(lines) + "\n\nEach domain's normal test clips against its own anomalies (AUC in %, mean over " \
        "the sections and draws; source / target):\n\n" + "\n".join(inner) + "\n"


def record(rows: dict, saved: Path, key: str, variant: str, seed: int | None, root: Path, t0: float,
           draw: tuple[int, int, int] | None = None) -> None:
    """Measure ``root`` (``draw``: as ``measure``) into ``rows[key]``, print its scores and write
    the rows to ``saved`` (after every draw: an interrupted run keeps what it measured)."""
    scores, per_section = measure(root, draw)
    rows[key] = {"variant": variant, "data_seed": seed, "scores": scores, "sections": per_section,
                 "seconds": round(time.perf_counter() - t0, 1), "commit": commit_id(), "date": time.strftime("%Y-%m-%d")}
    print(f"{key}: " + "  ".join(f"{d} {s['Overall']:.1f} ({s['Source AUC']:.0f}/{s['Target AUC']:.0f})"
                                 for d, s in scores.items()), flush=True)
    write_rows(saved, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "toycar-shift")
    p.add_argument("--work", type=Path, default=Path("/tmp/toycar-shift"), help="where trees are generated")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    p.add_argument("--data-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--redo", action="store_true",
                   help="measure the draws of the variants named (and with --real the real folder's rows) again, "
                        "even when saved; a variant's tree is generated once")
    p.add_argument("--real", action="store_true",
                   help="measure the real folder as well (the reference rows: as it is, and with demo's number of "
                        "training clips drawn from it once per data seed; skipped when the folder is absent)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    saved = a.out / "toycar_shift.json"
    rows = read_rows(saved)
    a.out.mkdir(parents=True, exist_ok=True)
    for variant in a.variants:
        v = VARIANTS[variant]
        preset = replace(PRESETS["demo"], machines=("ToyCar",), **v.overrides)
        slug = "-".join(variant.replace(",", "").split())
        for seed in a.data_seeds:
            if f"{variant}, data seed {seed}" in rows and not a.redo:
                continue
            t0 = time.perf_counter()
            root = a.work / f"{slug}-data-seed-{seed}"
            generate_variant(v, preset, root, seed)
            record(rows, saved, f"{variant}, data seed {seed}", variant, seed, root, t0)
    root = realism.real_tree(a.work) if a.real else None
    if root is not None and (REAL_ROW not in rows or a.redo):
        record(rows, saved, REAL_ROW, REAL_ROW, None, root, time.perf_counter())
    demo = PRESETS["demo"]
    for seed in a.data_seeds if root is not None else []:
        key = f"{REAL_AT_DEMO_SIZE}, data seed {seed}"
        if key not in rows or a.redo:
            record(rows, saved, key, REAL_AT_DEMO_SIZE, seed, root, time.perf_counter(),
                   (demo.source_train, demo.target_train, seed))
    publish(a.out / "toycar_shift.md", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
