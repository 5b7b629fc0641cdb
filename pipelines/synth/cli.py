"""``asd synth``: synthetic machine sounds in the DCASE 2022 Task 2 layout (docs/synthetic-data.md).

Generation: ``asd synth --preset demo --out data/demo [--eval] [overrides]`` writes
``data/demo/dev_data/`` (and ``eval_data/`` plus ground truth); files that exist are kept.
Data drop: ``asd synth --out data/demo --drop target --count 5`` adds new clips to an existing tree.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from pipelines.synth.generate import DEFAULT_SNR_DB, DEFAULT_STRENGTH, DROP_KINDS, PRESETS, add_drop, generate
from pipelines.synth.machines import MACHINE_TYPES, Difficulty


def _names(values: list[str] | None) -> tuple[str, ...] | None:
    """Space- and/or comma-separated names."""
    return None if values is None else tuple(x for v in values for x in v.split(",") if x)


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="generate synthetic machine sounds in the DCASE 2022 layout",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="size preset (default: demo)")
    p.add_argument("--out", required=True, help="root folder that holds / will hold dev_data/")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0); same seed -> identical files")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    p.add_argument("--eval", action="store_true", dest="eval_data",
                   help="also write eval_data/ (unlabelled test names) and ground_truth_data/, ground_truth_domain/")
    g = p.add_argument_group("preset overrides")
    g.add_argument("--machines", nargs="+", metavar="TYPE", help=f"machine types, from {', '.join(MACHINE_TYPES)}")
    g.add_argument("--sections", nargs="+", metavar="XX", help="dev section ids, e.g. 00 01 02")
    g.add_argument("--eval-sections", nargs="+", metavar="XX", help="eval section ids, e.g. 03 04 05")
    g.add_argument("--seconds", type=float, help="clip length in seconds")
    g.add_argument("--source-train", type=int, help="source-domain train clips per section")
    g.add_argument("--target-train", type=int, help="target-domain train clips per section")
    g.add_argument("--test-per-group", type=int, help="test clips per (domain, label) and section")
    g.add_argument("--anomaly-strength", nargs=2, type=float, metavar=("LO", "HI"),
                   help="anomaly strength range, 0 none .. 1 obvious "
                        f"(default {DEFAULT_STRENGTH[0]:g} {DEFAULT_STRENGTH[1]:g}; a drop: the tree's own)")
    g.add_argument("--snr", nargs=2, type=float, metavar=("LO", "HI"),
                   help="machine-to-background ratio range in dB "
                        f"(default {DEFAULT_SNR_DB[0]:g} {DEFAULT_SNR_DB[1]:g}; a drop: the tree's own)")
    g.add_argument("--easy", action="store_true",
                   help="without the real-sound factors (hidden operating states, time-limited anomalies, background "
                        "events, the valve under its background, the changed resonance as every type's anomaly "
                        "instead of its own kinds; docs/synthetic-data.md, 'Difficulty'): the generator before "
                        "it was calibrated")
    d = p.add_argument_group("data drop (adds clips to an existing dev_data tree instead of generating)")
    d.add_argument("--drop", choices=DROP_KINDS,
                   help="target: more target train clips per section; attribute: a new target attribute value "
                        "per section; section: a new section per machine type")
    d.add_argument("--count", type=int, default=10, help="clips per section in the drop (default 10)")
    p.set_defaults(func=main)


def main(args) -> int:
    strength = tuple(args.anomaly_strength) if args.anomaly_strength else None
    snr = tuple(args.snr) if args.snr else None
    try:
        if args.drop:
            t0 = time.perf_counter()
            out = add_drop(args.out, args.drop, args.count, seed=args.seed, workers=args.workers,
                           strength=strength, snr_db=snr)
            seconds = time.perf_counter() - t0
            wavs = [f for f in out if f.endswith(".wav")]
            print(f"drop '{args.drop}': {len(wavs)} clips written in {seconds:.1f} s "
                  f"({len(wavs) / max(seconds, 1e-9):.1f} clips/s); attribute tables touched: {len(out) - len(wavs)}")
            return 0
        overrides = {k: v for k, v in dict(
            machines=_names(args.machines), dev_sections=_names(args.sections),
            eval_sections=_names(args.eval_sections), seconds=args.seconds, source_train=args.source_train,
            target_train=args.target_train, test_per_group=args.test_per_group, anomaly_strength=strength,
            snr_db=snr, difficulty=Difficulty() if args.easy else None).items() if v is not None}
        preset = dataclasses.replace(PRESETS[args.preset], **overrides)
        s = generate(preset, args.out, seed=args.seed, workers=args.workers, eval_data=args.eval_data)
    except (ValueError, FileNotFoundError) as err:
        print(f"asd synth: error: {err}", file=sys.stderr)
        return 2
    for where, n in sorted(s.counts.items()):
        print(f"  {where}: {n} clips")
    print(f"synth '{preset.name}': {s.written} clips written ({s.skipped} existed) in {s.seconds:.1f} s, "
          f"{s.clips_per_s:.1f} clips/s -> {args.out}")
    return 0
