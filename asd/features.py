"""Inverted log-Mel features (paper Sec. 4.2, after Sahidullah et al. 2015), plain log-Mel, the
log-Mel of the official DCASE baselines (``librosa_logmel``), and the log power spectrogram on
linear frequency bins (``spectrum``, not in the paper: the spectral kNN's input, docs/method.md).

The inverted Mel filterbank is the Mel filterbank mirrored in frequency: the filter that the
Mel scale places at frequency ``f`` is placed at ``sr/2 - f``. Resolution is then finest at
high frequencies, where machine sounds carry much of their information.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torchaudio.functional as AF

FEATURE_KINDS = ("inverted_logmel", "logmel", "librosa_logmel", "spectrum")
# kind -> (Mel scale and filter normalisation, padding of the centred STFT)
_FRONT_ENDS = {"inverted_logmel": ("htk", "reflect"), "logmel": ("htk", "reflect"),
               # librosa.feature.melspectrogram defaults, as the official DCASE 2022 Task 2 AE
               # baseline computes its input (librosa 0.9.1): Slaney Mel scale with Slaney area
               # normalisation, centred frames zero-padded (librosa >= 0.9 pads with zeros)
               "librosa_logmel": ("slaney", "constant"),
               # no filterbank: the n_fft // 2 + 1 STFT bins themselves (n_mels does not apply)
               "spectrum": (None, "reflect")}


@dataclass(frozen=True)
class FeatureConfig:
    """Settings of the spectral front end. ``version`` changes whenever any field changes."""

    kind: str = "inverted_logmel"
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 128
    log_floor: float = 1e-10  # power floor before the log: -100 dB
    resample: str = "resample"  # or "reject" (see asd.audio)
    channels: str = "downmix"  # or "reject"
    min_frames: int = 64  # shorter clips cannot give one training crop

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"feature kind must be one of {FEATURE_KINDS}, got {self.kind!r}")

    @property
    def version(self) -> str:
        """Short content hash of the settings: stored with every feature row."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def n_bins(self) -> int:
        """Rows of a feature matrix: ``n_mels``, or the ``n_fft // 2 + 1`` STFT bins of ``spectrum``."""
        return self.n_fft // 2 + 1 if self.kind == "spectrum" else self.n_mels

    def num_frames(self, num_samples: int) -> int:
        """Frames of a centred STFT of ``num_samples`` samples."""
        return 1 + num_samples // self.hop_length


@lru_cache(maxsize=8)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, inverted: bool,
                   scale: str = "htk") -> torch.Tensor:
    """[n_fft//2+1, n_mels] triangular filters (torchaudio, 0 Hz .. Nyquist).

    ``scale="htk"``: HTK Mel scale, filters of peak 1 (no normalisation). ``scale="slaney"``:
    librosa's default bank (``librosa.filters.mel``): Slaney Mel scale (linear below 1 kHz,
    logarithmic above) and Slaney area normalisation (filter m scaled by 2 / (f_{m+2} - f_m)).
    ``inverted=True`` mirrors the bank in frequency (bin k -> bin n_freqs-1-k) and reverses
    the filter order, so filters still run from low to high frequency.
    """
    if scale not in ("htk", "slaney"):
        raise ValueError(f"scale must be 'htk' or 'slaney', got {scale!r}")
    fb = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate,
                            norm=None if scale == "htk" else "slaney", mel_scale=scale)
    return fb.flip(0).flip(1).contiguous() if inverted else fb


def power_spectrogram(wave: torch.Tensor, n_fft: int, hop_length: int,
                      pad_mode: str = "reflect") -> torch.Tensor:
    """|STFT|^2 with a periodic Hann window, centred frames with reflect (or zero,
    ``pad_mode="constant"``) padding: [..., F, T].

    The same values as ``torch.stft(center=True, pad_mode="reflect")``, computed by framing
    (``unfold``) + ``rfft`` and squaring real and imaginary parts, which costs less on one CPU
    thread than ``torch.stft`` followed by a complex ``abs().pow(2)``."""
    return _power_frames(wave, n_fft, hop_length, pad_mode).transpose(-1, -2)


def _power_frames(wave: torch.Tensor, n_fft: int, hop_length: int, pad_mode: str = "reflect") -> torch.Tensor:
    """:func:`power_spectrogram` with frames first: [..., T, F] (contiguous)."""
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}")
    if pad_mode == "reflect" and wave.shape[-1] <= n_fft // 2:
        raise ValueError(f"{wave.shape[-1]} samples: reflect padding needs more than n_fft//2 = {n_fft // 2}")
    lead = wave.shape[:-1]
    padded = torch.nn.functional.pad(wave.reshape(-1, 1, wave.shape[-1]), (n_fft // 2, n_fft // 2),
                                     mode=pad_mode)
    window = torch.hann_window(n_fft, dtype=wave.dtype, device=wave.device)
    frames = padded[:, 0].unfold(-1, n_fft, hop_length) * window  # [B, T, n_fft]
    parts = torch.view_as_real(torch.fft.rfft(frames, dim=-1))  # [B, T, F, 2]
    parts = parts * parts
    power = parts[..., 0] + parts[..., 1]
    return power.reshape(*lead, *power.shape[-2:])


def log_mel(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Features of ``wave`` [..., samples] -> [..., n_bins, frames] in dB (10 log10, floored).

    ``spectrum`` is the power spectrogram itself, ``10 log10(max(|STFT|^2, floor))`` per linear
    frequency bin (``cfg.n_bins`` = n_fft // 2 + 1 rows).

    ``librosa_logmel`` is ``10 log10(max(librosa.feature.melspectrogram(y, sr, n_fft=..,
    hop_length=.., n_mels=.., power=2), floor))`` (librosa >= 0.9 defaults), the official AE
    baseline's ``20/power * log10(max(mel, eps))`` with ``cfg.log_floor`` in place of the machine
    epsilon (the two differ only where a Mel band is below -100 dB, e.g. digital silence).
    """
    scale, pad_mode = _FRONT_ENDS[cfg.kind]
    power = _power_frames(wave, cfg.n_fft, cfg.hop_length, pad_mode)  # [..., T, n_fft // 2 + 1]
    if scale is not None:
        fb = mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate, cfg.kind == "inverted_logmel", scale)
        power = torch.matmul(power, fb.to(device=power.device, dtype=power.dtype))  # [..., T, n_mels]
    return (10.0 * torch.log10(power.clamp_min(cfg.log_floor))).transpose(-1, -2).contiguous()
