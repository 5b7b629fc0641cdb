"""The AE baseline against independent numpy computations of the official DCASE 2022 Task 2 recipe:
librosa's log-Mel (Slaney scale and area normalisation, zero-padded centred STFT), the 5-frame
vectors, the dense autoencoder's inference pass, the clip score (mean squared error over the
clip's vectors) and Keras' validation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from asd.audio import load_audio
from asd.baseline_ae import (AEConfig, DenseAutoencoder, clip_scores, frame_vectors, reconstruction_error,
                             validation_split)
from asd.features import FeatureConfig, log_mel, mel_filterbank

SR = 16000


# ============================================================================= numpy references

def _slaney_hz_to_mel(f):
    """Slaney's Mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3.0)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / logstep, linear)


def _slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3.0)


def _ref_slaney_bank(n_fft, n_mels, sr):
    """librosa.filters.mel(sr, n_fft, n_mels) transposed: [n_freqs, n_mels], filter m spanning
    Mel points m..m+2, scaled by 2 / (f_{m+2} - f_m) (Slaney area normalisation)."""
    n_freqs = n_fft // 2 + 1
    bin_hz = np.linspace(0.0, sr / 2, n_freqs)
    edges = _slaney_mel_to_hz(np.linspace(_slaney_hz_to_mel(0.0), _slaney_hz_to_mel(sr / 2), n_mels + 2))
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, centre, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bin_hz):
            fb[k, m] = max(0.0, min((f - lo) / (centre - lo), (hi - f) / (hi - centre))) * 2.0 / (hi - lo)
    return fb


def _ref_librosa_log_mel(x, n_fft=1024, hop=512, n_mels=128, sr=SR, floor=1e-10):
    """10 log10(max(mel power, floor)); centred frames zero-padded (librosa >= 0.9), periodic Hann."""
    x = np.asarray(x, dtype=np.float64)
    padded = np.pad(x, n_fft // 2, mode="constant")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[t * hop: t * hop + n_fft] * window for t in range(n_frames)])
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).T
    return 10.0 * np.log10(np.maximum(_ref_slaney_bank(n_fft, n_mels, sr).T @ power, floor))


def _ref_vectors(logmel, frames):
    """The official file_to_vectors: vector t is frames t..t+frames-1 concatenated, frame-major."""
    n_mels, n_total = logmel.shape
    n = n_total - frames + 1
    out = np.zeros((n, n_mels * frames))
    for t in range(n):
        for k in range(frames):
            for b in range(n_mels):
                out[t, k * n_mels + b] = logmel[b, t + k]
    return out


def _ref_ae_forward(model: DenseAutoencoder, x):
    """Inference pass from the state dict: Dense -> BatchNorm (running statistics) -> ReLU, x9,
    then the output Dense."""
    h = np.asarray(x, dtype=np.float64)
    layers = list(model.net)
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        elif isinstance(layer, torch.nn.BatchNorm1d):
            mean, var = layer.running_mean.double().numpy(), layer.running_var.double().numpy()
            gamma, beta = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
            h = (h - mean) / np.sqrt(var + 1e-3) * gamma + beta
        elif isinstance(layer, torch.nn.ReLU):
            h = np.maximum(h, 0.0)
        else:
            raise AssertionError(f"unexpected layer {i}: {layer}")
    return h


# ============================================================================= front end

@pytest.mark.parametrize("n_fft, n_mels", [(1024, 128), (512, 40)])
def test_slaney_filterbank_matches_numpy(n_fft, n_mels):
    fb = mel_filterbank(n_fft, n_mels, SR, False, "slaney").double().numpy()
    ref = _ref_slaney_bank(n_fft, n_mels, SR)
    # torchaudio builds the bank in float32
    np.testing.assert_allclose(fb, ref, rtol=1e-4, atol=1e-7)
    # Slaney area normalisation: peaks of 2 / (filter width in Hz), far below the HTK bank's ~1
    assert np.all(fb.max(axis=0) < 0.1) and mel_filterbank(n_fft, n_mels, SR, False).max() > 0.9
    with pytest.raises(ValueError, match="scale"):
        mel_filterbank(n_fft, n_mels, SR, False, "mfcc")


def test_slaney_scale_is_linear_below_1khz():
    assert _slaney_hz_to_mel(1000.0) == pytest.approx(15.0)
    np.testing.assert_allclose(_slaney_mel_to_hz(_slaney_hz_to_mel([0.0, 500.0, 999.0, 1000.0, 4000.0, 8000.0])),
                               [0.0, 500.0, 999.0, 1000.0, 4000.0, 8000.0], rtol=1e-12, atol=1e-9)


def test_librosa_log_mel_matches_numpy():
    x = np.random.default_rng(3).normal(scale=0.1, size=SR)
    cfg = FeatureConfig(kind="librosa_logmel")
    got = log_mel(torch.from_numpy(x), cfg).numpy()
    ref = _ref_librosa_log_mel(x)
    assert got.shape == ref.shape == (128, cfg.num_frames(SR))
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # only the zero padding and the Slaney bank differ from the HTK `logmel` kind: the first and
    # last frames differ from reflect padding, and the levels by the area normalisation
    htk = log_mel(torch.from_numpy(x), FeatureConfig(kind="logmel")).numpy()
    assert np.abs(got - htk).mean() > 5.0
    assert FeatureConfig(kind="librosa_logmel").version != FeatureConfig(kind="logmel").version


def test_librosa_log_mel_real_clip_matches_numpy(real_audio_dir):
    path = sorted(real_audio_dir.glob("*normal*.wav"))[0]
    _, ref_int = wavfile.read(path)
    x = ref_int.astype(np.float64) / 32768.0  # what librosa.load returns for 16-bit PCM
    wave, _ = load_audio(path)
    got = log_mel(wave, FeatureConfig(kind="librosa_logmel")).numpy()
    ref = _ref_librosa_log_mel(x)
    assert got.shape == (128, 313) == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


# ============================================================================= vectors, model, score

def test_frame_vectors_match_the_official_loop():
    logmel = torch.randn(7, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for frames in (1, 3, 5):
        got = frame_vectors(logmel, frames).numpy()
        np.testing.assert_array_equal(got, _ref_vectors(logmel.numpy(), frames))
        assert got.shape == (12 - frames + 1, 7 * frames)


def test_clip_score_is_the_mean_squared_error_of_an_independent_forward_pass():
    torch.manual_seed(0)
    cfg = AEConfig(n_mels=16, frames=5, hidden=32, bottleneck=4)
    model = DenseAutoencoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    clips = [torch.randn(16, n, generator=torch.Generator().manual_seed(n)) * 3 - 20 for n in (30, 41, 9)]
    train = torch.cat([frame_vectors(c, 5) for c in clips])
    model.train()
    for _ in range(30):  # non-trivial weights and batch-norm running statistics
        loss = reconstruction_error(model, train).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = clip_scores(model, clips, 5).numpy()
    assert not model.training
    for c, score in zip(clips, got):
        x = _ref_vectors(c.double().numpy(), 5)
        want = np.mean(np.square(x - _ref_ae_forward(model, x)))  # 01_test.py: mean over vectors and bins
        assert score == pytest.approx(want, rel=1e-5)


def test_clip_score_hand_computed_with_a_frame_swapping_model():
    """Clip score = mean over the clip's frame-major vectors of the per-vector mean squared error,
    by hand: a model that swaps the two frames of each 2-frame vector."""
    swap = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        swap.weight.copy_(torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]],
                                       dtype=torch.float32))
    clip = torch.tensor([[1.0, 3.0, 6.0], [0.0, 0.0, 2.0]])  # [n_mels=2, 3 frames]
    # vectors [1, 0, 3, 0] and [3, 0, 6, 2]; errors (4 + 4) / 4 = 2 and (9 + 4 + 9 + 4) / 4 = 6.5
    assert clip_scores(swap, [clip, torch.tensor([[5.0, 5.0], [1.0, 1.0]])], 2).tolist() == [4.25, 0.0]


def test_autoencoder_is_initialised_as_keras():
    model = DenseAutoencoder()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(640, 128), (128, 128), (128, 128), (128, 128), (128, 8), (8, 128), (128, 128), (128, 128),
         (128, 128), (128, 640)])
    assert len(norms) == 9 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
        limit = (6.0 / (m.in_features + m.out_features)) ** 0.5  # Glorot uniform
        assert m.weight.abs().max() <= limit and m.weight.abs().max() > 0.9 * limit


# ============================================================================= Keras validation split

def test_validation_split_holds_out_the_last_vectors_in_file_order():
    # 3 sections x (8 source + 2 target) equal-length clips in name order, 309 vectors each:
    # Keras splits at int(0.9 * 9270) = 8343 = 27 clips; the last section's last source clip and
    # both its target clips are never trained on
    n = [309] * 30
    got = validation_split(n, 0.1)
    assert got == [309] * 27 + [0, 0, 0]
    # a split inside a clip keeps that clip's leading vectors
    got = validation_split([100] * 10, 0.15)
    assert got == [100] * 8 + [50, 0]
    assert validation_split(n, 0.0) == n
    # unequal lengths: a running split over the concatenation
    assert validation_split([10, 5, 5], 0.25) == [10, 5, 0]
    assert validation_split([10, 5, 5], 0.5) == [10, 0, 0]
    assert validation_split([4, 4], 0.3) == [4, 1]  # int(8 * 0.7) = 5
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            validation_split(n, bad)


# ============================================================================= the pipeline

@pytest.mark.slow
def test_run_pipeline_with_the_ae_method(tmp_path, ray_session):
    """`asd run` on the tiny preset with the official front end: validation losses logged, one
    gamma threshold per machine type (a single cut of each machine's scores)."""
    import pandas as pd

    from pipelines.config import load_config
    from pipelines.operations.run import run_pipeline

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                               "method=ae", "features.kind=librosa_logmel", "mlflow.experiment=asd-ae-test"])
    summary = run_pipeline(cfg)
    assert set(summary["stages"]) == {"extract", "ae", "score"}
    assert 0.0 <= summary["stages"]["score"]["official_score"] <= 1.0
    history = pd.read_csv(tmp_path / "run" / "models" / "ae" / "history.csv")
    assert len(history) == cfg.ae.epochs
    assert {"loss/fan", "val_loss/fan", "loss/valve", "val_loss/valve"} <= set(history.columns)
    assert (history["val_loss/fan"] > 0).all()
    scores = pd.read_csv(tmp_path / "run" / "scoring" / "scores.csv")
    for _, rows in scores.groupby("machine"):
        flagged, passed = rows[rows["decision"] == 1]["score"], rows[rows["decision"] == 0]["score"]
        assert flagged.empty or passed.empty or passed.max() < flagged.min()


def _ae_tables(cfg, seed=0):
    """Train/test ClipTables of two machines x two sections, rows interleaved across machines;
    section 01 is louder (larger errors) than section 00, test clips span normal to 3x louder."""
    import pandas as pd

    from pipelines.store import ClipTable

    g = torch.Generator().manual_seed(seed)
    tables = {}
    for split, scales in (("train", [1.0] * 8), ("test", [1.0, 1.0, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0])):
        rows, feats = [], []
        for i, scale in enumerate(scales):
            for section, loud in (("00", 1.0), ("01", 2.0)):
                for machine in ("fan", "valve"):
                    feats.append(scale * loud * torch.randn(cfg.features.n_mels, 12 + i, generator=g))
                    rows.append({"machine": machine, "section": section,
                                 "path": f"{machine}/{split}/section_{section}_{i:02d}.wav"})
        tables[split] = ClipTable(pd.DataFrame(rows), feats)
    return tables["train"], tables["test"]


def test_ae_scoring_fits_one_gamma_threshold_per_machine_type(tmp_path, monkeypatch):
    """The AE detector's scoring: every clip scored by its machine's AE (independent numpy forward); one gamma
    threshold per machine type from the scores of all its training clips (every section)."""
    from scipy import stats

    from pipelines.detectors import ae
    from pipelines.detectors.ae import _ae_config, save_ae
    from pipelines.config import load_config

    cfg = load_config("tiny", ["features.n_mels=4", "model.n_mels=4", "ae.frames=3", "ae.hidden=8", "ae.bottleneck=2"])
    torch.manual_seed(0)
    models = {m: DenseAutoencoder(_ae_config(cfg)).eval() for m in ("fan", "valve")}
    save_ae(tmp_path / "ae", models, cfg, epochs=1)
    train, test = _ae_tables(cfg)
    fitted = []
    real_fit = ae.fit_gamma_threshold
    monkeypatch.setattr(ae, "fit_gamma_threshold",
                        lambda s, *a, **k: fitted.append(np.asarray(s, np.float64)) or real_fit(s, *a, **k))
    scored, _ = ae.DETECTOR.score(cfg, tmp_path / "ae", train, test)

    def ref_score(table, i):
        x = _ref_vectors(table.features[i].double().numpy(), 3)
        return np.mean(np.square(x - _ref_ae_forward(models[table.meta["machine"][i]], x)))

    q = cfg.score.threshold_quantile
    want_train = np.array([ref_score(train, i) for i in range(len(train))])
    want_test = np.array([ref_score(test, i) for i in range(len(test))])
    np.testing.assert_allclose(scored["score"].to_numpy(float), want_test, rtol=1e-5)
    assert len(fitted) == 2  # one fit per machine type, each on all its training clips
    for machine, fit_on in zip(("fan", "valve"), fitted):
        own = want_train[(train.meta["machine"] == machine).to_numpy()]
        np.testing.assert_allclose(np.sort(fit_on), np.sort(own), rtol=1e-5)
        # the 3-parameter gamma MLE is ill-conditioned (loc at the minimum): fit the job's own
        # float32 scores, just checked above, rather than the float64 reference ones
        threshold = stats.gamma.ppf(q, *stats.gamma.fit(fit_on))
        rows = (test.meta["machine"] == machine).to_numpy()
        want = (want_test[rows] > threshold).astype(int)
        assert list(scored["decision"][rows]) == list(want)
        assert 0 < want.sum() < len(want)
