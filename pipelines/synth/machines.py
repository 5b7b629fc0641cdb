"""Sound models of the seven DCASE 2022 Task 2 machine types (pure numpy + scipy, float32).

One clip = machine sound (normal model, plus an anomaly for anomalous clips) through a
transfer path (microphone position / enclosure), mixed with factory background noise at a
per-clip SNR. ``render_clip`` is the only entry point the generator needs.

Everything is driven by the clip's attributes (``{"vel": "10", "loc": "A"}``): numeric values
are parsed (speed, voltage, load, acceleration, noise level), categorical ones (noise type,
microphone location, valve pattern, car model) select parameters drawn from an RNG keyed by a
stable hash of the value, so any new value (data drops) renders deterministically. The fixed
physical parameters of each (machine type, section) "unit" come from a hash of both names and do
not depend on the generation seed. Strength ``s`` in [0, 1] scales every anomaly: 0 = none,
1 = obvious (additive components scale linearly with ``s``, modulations' depth likewise).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import product

import numpy as np
import scipy.fft as sfft
from scipy.signal import lfilter

SR = 16000
MACHINE_TYPES = ("ToyCar", "ToyTrain", "bearing", "fan", "gearbox", "slider", "valve")
LEVEL_DBFS = -26.0  # nominal RMS of a clip (machine at unit RMS), +-2 dB per clip
PEAK = 10 ** (-1 / 20)  # clips whose peak would exceed -1 dBFS are turned down to it

# ----------------------------------------------------------------------------- determinism


def stable_words(*parts) -> list[int]:
    """Four 32-bit words from a hash of ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def keyed_rng(*parts, seed: int | None = None) -> np.random.Generator:
    """A Generator seeded by ``seed`` (optional) and a stable hash of ``parts``."""
    entropy = ([int(seed)] if seed is not None else []) + stable_words(*parts)
    return np.random.default_rng(np.random.SeedSequence(entropy))


def number(value: str) -> float:
    """The first number in an attribute value: '28V' -> 28, 'L3' -> 3, '0.05' -> 0.05."""
    m = re.search(r"-?\d+(?:\.\d+)?", value)
    if not m:
        raise ValueError(f"attribute value {value!r} holds no number")
    return float(m.group())


# ----------------------------------------------------------------------------- DSP toolkit


@lru_cache(maxsize=8)
def _index(n: int) -> np.ndarray:
    idx = np.arange(n, dtype=np.float64)
    idx.flags.writeable = False
    return idx


@lru_cache(maxsize=2)
def _noise_buffer(size: int) -> np.ndarray:
    """Standard normal samples shared by every clip of a process (random slices; fixed seed)."""
    buf = keyed_rng("noise-buffer", size).standard_normal(size, dtype=np.float32)
    buf.flags.writeable = False
    return buf


def tilt(f, db_per_octave: float, f0: float = 1000.0):
    return (np.maximum(f, 20.0) / f0) ** (db_per_octave / 6.0206)


def peak(f, fc: float, q: float, gain_db: float):
    return 1.0 + (10 ** (gain_db / 20) - 1.0) / (1.0 + ((f - fc) * q / fc) ** 2)


def band(f, lo: float, hi: float, order: int = 2):
    f = np.maximum(f, 1.0)
    return 1.0 / np.sqrt((1.0 + (lo / f) ** (2 * order)) * (1.0 + (f / hi) ** (2 * order)))


_SHAPES = {"tilt": tilt, "peak": peak, "band": band}


@lru_cache(maxsize=64)
def spectrum(n: int, ops: tuple) -> np.ndarray:
    """Amplitude spectrum on the rfft grid of length ``n``: the product of ``ops`` such as
    ``("tilt", dB/octave)``, ``("peak", fc, q, gain dB)``, ``("band", lo, hi[, order])``. Cached."""
    f = np.fft.rfftfreq(n, 1 / SR).astype(np.float32)
    out = np.ones_like(f)
    for name, *args in ops:
        out *= _SHAPES[name](f, *args)
    out.flags.writeable = False
    return out


class Ctx:
    """One clip being synthesised: its length and RNG, and the primitives drawing from it."""

    def __init__(self, n: int, rng: np.random.Generator) -> None:
        self.n, self.rng = n, rng
        self.idx = _index(n)

    def smooth(self, rate_hz: float) -> np.ndarray:
        """Slow random curve (~N(0,1)): control points every 1/rate s, linear in between (2 ms steps)."""
        k = int(np.ceil(self.n / SR * rate_hz)) + 2
        coarse = np.interp(np.arange(0, self.n, 32), np.linspace(0, self.n - 1, k), self.rng.standard_normal(k))
        return np.repeat(coarse.astype(np.float32), 32)[: self.n]

    def cycles(self, freq) -> np.ndarray:
        """Phase in cycles (float64) of an instantaneous frequency (array or constant), random start."""
        if np.isscalar(freq):
            return self.idx * (freq / SR) + self.rng.random()
        return np.cumsum(freq, dtype=np.float64) / SR + self.rng.random()

    def noise(self, *ops) -> np.ndarray:
        """Gaussian noise with amplitude spectrum ``spectrum(n, ops)``, unit RMS.

        The complex spectrum is a random slice of the process's noise buffer (cheaper than drawing)."""
        shape = spectrum(self.n, ops)
        buf = _noise_buffer(max(1 << 22, 1 << int(np.ceil(np.log2(8 * len(shape))))))
        off = 2 * int(self.rng.integers(0, (len(buf) - 2 * len(shape)) // 2))
        z = buf[off:off + 2 * len(shape)].view(np.complex64)
        return unit_rms(sfft.irfft(z * shape, self.n))

    def poisson_times(self, rate_hz: float) -> np.ndarray:
        """Sample indices of a Poisson process."""
        return np.sort(self.rng.integers(0, self.n, self.rng.poisson(rate_hz * self.n / SR)))

    def impulses(self, idx: np.ndarray, amps) -> np.ndarray:
        """Impulses of amplitude ``amps`` at sample indices ``idx`` (out-of-range ones dropped)."""
        idx = np.asarray(idx, dtype=np.int64)
        keep = (idx >= 0) & (idx < self.n)
        amps = np.broadcast_to(np.asarray(amps, dtype=np.float64), idx.shape)[keep]
        return np.bincount(idx[keep], weights=amps, minlength=self.n).astype(np.float32)


def unit_rms(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-12)).astype(np.float32)


_TABLE = 4096


def periodic(c: Ctx, cyc: np.ndarray, amps, f_top: float) -> np.ndarray:
    """Waveform with harmonic k at amplitude ``amps[k-1]`` following phase ``cyc`` (cycles).

    Wavetable synthesis with linear interpolation; harmonics above 0.45 SR at the highest
    fundamental ``f_top`` are dropped, so nothing aliases. Random harmonic phases.
    """
    amps = np.asarray(amps, dtype=np.float64)
    if len(amps) == 1:  # a plain sine: cheaper than the table
        frac = (cyc - np.floor(cyc)).astype(np.float32)
        return np.float32(amps[0]) * np.sin(np.float32(2 * np.pi) * frac + np.float32(2 * np.pi * c.rng.random()))
    k = np.arange(1, len(amps) + 1)
    amps = np.where(k * f_top < 0.45 * SR, amps, 0.0)
    spec = np.zeros(_TABLE // 2 + 1, dtype=np.complex128)
    spec[1:len(amps) + 1] = amps * (_TABLE / 2) * np.exp(2j * np.pi * c.rng.random(len(amps)))
    table = np.fft.irfft(spec, _TABLE).astype(np.float32)
    step = np.append(table[1:], table[0]) - table
    pos = ((cyc - np.floor(cyc)) * _TABLE).astype(np.float32)
    i_f = np.floor(pos)
    w = pos - i_f
    i = i_f.astype(np.int32) & (_TABLE - 1)
    return table[i] + w * step[i]


def crossings(cyc: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """Sample indices where the increasing phase ``cyc - offset`` passes an integer (one per cycle)."""
    first, last = np.floor(cyc[0] - offset) + 1, np.floor(cyc[-1] - offset)
    return np.searchsorted(cyc, np.arange(first, last + 1) + offset)


def resonate(x: np.ndarray, modes) -> np.ndarray:
    """Excitation ``x`` through parallel two-pole resonators ``(freq Hz, decay s, gain)``.

    A few impulses: their impulse responses (truncated after 6 decay times) are added directly;
    otherwise the resonators run as IIR filters. Both give the same sound."""
    nz = np.flatnonzero(x)
    length = min(len(x), int(6 * max(tau for _, tau, _ in modes) * SR))
    if len(nz) * length <= 400_000:
        k = np.arange(length)
        h = sum(g * np.exp(-k / (tau * SR)) * np.sin((k + 1) * 2 * np.pi * f / SR) for f, tau, g in modes)
        y = np.zeros(len(x) + length, dtype=np.float32)
        for i in nz:
            y[i:i + length] += x[i] * h
        return y[:len(x)]
    y = np.zeros(len(x), dtype=np.float64)
    for f, tau, g in modes:
        r, w = np.exp(-1.0 / (tau * SR)), 2 * np.pi * f / SR
        y += lfilter([g * np.sin(w)], [1.0, -2 * r * np.cos(w), r * r], x)
    return y.astype(np.float32)


def decay(x: np.ndarray, tau: float) -> np.ndarray:
    """One-pole smoothing / exponential decay with time constant ``tau`` s (unit DC gain)."""
    a = np.exp(-1.0 / (tau * SR))
    return lfilter([1 - a], [1.0, -a], x).astype(np.float32)


def bursts(c: Ctx, idx, amps, tau: float) -> np.ndarray:
    """Exponentially decaying envelopes (peak ``amps``, time constant ``tau`` s) starting at ``idx``."""
    return lfilter([1.0], [1.0, -np.exp(-1.0 / (tau * SR))], c.impulses(idx, amps)).astype(np.float32)


def gate(c: Ctx, starts, stops) -> np.ndarray:
    """1 between each start and stop sample index, else 0."""
    steps = c.impulses(starts, 1.0) - c.impulses(stops, 1.0)
    return np.clip(np.cumsum(steps), 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Scene:
    """What surrounds the machine: factory noise type, a second machine, SNR offset, mic path."""

    noise: str
    path: str
    interferer: str | None = None
    snr_offset_db: float = 0.0


NOISE_PARAMS = ("f-n", "noise")  # value = factory noise type
PATH_PARAMS = ("loc", "mic", "panel")  # value = microphone position / enclosure
MIXED_PARAM = "m-n"  # value = another machine mixed into the background
LEVEL_PARAM = "n-lv"  # value L<k>: background level, SNR offset 6 - 3k dB


@lru_cache(maxsize=256)
def factory_params(key: str) -> dict:
    r = keyed_rng("factory-noise", key)
    return dict(tilt=r.uniform(-5.0, -1.5), peaks=[(log_uniform(r, 150, 3500), r.uniform(0.7, 2.0), r.uniform(3, 12))
                                                   for _ in range(2)],
                hum=r.uniform(45, 130), hum_amps=r.uniform(0.2, 1.0, 6) / np.arange(1, 7),
                hum_level=r.uniform(0.1, 0.5), impact_rate=r.uniform(0.2, 2.0), impact_level=r.uniform(2.0, 6.0),
                impact_modes=[(log_uniform(r, 300, 4000), r.uniform(0.01, 0.12), 1.0)
                              for _ in range(2)], flutter=r.uniform(0.05, 0.3))


def factory_noise(c: Ctx, key: str) -> np.ndarray:
    """Factory background: coloured noise + distant machinery hum + occasional impacts; unit RMS."""
    p = factory_params(key)
    x = c.noise(("tilt", p["tilt"]), ("band", 30, 7800), *(("peak", *pk) for pk in p["peaks"]))
    x *= 1 + p["flutter"] * c.smooth(0.5)
    hum = p["hum"] * (1 + 0.002 * c.smooth(0.3))
    x += p["hum_level"] * periodic(c, c.cycles(hum), p["hum_amps"], p["hum"] * 1.01)
    t = c.poisson_times(p["impact_rate"])
    x += resonate(c.impulses(t, p["impact_level"] * c.rng.uniform(0.3, 1.0, len(t))), p["impact_modes"])
    return unit_rms(x)


def mixed_machine(c: Ctx, key: str) -> np.ndarray:
    """Another machine running nearby (MIMII DG fan section 00): hum + noise, cycling load; unit RMS."""
    r = keyed_rng("mixed-machine", key)
    f0 = r.uniform(25, 70)
    amps = r.uniform(0.2, 1.0, 24) / np.arange(1, 25) ** r.uniform(0.3, 1.2)
    fc, rate, depth = log_uniform(r, 300, 3000), r.uniform(0.3, 3.0), r.uniform(0.2, 0.8)
    x = periodic(c, c.cycles(f0 * (1 + 0.003 * c.smooth(1.0))), amps, f0 * 1.01)
    x = unit_rms(x) + c.noise(("peak", fc, 1.0, 15), ("band", 50, 7000))
    return unit_rms(x * (1 + depth * np.sin(2 * np.pi * c.cycles(rate))).astype(np.float32))


# valve enclosure panels (other values, e.g. from data drops, get hash-derived paths like mics)
PANELS = {
    "open": dict(gain_db=0.0, cutoff=8000.0, delay=0.002, reflection=0.2, eq_fc=1000.0, eq_q=1.0, eq_db=0.0),
    "closed": dict(gain_db=-6.0, cutoff=1800.0, delay=0.004, reflection=0.5, eq_fc=500.0, eq_q=1.5, eq_db=6.0),
    "half": dict(gain_db=-3.0, cutoff=3500.0, delay=0.003, reflection=0.35, eq_fc=900.0, eq_q=1.5, eq_db=4.0),
    "lined": dict(gain_db=-4.0, cutoff=2500.0, delay=0.003, reflection=0.1, eq_fc=2500.0, eq_q=1.0, eq_db=-6.0),
}


@lru_cache(maxsize=256)
def path_params(key: str) -> dict:
    param, _, value = key.rpartition(":")
    if param.endswith(":panel") and value in PANELS:
        return PANELS[value]
    r = keyed_rng("mic-path", key)
    return dict(gain_db=r.uniform(-8, 0), cutoff=r.uniform(2500, 8000), delay=r.uniform(0.0015, 0.009),
                reflection=r.uniform(0.2, 0.6), eq_fc=log_uniform(r, 300, 4000), eq_q=r.uniform(1.0, 3.0),
                eq_db=r.choice([-1.0, 1.0]) * r.uniform(3, 9))


def apply_path(x: np.ndarray, key: str) -> np.ndarray:
    """Microphone position / enclosure: distance gain, high-frequency loss, one reflection and a
    resonance (peaking EQ) of the structure or room seen from there."""
    p = path_params(key)
    amp, w0 = 10 ** (p["eq_db"] / 40), 2 * np.pi * p["eq_fc"] / SR
    alpha, cw = np.sin(w0) / (2 * p["eq_q"]), np.cos(w0)
    y = lfilter([1 + alpha * amp, -2 * cw, 1 - alpha * amp], [1 + alpha / amp, -2 * cw, 1 - alpha / amp], x)
    y = decay(y, 1.0 / (2 * np.pi * p["cutoff"]))
    d = int(p["delay"] * SR)
    y[d:] += p["reflection"] * y[:-d].copy()
    return y * np.float32(10 ** (p["gain_db"] / 20))


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SectionSpec:
    """Attribute parameters of a section and their source/target value combinations (disjoint)."""

    shift: str  # what the domain shift changes
    params: tuple[str, ...]
    source: tuple[tuple[str, ...], ...]
    target: tuple[tuple[str, ...], ...]

    def values(self, domain: str) -> list[dict[str, str]]:
        combos = self.source if domain == "source" else self.target
        return [dict(zip(self.params, combo)) for combo in combos]


def _spec(shift: str, params: tuple[str, ...], source, target) -> SectionSpec:
    """Spec from value lists per parameter (their product) or ready combinations."""
    def combos(v):
        return tuple(product(*v)) if isinstance(v[0], list) else tuple(tuple(x) for x in v)
    return SectionSpec(shift, params, combos(source), combos(target))


def section_number(section: str) -> int:
    return int(section) if section.isdigit() else stable_words("section", section)[0]


class Machine:
    """A machine type: its section specs, unit parameters, anomaly kinds and sound."""

    name = ""
    anomalies: tuple[str, ...] = ()
    specs: tuple[SectionSpec, ...] = ()

    def spec(self, section: str) -> SectionSpec:
        return self.specs[section_number(section) % len(self.specs)]

    def unit(self, r: np.random.Generator) -> dict:
        raise NotImplementedError

    def sound(self, c: Ctx, u: dict, a: dict, anomaly: str | None, s: float) -> np.ndarray:
        """The machine signal (about unit RMS when normal) for attributes ``a``."""
        raise NotImplementedError

    def default(self, a: dict, u: dict, key: str) -> float:
        """Numeric attribute ``key`` from the clip, else the unit's value."""
        return number(a[key]) if key in a else u[key]


@lru_cache(maxsize=512)
def section_unit(machine: str, section: str) -> dict:
    """Fixed physical parameters of one (machine type, section): independent of the data seed."""
    return MACHINES[machine].unit(keyed_rng("unit", machine, section))


def log_uniform(r: np.random.Generator, lo: float, hi: float, size=None):
    return np.exp(r.uniform(np.log(lo), np.log(hi), size))


class Fan(Machine):
    """Industrial fan: blade-pass harmonic series + broadband turbulence + motor hum."""

    name = "fan"
    anomalies = ("imbalance", "blade-rub", "stall", "bearing")
    specs = (
        _spec("another machine mixed into the background", ("m-n",), [["W", "X"]], [["Y", "Z"]]),
        _spec("factory noise type", ("f-n",), [["A", "B"]], [["C", "D"]]),
        _spec("background noise level (SNR offset 6-3k dB for L<k>)", ("n-lv",), [["L1", "L2"]], [["L3", "L4"]]),
    )

    def unit(self, r):
        return dict(rps=r.uniform(18, 30), blades=int(r.integers(5, 10)), decay=r.uniform(0.35, 0.65),
                    tonal=r.uniform(0.3, 0.6), turb_fc=r.uniform(300, 1200), turb_q=r.uniform(0.5, 1.0),
                    housing=r.uniform(900, 2600), mains=float(r.choice([50.0, 60.0])), bpfo=r.uniform(2.9, 4.1),
                    stall=r.uniform(0.3, 0.5), rub_fc=r.uniform(2500, 5000), res=r.uniform(3000, 5500))

    def sound(self, c, u, a, anomaly, s):
        rps = u["rps"] * (1 + 0.004 * c.smooth(0.5))
        cyc = c.cycles(rps)
        nb = u["blades"]
        tonal = u["tonal"] * unit_rms(periodic(c, cyc * nb, u["decay"] ** np.arange(6), nb * u["rps"] * 1.02))
        blade = periodic(c, cyc * nb, [1.0], nb * u["rps"])
        turb = c.noise(("tilt", -3), ("peak", u["turb_fc"], u["turb_q"], 9), ("peak", u["housing"], 4, 6),
                       ("band", 40, 7000)) * (1 + 0.15 * blade)
        shaft = periodic(c, cyc, [1.0, 0.3], u["rps"] * 1.02)
        hum = periodic(c, c.cycles(2 * u["mains"]), [1, 0.5, 0.3, 0.2], 2 * u["mains"])
        if anomaly == "stall":  # rotating stall: sub-synchronous surging of the flow noise
            turb = turb * (1 + 0.9 * s * periodic(c, cyc * u["stall"], [1.0], u["rps"]))
        x = turb + tonal + 0.05 * shaft + 0.05 * hum
        if anomaly == "imbalance":  # shaft-rate harmonics (1x, 2x, ...) and once-per-rev modulation
            x = x + 0.8 * s * unit_rms(periodic(c, cyc, 0.7 ** np.arange(8), u["rps"] * 1.02))
            x = x * (1 + 0.6 * s * shaft / 1.05)
        elif anomaly == "blade-rub":  # a blade scrapes the housing once per revolution
            env = bursts(c, crossings(cyc, c.rng.random()), 1.0, 0.006)
            x = x + 3.0 * s * env * c.noise(("band", u["rub_fc"] * 0.7, u["rub_fc"] * 1.4, 3))
        elif anomaly == "bearing":  # outer-race defect: impacts at BPFO exciting a resonance
            t = crossings(c.cycles(u["rps"] * u["bpfo"] * (1 + 0.01 * c.smooth(3))))
            x = x + 2.5 * s * resonate(c.impulses(t, c.rng.uniform(0.7, 1.0, len(t))), [(u["res"], 0.002, 1.0)])
        return x


@lru_cache(maxsize=256)
def valve_pattern(name: str) -> tuple[float, tuple[tuple[float, float], ...]]:
    """Operating pattern ``name``: (cycle period s, ((open time, open duration) s, ...))."""
    r = keyed_rng("valve-pattern", name)
    period = r.uniform(1.0, 3.0)
    k = int(r.integers(1, 4))
    slot = period / k
    return period, tuple((i * slot + r.uniform(0, 0.3) * slot, r.uniform(0.12, 0.55) * slot) for i in range(k))


class Valve(Machine):
    """Solenoid valve: actuation clicks, air-flow hiss while open, exhaust puffs, coil buzz."""

    name = "valve"
    anomalies = ("leak", "sticky", "whistle")
    specs = (
        _spec("operating pattern", ("pat",), [["00", "01"]], [["02", "03"]]),
        _spec("enclosure panel (acoustic path)", ("panel",), [["open", "closed"]], [["half", "lined"]]),
        _spec("patterns of two valves side by side", ("v1pat", "v2pat"), [("00", "01"), ("01", "00")],
              [("02", "03"), ("03", "02")]),
    )

    def unit(self, r):
        return dict(modes=[(r.uniform(1200, 2200), r.uniform(0.004, 0.012), 1.0),
                           (r.uniform(2800, 4500), r.uniform(0.003, 0.008), 0.7),
                           (r.uniform(5000, 7000), r.uniform(0.002, 0.005), 0.4)],
                    hiss_fc=r.uniform(2500, 5000), hiss_q=r.uniform(0.7, 1.2), mains=float(r.choice([50.0, 60.0])),
                    whistle=r.uniform(3000, 6000), pattern=f"unit{int(r.integers(1000))}",
                    second=dict(modes=[(r.uniform(1000, 3000), r.uniform(0.003, 0.01), 1.0),
                                       (r.uniform(3000, 6000), r.uniform(0.002, 0.006), 0.6)],
                                hiss_fc=r.uniform(2000, 5000), hiss_q=r.uniform(0.7, 1.2), mains=50.0,
                                whistle=4000.0))

    def sound(self, c, u, a, anomaly, s):
        pattern = a.get("pat", a.get("v1pat", u["pattern"]))
        x = self._valve(c, u, pattern, anomaly, s)
        if "v2pat" in a:
            x = x + 0.5 * self._valve(c, u["second"], a["v2pat"], None, 0.0)
        return x

    def _valve(self, c, u, pattern, anomaly, s):
        period, openings = valve_pattern(pattern)
        offset = c.rng.uniform(0, period)
        cyc0 = np.arange(-1, int(c.n / SR / period) + 2) * period - offset
        opens = (cyc0[:, None] + np.array([o for o, _ in openings])[None, :]).ravel()
        closes = opens + np.tile([d for _, d in openings], len(cyc0))
        opens = opens + c.rng.normal(0, 0.004, len(opens))
        closes = closes + c.rng.normal(0, 0.004, len(closes))
        click_amp = c.rng.uniform(0.9, 1.1, len(opens))
        if anomaly == "sticky":  # contamination: the valve opens late and weakly, and chatters
            opens = np.minimum(opens + s * c.rng.uniform(0.02, 0.12, len(opens)), closes - 0.02)
            click_amp *= 1 - 0.5 * s
        o, cl = (np.round(opens * SR).astype(np.int64), np.round(closes * SR).astype(np.int64))
        g = decay(gate(c, o, cl), 0.015)
        exc = c.impulses(o, click_amp) + c.impulses(cl, 0.6 * c.rng.uniform(0.9, 1.1, len(cl)))
        if anomaly == "sticky":
            for _ in range(2):
                exc += c.impulses(o + (c.rng.uniform(0.01, 0.03, len(o)) * SR).astype(np.int64), 0.6 * s)
        hiss_gate = g + 0.35 * s * (1 - g) if anomaly == "leak" else g  # leak: flow while closed
        hiss = c.noise(("peak", u["hiss_fc"], u["hiss_q"], 12), ("band", 300, 7500)) * hiss_gate
        puff = c.noise(("tilt", -6), ("band", 100, 2500)) * bursts(c, cl, 1.0, 0.05)
        buzz = periodic(c, c.cycles(2 * u["mains"]), [1, 0.6, 0.4, 0.3, 0.2], 2 * u["mains"]) * g
        x = 0.35 * hiss + resonate(exc, u["modes"]) + 0.3 * puff + 0.04 * buzz
        if anomaly == "whistle":  # partial clog: a narrow whistle while the flow passes
            x = x + 0.4 * s * periodic(c, c.cycles(u["whistle"] * (1 + 0.01 * c.smooth(4))), [1.0],
                                       u["whistle"] * 1.05) * g
        return 4.0 * x


@lru_cache(maxsize=64)
def stroke_cycle(stroke: float, vel: float, accel: float, dwell: float):
    """One back-and-forth cycle of a slide: (speed mm/s, position mm, accelerating flag, stop indices)."""
    ta = vel / accel
    if vel * ta > stroke:  # never reaches the set velocity: triangular profile
        vel = np.sqrt(stroke * accel)
        ta = vel / accel
    dur = stroke / vel + ta
    tau = np.arange(int(dur * SR)) / SR
    sp = np.clip(np.minimum(np.minimum(accel * tau, vel), accel * (dur - tau)), 0, None)
    nd = int(dwell * SR)
    one = np.concatenate([sp, np.zeros(nd)])
    speed = np.concatenate([one, one])
    direction = np.concatenate([np.ones(len(one)), -np.ones(len(one))])
    position = np.cumsum(speed * direction) / SR
    acc = np.concatenate([(tau < ta) | (tau > dur - ta), np.zeros(nd, bool)] * 2)
    stops = np.array([len(sp) - 1, len(one) + len(sp) - 1])
    out = (speed.astype(np.float32), position.astype(np.float32), acc, stops)
    for arr in out:
        arr.flags.writeable = False
    return out


class Slider(Machine):
    """Linear slide on a ball screw: motor tone following the speed, rolling noise, end-of-stroke clunks."""

    name = "slider"
    anomalies = ("rail-damage", "no-grease", "rattle")
    specs = (
        _spec("carriage velocity (mm/s)", ("vel",), [["300", "400"]], [["600", "700"]]),
        _spec("acceleration (G)", ("ac",), [["0.05", "0.1"]], [["0.3", "0.5"]]),
        _spec("factory noise type", ("f-n",), [["A", "B"]], [["C", "D"]]),
    )

    def unit(self, r):
        return dict(lead=float(r.choice([5.0, 10.0])), stroke=r.uniform(120, 250), dwell=r.uniform(0.15, 0.5),
                    vel=r.uniform(350, 500), ac=r.uniform(0.1, 0.3), amps=r.uniform(0.2, 1.0, 8) / np.arange(1, 9),
                    pwm=r.uniform(3500, 7000), roll_fc=r.uniform(800, 2500), defect=r.uniform(0.2, 0.8),
                    squeal=r.uniform(1800, 4200),
                    clunk=[(r.uniform(250, 600), r.uniform(0.01, 0.03), 1.0), (r.uniform(1500, 3000), 0.005, 0.4)],
                    tick=[(r.uniform(2500, 5000), 0.008, 1.0), (r.uniform(600, 1200), 0.02, 0.7)],
                    rattle=[(r.uniform(700, 1500), 0.006, 1.0)])

    def sound(self, c, u, a, anomaly, s):
        vel, ac = self.default(a, u, "vel"), self.default(a, u, "ac")
        speed_c, pos_c, acc_c, stops = stroke_cycle(u["stroke"], vel, ac * 9810.0, u["dwell"])
        m = len(speed_c)
        off = int(c.rng.integers(m))
        i = (np.arange(c.n) + off) % m
        speed, pos, acc = speed_c[i], pos_c[i], acc_c[i]
        vmax = float(speed_c.max())
        rel = speed / vmax
        motor = periodic(c, c.cycles(speed / u["lead"]), u["amps"], vmax / u["lead"]) * np.sqrt(rel)
        roll = c.noise(("peak", u["roll_fc"], 0.8, 10), ("band", 200, 7000)) * rel ** 0.8
        servo = periodic(c, c.cycles(u["pwm"]), [1.0], u["pwm"]) * (0.03 + 0.15 * decay(acc.astype(np.float32), 0.02))
        stop_idx = (stops[None, :] + m * np.arange(c.n // m + 2)[:, None]).ravel() - off
        clunk = resonate(c.impulses(stop_idx, c.rng.uniform(0.8, 1.0, len(stop_idx)) * np.sqrt(ac / 0.2)),
                         u["clunk"])
        if anomaly == "no-grease":  # dry friction: louder rolling noise and intermittent squeal
            roll = roll * (1 + 0.8 * s)
        x = 1.2 * motor + 0.6 * roll + servo + 0.8 * clunk
        if anomaly == "rail-damage":  # a dent in the rail: a tick each time the carriage passes it
            side = pos > u["defect"] * u["stroke"]
            t = np.flatnonzero(side[1:] != side[:-1]) + 1
            x = x + 6.0 * s * resonate(c.impulses(t, rel[t] + 0.2), u["tick"])
        elif anomaly == "no-grease":
            on = decay((c.smooth(1.5) > 0.3).astype(np.float32), 0.03) * rel
            f_sq = u["squeal"] * (1 + 0.02 * c.smooth(3))
            x = x + 1.0 * s * on * periodic(c, c.cycles(f_sq), [1.0, 0.3], u["squeal"] * 1.1)
        elif anomaly == "rattle":  # loose belt / bolt: knocks while the carriage accelerates
            t = c.poisson_times(40.0)
            t = t[acc[t]]
            x = x + 1.5 * s * resonate(c.impulses(t, c.rng.uniform(0.3, 1.0, len(t))), u["rattle"])
        return 1.8 * x


class Bearing(Machine):
    """Rotating shaft on rolling bearings: shaft/motor harmonics, rolling noise, micro-impacts."""

    name = "bearing"
    anomalies = ("outer-race", "inner-race", "ball", "wear")
    specs = (
        _spec("shaft speed (rev/s)", ("vel",), [["6", "10", "14"]], [["18", "22"]]),
        _spec("microphone location", ("vel", "loc"), [["8", "12"], ["A", "B"]], [["8", "12"], ["C", "D"]]),
        _spec("factory noise type", ("f-n",), [["A", "B"]], [["C", "D"]]),
    )

    def unit(self, r):
        return dict(balls=int(r.integers(7, 13)), dd=r.uniform(0.2, 0.35), slots=int(r.integers(24, 41)),
                    modes=[(r.uniform(2500, 4500), r.uniform(0.002, 0.005), 1.0),
                           (r.uniform(5000, 7000), r.uniform(0.001, 0.003), 0.6)],
                    roll_fc=r.uniform(800, 2500), vel=r.uniform(8, 12), motor=r.uniform(0.2, 1.0, 6) / np.arange(1, 7))

    def sound(self, c, u, a, anomaly, s):
        vel = self.default(a, u, "vel")
        fr = vel * (1 + 0.003 * c.smooth(0.5))
        cyc = c.cycles(fr)
        dd = u["dd"]
        ftf = 0.5 * (1 - dd)
        motor = 0.15 * unit_rms(periodic(c, cyc, u["motor"], vel * 1.01)) \
            + 0.15 * periodic(c, cyc * u["slots"], [1.0, 0.4], vel * u["slots"] * 1.01)
        roll = c.noise(("band", 200, 7000), ("peak", u["roll_fc"] * (vel / 10) ** 0.5, 0.8, 8), ("tilt", -2))
        roll = roll * (1 + 0.1 * periodic(c, cyc * ftf, [1.0], vel))
        if anomaly == "wear":  # rough races: more and brighter rolling noise
            roll = roll * (1 + 0.5 * s) + 0.8 * s * c.noise(("band", 3000, 7000, 3))
        t = c.poisson_times(15.0 * vel)  # rolling elements' micro-impacts
        micro = resonate(c.impulses(t, c.rng.exponential(1.0, len(t))), u["modes"])
        x = (motor + roll + 0.15 * micro) * np.float32((vel / 10) ** 0.5)
        if anomaly in ("outer-race", "inner-race", "ball"):
            ratio = {"outer-race": u["balls"] / 2 * (1 - dd), "inner-race": u["balls"] / 2 * (1 + dd),
                     "ball": (1 - dd * dd) / dd}[anomaly]  # BPFO, BPFI, 2 x BSF (per shaft rev)
            t = crossings(c.cycles(fr * ratio * (1 + 0.01 * c.smooth(3))))
            amp = c.rng.uniform(0.8, 1.0, len(t))
            if anomaly == "inner-race":  # the defect moves through the load zone once per revolution
                amp *= (0.5 + 0.5 * np.cos(2 * np.pi * cyc[t])) ** 2
            elif anomaly == "ball":  # the ball travels with the cage
                amp *= 0.5 + 0.5 * np.cos(2 * np.pi * ftf * cyc[t])
            x = x + 3.5 * s * resonate(c.impulses(t, amp), u["modes"]) * np.float32((vel / 10) ** 0.5)
        return x


class Gearbox(Machine):
    """DC motor driving a gearbox with a load: gear-mesh harmonic series with shaft sidebands."""

    name = "gearbox"
    anomalies = ("chipped-tooth", "wear", "misalignment", "loose-part")
    specs = (
        _spec("motor voltage (V)", ("volt",), [["1.0", "1.5"]], [["2.0", "2.5"]]),
        _spec("load weight (g)", ("wt",), [["0", "50"]], [["100", "150"]]),
        _spec("microphone position", ("mic",), [["1", "2"]], [["3", "4"]]),
    )

    def unit(self, r):
        return dict(z1=int(r.integers(13, 22)), z2=int(r.integers(31, 48)), k=r.uniform(14, 20),
                    volt=r.uniform(1.2, 1.8), wt=r.uniform(20, 80), housing=r.uniform(600, 2000),
                    motor=r.uniform(0.2, 1.0, 4) / np.arange(1, 5),
                    modes=[(r.uniform(1500, 3500), r.uniform(0.004, 0.01), 1.0),
                           (r.uniform(4000, 6000), r.uniform(0.002, 0.005), 0.5)],
                    knock=[(r.uniform(3000, 6000), 0.002, 1.0)])

    def sound(self, c, u, a, anomaly, s):
        volt, wt = self.default(a, u, "volt"), self.default(a, u, "wt")
        f0 = u["k"] * volt * (1 - wt / 600)  # heavier load, slower shaft
        fr = f0 * (1 + 0.005 * c.smooth(1.0))
        cyc = c.cycles(fr)
        z1 = u["z1"]
        load = np.float32((1 + wt / 100) ** 0.5)
        shaft = periodic(c, cyc, [1.0], f0)
        out = periodic(c, cyc * z1 / u["z2"], [1.0], f0)
        mesh = periodic(c, cyc * z1, [1.0, 0.5, 0.3, 0.15], z1 * f0 * 1.02) * (1 + 0.08 * shaft + 0.05 * out)
        housing = c.noise(("band", 50, 7000), ("peak", u["housing"], 1.0, 8), ("tilt", -3))
        if anomaly == "chipped-tooth":  # the mesh falters once per pinion revolution
            phase = c.rng.random()
            mesh = mesh * (1 - 0.6 * s * (((cyc - phase) % 1.0) < 1.0 / z1)).astype(np.float32)
        elif anomaly == "wear":  # worn flanks: strong shaft-rate sidebands and 2 x GMF, rougher noise
            mesh = mesh * (1 + 0.7 * s * shaft) + 0.6 * s * periodic(c, cyc * 2 * z1, [1.0], 2 * z1 * f0 * 1.02)
            housing = housing * (1 + 0.5 * s)
        elif anomaly == "misalignment":  # 2 x shaft vibration
            mesh = mesh * (1 + 0.4 * s * periodic(c, cyc * 2, [1.0], 2 * f0))
        x = 0.7 * load * mesh + 0.2 * unit_rms(periodic(c, cyc, u["motor"], f0 * 1.02)) + 0.6 * housing
        if anomaly == "chipped-tooth":
            t = crossings(cyc, phase)
            x = x + 2.5 * s * resonate(c.impulses(t, c.rng.uniform(0.8, 1.0, len(t))), u["modes"])
        elif anomaly == "misalignment":
            x = x + 1.0 * s * periodic(c, cyc, [0.0, 1.0], f0 * 1.02)
        elif anomaly == "loose-part":  # a loose cover knocks when the shaft swings past
            t = c.poisson_times(80.0)
            t = t[((cyc[t] % 1.0) < 0.3)]
            x = x + 1.5 * s * resonate(c.impulses(t, c.rng.uniform(0.3, 1.0, len(t))), u["knock"])
        return x * np.float32((volt / 1.5) ** 0.5)


@lru_cache(maxsize=64)
def toy_car_model(machine: str, model: str) -> dict:
    """Parameters of a toy car / train model: the same physical toy in every section."""
    r = keyed_rng("toy-model", machine, model)
    cars = int(r.integers(2, 4))
    lengths = r.uniform(0.12, 0.18, cars)
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    axles = np.concatenate([[st + 0.02, st + 0.05, st + ln - 0.05, st + ln - 0.02] for st, ln in zip(starts, lengths)])
    return dict(k=r.uniform(70, 95), comm=int(r.choice([3, 5])), ratio=r.uniform(8, 13), teeth=int(r.integers(9, 14)),
                comm_amps=r.uniform(0.3, 1.0, 6) / np.arange(1, 7) ** 0.7, roll_fc=r.uniform(300, 900),
                body=[(r.uniform(600, 1200), r.uniform(3, 8), 8.0), (r.uniform(1500, 2500), r.uniform(3, 8), 6.0)],
                gear=r.uniform(500, 800), axles=axles, wheel=r.uniform(0.015, 0.025),
                motor_amps=r.uniform(0.3, 1.0, 6) / np.arange(1, 7))


def blend_model(reference: dict, model: dict, effect: float) -> dict:
    """``model``'s parameters moved ``effect`` of the way from ``reference``'s (0: the reference,
    1: the model); counts (commutator segments, gear teeth) become the frequency ratios between
    them. A parameter whose shape differs between the two keeps the model's value."""
    out = {}
    for key, value in model.items():
        ref, val = np.asarray(reference[key], dtype=np.float64), np.asarray(value, dtype=np.float64)
        if ref.shape != val.shape:
            out[key] = value
        elif key == "body":
            out[key] = [tuple(row) for row in ref + effect * (val - ref)]
        else:
            out[key] = ref + effect * (val - ref) if val.ndim else float(ref + effect * (val - ref))
    return out


def run_speed(c: Ctx, run: tuple[float, float, float, float]) -> np.ndarray:
    """A 0..1 speed curve of a machine started and stopped within the clip: ``run`` = (latest
    start, rise, earliest stop, fall) as fractions of the clip; it starts at 0.5-1 x the latest
    start, reaches full speed over ``rise`` (raised cosine), and slows to a stop over ``fall`` from
    1-1.05 x the earliest stop."""
    latest_start, rise, earliest_stop, fall = run
    t = c.idx / c.n
    start = c.rng.uniform(0.5, 1.0) * latest_start
    stop = min(c.rng.uniform(1.0, 1.05) * earliest_stop, 1.0 - fall)
    up = np.clip((t - start) / rise, 0.0, 1.0)
    down = np.clip((stop + fall - t) / fall, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * np.minimum(up, down))).astype(np.float32)


class ToyCar(Machine):
    """Toy car on a roller (ToyADMOS2): DC-motor commutator whine, gear whine, rolling noise.

    ``run``: None (the default), the car runs through the whole clip; else (latest start, rise,
    earliest stop, fall) as fractions of the clip (``run_speed``), as the real DCASE 2023 ToyCar
    clips do (started about 1.5 s into a 12 s clip, stopped about 10 s in): the motor's pitch and
    the sound's amplitude follow the speed. Measured, not adopted (BENCHMARKS.md, "The synthetic
    toy car's target domain").

    ``attribute_effect``: how far the car model and the motor voltage move the sound from the
    section's own car at its own speed; 1 (the default) as drawn, 0 every model and voltage alike.
    The real folder's car models and voltages move the log-Mel statistics far less against the
    clip-to-clip spread than the drawn ones do (``realism.attribute_accuracy``); measured, not
    adopted (BENCHMARKS.md, "The synthetic toy car's target domain").

    ``line_db``: the level of the motor's, the commutator's and the gear's tone lines against the
    rolling noise, dB (0, the default: as drawn). A line moves by more than a Mel bin between
    the voltages of a section, so a smaller ``attribute_effect`` did not bring them closer; lower
    lines did, a little. The anomalies added to the sound keep their level, so against a car with
    lower lines they stand further out. Measured, not adopted (the same section).

    Two kinds are not among ``anomalies`` (which the generator draws from); the same section
    measures them as the only ones, not adopted. ``worn-gear``: a worn gear squeals, a steady tone
    line in ``worn_gear_hz`` (2-4 kHz by default, per car model) that follows the motor's speed,
    as the real folder's source anomaly in docs/realism_spectrograms.png shows one.
    ``eccentric-gear``: the load, and with it every tone line, swells and fades once per
    revolution of the intermediate gear (depth 0.5 x strength, at most 1): sidebands around the
    lines, the classic sign of a damaged gear.
    """

    name = "ToyCar"
    run: tuple[float, float, float, float] | None = None
    attribute_effect: float = 1.0
    line_db: float = 0.0
    worn_gear_hz: tuple[float, float] = (2000.0, 4000.0)
    anomalies = ("flat-tire", "gear-chip", "bent-shaft", "brush-spark")
    specs = (
        _spec("motor voltage (speed)", ("car", "spd"), [["A1", "A2"], ["28V", "31V"]], [["A1", "A2"], ["37V", "40V"]]),
        _spec("microphone position", ("car", "mic"), [["A1", "A2"], ["1", "2"]], [["A1", "A2"], ["3", "4"]]),
        _spec("factory noise type", ("car", "noise"), [["A1", "A2"], ["1", "2"]], [["A1", "A2"], ["3", "4"]]),
    )

    def unit(self, r):
        return dict(car=f"U{int(r.integers(100))}", spd=r.uniform(28, 34),
                    thump=[(r.uniform(150, 400), r.uniform(0.01, 0.03), 1.0)],
                    click=[(r.uniform(3000, 5000), 0.003, 1.0)], spark=[(r.uniform(5500, 7000), 0.0008, 1.0)])

    def sound(self, c, u, a, anomaly, s):
        m = toy_car_model(self.name, a.get("car", u["car"]))
        spd = self.default(a, u, "spd")
        if self.attribute_effect != 1.0:
            m = blend_model(toy_car_model(self.name, u["car"]), m, self.attribute_effect)
            spd = u["spd"] + self.attribute_effect * (spd - u["spd"])
        fm0 = m["k"] * spd / 10
        speed = run_speed(c, self.run) if self.run else np.float32(1.0)
        jitter = 0.01 * c.smooth(2.0)
        fw0 = fm0 / m["ratio"]
        cyc_w = None
        if anomaly == "bent-shaft":  # load oscillates once per wheel revolution
            cyc_w = c.cycles(fw0 * (speed + jitter))
            jitter = jitter + 0.03 * s * periodic(c, cyc_w, [1.0], fw0)
        fm = fm0 * (speed + jitter)
        cyc = c.cycles(fm)
        cyc_w = c.cycles(fm / m["ratio"]) if cyc_w is None else cyc_w
        whine = periodic(c, cyc * m["comm"], m["comm_amps"], m["comm"] * fm0 * 1.05)
        motor = periodic(c, cyc, m["motor_amps"], fm0 * 1.05)
        gear = periodic(c, cyc * m["teeth"], [1.0, 0.3], m["teeth"] * fm0 * 1.05)
        wheel = periodic(c, cyc_w, [1.0], fw0)
        depth = 0.3 + (0.6 * s if anomaly == "bent-shaft" else 0.0)
        # the chassis resonances colour the rolling noise
        roll = c.noise(("peak", m["roll_fc"], 0.7, 10), ("band", 80, 6000), *(("peak", *b) for b in m["body"]))
        roll *= 1 + depth * wheel
        brush = c.noise(("band", 3000, 7500))
        lines = np.float32(10 ** (self.line_db / 20))
        drive = 0.5 * unit_rms(whine) + 0.3 * unit_rms(motor) + 0.25 * gear
        if anomaly == "eccentric-gear":  # the load, and with it every tone line, swells once per gear revolution
            drive = drive * (1 + min(1.0, 0.5 * s) * np.cos(2 * np.pi * cyc / np.sqrt(m["ratio"]))).astype(np.float32)
        x = lines * drive + 0.6 * roll + 0.15 * brush
        if anomaly == "flat-tire":  # a thump every wheel revolution
            t = crossings(cyc_w, c.rng.random())
            x = x + 2.0 * s * resonate(c.impulses(t, c.rng.uniform(0.8, 1.0, len(t))), u["thump"])
        elif anomaly == "gear-chip":  # a chipped intermediate gear clicks once per its revolution
            t = crossings(cyc / np.sqrt(m["ratio"]), c.rng.random())
            x = x + 1.2 * s * resonate(c.impulses(t, c.rng.uniform(0.6, 1.0, len(t))), u["click"])
        elif anomaly == "brush-spark":  # arcing brushes crackle
            t = c.poisson_times(60.0)
            x = x + 3.0 * s * resonate(c.impulses(t, c.rng.exponential(0.5, len(t))), u["spark"])
        elif anomaly == "worn-gear":  # a squeal at a fixed multiple of the motor's rate, drawn per car model
            squeal = keyed_rng("worn-gear", self.name, a.get("car", u["car"])).uniform(*self.worn_gear_hz) / fm0
            x = x + 0.2 * s * periodic(c, cyc * squeal, [1.0], squeal * fm0 * 1.05)
        return x * speed


@lru_cache(maxsize=64)
def train_mic(value: str) -> tuple[float, float]:
    """Microphone ``value`` beside a toy-train loop: (position along the loop 0..1, distance m)."""
    r = keyed_rng("toy-train-mic", value)
    return r.uniform(0, 1), r.uniform(0.1, 0.5)


class ToyTrain(Machine):
    """Toy train on a track loop (ToyADMOS2): motor whine, rail-joint clacks, pass-by loudness."""

    name = "ToyTrain"
    anomalies = ("flat-wheel", "obstacle", "gear-crunch", "derail-scrape")
    specs = (
        _spec("speed level", ("car", "spd"), [["A", "B"], ["6", "7"]], [["A", "B"], ["9", "10"]]),
        _spec("microphone position", ("car", "mic"), [["A", "B"], ["1", "2"]], [["A", "B"], ["3", "4"]]),
        _spec("factory noise type", ("car", "noise"), [["A", "B"], ["1", "2"]], [["A", "B"], ["3", "4"]]),
    )

    def unit(self, r):
        return dict(car=f"U{int(r.integers(100))}", spd=r.uniform(6, 8), mic=f"U{int(r.integers(100))}",
                    loop=r.uniform(2.5, 4.0), joint=r.uniform(0.15, 0.25), obstacles=r.uniform(0, 1, 3),
                    rail=[(r.uniform(1500, 3000), r.uniform(0.006, 0.015), 1.0),
                          (r.uniform(3500, 5500), r.uniform(0.003, 0.008), 0.6)],
                    wheel=[(r.uniform(800, 1500), 0.006, 1.0)], crunch=[(r.uniform(3000, 6000), 0.002, 1.0)])

    def sound(self, c, u, a, anomaly, s):
        m = toy_car_model(self.name, a.get("car", u["car"]))
        v0 = 0.05 * self.default(a, u, "spd")  # m/s
        v = v0 * (1 + 0.01 * c.smooth(1.0))
        pos = np.cumsum(v, dtype=np.float64) / SR + c.rng.uniform(0, u["loop"])  # front of the train, m
        fm0 = v0 * m["gear"]
        cyc = pos * m["gear"]
        motor = periodic(c, cyc, m["motor_amps"], fm0 * 1.05)
        gear = periodic(c, cyc * m["teeth"], [1.0], m["teeth"] * fm0 * 1.05)
        roll = c.noise(("band", 400, 4000))
        exc = np.zeros(c.n, np.float32)
        laps, joints = pos / u["loop"], pos / u["joint"]
        for off in m["axles"]:  # every axle clacks over every rail joint
            t = crossings(joints, off / u["joint"])
            exc += c.impulses(t, 0.8 * c.rng.uniform(0.8, 1.2, len(t)))
            if anomaly == "obstacle":  # debris on the track: every axle knocks at a few spots of the loop
                for spot in u["obstacles"]:
                    exc += c.impulses(crossings(laps, spot + off / u["loop"]), 5.0 * s)
        x = 0.35 * unit_rms(motor) + 0.1 * gear + 0.4 * roll + resonate(exc, u["rail"])
        if anomaly == "flat-wheel":
            t = crossings(pos / (np.pi * m["wheel"]), c.rng.random())
            x = x + 3.0 * s * resonate(c.impulses(t, c.rng.uniform(0.8, 1.0, len(t))), u["wheel"])
        elif anomaly == "gear-crunch":
            t = crossings(cyc / 8, c.rng.random())
            x = x + 1.2 * s * resonate(c.impulses(t, c.rng.exponential(0.7, len(t))), u["crunch"])
        elif anomaly == "derail-scrape":
            on = decay((c.smooth(2.0) > 0.5).astype(np.float32), 0.02)
            x = x + 1.0 * s * on * c.noise(("band", 2000, 6000, 3))
        where, dist = train_mic(a.get("mic", u["mic"]))
        along = (pos - m["axles"][-1] / 2 - where * u["loop"]) % u["loop"]
        along = np.minimum(along, u["loop"] - along)
        return x * (0.5 / np.sqrt(dist ** 2 + along ** 2)).astype(np.float32)  # pass-by loudness


MACHINES: dict[str, Machine] = {m.name: m for m in (ToyCar(), ToyTrain(), Bearing(), Fan(), Gearbox(), Slider(),
                                                    Valve())}


# ----------------------------------------------------------------------------- one clip


def scene_for(machine: str, section: str, attrs: dict[str, str]) -> Scene:
    """Background and microphone path of a clip: the unit's own unless an attribute sets them."""
    scene = Scene(noise=f"{machine}-{section}", path=f"{machine}-{section}")
    for p, v in attrs.items():
        if p in NOISE_PARAMS:
            scene = replace(scene, noise=f"{p}:{v}")
        elif p in PATH_PARAMS:
            scene = replace(scene, path=f"{machine}:{p}:{v}")
        elif p == MIXED_PARAM:
            scene = replace(scene, interferer=v)
        elif p == LEVEL_PARAM:
            scene = replace(scene, snr_offset_db=6.0 - 3.0 * number(v))
    return scene


@dataclass(frozen=True)
class Difficulty:
    """What makes real machine sound hard (docs/synthetic-data.md, "Difficulty"); all off by default.

    ``hidden_states``: operating states of every unit that no attribute names (load, temperature,
    wear, a door open); each clip is in one, and each state colours the machine's spectrum by up
    to ``state_db`` (a spectral tilt and a broad peak), ``clip_db`` more per clip.
    ``anomaly_duty``: the fraction of the clip an anomaly is present in (one stretch, uniform in
    the range; 1 = the whole clip). ``events_per_s``: intermittent background sources (a voice-like
    harmonic complex, a tool's band of noise, a passing vehicle's swell), 0.2-2 s long, at a
    machine-to-event ratio uniform in ``event_snr_db``. ``machine_snr_db``: (machine type, dB)
    pairs added to that type's machine-to-background ratio (a machine quieter against its
    factory than the others, calibrated on real clips of it). ``machine_anomaly_gain``: (machine
    type, factor) pairs scaling that type's anomaly strength (a type whose anomalies the detectors
    found far easier than real ones, calibrated with ``benchmarks/anomaly_kinds.py``).
    ``anomaly_kinds``: (machine type, kinds) pairs: the kinds that type's anomalous clips cycle
    through instead of its own (its own or :data:`GENERIC_ANOMALIES`). ``tone_line_db``: the level
    of the generic ``tone-line`` anomaly at strength 1 against the machine's sound.
    ``resonance_db``: the gain of the generic ``resonance`` anomaly's peak at strength 1;
    ``resonance_q``: its quality (2: an octave wide at half its excess; 8: a quarter of an octave).
    """

    hidden_states: int = 0
    state_db: float = 0.0
    clip_db: float = 0.0
    anomaly_duty: tuple[float, float] = (1.0, 1.0)
    events_per_s: float = 0.0
    event_snr_db: tuple[float, float] = (0.0, 10.0)
    machine_snr_db: tuple[tuple[str, float], ...] = ()
    machine_anomaly_gain: tuple[tuple[str, float], ...] = ()
    anomaly_kinds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tone_line_db: float = -12.0
    resonance_db: float = 3.0
    resonance_q: float = 2.0

    def kinds(self, machine: str) -> tuple[str, ...]:
        """The anomaly kinds ``machine``'s anomalous clips cycle through (checked when the dataset
        is planned, not at the first clip rendered)."""
        own = MACHINES[machine].anomalies
        kinds = dict(self.anomaly_kinds).get(machine, own)
        if not kinds or any(k not in own + GENERIC_ANOMALIES for k in kinds):
            raise ValueError(f"Difficulty.anomaly_kinds: {machine} cannot draw {kinds!r}; "
                             f"known: {', '.join(own + GENERIC_ANOMALIES)}")
        return kinds


# kinds any machine type can be given (``Difficulty.anomaly_kinds``); ``Difficulty()`` draws none, the
# real-sound default (``generate.REAL_SOUND``) ``resonance`` for every type
GENERIC_ANOMALIES = ("tone-line", "resonance")


def tone_line(c: Ctx, machine: str, section: str, rms: float, s: float, db: float) -> np.ndarray:
    """A worn part's steady tone line: one sinusoid at a frequency of the unit's own (400-4000 Hz),
    wandering by 0.2 %, at ``db`` x ``s`` against ``rms``. On real normal sound a steady tone is
    what the kNN floor finds and the untrained network does not (BENCHMARKS.md, "What the untrained
    network sees"); a swelling line (sidebands) or one that comes and goes, the network sees."""
    f0 = log_uniform(keyed_rng("tone-line", machine, section), 400, 4000)
    line = np.sin(2 * np.pi * c.cycles(f0 * (1 + 0.002 * c.smooth(0.5))))
    return unit_rms(line.astype(np.float32)) * np.float32(rms * s * 10 ** (db / 20))


def resonance_change(c: Ctx, x: np.ndarray, s: float, db: float, q: float = 2.0) -> np.ndarray:
    """A changed resonance of the machine's body or its transfer path (a loose panel, a cracked
    mount, a worn bearing seat): the machine's whole sound through a peak of ``db`` x ``s`` at
    0.5-4 kHz (log-uniform per clip) of quality ``q`` (half its amplitude excess fc / q either side
    of its centre fc). Multiplicative, so it moves the log spectrum alike in
    every operating condition and domain. Implanted in real normal toy-car clips at 3 dB the three
    detectors see it as they see the real anomalies (``benchmarks/implant.py``: kNN floor 65 / 64,
    untrained network 54 / 48, spectral kNN 74 / 62; real anomalies 61 / 62, 50 / 47, 74 / 63)."""
    peak_op = ("peak", round(log_uniform(c.rng, 500, 4000), 1), float(q), round(db * s, 3))
    return sfft.irfft(sfft.rfft(x) * spectrum(c.n, (peak_op,)), c.n).astype(np.float32)


def colouring(n: int, rng: np.random.Generator, db: float) -> tuple:
    """Spectrum ops of a random colouring up to ``db``: a tilt of up to db/4 per octave and a
    broad peak or dip of up to db."""
    return (("tilt", rng.uniform(-1, 1) * db / 4), ("peak", log_uniform(rng, 150, 5000), rng.uniform(0.7, 2.0),
                                                    rng.uniform(-1, 1) * db))


def operating_state(c: Ctx, x: np.ndarray, machine: str, section: str, d: Difficulty) -> np.ndarray:
    """The machine sound coloured by the clip's hidden operating state and its own variation."""
    if d.hidden_states <= 0 and d.clip_db <= 0:
        return x
    ops = ()
    if d.hidden_states > 0:
        state = int(c.rng.integers(d.hidden_states))
        ops += colouring(c.n, keyed_rng("hidden-state", machine, section, state), d.state_db)
    if d.clip_db > 0:
        ops += colouring(c.n, c.rng, d.clip_db)
    return sfft.irfft(sfft.rfft(x) * spectrum(c.n, tuple(round(v, 6) if isinstance(v, float) else v for v in ops)),
                      c.n).astype(np.float32)


def stretch(c: Ctx, duty: tuple[float, float], fade_s: float = 0.05) -> np.ndarray:
    """A 0..1 envelope that is 1 over one random stretch of the clip (raised-cosine fades)."""
    length = int(c.rng.uniform(*duty) * c.n)
    if length >= c.n:
        return np.ones(c.n, np.float32)
    start = int(c.rng.integers(0, c.n - length + 1))
    g = gate(c, [start], [start + length])
    k = max(1, int(fade_s * SR))
    return np.convolve(g, np.hanning(2 * k + 1) / np.hanning(2 * k + 1).sum(), mode="same").astype(np.float32)


def background_events(c: Ctx, rate: float) -> np.ndarray:
    """Intermittent other sources, each with unit RMS while it sounds; zeros when there is none."""
    out = np.zeros(c.n, np.float32)
    for onset in c.poisson_times(rate):
        length = int(c.rng.uniform(0.2, 2.0) * SR)
        kind = int(c.rng.integers(3))
        if kind == 0:  # a voice or a tool's whine: a gliding harmonic complex
            f0 = log_uniform(c.rng, 90, 600)
            sound = periodic(c, c.cycles(f0 * (1 + 0.05 * c.smooth(3.0))), c.rng.uniform(0.2, 1, 8) / np.arange(1, 9),
                             f0 * 1.2)
        elif kind == 1:  # a hand tool or an air blow-off: a band of noise
            fc = log_uniform(c.rng, 300, 6000)
            sound = c.noise(("band", fc / 1.5, fc * 1.5, 2))
        else:  # a passing vehicle or a crane: a low rumble
            sound = c.noise(("tilt", -4.0), ("band", 40, 1500))
        env = np.zeros(c.n, np.float32)
        stop = min(c.n, onset + length)
        env[onset:stop] = np.sin(np.linspace(0, np.pi, stop - onset, dtype=np.float32))  # swells and fades
        out += unit_rms(sound) * env
    return out


def render_clip(machine: str, section: str, attrs: dict[str, str], *, anomaly: str | None, strength: float,
                snr_db: float, rng: np.random.Generator, n: int, difficulty: Difficulty = Difficulty()) -> np.ndarray:
    """One clip as float32 in [-1, 1]: machine (+ anomaly) in its operating state through the mic
    path, plus background (and its events)."""
    model = MACHINES[machine]
    if anomaly is not None and anomaly not in model.anomalies + GENERIC_ANOMALIES:
        raise ValueError(f"{machine}: unknown anomaly {anomaly!r}; known: {model.anomalies + GENERIC_ANOMALIES}")
    d = difficulty
    strength = float(strength) * dict(d.machine_anomaly_gain).get(machine, 1.0)
    unit = section_unit(machine, section)
    if anomaly in GENERIC_ANOMALIES:  # a change of the machine's normal sound, all through the clip
        c = Ctx(n, rng)
        x = model.sound(c, unit, attrs, None, 0.0)
        if anomaly == "resonance":
            x = resonance_change(c, x, strength, d.resonance_db, d.resonance_q)
        else:
            x = x + tone_line(c, machine, section, float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))),
                              strength, d.tone_line_db)
    elif anomaly is not None and d.anomaly_duty[0] < 1.0:
        # the anomaly sounds over one stretch: the rest of the clip is the same machine rendered normal
        normal = model.sound(Ctx(n, np.random.default_rng(rng.integers(2**63))), unit, attrs, None, 0.0)
        c = Ctx(n, rng)
        on = stretch(c, d.anomaly_duty)
        x = normal + on * (model.sound(c, unit, attrs, anomaly, strength) - normal)
    else:
        c = Ctx(n, rng)
        x = model.sound(c, unit, attrs, anomaly, strength if anomaly else 0.0)
    scene = scene_for(machine, section, attrs)
    power = float(np.mean(np.square(x, dtype=np.float64)))
    x = operating_state(c, x, machine, section, d)
    bg = factory_noise(c, scene.noise)
    if scene.interferer is not None:
        bg = unit_rms(bg + mixed_machine(c, scene.interferer))
    snr = snr_db + scene.snr_offset_db + dict(d.machine_snr_db).get(machine, 0.0)
    y = apply_path(x, scene.path) + bg * np.float32(np.sqrt(power / 10 ** (snr / 10)))
    if d.events_per_s > 0:
        y += background_events(c, d.events_per_s) * np.float32(np.sqrt(power / 10 ** (c.rng.uniform(*d.event_snr_db) / 10)))
    y *= np.float32(10 ** ((LEVEL_DBFS + rng.uniform(-2, 2)) / 20))
    top = float(np.max(np.abs(y)))
    return y * np.float32(PEAK / top) if top > PEAK else y
