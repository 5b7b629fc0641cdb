"""Tests of WAV decoding (asd/audio.py) and the (inverted) log-Mel front end (asd/features.py).

References are independent: scipy.io.wavfile for decoding, and a numpy re-implementation of the
HTK Mel filterbank, the periodic-Hann centred STFT and the dB conversion for the features.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from asd.audio import AudioFormatError, AudioInfo, load_audio
from asd.features import FeatureConfig, log_mel, mel_filterbank, power_spectrogram

SR = 16000


def _sine(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(round(sr * seconds))) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def _to_int16(x):
    return np.round(np.clip(x, -1, 1 - 1 / 32768) * 32767).astype(np.int16)


def _peak_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * sr / len(x)


# ============================================================================= audio

def test_int16_mono_decodes_like_scipy(tmp_path, write_wav):
    rng = np.random.default_rng(0)
    samples = rng.integers(-32768, 32768, size=4001, dtype=np.int16)
    samples[:4] = [-32768, 32767, 0, 1]
    path = write_wav(tmp_path / "a.wav", samples, SR)
    wave, info = load_audio(path)
    sr, ref = wavfile.read(path)
    assert sr == SR
    assert wave.dtype == torch.float32 and wave.shape == (4001,)
    np.testing.assert_array_equal(wave.numpy(), (ref.astype(np.float64) / 32768.0).astype(np.float32))
    assert info == AudioInfo(sample_rate=SR, channels=1, frames=4001, resampled=False, downmixed=False,
                             declared_frames=4001)


def test_bytes_source_equals_path_source(tmp_path, write_wav):
    samples = np.random.default_rng(1).integers(-2000, 2000, size=1000, dtype=np.int16)
    path = write_wav(tmp_path / "b.wav", samples, SR)
    w_path, i_path = load_audio(path)
    w_bytes, i_bytes = load_audio(path.read_bytes())
    assert torch.equal(w_path, w_bytes) and i_path == i_bytes


def test_stereo_downmix_is_channel_mean(tmp_path, write_wav):
    rng = np.random.default_rng(2)
    stereo = rng.integers(-20000, 20000, size=(3000, 2), dtype=np.int16)
    path = write_wav(tmp_path / "st.wav", stereo, SR)
    wave, info = load_audio(path, channels="downmix")
    _, ref = wavfile.read(path)
    expected = ref.astype(np.float64).mean(axis=1) / 32768.0
    np.testing.assert_allclose(wave.numpy(), expected, atol=1e-7, rtol=0)
    assert info.channels == 2 and info.downmixed and not info.resampled and info.frames == 3000


def test_stereo_rejected_by_policy(tmp_path, write_wav):
    path = write_wav(tmp_path / "st.wav", np.zeros((100, 2), np.int16), SR)
    with pytest.raises(AudioFormatError) as err:
        load_audio(path, channels="reject")
    assert str(path) in str(err.value) and "2 channels" in str(err.value)


@pytest.mark.parametrize("sr, freq", [(8000, 1000.0), (44100, 3000.0), (22050, 440.0)])
def test_other_rates_resampled_preserving_frequency(tmp_path, write_wav, sr, freq):
    seconds = 1.0
    x = _sine(freq, sr, seconds)
    path = write_wav(tmp_path / f"r{sr}.wav", _to_int16(x), sr)
    wave, info = load_audio(path, resample="resample")
    n_in = int(round(sr * seconds))
    assert abs(wave.shape[0] - n_in * SR / sr) <= 1
    assert info.sample_rate == sr and info.resampled and info.frames == n_in and not info.downmixed
    w = wave.numpy().astype(np.float64)
    assert abs(_peak_hz(w, SR) - freq) <= SR / len(w) + 1e-9
    # The amplitude of a tone well inside both bands survives resampling.
    mid = w[len(w) // 4: 3 * len(w) // 4]
    assert np.sqrt(np.mean(mid ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_to_other_target_rate(tmp_path, write_wav):
    path = write_wav(tmp_path / "a.wav", _to_int16(_sine(500.0, SR)), SR)
    wave, info = load_audio(path, sample_rate=8000)
    assert wave.shape[0] == 8000 and info.resampled and info.sample_rate == SR
    assert abs(_peak_hz(wave.numpy().astype(np.float64), 8000) - 500.0) <= 1.0


@pytest.mark.parametrize("sr", [8000, 44100])
def test_other_rates_rejected_by_policy(tmp_path, write_wav, sr):
    path = write_wav(tmp_path / "r.wav", np.zeros(sr // 10, np.int16), sr)
    with pytest.raises(AudioFormatError) as err:
        load_audio(path, resample="reject")
    assert str(path) in str(err.value) and str(sr) in str(err.value)


def test_unknown_policy_raises(tmp_path, write_wav):
    path = write_wav(tmp_path / "a.wav", np.zeros(10, np.int16), SR)
    with pytest.raises(ValueError):
        load_audio(path, resample="ignore")
    with pytest.raises(ValueError):
        load_audio(path, channels="first")


def _valid_wav_bytes(tmp_path, write_wav, n=1000):
    path = write_wav(tmp_path / "ok.wav", np.arange(n, dtype=np.int16), SR)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random", "empty", "truncated_header", "header_only", "text"])
def test_broken_files_raise_naming_the_file(tmp_path, write_wav, kind):
    valid = _valid_wav_bytes(tmp_path, write_wav)
    content = {
        "random": np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated_header": valid[:20],
        "header_only": valid[:44],  # a well-formed header with no samples after it
        "text": b"this is not audio at all\n" * 10,
    }[kind]
    path = tmp_path / f"section_00_source_test_normal_0000_{kind}.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFormatError) as err:
        load_audio(path)
    assert str(path) in str(err.value)
    with pytest.raises(AudioFormatError):
        load_audio(content)


def test_zero_sample_wav_is_empty_error(tmp_path, write_wav):
    path = write_wav(tmp_path / "zero.wav", np.zeros(0, np.int16), SR)
    with pytest.raises(AudioFormatError) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_non_finite_float_wav_rejected(tmp_path, write_wav):
    x = np.zeros(100, np.float32)
    x[10] = np.nan
    path = write_wav(tmp_path / "nan.wav", x, SR)
    with pytest.raises(AudioFormatError) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_missing_file_raises_audio_format_error(tmp_path):
    path = tmp_path / "missing.wav"
    with pytest.raises(AudioFormatError) as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_real_clips_decode(real_audio_dir):
    for path in sorted(real_audio_dir.glob("*.wav")):
        wave, info = load_audio(path, resample="reject", channels="reject")
        sr, ref = wavfile.read(path)
        assert sr == SR and ref.dtype == np.int16
        assert wave.shape == (160000,)
        assert info == AudioInfo(sample_rate=SR, channels=1, frames=160000, resampled=False, downmixed=False,
                                 declared_frames=160000)
        np.testing.assert_array_equal(wave.numpy(), (ref / 32768.0).astype(np.float32))


# ============================================================================= features (reference)

def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def _ref_mel_bank(n_fft, n_mels, sr):
    """HTK triangular filters [n_freqs, n_mels], unnormalised, on the linear FFT bin frequencies."""
    n_freqs = n_fft // 2 + 1
    bin_hz = np.arange(n_freqs) * sr / n_fft
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bin_hz):
            rise = (f - lo) / (centre - lo)
            fall = (hi - f) / (hi - centre)
            fb[k, m] = max(0.0, min(rise, fall))
    return fb


def _ref_inverted_bank(n_fft, n_mels, sr):
    fb = _ref_mel_bank(n_fft, n_mels, sr)
    n_freqs = fb.shape[0]
    inv = np.zeros_like(fb)
    for k in range(n_freqs):
        for m in range(n_mels):
            inv[k, m] = fb[n_freqs - 1 - k, n_mels - 1 - m]
    return inv


def _ref_power_stft(x, n_fft, hop):
    x = np.asarray(x, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    padded = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[t * hop: t * hop + n_fft] * window for t in range(n_frames)])
    return (np.abs(np.fft.rfft(frames, axis=1)) ** 2).T  # [n_freqs, T]


def _ref_log_mel(x, cfg: FeatureConfig):
    if cfg.kind == "inverted_logmel":
        fb = _ref_inverted_bank(cfg.n_fft, cfg.n_mels, cfg.sample_rate)
    else:
        fb = _ref_mel_bank(cfg.n_fft, cfg.n_mels, cfg.sample_rate)
    power = _ref_power_stft(x, cfg.n_fft, cfg.hop_length)
    return 10.0 * np.log10(np.maximum(fb.T @ power, cfg.log_floor))


def _bandwidths_hz(fb, sr, n_fft):
    """Width in Hz of the support (non-zero bins) of every filter: [n_mels]."""
    bin_hz = np.arange(fb.shape[0]) * sr / n_fft
    out = []
    for m in range(fb.shape[1]):
        nz = np.nonzero(fb[:, m] > 0)[0]
        out.append(bin_hz[nz[-1]] - bin_hz[nz[0]] if len(nz) else 0.0)
    return np.array(out)


def _centres_hz(fb, sr, n_fft):
    bin_hz = np.arange(fb.shape[0]) * sr / n_fft
    return np.array([bin_hz[np.argmax(fb[:, m])] for m in range(fb.shape[1])])


# ============================================================================= features (tests)

@pytest.mark.parametrize("n_fft, n_mels", [(1024, 128), (512, 40)])
def test_mel_filterbank_matches_numpy_htk(n_fft, n_mels):
    # torchaudio builds the bank in float32: weights agree to float32 rounding of the Mel points.
    fb = mel_filterbank(n_fft, n_mels, SR, False).double().numpy()
    np.testing.assert_allclose(fb, _ref_mel_bank(n_fft, n_mels, SR), atol=5e-5, rtol=0)
    inv = mel_filterbank(n_fft, n_mels, SR, True).double().numpy()
    np.testing.assert_allclose(inv, _ref_inverted_bank(n_fft, n_mels, SR), atol=5e-5, rtol=0)
    # Same support (which bins each filter touches), up to bins that sit on a triangle corner.
    ref = _ref_inverted_bank(n_fft, n_mels, SR)
    assert np.all(((inv > 0) == (ref > 0)) | (np.abs(ref) < 5e-5))


def test_inverted_bank_is_fine_at_high_frequencies():
    n_fft, n_mels = 1024, 128
    fb = mel_filterbank(n_fft, n_mels, SR, False).numpy().astype(np.float64)
    inv = mel_filterbank(n_fft, n_mels, SR, True).numpy().astype(np.float64)
    bw, bw_inv = _bandwidths_hz(fb, SR, n_fft), _bandwidths_hz(inv, SR, n_fft)
    # Mirror property: filter i of the inverted bank is as wide as filter n_mels-1-i of the normal one.
    np.testing.assert_allclose(bw_inv, bw[::-1], atol=1e-9)
    # Filters still run from low to high frequency.
    c_inv = _centres_hz(inv, SR, n_fft)
    assert np.all(np.diff(c_inv) >= 0) and c_inv[0] < c_inv[-1]
    # Normal bank: narrow at low, wide at high. Inverted: the opposite.
    assert bw[-1] > 10 * bw[0]
    assert bw_inv[0] > 10 * bw_inv[-1]
    # Non-increasing widths up to one FFT bin of quantisation.
    assert np.all(np.diff(bw_inv) <= SR / n_fft + 1e-9)
    # Resolution: more inverted filters centred above 4 kHz than below, and vice versa.
    assert (c_inv > SR / 4).sum() > 2 * (c_inv < SR / 4).sum()
    c = _centres_hz(fb, SR, n_fft)
    assert (c < SR / 4).sum() > 2 * (c > SR / 4).sum()


def test_power_spectrogram_matches_numpy():
    x = np.random.default_rng(4).normal(size=5000)
    got = power_spectrogram(torch.from_numpy(x), 256, 128).numpy()
    ref = _ref_power_stft(x, 256, 128)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["inverted_logmel", "logmel"])
def test_log_mel_matches_numpy_on_random_audio(kind):
    cfg = FeatureConfig(kind=kind)
    x = np.random.default_rng(5).normal(scale=0.1, size=SR * 2).astype(np.float32)
    ref = _ref_log_mel(x.astype(np.float64), cfg)
    got = log_mel(torch.from_numpy(x), cfg).numpy()
    assert got.shape == ref.shape == (cfg.n_mels, cfg.num_frames(len(x)))
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # float64 input: the STFT is exact, only the float32 filterbank weights remain.
    got64 = log_mel(torch.from_numpy(x.astype(np.float64)), cfg).numpy()
    np.testing.assert_allclose(got64, ref, atol=5e-4, rtol=0)


def test_spectrum_kind_is_the_db_power_spectrogram_on_linear_bins():
    """``features.kind=spectrum``: 10 log10 of numpy's |STFT|^2, n_fft // 2 + 1 rows, n_mels unused."""
    cfg = FeatureConfig(kind="spectrum", n_fft=256, hop_length=128, n_mels=7)
    x = np.random.default_rng(6).normal(scale=0.1, size=4000)
    got = log_mel(torch.from_numpy(x), cfg).numpy()
    ref = 10 * np.log10(np.maximum(_ref_power_stft(x, 256, 128), cfg.log_floor))
    assert cfg.n_bins == 129 and got.shape == ref.shape == (129, cfg.num_frames(len(x)))
    np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)
    assert FeatureConfig(kind="logmel", n_mels=7).n_bins == 7


def test_log_mel_floor_applies():
    cfg = FeatureConfig(n_fft=256, hop_length=128, n_mels=16, log_floor=1e-6)
    got = log_mel(torch.zeros(2000), cfg)
    assert torch.allclose(got, torch.full_like(got, -60.0))


def test_log_mel_real_clip_matches_numpy(real_audio_dir):
    path = sorted(real_audio_dir.glob("*normal*.wav"))[0]
    _, ref_int = wavfile.read(path)
    x = ref_int.astype(np.float64) / 32768.0
    wave, _ = load_audio(path)
    for kind in ("inverted_logmel", "logmel"):
        cfg = FeatureConfig(kind=kind)
        ref = _ref_log_mel(x, cfg)
        got = log_mel(wave, cfg).numpy()
        assert got.shape == (128, 313) == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


def test_log_mel_kinds_differ_and_batch_matches_single():
    x = torch.from_numpy(np.random.default_rng(6).normal(size=(3, 4000)))
    cfg_i, cfg_l = FeatureConfig(kind="inverted_logmel"), FeatureConfig(kind="logmel")
    a, b = log_mel(x, cfg_i), log_mel(x, cfg_l)
    assert a.shape == b.shape == (3, 128, cfg_i.num_frames(4000))
    assert (a - b).abs().max() > 1.0
    for i in range(3):
        torch.testing.assert_close(log_mel(x[i], cfg_i), a[i], rtol=0, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_mel_on_cuda_matches_cpu():
    x = torch.randn(2, 8000, generator=torch.Generator().manual_seed(7))
    cfg = FeatureConfig()
    got = log_mel(x.cuda(), cfg)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), log_mel(x, cfg), rtol=0, atol=1e-3)


@pytest.mark.parametrize("n", [1024, 4000, 4096, 16000, 160000])
@pytest.mark.parametrize("hop", [512, 160])
def test_frame_count(n, hop):
    cfg = FeatureConfig(n_fft=1024, hop_length=hop, n_mels=8)
    assert cfg.num_frames(n) == 1 + n // hop
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert log_mel(x, cfg).shape == (8, 1 + n // hop)


def test_feature_config_version():
    base = FeatureConfig()
    assert base.version == FeatureConfig().version
    assert isinstance(base.version, str) and len(base.version) >= 8
    changes = {
        "kind": "logmel", "sample_rate": 22050, "n_fft": 2048, "hop_length": 256, "n_mels": 64,
        "log_floor": 1e-8, "resample": "reject", "channels": "reject", "min_frames": 32,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(FeatureConfig)}
    versions = {base.version}
    for field, value in changes.items():
        changed = dataclasses.replace(base, **{field: value})
        assert changed.version != base.version, field
        assert changed.version == dataclasses.replace(base, **{field: value}).version
        versions.add(changed.version)
    assert len(versions) == len(changes) + 1


def test_feature_config_rejects_unknown_kind():
    with pytest.raises(ValueError):
        FeatureConfig(kind="mfcc")
