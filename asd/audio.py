"""Decoding WAV files with soundfile, the policy for rates and channel counts, and audio checks.

The method expects 16 kHz mono. Other inputs are never used silently as they are:
``resample="resample"`` converts the rate with a polyphase resampler (:func:`resample`) and
``channels="downmix"`` averages the channels; ``"reject"`` raises ``AudioFormatError`` instead.
What was converted is returned in ``AudioInfo`` so that callers can record it, together with
what the WAV header declared, so that a truncated file can be told from a short one
(:func:`audio_flags`).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

# Accepted source rates. Outside them a file is not audio the front end can use (or a header
# error); inside, the cost of resampling is bounded by MAX_RATIO_TERM below.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 384000
# The resampling ratio target/source is used as the fraction up/down with both terms at most
# this: an exact ratio such as 16000/44101 would need a 900k-tap filter (and torchaudio's
# resampler a kernel of gigabytes); the nearest fraction within the bound changes the rate by
# less than 1e-5 relative (a 44101 Hz clip plays 0.0004 % slow: far below one Mel bin).
MAX_RATIO_TERM = 1000
# "heavy clipping": at least this share of samples at (or within 0.1 % of) full scale
CLIPPING_LEVEL = 0.999
CLIPPING_SHARE = 0.01


class AudioFormatError(ValueError):
    """A clip that cannot be decoded or is unusable under the configured policy."""


@dataclass(frozen=True)
class AudioInfo:
    """How the decoded clip came to be: original rate/channels and what was done to it.

    ``declared_frames``: the frame count the WAV header's data chunk declares (None when the
    header does not say, e.g. a streamed WAV or another container); ``flags``: suspicious
    properties of the clip (:func:`audio_flags`)."""

    sample_rate: int
    channels: int
    frames: int
    resampled: bool
    downmixed: bool
    declared_frames: int | None = None
    flags: tuple[str, ...] = ()


def resample_ratio(source_rate: int, target_rate: int) -> Fraction:
    """target/source as a fraction whose terms are at most ``MAX_RATIO_TERM`` (exact when they fit)."""
    ratio = Fraction(target_rate, source_rate)
    if max(ratio.numerator, ratio.denominator) <= MAX_RATIO_TERM:
        return ratio
    bound = MAX_RATIO_TERM if ratio <= 1 else max(1, int(MAX_RATIO_TERM / ratio))
    return ratio.limit_denominator(bound)


def resample(wave: torch.Tensor, source_rate: int, target_rate: int) -> torch.Tensor:
    """Band-limited polyphase resampling (scipy's ``resample_poly``, Kaiser-windowed FIR) of a
    1-D waveform; time and memory grow with the clip's length only (see ``MAX_RATIO_TERM``)."""
    ratio = resample_ratio(source_rate, target_rate)
    if ratio == 1:
        return wave
    from scipy.signal import resample_poly  # deferred: ~1.5 s to import, and most clips need no resampling

    out = resample_poly(wave.numpy(), ratio.numerator, ratio.denominator)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def check_rate(sample_rate: int, target_rate: int, policy: str, name: str = "<waveform>") -> None:
    """Raise ``AudioFormatError`` for a rate the policy does not accept."""
    if sample_rate != target_rate and policy == "reject":
        raise AudioFormatError(f"{name}: sample rate {sample_rate} Hz, expected {target_rate} Hz")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioFormatError(f"{name}: sample rate {sample_rate} Hz outside the accepted "
                               f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")


def prepare_waveform(wave: torch.Tensor, sample_rate: int, target_rate: int, resample_policy: str,
                     name: str = "<waveform>") -> torch.Tensor:
    """A decoded mono waveform checked (non-empty, finite, accepted rate) and at ``target_rate``."""
    if wave.numel() == 0:
        raise AudioFormatError(f"{name}: empty audio (0 samples)")
    if not torch.isfinite(wave).all():
        raise AudioFormatError(f"{name}: audio contains NaN or infinite samples")
    check_rate(sample_rate, target_rate, resample_policy, name)
    return resample(wave, sample_rate, target_rate).contiguous()


def wav_declared_frames(data: bytes) -> int | None:
    """Frames the RIFF/WAVE header's ``data`` chunk declares (libsndfile reports only what it
    could read, so a file cut short looks like a shorter clip). None when not a plain RIFF WAV
    or the size is the streaming placeholder."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt " and pos + 20 <= len(data):
            block_align = struct.unpack("<H", data[pos + 20:pos + 22])[0]
        elif chunk == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    return None


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
    try:  # one read: the bytes are decoded and their header checked (wav_declared_frames)
        raw = source if isinstance(source, bytes) else Path(name).read_bytes()
        data, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as err:  # OSError, and soundfile's several types (LibsndfileError, RuntimeError, ...)
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", str(err))
        raise AudioFormatError(f"{name}: cannot decode audio: {reason}") from err
    frames, n_channels = data.shape
    if n_channels > 1 and channels == "reject":
        raise AudioFormatError(f"{name}: {n_channels} channels, expected mono")
    mono = data.mean(axis=1) if n_channels > 1 else data[:, 0]
    wave = prepare_waveform(torch.from_numpy(mono), sr, sample_rate, resample, name)
    declared = wav_declared_frames(raw)
    info = AudioInfo(sample_rate=sr, channels=n_channels, frames=frames, resampled=sr != sample_rate,
                     downmixed=n_channels > 1, declared_frames=declared,
                     flags=audio_flags(data, mono, declared))
    return wave, info


def audio_flags(samples: np.ndarray, mono: np.ndarray, declared_frames: int | None = None) -> tuple[str, ...]:
    """Suspicious properties of a decoded clip: ``truncated`` (fewer frames than the header
    declares), ``constant`` (the down-mixed ``mono`` is digital silence or a constant signal:
    nothing to analyse; judged after the down-mix, because channels in anti-phase cancel to
    silence there), ``clipping`` (at least ``CLIPPING_SHARE`` of the source ``samples`` [frames,
    channels] at full scale: before any conversion, so that down-mixing and resampling cannot
    hide it)."""
    flags = []
    if declared_frames is not None and len(samples) < declared_frames:
        flags.append("truncated")
    if mono.size and mono.max() == mono.min():
        flags.append("constant")
    elif samples.size and np.mean(np.abs(samples) >= CLIPPING_LEVEL) >= CLIPPING_SHARE:
        flags.append("clipping")
    return tuple(flags)


def require_signal(info: AudioInfo) -> None:
    """Raise ``AudioFormatError`` for a clip flagged ``constant``: a score of silence (or of
    channels that cancel in the down-mix) measures the microphone, not the machine."""
    if "constant" in info.flags:
        cancelled = f" after down-mixing {info.channels} channels" if info.downmixed else ""
        raise AudioFormatError(f"constant signal{cancelled} (digital silence or DC offset): nothing to analyse")
