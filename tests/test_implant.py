"""benchmarks/implant.py: each implant adds what it names at the level set (checked by FFT and RMS),
within-domain AUCs against a pairwise count, and the table's means over draws."""

from __future__ import annotations

import argparse
import sys
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import implant  # noqa: E402  (benchmarks/ is not a package)
from pipelines.synth.machines import SR  # noqa: E402


def _clip(seconds=2.0, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _band_share(x, lo, hi):
    power = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return power[(f >= lo) & (f <= hi)].sum() / power.sum()


@pytest.mark.parametrize("kind, band", [("tone", (1000, 2000)), ("band", (3000, 7000)), ("clicks", (2000, 4500))])
def test_added_sounds_sit_in_their_band_at_the_level_set(kind, band):
    wave = _clip()
    added = implant.implant(wave, kind, -12.0, np.random.default_rng(1)) - wave
    assert _rms(added) / _rms(wave) == pytest.approx(10 ** (-12 / 20), rel=1e-3)
    assert _band_share(added, *band) > (0.99 if kind == "tone" else 0.8)
    assert _band_share(wave, *band) < _band_share(added, *band) - 0.3  # the clip's own noise is spread wider


def test_clicks_come_eight_times_a_second():
    wave = np.zeros(2 * SR, np.float32) + 1e-3
    added = implant.implant(wave, "clicks", 0.0, np.random.default_rng(2)) - wave
    envelope = np.abs(added) > 0.5 * np.abs(added).max()
    onsets = np.flatnonzero(envelope[1:] & ~envelope[:-1])
    assert len(np.unique(onsets // (SR // 8))) == 16  # one click in each eighth of a second


def test_am_modulates_by_the_depth_set_and_speed_moves_a_tone_line():
    wave = np.ones(SR, np.float32)
    out = implant.implant(wave, "am", -6.0, np.random.default_rng(3))
    assert out.max() == pytest.approx(1 + 10 ** (-6 / 20), abs=1e-3)
    assert out.min() == pytest.approx(1 - 10 ** (-6 / 20), abs=1e-3)
    t = np.arange(2 * SR) / SR
    sped = implant.implant(np.sin(2 * np.pi * 1000 * t).astype(np.float32), "speed", 2.0, np.random.default_rng(0))
    peak = np.fft.rfftfreq(len(t), 1 / SR)[np.argmax(np.abs(np.fft.rfft(sped)))]
    assert peak == pytest.approx(1020.0, abs=1.0)


def test_resonance_lifts_one_band_by_the_gain_set():
    wave = _clip(seed=6)
    out = implant.implant(wave, "resonance", 4.0, np.random.default_rng(5))
    gain_db = 20 * np.log10(np.abs(np.fft.rfft(out.astype(np.float64))) / np.abs(np.fft.rfft(wave.astype(np.float64))))
    f = np.fft.rfftfreq(len(wave), 1 / SR)
    fc = f[np.argmax(gain_db)]
    assert gain_db.max() == pytest.approx(4.0, abs=0.01) and 500 <= fc <= 4000
    assert gain_db.min() > -0.01  # a peak: nothing cut
    for edge in (0.5 * fc, 1.5 * fc):  # Q 2: half the peak's excess in amplitude fc / 2 either side
        excess = 10 ** (gain_db[np.argmin(np.abs(f - edge))] / 20) - 1
        assert excess == pytest.approx((10 ** (4 / 20) - 1) / 2, rel=0.02)


def test_within_domains_matches_a_pairwise_count():
    rng = np.random.default_rng(4)
    domains = ["source"] * 10 + ["target"] * 10 + ["source"] * 10 + ["target"] * 10
    test = [{"meta": SimpleNamespace(domain=d)} for d in domains]
    implanted = np.r_[np.zeros(20), np.ones(20)]
    scores = rng.normal(size=40) + implanted * 0.7 + np.array([d == "target" for d in domains]) * 2.0
    got = implant.within_domains(test, implanted, scores)
    for d in implant.DOMAINS:
        mine = np.array([x == d for x in domains])
        normal, copy = scores[mine & (implanted == 0)], scores[mine & (implanted == 1)]
        wins = [1.0 if c > n else 0.5 if c == n else 0.0 for n, c in product(normal, copy)]
        assert got[d] == pytest.approx(100 * np.mean(wins))


def test_parse_implant_names_the_kinds_on_a_bad_one():
    assert implant.parse_implant("tone:-20") == ("tone", -20.0)
    for bad in ("hum:-20", "tone", "tone:"):
        with pytest.raises(argparse.ArgumentTypeError, match="clicks, tone, band, am, speed, resonance"):
            implant.parse_implant(bad)


def test_the_table_averages_the_draws_per_dataset():
    def row(ds, seed, kind, level, v):
        return {"dataset": ds, "data_seed": seed, "implant": kind, "level": level,
                "auc": {d: {"source": v, "target": v + 10} for d in implant.DETECTORS}}
    rows = {"a": row("real", 0, "tone", -30.0, 50.0), "b": row("real", 1, "tone", -30.0, 61.0),
            "c": row("synthetic", 0, "tone", -30.0, 70.0), "d": row("real", 0, "clicks", -6.0, 90.0)}
    lines = [line for line in implant.table(rows).splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| clicks", "| tone"]  # the kinds' order
    tone = lines[1].split(" | ")
    n = len(implant.DETECTORS)
    assert tone[2:2 + n] == ["56 / 66"] * n  # real: mean of 50 and 61 (55.5 rounds to even)
    assert tone[2 + n:2 + 2 * n] == ["70 / 80"] * (n - 1) + ["70 / 80 |"]
    assert lines[0].split(" | ")[2 + n] == ""  # no synthetic row of clicks
