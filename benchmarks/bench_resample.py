"""Cost of one clip against its sample rate: decode + resample + features (``featurise_clip``).

Each rate runs in a fresh process (so its peak RSS is its own): a 10 s clip of noise at that
rate, WAV bytes in memory, the median of ``--repeat`` timed runs after one warm-up. The issue's
bar: the worst rate costs <= 2x a 48 kHz clip. Rates that are not small ratios of 16 kHz
(16001, 44101, primes) are the ones an exact rational resampler makes expensive.

    .venv/bin/python benchmarks/bench_resample.py [--seconds 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RATES = [8000, 16000, 16001, 22050, 44100, 44101, 48000, 48001, 96000, 99991, 192000]


def one_rate(rate: int, seconds: float, repeat: int) -> dict:
    import soundfile as sf
    import torch

    from asd.audio import resample_ratio
    from asd.features import FeatureConfig
    from pipelines.stages.extract import featurise_clip

    torch.set_num_threads(1)
    buf = io.BytesIO()
    noise = np.random.default_rng(rate).normal(0, 0.1, int(seconds * rate)).astype(np.float32)
    sf.write(buf, noise, rate, format="WAV", subtype="PCM_16")
    data, fcfg = buf.getvalue(), FeatureConfig()
    featurise_clip(data, fcfg)  # warm-up: filter design caches, torch kernels
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        featurise_clip(data, fcfg)
        times.append(time.perf_counter() - t0)
    ratio = resample_ratio(rate, fcfg.sample_rate)
    return {"rate": rate, "ratio": f"{ratio.numerator}/{ratio.denominator}", "seconds": statistics.median(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/resample.json")
    args = ap.parse_args()
    rows = []
    for rate in RATES:  # one fresh process per rate, one at a time
        with ProcessPoolExecutor(max_workers=1) as pool:
            rows.append(pool.submit(one_rate, rate, args.seconds, args.repeat).result())
    ref = next(r for r in rows if r["rate"] == 48000)
    lines = [f"| rate (Hz) | ratio used | ms per {args.seconds:g} s clip | x 48 kHz | peak RSS (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        r["x_48k"] = r["seconds"] / ref["seconds"]
        lines.append(f"| {r['rate']} | {r['ratio']} | {1000 * r['seconds']:.1f} | {r['x_48k']:.2f} | {r['peak_rss_mb']:.0f} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.node(), "date": time.strftime("%Y-%m-%d"),
                                          "seconds": args.seconds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
