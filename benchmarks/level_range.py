"""Within-clip level range: how far a machine's own sound stands out of its background over a clip.

For every clip, the level of non-overlapping 10 ms frames (dB RMS) and the spread of those levels,
95th minus 5th percentile (dB). A machine that dominates its recording and sounds intermittently
(a valve's clicks, a slide's strokes) gives a large range; one buried in factory noise, or running
steadily, a small one. Per machine type: the median and the 10th-90th percentiles over the clips.

It measures what `benchmarks/realism.py` does not: that script's statistics are of the time-averaged
spectrum and of frame-to-frame steps, and the real valve clips (eight, in a flat folder) have no
training split for its detectors. The synthetic valve's machine-to-background ratio is calibrated
with it (docs/synthetic-data.md, "Calibration").

    .venv/bin/python benchmarks/level_range.py ../shared/real_audio /tmp/demo/dev_data
    .venv/bin/python benchmarks/level_range.py TREE --json out.json

A path is a DCASE-layout tree (``<machine>/<split>/*.wav``, or its parent holding ``dev_data``)
or a flat folder of clips (one group, named after the folder). ``--split test`` (default) reads
the test clips of a tree; ``all`` every clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from asd.metadata import discover_clips  # noqa: E402

FRAME_S = 0.010
PERCENTILES = (5.0, 95.0)


def frame_levels_db(x: np.ndarray, frame: int) -> np.ndarray:
    """RMS level in dB of each whole non-overlapping frame of ``frame`` samples (a silent frame: -200)."""
    n = len(x) // frame
    if n == 0:
        raise ValueError(f"a clip of {len(x)} samples holds no {frame}-sample frame")
    power = np.mean(np.square(x[:n * frame].astype(np.float64)).reshape(n, frame), axis=1)
    return 10.0 * np.log10(np.maximum(power, 1e-20))


def level_range_db(x: np.ndarray, sample_rate: int) -> float:
    """95th minus 5th percentile of the clip's 10 ms frame levels (dB)."""
    levels = frame_levels_db(x, max(1, round(FRAME_S * sample_rate)))
    lo, hi = np.percentile(levels, PERCENTILES)
    return float(hi - lo)


def clips_by_group(path: Path, split: str) -> dict[str, list[Path]]:
    """Machine type -> clip files of a DCASE tree; or folder name -> every clip of a flat folder."""
    base = path / "dev_data" if (path / "dev_data").is_dir() else path
    flat = sorted(p for p in base.iterdir() if p.suffix.lower() in (".wav", ".flac") and p.is_file())
    if flat:
        return {base.name: flat}
    groups = defaultdict(list)
    for meta in discover_clips(base).clips:
        if split == "all" or meta.split == split:
            groups[meta.machine].append(base / meta.path)
    if not groups:
        raise SystemExit(f"{path}: no clips found (a DCASE tree or a folder of .wav/.flac files)")
    return dict(sorted(groups.items()))


def measure(path: Path, split: str = "test") -> dict[str, dict]:
    out = {}
    for group, files in clips_by_group(path, split).items():
        ranges = []
        for f in files:
            x, sr = sf.read(str(f), dtype="float32", always_2d=True)
            ranges.append(level_range_db(x.mean(axis=1), sr))
        v = np.asarray(ranges)
        out[group] = {"clips": len(v), "median dB": float(np.median(v)), "p10 dB": float(np.percentile(v, 10)),
                      "p90 dB": float(np.percentile(v, 90)), "min dB": float(v.min()), "max dB": float(v.max())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", type=Path, nargs="+", help="DCASE trees or flat folders of clips")
    p.add_argument("--split", choices=("test", "train", "all"), default="test")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    rows = {str(path): measure(path, a.split) for path in a.paths}
    print("| data | group | clips | level range dB, median (p10 .. p90) | min .. max |")
    print("|---|---|---|---|---|")
    for path, groups in rows.items():
        for group, r in groups.items():
            print(f"| {path} | {group} | {r['clips']} | {r['median dB']:.1f} ({r['p10 dB']:.1f} .. {r['p90 dB']:.1f}) "
                  f"| {r['min dB']:.1f} .. {r['max dB']:.1f} |")
    if a.json is not None:
        a.json.write_text(json.dumps({"split": a.split, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
