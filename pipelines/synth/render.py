"""Example spectrograms of every synthetic machine type: ``python -m pipelines.synth.render --out PNG``.

One row per machine type (section ``--section``): a source-domain normal clip, a target-domain
normal clip, and two kinds of anomaly (source domain) at strength ``--strength``. The normal and
anomalous clips of a row share their random seed, so what differs is the anomaly.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image
from scipy.signal import spectrogram

from pipelines.synth.machines import MACHINE_TYPES, MACHINES, SR, keyed_rng, render_clip


def clip(machine: str, section: str, domain: str, anomaly: str | None, strength: float, snr: float,
         seconds: float, seed: int) -> tuple[np.ndarray, dict]:
    attrs = MACHINES[machine].spec(section).values(domain)[0]
    rng = keyed_rng("render", machine, section, domain, seed=seed)
    y = render_clip(machine, section, attrs, anomaly=anomaly, strength=strength, snr_db=snr, rng=rng,
                    n=int(seconds * SR))
    return y, attrs


def render(out: str | Path, section: str = "00", strength: float = 0.8, snr: float = 6.0, seconds: float = 10.0,
           seed: int = 0) -> Path:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after the backend is chosen, when rendering

    fig, axes = plt.subplots(len(MACHINE_TYPES), 4, figsize=(20, 3.0 * len(MACHINE_TYPES)), sharex=True, sharey=True)
    for row, machine in zip(axes, MACHINE_TYPES):
        kinds = MACHINES[machine].anomalies
        cells = [("source", None), ("target", None), ("source", kinds[0]), ("source", kinds[1])]
        panels = []
        for domain, anomaly in cells:
            y, attrs = clip(machine, section, domain, anomaly, strength, snr, seconds, seed)
            f, t, p = spectrogram(y, fs=SR, nperseg=1024, noverlap=768)
            panels.append((domain, anomaly, attrs, t, f, 10 * np.log10(p + 1e-14)))
        top = max(np.percentile(db, 99.9) for *_, db in panels)  # one colour scale per row
        for ax, (domain, anomaly, attrs, t, f, db) in zip(row, panels):
            ax.pcolormesh(t, f[1:], db[1:], shading="auto", cmap="magma", vmin=top - 75, vmax=top)
            attr = "_".join(f"{k}_{v}" for k, v in attrs.items())
            what = f"anomaly: {anomaly} (strength {strength:g})" if anomaly else "normal"
            ax.set_title(f"{machine} section {section} {domain} {attr}\n{what}", fontsize=10)
        row[0].set_ylabel("Hz (log)")
    axes[0, 0].set_yscale("log")
    axes[0, 0].set_ylim(30, SR / 2)
    for ax in axes[-1]:
        ax.set_xlabel("s")
    fig.suptitle(f"Synthetic machine sounds (power spectrogram dB, SNR {snr:g} dB)", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=64)
    plt.close(fig)
    # a 64-colour palette keeps the noisy spectrograms to a few hundred kB
    Image.open(buf).convert("RGB").quantize(64).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.synth.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/synthetic_spectrograms.png")
    p.add_argument("--section", default="00")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--snr", type=float, default=6.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(render(a.out, a.section, a.strength, a.snr, a.seconds, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
