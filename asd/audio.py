"""Decoding WAV files with soundfile, and the policy for rates and channel counts.

The method expects 16 kHz mono. Other inputs are never used silently as they are:
``resample="resample"`` converts the rate with torchaudio's band-limited resampler and
``channels="downmix"`` averages the channels; ``"reject"`` raises ``AudioFormatError`` instead.
What was converted is returned in ``AudioInfo`` so that callers can record it.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


class AudioFormatError(ValueError):
    """A clip that cannot be decoded or is unusable under the configured policy."""


@dataclass(frozen=True)
class AudioInfo:
    """How the decoded clip came to be: original rate/channels and what was done to it."""

    sample_rate: int
    channels: int
    frames: int
    resampled: bool
    downmixed: bool


def load_audio(
    source: str | os.PathLike | bytes,
    sample_rate: int = 16000,
    resample: str = "resample",
    channels: str = "downmix",
) -> tuple[torch.Tensor, AudioInfo]:
    """Decode a WAV file (path or bytes) to a float32 mono tensor at ``sample_rate``.

    Raises ``AudioFormatError`` naming the reason for undecodable, empty or non-finite audio,
    and for a rate or channel count that the policy rejects.
    """
    if resample not in ("resample", "reject") or channels not in ("downmix", "reject"):
        raise ValueError(f"unknown audio policy resample={resample!r} channels={channels!r}")
    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    try:
        data, sr = sf.read(io.BytesIO(source) if isinstance(source, bytes) else name,
                           dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types (LibsndfileError, RuntimeError, ...)
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", str(err))
        raise AudioFormatError(f"{name}: cannot decode audio: {reason}") from err
    frames, n_channels = data.shape
    if frames == 0:
        raise AudioFormatError(f"{name}: empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioFormatError(f"{name}: audio contains NaN or infinite samples")
    if n_channels > 1 and channels == "reject":
        raise AudioFormatError(f"{name}: {n_channels} channels, expected mono")
    if sr != sample_rate and resample == "reject":
        raise AudioFormatError(f"{name}: sample rate {sr} Hz, expected {sample_rate} Hz")
    wave = torch.from_numpy(data.mean(axis=1) if n_channels > 1 else data[:, 0])
    if sr != sample_rate:
        wave = AF.resample(wave, sr, sample_rate)
    info = AudioInfo(sample_rate=sr, channels=n_channels, frames=frames,
                     resampled=sr != sample_rate, downmixed=n_channels > 1)
    return wave.contiguous(), info
